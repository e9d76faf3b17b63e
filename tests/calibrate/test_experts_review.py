"""Review of the calibration of MoE experts stored as 3-D parameters (GPTQ, AdaRound): cases the first tests missed.

References are independent of medquant's unfolding: the routing recorded by a forward pre-hook on the float experts
module, and :meth:`QuantLinear.from_float` of each expert's ``(out, in)`` slice for the experts that must be rounded
to nearest.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from medquant import QuantConfig, QuantLinear
from medquant.calibrate import adaround_quantize_, gptq_quantize_, gptq_quantize_sequential
from medquant.quant.experts import QuantExperts, is_experts_module
from medquant.testing.zoo_moe import build_moe, moe_inputs

CFG = QuantConfig(4, group_size=16)


def _experts(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_experts_module(m)}


def _rtn(float_experts: nn.Module, key: str, e: int) -> torch.Tensor:
    """Round-to-nearest dequantized weight of expert ``e``'s ``key`` projection (``gate_up`` / ``down``)."""
    w, b = QuantExperts.expert_weights(float_experts)["gate_up_proj" if key == "gate_up" else "down_proj"][e]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    lin.weight = nn.Parameter(w.clone())
    if b is not None:
        lin.bias = nn.Parameter(b.clone())
    return QuantLinear.from_float(lin, CFG).dequantized_weight()


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "sequential"])
def test_dense_llama4_experts_no_token_reaches_are_rounded_to_nearest_not_zeroed(sequential):
    """Llama 4's experts run densely: every expert receives every token, the ones the router did not pick scaled by
    a score of exactly 0. Those zero rows are not the expert's calibration data: an expert no token is routed to
    had an all-zero Hessian, every input column counted dead, and GPTQ set all its weights to 0 (silently). It must
    be rounded to nearest and reported like a routed-style expert no token reaches; a reached expert counts the
    tokens routed to it only."""
    model = build_moe("llama4_text")  # 4 experts, top-1: one token reaches one expert per layer
    float_experts = {n: copy.deepcopy(m) for n, m in _experts(model).items()}
    one = {"input_ids": torch.tensor([[17]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    run = (lambda: gptq_quantize_sequential(model, CFG, [one], skip=["@head"], device="cpu", progress=False)) \
        if sequential else (lambda: gptq_quantize_(model, CFG, [one], skip=["@head"], progress=False))
    with pytest.warns(UserWarning, match=r"12 MoE expert layer\(s\) received no calibration token"):
        recs = run()
    for parent, f in float_experts.items():
        methods = []
        for e in range(4):
            for key in ("gate_up", "down"):
                rec = recs[f"{parent}.{key}.{e}"]
                methods.append(rec["method"])
                if rec["method"] == "rtn":
                    assert rec["rows"] == 0
                    assert torch.equal(model.get_submodule(f"{parent}.{key}.{e}").dequantized_weight(),
                                       _rtn(f, key, e))
                else:
                    assert rec["rows"] == 1  # the one token routed to it, not the 1 x 4 rows of the dense input
        assert methods.count("gptq") == 2 and methods.count("rtn") == 6


def test_adaround_expert_reached_only_by_padding_is_rounded_to_nearest():
    """An expert that only padding positions are routed to has no calibration row: GPTQ rounds it to nearest; learned
    rounding failed with 'learned rounding diverged (reconstruction error nan)' (a mean over zero rows)."""
    model = build_moe("mixtral")
    float_experts = {n: copy.deepcopy(m) for n, m in _experts(model).items()}
    batch = moe_inputs(batch=2, length=8, seed=0)
    batch["attention_mask"][:, 1:] = 0  # one real token per sample
    idx: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, a, k, n=n: idx.update({n: a[1] if len(a) > 1 else k["top_k_index"]}), with_kwargs=True)
        for n, m in model.named_modules() if is_experts_module(m)]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    keep = batch["attention_mask"].reshape(-1).bool()
    padding_only = [(n, e) for n, i in idx.items() for e in range(4)
                    if (i == e).any() and not keep[torch.where(i == e)[0]].any()]
    assert padding_only  # the case under test: routed to, but by padding positions only
    with pytest.warns(UserWarning, match=r"MoE expert layer\(s\) received no calibration token"):
        recs = adaround_quantize_(model, CFG, [batch], skip=["@head"], iters=10, progress=False)
    for parent, e in padding_only:
        for key in ("gate_up", "down"):
            name = f"{parent}.{key}.{e}"
            assert recs[name]["method"] == "rtn" and recs[name]["rows"] == 0, name
            assert torch.equal(model.get_submodule(name).dequantized_weight(), _rtn(float_experts[parent], key, e))
    assert any(r["method"] == "adaround" for n, r in recs.items() if ".experts." in n)


def test_block_by_block_gptq_keeps_the_train_eval_mode_of_each_quantized_layer():
    """The calibration runs in eval mode; every quantized layer (an experts module and its expert layers too) must
    get back the mode its float layer had, as whole-model GPTQ and round-to-nearest ``quantize_sequential`` do;
    block-by-block GPTQ left them all in eval mode."""
    model = build_moe("mixtral")
    model.train()
    model.model.layers[1].eval()  # one block in eval mode: it stays so
    want = {n: m.training for n, m in model.named_modules()}
    whole = copy.deepcopy(model)
    batch = moe_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gptq_quantize_sequential(model, CFG, [batch], skip=["@head"], device="cpu", progress=False)
        gptq_quantize_(whole, CFG, [batch], skip=["@head"], progress=False)
    got = {n: m.training for n, m in model.named_modules()}
    assert got == {n: m.training for n, m in whole.named_modules()}
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    for n, m in model.named_modules():  # a new expert layer takes its experts module's mode
        assert got[n] == want[n if n in want else n.rsplit(".", 2)[0]], n


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "sequential"])
def test_a_hessian_memory_budget_holds_with_group_labels(sequential, monkeypatch):
    """``max_hessian_bytes`` counts ``K^2`` float64 per layer times the number of group labels (each group has its
    own sums): with two labels per batch a capture pass held twice the budget."""
    from medquant.calibrate import gptq as gptq_mod

    model = build_moe("mixtral")
    batches = [moe_inputs(seed=0), moe_inputs(seed=1)]
    groups = [["a", "b"], ["b", "a"]]
    budget = 64 * 64 * 8 * 3  # three Hessian sums of K = 64
    held: list[int] = []
    name = "_capture_block" if sequential else "_capture"
    real = getattr(gptq_mod, name)

    def spy(root, *args, **kwargs):
        out = real(root, *args, **kwargs)
        accs = args[1] if sequential else out
        held.append(sum(s.numel() * s.element_size() for a in accs.values() for s in a.sums.values()))
        return out

    monkeypatch.setattr(gptq_mod, name, spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if sequential:
            gptq_quantize_sequential(model, CFG, batches, skip=["@head"], device="cpu", groups=groups,
                                     max_hessian_bytes=budget, progress=False)
        else:
            gptq_quantize_(model, CFG, batches, skip=["@head"], groups=groups, max_hessian_bytes=budget,
                           progress=False)
    assert held and max(held) <= budget


def _two_images_of_different_sizes() -> tuple[nn.Module, dict]:
    """A tiny Qwen2-VL and one batch of two samples, a 4 x 4 and a 2 x 4 patch image: the vision tower's layers
    read the 24 patches of both images as one ``(24, K)`` input, 16 of sample 0 then 8 of sample 1."""
    from medquant.testing import zoo

    model = zoo.ZOO_BY_NAME["qwen2_vl"].build_fn()
    vc = model.config.vision_config
    p, tp, m = vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size
    grids = [(1, 4, 4), (1, 2, 4)]
    rows = [[zoo.BOS_ID, zoo.VISION_START] + [zoo.IMAGE_TOKEN] * (t * h * w // (m * m)) + [zoo.VISION_END, 5, 6, 7, 8]
            for t, h, w in grids]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [zoo.PAD_ID] * (width - len(r)) for r in rows])
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": ids, "attention_mask": (ids != zoo.PAD_ID).long(),
             "pixel_values": torch.randn(sum(t * h * w for t, h, w in grids), 3 * tp * p * p, generator=gen),
             "image_grid_thw": torch.tensor(grids), "mm_token_type_ids": (ids == zoo.IMAGE_TOKEN).int()}
    return model, batch


