"""Block-by-block GPTQ (``gptq_quantize_sequential``) collects every call of every planned layer, whatever the
first calibration call of a block did, and keeps finished blocks off the compute device while later stacks are
captured.

References: plain torch (``H = 2 X^T X / n`` over the inputs a forward pre-hook sees on full forwards of the float
model) and the whole-model path :func:`gptq_quantize_`, which counts the calls of every batch before deciding how
far a capture pass may run."""
from __future__ import annotations

import copy
import types

import torch
from torch import nn

from medquant import QuantConfig
from medquant.calibrate.gptq import gptq_quantize_, gptq_quantize_sequential
from medquant.models import block_stacks
from medquant.testing.zoo import BATCH, BOS_ID, ZOO_BY_NAME

# the blocks' layers only: the layers outside the blocks (patch embedding, projector) are round-to-nearest in the
# block-by-block path and GPTQ in the whole-model one
BLOCKS = {r"re:.*\.layers\.\d+\..*": QuantConfig(4, group_size=32)}

SHORT, LONG = 6, 10  # tokens of batch 0 and batch 1; the MLPs run twice on sequences longer than 8


def _looping_llama() -> nn.Module:
    """The zoo's tiny Llama whose MLPs run a second time on long sequences (data-dependent control flow: batch 0
    calls gate/up/down once per block, batch 1 twice)."""
    model = ZOO_BY_NAME["llama"].build()

    def forward(self, x):
        y = type(self).forward(self, x)
        if x.shape[-2] > 8:
            y = type(self).forward(self, torch.tanh(y))
        return y

    for layer in model.model.layers:
        layer.mlp.forward = types.MethodType(forward, layer.mlp)  # a deep copy binds it to the copied MLP
    return model


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (SHORT, LONG):
        ids = torch.randint(4, 200, (BATCH, n), generator=g)
        ids[:, 0] = BOS_ID
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _plain_hessians(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """``2 X^T X / n`` (float64) over every input of each layer on full float forwards."""
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for n, parts in xs.items():
        x = torch.cat(parts)
        out[n] = 2 * x.T @ x / x.shape[0]
    return out


def test_a_later_call_that_runs_a_layer_more_often_than_the_first_is_collected(recorded_hessians):
    """Batch 0 calls each planned layer of a block once, batch 1 calls gate/up/down twice: every input is in the
    Hessian (rows 2*6 + 2*2*10 = 52, not 32), as plain torch collects it over full forwards, and the codes are those
    of gptq_quantize_. Before the fix the block's passes after the first stopped at the first call of its last
    planned layer, losing batch 1's second MLP call."""
    torch.manual_seed(0)
    model = _looping_llama()
    whole = copy.deepcopy(model)
    batches = _batches()
    layer0 = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
              "model.layers.0.mlp.down_proj"]
    want = _plain_hessians(copy.deepcopy(model), layer0, batches)  # block 0 sees float inputs: the embeddings

    seen = recorded_hessians  # the Hessians GPTQ factorises, by layer
    cfg = {r"re:.*\.(mlp\..*|self_attn\.q_proj)": QuantConfig(4, group_size=32)}  # q_proj: called once per batch
    recs = gptq_quantize_sequential(model, cfg, batches, device="cpu", progress=False)
    for n in layer0:  # [0]: the Hessian of the one group
        torch.testing.assert_close(seen[n][0].double(), want[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    for i in range(2):
        for n in ("gate_proj", "up_proj", "down_proj"):
            assert recs[f"model.layers.{i}.mlp.{n}"]["rows"] == BATCH * (SHORT + 2 * LONG)
        assert recs[f"model.layers.{i}.self_attn.q_proj"]["rows"] == BATCH * (SHORT + LONG)

    whole_recs = gptq_quantize_(whole, cfg, batches, progress=False)
    assert len(recs) == 8
    assert {n: r["rows"] for n, r in whole_recs.items()} == {n: r["rows"] for n, r in recs.items()}
    a, b = model.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finished_vision_blocks_are_on_the_compute_device_only_while_they_run(monkeypatch):
    """A VLM: the vision blocks are quantized first, then the language stack's inputs are captured by running
    the model, quantized vision tower included. Each finished vision block may be on the compute device only
    while it runs (peak: one block), and ends on ``offload_device``. Where a block lives is tracked through its
    ``Module.to`` moves, with ``cpu:0`` as the compute device and ``cpu`` as the offload device (equal storage on
    a CPU-only machine, distinct requests). Before the fix every finished vision block was moved to the compute
    device at once before the language capture (peak: the whole vision tower)."""
    entry = ZOO_BY_NAME["llava"]
    torch.manual_seed(0)
    model = entry.build()
    ref = copy.deepcopy(model)
    inputs = entry.inputs(model)
    vision = block_stacks(model)[0]
    assert len(vision) >= 2
    ids = {id(model.get_submodule(n)): n for n in vision}
    where: dict[str, str] = {}
    peak = [0]
    during_run: list[tuple[str, str, int]] = []
    to = nn.Module.to

    def spy(self, *args, **kwargs):
        if id(self) in ids:
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None:
                where[ids[id(self)]] = str(device)
                peak[0] = max(peak[0], sum(d == "cpu:0" for d in where.values()))
        return to(self, *args, **kwargs)

    def after(mod, args, out, name):
        if name in where:  # finished (moved at least once): the language capture runs it
            during_run.append((name, where[name], sum(d == "cpu:0" for d in where.values())))

    for n in vision:
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: after(m, a, o, n))
    monkeypatch.setattr(nn.Module, "to", spy)
    gptq_quantize_sequential(model, BLOCKS, [inputs], device="cpu:0", offload_device="cpu", progress=False)
    monkeypatch.undo()
    assert {n for n, _, _ in during_run} == set(vision)  # every finished block ran in the language capture ...
    assert all(d == "cpu:0" and on == 1 for _, d, on in during_run), during_run  # ... alone on the device
    assert peak[0] == 1
    assert all(where[n] == "cpu" for n in vision), where
    # the result is unchanged: that of the whole-model path
    gptq_quantize_(ref, BLOCKS, [inputs], progress=False)
    a, b = model.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_offload_device_gives_the_same_codes():
    """With ``offload_device=None`` the finished blocks stay on the compute device (nothing to move them); the
    codes are those of the whole-model path."""
    entry = ZOO_BY_NAME["llava"]
    torch.manual_seed(0)
    model = entry.build()
    ref = copy.deepcopy(model)
    inputs = entry.inputs(model)
    gptq_quantize_sequential(model, BLOCKS, [inputs], device="cpu", offload_device=None, progress=False)
    gptq_quantize_(ref, BLOCKS, [inputs], progress=False)
    a, b = model.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
