"""Layer selection from activations: block influence scores against an independent computation; ratio allocation;
dropping whole blocks equals skipping them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from medquant.prune import (
    StructuredPruner,
    allocate_ratios,
    block_influence,
    influence_table,
    least_influential,
    load_pruned,
    plot_influence,
    save_pruned,
)
from medquant.testing.zoo import ZOO_BY_NAME


def test_block_influence_matches_hidden_states(tmp_path):
    e = ZOO_BY_NAME["bert"]  # BERT's hidden_states[i] / [i+1] are exactly block i's input / output
    model = e.build()
    batches = [e.inputs(model)]
    scores = block_influence(model, batches, progress=False)
    with torch.no_grad():
        hs = model(**batches[0], output_hidden_states=True).hidden_states
    for i, s in enumerate(scores):
        x, y = hs[i].reshape(-1, 128), hs[i + 1].reshape(-1, 128)
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()
        assert s["cosine"] == pytest.approx(float(1 - cos), rel=1e-4, abs=1e-6)
        w1 = wasserstein_distance(x.flatten().numpy(), y.flatten().numpy()) / float(x.flatten().std())
        assert s["wasserstein"] == pytest.approx(w1, rel=1e-3)
    table = influence_table(scores)
    assert table.count("\n") == 1 + len(scores) and "encoder.layer.1" in table
    png = plot_influence(scores, tmp_path / "scores.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_allocate_ratios_mean_and_order():
    scores = [{"block": f"b{i}", "index": i, "cosine": c, "wasserstein": 0.0}
              for i, c in enumerate([0.5, 0.1, 0.3, 0.9])]
    r = allocate_ratios(scores, 0.3, spread=0.5)
    assert np.mean(list(r.values())) == pytest.approx(0.3)
    assert r["b1"] == pytest.approx(0.45) and r["b3"] == pytest.approx(0.15)  # least / most influential
    assert r["b1"] > r["b2"] > r["b0"] > r["b3"]
    assert least_influential(scores, 2) == ["b1", "b2"]
    with pytest.raises(ValueError, match="can drop"):
        least_influential(scores, 4)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_drop_block_equals_skipping_it(tmp_path, name):
    e = ZOO_BY_NAME[name]
    model = e.build()
    inputs = e.inputs(model)
    scores = block_influence(model, [inputs], progress=False)
    drop = least_influential(scores, 1)
    blk = model.get_submodule(drop[0])
    h = blk.register_forward_hook(lambda m, a, kw, out: (a[0] if a else kw["hidden_states"]) if
                                  isinstance(out, torch.Tensor) else (a[0] if a else kw["hidden_states"],) +
                                  tuple(out[1:]), with_kwargs=True)
    with torch.no_grad():
        ref = e.output(model, inputs)
    h.remove()
    plan = StructuredPruner(drop_blocks=drop, progress=False).prune(model)
    assert plan.drop_blocks == drop
    with torch.no_grad():
        out = e.output(model, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    save_pruned(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(e.output(load_pruned(tmp_path), inputs), out)
    if name == "llama":
        gen = model.generate(inputs["input_ids"], max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


def test_layer_selected_pruning_exact():
    from medquant.testing.zoo import HEAD_DIM
    from tests.prune._reference import removed_from_plan, zeroed_copy

    e = ZOO_BY_NAME["llava"]
    model = e.build()
    inputs = e.inputs(model)
    scores = block_influence(model, [inputs], progress=False)
    ratios = allocate_ratios(scores, 0.3, spread=0.6)
    pruner = StructuredPruner(ratios, ratios, importance="activation", progress=False)
    plan = pruner.plan(model, calib=[inputs])
    with torch.no_grad():
        ref = e.output(zeroed_copy(model, removed_from_plan(plan), HEAD_DIM), inputs)
    pruner.apply(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(e.output(model, inputs), ref, rtol=1e-4, atol=1e-5)


def test_drop_decoder_block_of_encoder_decoder_updates_its_own_config_key(tmp_path):
    # BART: num_hidden_layers is an alias of encoder_layers; dropping a decoder block must change decoder_layers
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)
    model = BartForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    skip = model.model.decoder.layers[0].register_forward_hook(  # the reference: the block passes its input on
        lambda m, a, kw, out: (a[0] if a else kw["hidden_states"]) if isinstance(out, torch.Tensor) else
        (a[0] if a else kw["hidden_states"],) + tuple(out[1:]), with_kwargs=True)
    with torch.no_grad():
        ref = model(**inputs).logits
    skip.remove()
    plan = StructuredPruner(drop_blocks=["model.decoder.layers.0"], progress=False).prune(model)
    with torch.no_grad():
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (model.config.encoder_layers, model.config.decoder_layers) == (3, 1)
    assert plan.hf_config_exact is True
    model.save_pretrained(tmp_path / "hf")
    again = BartForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert (len(again.model.encoder.layers), len(again.model.decoder.layers)) == (3, 1)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, out)


def test_drop_blocks_refuses_an_index_outside_the_block_list():
    from medquant.prune import drop_blocks

    model = ZOO_BY_NAME["llama"].build()
    with pytest.raises(ValueError, match=r"'model.layers.7' is not an entry of a block list.*has 2 blocks"):
        drop_blocks(model, ["model.layers.7"])
    with pytest.raises(ValueError, match=r"'model.layers.5' is not an entry"):
        drop_blocks(model, ["model.layers.0", "model.layers.5"])
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2


# --------------------------------------------------------------------------------------- bug review (6 Dec 2026)
def _hf_reference(model, batch, keep=None):
    """(1 - mean cos, W1 / std) per block from BERT's hidden_states, over the rows ``keep`` (bool (B, T))."""
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    out = []
    for i in range(len(hs) - 1):
        x, y = hs[i], hs[i + 1]
        x, y = (x[keep], y[keep]) if keep is not None else (x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
        cos = float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())
        out.append((1 - cos, wasserstein_distance(x.flatten().numpy(), y.flatten().numpy()) / float(x.std())))
    return out