def test_per_sample_labels_are_not_spread_evenly_over_rows_that_are_not_the_batch_tokens():
    """Per-sample group labels follow tokens flattened sample by sample (``(batch * tokens, K)``, an MoE block's
    shared expert); any other 2-D input whose row count the number of labels divides was cut into equal runs too,
    so a vision tower's patches of two images of different sizes (16 and 8) were labelled 12 / 12, silently. Such
    an input is refused, as before the change, naming the layer and saying to give one label per batch."""
    model, batch = _two_images_of_different_sizes()
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"visual\.blocks\.0\..*per-sample group labels"):
        warnings.simplefilter("ignore")
        gptq_quantize_(model, CFG, [batch], groups=[["a", "b"]], progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "sequential"])
def test_per_sample_labels_are_not_spread_over_image_patches_as_many_as_the_tokens_of_an_unpadded_batch(sequential):
    """The same two images (16 and 8 patches) with texts making two unpadded rows of 12 tokens: the 24 patches are
    as many as the batch's tokens, but they are no tokens (vision-tower layers never take the token count, padded
    batch or not). They were cut into 12 / 12 runs (4 of image 0's patches labelled with sample 1), silently;
    refused as for the padded batch above."""
    from medquant.testing import zoo

    model, batch = _two_images_of_different_sizes()
    ids = batch["input_ids"]
    rows = [[t for t in r if t != zoo.PAD_ID] for r in ids.tolist()]
    rows = [r + list(range(20, 20 + 12 - len(r))) for r in rows]
    ids = torch.tensor(rows)
    batch.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == zoo.IMAGE_TOKEN).int())
    assert ids.numel() == batch["pixel_values"].shape[0] == 24
    before = copy.deepcopy(model.state_dict())
    run = gptq_quantize_sequential if sequential else gptq_quantize_
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"visual\.blocks\.0\..*per-sample group labels"):
        warnings.simplefilter("ignore")
        run(model, CFG, [batch], groups=[["a", "b"]], skip=["@head", r"re:model\.visual\.merger\..*"],
            progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_adaround_rounds_dense_llama4_experts_no_token_reaches_to_nearest():
    """Learned rounding on Llama 4's dense experts: an expert no token is routed to (only zero rows) is rounded to
    nearest and reported, like GPTQ's; its calls are counted as they are captured (on the routed rows)."""
    model = build_moe("llama4_text")
    float_experts = {n: copy.deepcopy(m) for n, m in _experts(model).items()}
    one = {"input_ids": torch.tensor([[17]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    with pytest.warns(UserWarning, match=r"12 MoE expert layer\(s\) received no calibration token"):
        recs = adaround_quantize_(model, CFG, [one], skip=["@head"], iters=5, progress=False)
    for parent, f in float_experts.items():
        methods = [recs[f"{parent}.{key}.{e}"]["method"] for e in range(4) for key in ("gate_up", "down")]
        assert methods.count("adaround") == 2 and methods.count("rtn") == 6
        for e in range(4):
            for key in ("gate_up", "down"):
                if recs[f"{parent}.{key}.{e}"]["method"] == "rtn":
                    assert torch.equal(model.get_submodule(f"{parent}.{key}.{e}").dequantized_weight(),
                                       _rtn(f, key, e))


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "sequential"])
def test_per_row_bit_widths_on_an_experts_module_are_refused_as_quantize_refuses_them(sequential):
    """``channel_bits`` gives one bit-width per output row of one matrix; an experts module holds 2E matrices with
    two row counts (gate_up 2I, down H). ``quantize_`` refuses it; GPTQ gave the one list to every expert layer
    (accepted only where 2I == H). Refused before anything changes, with quantize_'s reason."""
    from medquant.quant import ConfigMap

    model = build_moe("mixtral")
    name = next(iter(_experts(model)))
    rows = QuantExperts.expert_weights(model.get_submodule(name))["down_proj"][0][0].shape[0]
    cmap = ConfigMap({name: QuantConfig(4, group_size=16, channel_bits=[4] * rows), "_default": CFG})
    before = copy.deepcopy(model.state_dict())
    fn = gptq_quantize_sequential if sequential else gptq_quantize_
    with pytest.raises(ValueError, match=rf"{name}.*channel_bits.*not supported for MoE experts"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(model, cmap, [moe_inputs()])
    assert not any(isinstance(m, (QuantExperts, QuantLinear)) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
