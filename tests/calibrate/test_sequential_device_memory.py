"""Block-by-block calibration keeps the modules outside the blocks (embeddings, norms, rotary, projector,
``lm_head``) off the compute device except while they run, and stops each capture pass at the group's last block
(the final norm and ``lm_head`` - batch x tokens x vocabulary logits - never run).

Where a tensor lives is tracked through its ``Tensor.to`` moves (``Module.to`` moves tensors with it), keyed by its
storage: ``cpu:0`` is the compute device and ``cpu`` the offload device (one storage on a CPU-only machine, distinct
requests). References: :func:`gptq_quantize_` (whole model) and :func:`medquant.quantize_` (round-to-nearest)."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_model
from torch import nn

import medquant
from medquant import QuantConfig
from medquant.calibrate import awq_quantize_sequential, quantize_sequential
from medquant.calibrate.gptq import gptq_quantize_, gptq_quantize_sequential
from medquant.models import block_stacks
from medquant.testing.zoo import ZOO_BY_NAME

BLOCKS = {r"re:.*\.layers\.\d+\..*": QuantConfig(4, group_size=32)}
DEVICE = "cpu:0"
_TO = torch.Tensor.to


class _Where:
    """The last device each storage was sent to by ``Tensor.to`` (unset: where the model was built, ``cpu``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loc: dict[int, str] = {}
        where = self

        def spy(t, *args, **kwargs):
            out = _TO(t, *args, **kwargs)
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None and out.numel():
                try:
                    where.loc[out.untyped_storage().data_ptr()] = str(device)
                except (NotImplementedError, RuntimeError):  # a tensor inside vmap (masks): no storage, no weight
                    pass
            return out

        monkeypatch.setattr(torch.Tensor, "to", spy)

    def on_device(self, module: nn.Module, recurse: bool = False) -> bool:
        ts = itertools.chain(module.parameters(recurse=recurse), module.buffers(recurse=recurse))
        return any(self.loc.get(t.untyped_storage().data_ptr()) == DEVICE for t in ts if t.numel())


def _outside(model: nn.Module) -> dict[str, nn.Module]:
    """The modules outside the blocks holding tensors of their own."""
    blocks = [n for g in block_stacks(model) for n in g]
    return {n: m for n, m in model.named_modules()
            if n and not any(n == b or n.startswith(b + ".") or b.startswith(n + ".") for b in blocks)
            and (m._parameters or m._buffers)}


def _unit(name: str, blocks: list[str]) -> str:
    """The largest module holding ``name`` and no block (moved as one: its forward may read its children's
    tensors, as SigLIP's embeddings read ``position_embedding.weight``)."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        p = ".".join(parts[:i])
        if not any(b.startswith(p + ".") for b in blocks):
            return p
    return name


def _watch(model: nn.Module, where: _Where, outside: dict[str, nn.Module], blocks: list[str]):
    """Hooks recording, at every block call, the outside modules on the device, and at the end of every outside
    module's call, whether it is on the device and which outside modules of other units (sharing none of its
    tensors) are too."""
    at_blocks: list[tuple[str, list[str]]] = []
    at_calls: list[tuple[str, bool, list[str]]] = []
    for n in blocks:
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: at_blocks.append((n, [o for o, om in outside.items() if where.on_device(om)])))
    def ids(m: nn.Module) -> set[int]:
        return {id(t) for t in itertools.chain(m.parameters(), m.buffers())}

    for n, mod in outside.items():  # registered before the call: runs before the module is sent back
        mod.register_forward_hook(lambda m, a, o, n=n: at_calls.append(  # (a tied lm_head is the embedding's weight)
            (n, where.on_device(m), [x for x, xm in outside.items() if _unit(x, blocks) != _unit(n, blocks)
                                     and not ids(xm) & ids(m) and where.on_device(xm)])))
    return at_blocks, at_calls


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda m, a, o: calls.__setitem__(0, calls[0] + 1))
    return calls


def _equal_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_vlm_outside_modules_are_on_the_device_only_while_they_run(monkeypatch):
    """LLaVA: vision embeddings (a non-leaf module with a class token of its own), layer norms, projector, text
    embeddings, rotary, final norm, lm_head. While any block runs (captures, GPTQ's block passes) none of them is
    on the compute device; each is there while it runs, with no unrelated outside module; all end on the offload
    device. The final norm and lm_head never run. The codes are those of gptq_quantize_. Before the change every
    outside module stayed on the compute device for the whole calibration."""
    entry = ZOO_BY_NAME["llava"]
    torch.manual_seed(0)
    model = entry.build()
    ref = copy.deepcopy(model)
    inputs = entry.inputs(model)
    outside = _outside(model)
    assert {"model.vision_tower.embeddings", "model.language_model.rotary_emb", "lm_head"} <= set(outside)
    blocks = [n for g in block_stacks(model) for n in g]
    where = _Where(monkeypatch)
    at_blocks, at_calls = _watch(model, where, outside, blocks)
    head_calls = _count_calls(model.lm_head)
    norm_calls = _count_calls(model.model.language_model.norm)
    gptq_quantize_sequential(model, BLOCKS, [inputs], device=DEVICE, offload_device="cpu", progress=False)
    monkeypatch.undo()

    assert {n for n, _ in at_blocks} == set(blocks)
    assert all(not on for _, on in at_blocks), [x for x in at_blocks if x[1]]
    called = {n for n, _, _ in at_calls}
    assert {"model.vision_tower.embeddings", "model.vision_tower.embeddings.patch_embedding",
            "model.multi_modal_projector.linear_1",
            "model.language_model.embed_tokens", "model.language_model.rotary_emb"} <= called
    assert all(on and not others for _, on, others in at_calls), [x for x in at_calls if not x[1] or x[2]]
    assert head_calls[0] == 0 and norm_calls[0] == 0  # the capture stops at the last block of its group
    assert not any(where.on_device(m) for m in outside.values())

    gptq_quantize_(ref, BLOCKS, [inputs], progress=False)
    _equal_state(model, ref)


def test_tied_lm_head_stays_tied_and_off_the_device(monkeypatch):
    """Gemma 3 text (lm_head.weight is embed_tokens.weight, rotary inv_freq buffers): the tie survives, the
    embedding table and the rotary buffers are off the compute device while the blocks run, lm_head never runs,
    and the codes are those of gptq_quantize_."""
    entry = ZOO_BY_NAME["gemma3_text"]
    torch.manual_seed(0)
    model = entry.build()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = copy.deepcopy(model)
    inputs = entry.inputs(model)
    outside = _outside(model)
    blocks = [n for g in block_stacks(model) for n in g]
    where = _Where(monkeypatch)
    at_blocks, _ = _watch(model, where, outside, blocks)
    head_calls = _count_calls(model.lm_head)
    gptq_quantize_sequential(model, BLOCKS, [inputs], device=DEVICE, offload_device="cpu", progress=False)
    monkeypatch.undo()

    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {n for n, _ in at_blocks} == set(blocks)
    assert all(not on for _, on in at_blocks), [x for x in at_blocks if x[1]]
    assert head_calls[0] == 0
    assert not any(where.on_device(m) for m in outside.values())
    gptq_quantize_(ref, BLOCKS, [inputs], progress=False)
    _equal_state(model, ref)


def test_awq_tied_vlm_outside_modules_off_the_device_same_result(monkeypatch):
    """AWQ block by block on the Gemma 3 VLM (tied lm_head, vision embeddings, projector, rotary): the outside
    modules are off the compute device while any block runs, lm_head never runs, the tie survives, and the result
    is that of the same call with one device for everything (nothing moved: the capture runs as before)."""
    entry = ZOO_BY_NAME["gemma3_vlm"]
    torch.manual_seed(0)
    model = entry.build()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ref = copy.deepcopy(model)
    inputs = entry.inputs(model)
    cfg = QuantConfig(4, group_size=32)
    outside = _outside(model)
    blocks = [n for g in block_stacks(model) for n in g]
    where = _Where(monkeypatch)
    at_blocks, at_calls = _watch(model, where, outside, blocks)
    head_calls = _count_calls(model.lm_head)
    awq_quantize_sequential(model, cfg, [inputs], device=DEVICE, offload_device="cpu", progress=False, grid=4)
    monkeypatch.undo()

    assert {n for n, _ in at_blocks} == set(blocks)
    assert all(not on for _, on in at_blocks), [x for x in at_blocks if x[1]]
    assert at_calls and all(on and not others for _, on, others in at_calls), [x for x in at_calls if not x[1] or x[2]]
    assert head_calls[0] == 0
    assert model.lm_head.weight is model.get_input_embeddings().weight
    awq_quantize_sequential(ref, cfg, [inputs], device="cpu", offload_device=None, progress=False, grid=4)
    _equal_state(model, ref)


@pytest.mark.parametrize("calibrate", [False, True])
@pytest.mark.parametrize("source", ["real", "meta"])
def test_quantized_tied_lm_head_leaves_the_embedding_on_the_offload_device(monkeypatch, tmp_path, source, calibrate):
    """Gemma 3 text with lm_head planned (quantized, so no longer tied) and its weights in the model or streamed
    from a checkpoint into a meta skeleton: the embedding table, moved to the device with lm_head (one parameter),
    goes back with it and every tensor ends on the offload device; with a calibration pass (a per-block function
    that changes nothing) it is off the device while the blocks run (captures: blocks 0 and 1, then block 0 on
    the calibration inputs of block 1). The result is that of medquant.quantize_."""
    entry = ZOO_BY_NAME["gemma3_text"]
    torch.manual_seed(0)
    real = entry.build()
    ref = copy.deepcopy(real)
    inputs = entry.inputs(real)
    cfg = QuantConfig(4, group_size=32)
    checkpoint = None
    if source == "meta":
        save_model(real, str(tmp_path / "float.safetensors"))
        checkpoint = tmp_path / "float.safetensors"
        with init_empty_weights():
            model = entry.build()
    else:
        model = real
        assert model.lm_head.weight is model.model.embed_tokens.weight
    blocks = [n for g in block_stacks(model) for n in g]
    where = _Where(monkeypatch)
    at_blocks, _ = _watch(model, where, _outside(model), blocks)
    kw = {"per_block_fn": lambda block, inputs: None, "calib_inputs": [inputs]} if calibrate else {}
    quantize_sequential(model, cfg, device=DEVICE, offload_device="cpu", checkpoint=checkpoint, **kw)
    embed_on = where.on_device(model.model.embed_tokens)
    anything_on = where.on_device(model, recurse=True)
    monkeypatch.undo()

    assert isinstance(model.lm_head, medquant.QuantLinear)
    assert not embed_on and not anything_on
    assert all(not on for _, on in at_blocks) and len(at_blocks) == (3 if calibrate else 0), at_blocks
    medquant.quantize_(ref, cfg)
    _equal_state(model, ref)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(h))


class _Tower(nn.Module):
    """A class token owned by the module that holds the blocks (not a leaf: its forward spans the blocks'), an
    embedding called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 32))
        self.embed = nn.Linear(8, 32)
        self.layers = nn.ModuleList([_Block() for _ in range(2)])
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x) + self.embed(x.flip(1))], 1)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def test_tensors_of_a_module_holding_blocks_stay_on_the_device_while_calibrating(monkeypatch):
    """The class token belongs to the module whose forward runs the blocks: it stays on the compute device while
    calibrating (documented) and ends on the offload device; the embedding, norm and head are off the device while
    the blocks run and the head never runs. Each block sees the inputs plain torch gives it (the quantized block 0's
    output for block 1); the result is that of medquant.quantize_."""
    torch.manual_seed(0)
    model = _Tower()
    ref = copy.deepcopy(model)
    x = torch.randn(3, 5, 8)
    cfg = {r"re:layers\.\d+\.fc": QuantConfig(4, group_size=32)}
    outside = {n: model.get_submodule(n) for n in ("embed", "norm", "head")}
    blocks = ["layers.0", "layers.1"]
    where = _Where(monkeypatch)
    at_blocks, at_calls = _watch(model, where, outside, blocks)
    head_calls = _count_calls(model.head)
    seen: dict[str, torch.Tensor] = {}
    cls_on: list[bool] = []

    def per_block(block, inputs):
        seen[inputs.name] = inputs.hidden_states[0]
        cls_on.append(where.on_device(model))

    quantize_sequential(model, cfg, {"x": x}, blocks=blocks, per_block_fn=per_block, device=DEVICE,
                        offload_device="cpu")
    monkeypatch.undo()

    assert all(not on for _, on in at_blocks) and len(at_blocks) >= 2, at_blocks
    assert [n for n, _, _ in at_calls] == ["embed", "embed"]  # called twice, on the device both times
    assert all(on and not others for _, on, others in at_calls), at_calls
    assert head_calls[0] == 0
    assert cls_on == [True, True]
    assert not where.on_device(model, recurse=True)
    medquant.quantize_(ref, cfg)
    _equal_state(model, ref)
    with torch.no_grad():
        h0 = torch.cat([ref.cls.expand(3, -1, -1), ref.embed(x) + ref.embed(x.flip(1))], 1)
        torch.testing.assert_close(seen["layers.0"], h0, rtol=0, atol=0)
        torch.testing.assert_close(seen["layers.1"], ref.layers[0](h0), rtol=0, atol=0)
