"""Block-by-block calibration when the model changes the hidden states between two blocks of one stack.

Qwen3-VL adds a deepstack image feature to the hidden states after each of its first text layers; IDEFICS runs a
gated cross-attention layer before every ``cross_layer_interval``-th text layer. The block after such a point
cannot be calibrated on the previous block's output: its inputs are captured again, in a pass that runs the blocks
before it quantized. References: forward pre-hooks on the finished quantized model (the inputs each block really
gets) and :func:`gptq_quantize_`, which calibrates every layer in whole-model forwards (no chaining of blocks).
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import medquant.calibrate.sequential as seq_mod
from medquant import QuantConfig
from medquant.calibrate.gptq import gptq_quantize_, gptq_quantize_sequential
from medquant.calibrate.sequential import quantize_sequential
from medquant.models import block_stacks
from medquant.testing.zoo import BATCH, IMAGE, VOCAB, ZOO_BY_NAME, _qwen_vl_inputs
from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME
from tests.tiny_idefics import idefics_inputs, tiny_idefics


def _qwen3_vl():
    model = EXTRA_ZOO_BY_NAME["qwen3_vl"].build()  # deepstack_visual_indexes [0]: a feature after text layer 0
    return model, _qwen_vl_inputs(model, torch.Generator().manual_seed(0))


def _idefics():
    return tiny_idefics(layers=4, interval=2), idefics_inputs()  # cross-attention before text layers 0 and 2


def _mllama():
    """Mllama's vision blocks are one stack, the local transformer's then the global transformer's; between them
    the model normalises, adds tile position embeddings and reshapes."""
    model = EXTRA_ZOO_BY_NAME["mllama"].build()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (BATCH, 8), generator=gen)
    ids[:, 1] = VOCAB + 1  # the image token (the zoo's image_token_index)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "pixel_values": torch.randn(BATCH, 1, 1, 3, IMAGE, IMAGE, generator=gen),
                   "aspect_ratio_ids": torch.ones(BATCH, 1, dtype=torch.long),
                   "aspect_ratio_mask": torch.ones(BATCH, 1, 1, dtype=torch.long),
                   "cross_attention_mask": torch.ones(BATCH, 8, 1, 1, dtype=torch.long), "use_cache": False}


MODELS = {"qwen3_vl": _qwen3_vl, "idefics": _idefics, "mllama": _mllama}


@pytest.fixture
def captures(monkeypatch):
    """The block groups of every recording pass ``quantize_sequential`` makes (its ``_capture``, wrapped)."""
    calls: list[list[str]] = []
    real = seq_mod._capture

    def record(model, group, *args):
        calls.append(list(group))
        return real(model, group, *args)
    monkeypatch.setattr(seq_mod, "_capture", record)
    return calls


def _block_inputs(model, names, inputs):
    """Each block's hidden-state input and output in one forward of ``model`` (hooks)."""
    got: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for n in names:
        def pre(mod, args, kwargs, n=n):
            got.setdefault(n, []).append(args[0] if args else kwargs["hidden_states"])

        def post(mod, args, kwargs, out, n=n):
            got[n].append(out[0] if isinstance(out, tuple) else out)
        hooks.append(model.get_submodule(n).register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(model.get_submodule(n).register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return got


@pytest.mark.parametrize("name", list(MODELS))
def test_each_block_is_calibrated_on_the_inputs_the_quantized_model_gives_it(name, captures):
    model, inputs = MODELS[name]()
    stacks = block_stacks(model)
    flow = _block_inputs(model, [n for g in stacks for n in g], inputs)
    # blocks whose input is not the previous block's output; there are some (else this test could not fail)
    changed = [b for g in stacks for a, b in itertools.pairwise(g) if not torch.equal(flow[a][1], flow[b][0])]
    assert changed

    seen: dict[str, torch.Tensor] = {}

    def per_block(block, block_inputs):
        seen[block_inputs.name] = block_inputs.hidden_states[0]

    quantize_sequential(model, QuantConfig(4, group_size=32), [inputs], device="cpu", per_block_fn=per_block)
    ref = _block_inputs(model, list(seen), inputs)
    assert set(seen) == {n for g in stacks for n in g}
    for n, h in seen.items():
        assert torch.equal(h, ref[n][0]), n
    # one capture pass per stack, and one more from each block whose input the model changed
    order = [n for g in stacks for n in g]
    assert [g[0] for g in captures] == sorted([g[0] for g in stacks] + changed, key=order.index)


def _outside_the_blocks(model):
    """The Linear / Conv2d layers outside every block: block by block they get round-to-nearest (whole-model GPTQ
    calibrates them), so they stay float where the codes of the two are compared."""
    blocks = tuple(n + "." for g in block_stacks(model) for n in g)
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.startswith(blocks)]


@pytest.mark.parametrize("name", list(MODELS))
def test_gptq_block_by_block_gives_the_codes_of_whole_model_gptq(name):
    model, inputs = MODELS[name]()
    skip = _outside_the_blocks(model)  # IDEFICS's cross-attention layers among them
    whole, seq = model, copy.deepcopy(model)
    gptq_quantize_(whole, QuantConfig(4, group_size=32), [inputs], skip=skip, progress=False)
    gptq_quantize_sequential(seq, QuantConfig(4, group_size=32), [inputs], skip=skip, device="cpu", progress=False)
    a, b = whole.state_dict(), seq.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_plain_model_with_a_module_between_its_blocks():
    """Not a transformers model: a nonlinear module runs between blocks 1 and 2 of an explicit block list."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32)) for _ in range(4))
            self.mix = nn.Sequential(nn.Linear(32, 32), nn.Tanh())

        def forward(self, x):
            for i, b in enumerate(self.blocks):
                x = torch.relu(b(x))
                if i == 1:
                    x = x + self.mix(x)
            return x

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(16, 32)
    seen = {}
    quantize_sequential(net, QuantConfig(4, group_size=32), [{"x": x}], device="cpu",
                        blocks=[f"blocks.{i}" for i in range(4)],
                        per_block_fn=lambda b, bi: seen.setdefault(bi.name, bi.hidden_states[0]))
    ref = _block_inputs(net, list(seen), {"x": x})
    assert all(torch.equal(seen[n], ref[n][0]) for n in seen)


def test_a_model_without_changes_between_blocks_is_captured_once_per_stack(captures):
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    quantize_sequential(model, QuantConfig(4, group_size=32), [entry.inputs(model)], device="cpu",
                        per_block_fn=lambda b, bi: None)
    assert captures == block_stacks(model)


# ---------------------------------------------------------------------------------------------- Swin-style stages
def _swin(kind):
    import transformers

    cfg = getattr(transformers, f"{kind}Config")(image_size=32, patch_size=4, embed_dim=32, depths=[2, 2],
                                                 num_heads=[2, 4], window_size=4)
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}Model")(cfg).eval()
    return model, {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


# Swin's stages return (hidden states, reshaped hidden states, attention), which its encoder unpacks; Swin V2's
# encoder reads the downsampled sizes a stage returns: neither can run with pass-through recorders, so each stage is
# recorded in a pass that runs the stages before it.
@pytest.mark.parametrize("kind", ["Swin", "Swinv2"])
def test_swin_stages_are_calibrated_on_their_true_inputs(kind, captures):
    model, inputs = _swin(kind)
    ref_model = copy.deepcopy(model)
    seen: dict[str, torch.Tensor] = {}
    skip = ["embeddings.patch_embeddings.projection"]  # outside the stages: round-to-nearest block by block
    gptq_quantize_sequential(model, QuantConfig(4, group_size=16), [inputs], skip=skip, device="cpu",
                             progress=False)
    gptq_quantize_(ref_model, QuantConfig(4, group_size=16), [inputs], skip=skip, progress=False)
    a, b = model.state_dict(), ref_model.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    stages = ["encoder.layers.0", "encoder.layers.1"]
    assert captures == [stages, stages[:1], stages[1:]]  # the pass with recorders fails, then one stage at a time
    fresh, _ = _swin(kind)
    quantize_sequential(fresh, QuantConfig(4, group_size=16), [inputs], device="cpu",
                        per_block_fn=lambda blk, bi: seen.setdefault(bi.name, bi.hidden_states[0]))
    ref = _block_inputs(fresh, list(seen), inputs)
    assert len(seen) == 2 and all(torch.equal(seen[n], ref[n][0]) for n in seen)


def test_a_bad_batch_still_fails_with_the_models_own_error():
    model, inputs = _swin("Swinv2")
    with pytest.raises(ValueError, match=r"calibration batch 0 .*encoder\.layers\.0"):
        quantize_sequential(model, 4, [{"pixel_values": inputs["pixel_values"][:, :2]}], device="cpu",
                            per_block_fn=lambda b, bi: None)