def test_block_influence_leaves_padding_out_as_activation_importance_does():
    # right-padded batch of two reports of different lengths: the padding rows are not calibration tokens
    e = ZOO_BY_NAME["bert"]
    model = e.build()
    batch = e.inputs(model)
    mask = torch.ones_like(batch["attention_mask"])
    mask[1, -5:] = 0
    batch = {**batch, "attention_mask": mask}
    ref = _hf_reference(model, batch, keep=mask.bool())
    for calib in ([batch], [(batch["input_ids"], mask)]):  # a dict, or a tuple bound to forward's parameters
        scores = block_influence(model, calib, progress=False)
        for s, (cos, w1) in zip(scores, ref):
            assert s["cosine"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
            assert s["wasserstein"] == pytest.approx(w1, rel=1e-3)


def test_block_influence_refuses_blocks_the_batches_never_run():
    # text-only batches never reach the vision tower: its blocks scored 0 and were "least influential"
    e = ZOO_BY_NAME["llava"]
    model = e.build()
    text = {k: v for k, v in e.inputs(model).items() if k != "pixel_values"}
    with pytest.raises(ValueError, match=r"never ran.*vision_tower\.encoder\.layers\.0"):
        block_influence(model, [text], scope="all", progress=False)


def test_block_influence_refuses_one_dict_batch_and_non_finite_scores():
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    with pytest.raises(TypeError, match=r"calib=\[batch\]"):
        block_influence(model, inputs, progress=False)
    with pytest.raises(ValueError, match="empty"):
        block_influence(model, [], progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1.*not finite"):
        block_influence(model, [inputs], progress=False)


def test_wasserstein_subsample_covers_every_channel(monkeypatch):
    # a strided subsample whose stride divides the hidden size reads the same few channels of every token: a block
    # that changes only the odd channels scored W1 = 0 (hidden 128, 3072 values, 768 kept -> stride 4)
    from medquant.prune import layers

    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    blk = model.model.layers[0]
    seen = {}

    def shift_odd(m, a, kw, out):  # the block passes its input on, odd channels + 1
        x = a[0] if a else kw["hidden_states"]
        seen["x"] = x.detach().reshape(-1, x.shape[-1])
        y = x.clone()
        y[..., 1::2] += 1.0
        return y if isinstance(out, torch.Tensor) else (y,) + tuple(out[1:])

    h = blk.register_forward_hook(shift_odd, with_kwargs=True)  # runs before block_influence's own hook
    try:
        monkeypatch.setattr(layers, "_MAX_VALUES", 768)
        got = block_influence(model, [inputs], progress=False)[0]["wasserstein"]
    finally:
        h.remove()
    x = seen["x"]
    y = x.clone()
    y[:, 1::2] += 1.0
    ref = wasserstein_distance(x.flatten().numpy(), y.flatten().numpy()) / float(x.flatten().std())
    assert got == pytest.approx(ref, rel=0.25)


def _scores(values):
    return [{"block": f"b{i}", "index": i, "cosine": c, "wasserstein": c} for i, c in enumerate(values)]


def test_allocate_ratios_keeps_the_mean_when_the_clip_bites():
    # spread 1: the least influential block asks for 2 x 0.5 = 1.0 > max_ratio 0.9; the 0.1 over is spread evenly
    r = allocate_ratios(_scores([0.1, 0.2, 0.3, 0.4]), 0.5, spread=1.0)
    assert np.mean(list(r.values())) == pytest.approx(0.5)
    assert r == pytest.approx({"b0": 0.9, "b1": 2 / 3 + 0.1 / 3, "b2": 1 / 3 + 0.1 / 3, "b3": 0.1 / 3})
    r = allocate_ratios(_scores([0.5, 0.1, 0.2, 0.3, 0.9, 0.4]), 0.7, spread=0.5, max_ratio=0.8)
    assert np.mean(list(r.values())) == pytest.approx(0.7)
    assert max(r.values()) <= 0.8 + 1e-12
    assert r["b1"] >= r["b2"] >= r["b3"] >= r["b5"] >= r["b0"] >= r["b4"]


def test_allocate_ratios_refuses_a_max_ratio_it_cannot_meet():
    for bad in (-0.1, 1.0, 0.2):  # negative ratios were returned; 1.0 removes a whole block; 0.2 < the mean 0.3
        with pytest.raises(ValueError, match="max_ratio"):
            allocate_ratios(_scores([0.1, 0.2, 0.3]), 0.3, max_ratio=bad)


def test_allocate_ratios_gives_tied_blocks_the_same_ratio():
    r = allocate_ratios(_scores([0.0, 0.0, 0.0]), 0.3)  # e.g. blocks that pass their input on
    assert r == pytest.approx({"b0": 0.3, "b1": 0.3, "b2": 0.3})
    r = allocate_ratios(_scores([0.2, 0.1, 0.1, 0.4]), 0.3, spread=0.5)  # b1, b2 share ranks 0 and 1
    assert r["b1"] == r["b2"] == pytest.approx(0.3 * (1 + 0.5 * 2 / 3))
    assert np.mean(list(r.values())) == pytest.approx(0.3)


def test_ranking_refuses_non_finite_scores():
    s = _scores([0.2, float("nan"), 0.1])
    with pytest.raises(ValueError, match=r"b1.*not finite"):
        allocate_ratios(s, 0.3)
    with pytest.raises(ValueError, match=r"b1.*not finite"):
        least_influential(s, 1)
