"""Training across 2 gloo processes (CPU) equals single-process training on the concatenated global batches.

One ``torch.multiprocessing.spawn`` runs every distributed case (module fixture); each test compares one case with
a single-process reference computed here on the same global batches in the same order.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from medquant.distill import Distiller
from medquant.distributed import unwrap
from medquant.fairquant.allocator import FairQuantAllocator
from medquant.fairquant.baq import BAQWrapper
from medquant.fairquant.batches import fairness_penalty
from medquant.fairquant.distributed import (
    fit_allocator_distributed,
    fit_baq_distributed,
    global_group_objective,
)
from medquant.fairquant.importance import compute_group_importance
from medquant.fairquant.qat import fq_qat
from medquant.quant.api import quantize_
from medquant.quant.config import QuantConfig
from medquant.training import train_steps
from tests.distributed._spawn import error_message, spawn_rank_results, write_rank_results

WORLD = 2
STEPS = 6
BATCH = 16  # global batch; each rank gets BATCH // WORLD samples


def _mlp(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Rank 0's half is mostly group 0 (learnable labels), rank 1's half mostly group 1 (random labels): the
    per-rank group means differ from the global ones, so a rank-local fairness penalty is a different objective."""
    g = torch.Generator().manual_seed(1)
    out = []
    half = BATCH // 2
    for _ in range(STEPS):
        x = torch.randn(BATCH, 6, generator=g)
        y = torch.randint(0, 3, (BATCH,), generator=g)
        grp = torch.cat([(torch.rand(half, generator=g) < 0.2).long(), (torch.rand(half, generator=g) < 0.8).long()])
        y = torch.where(grp == 0, (x[:, 0] > 0).long(), y)
        out.append((x, y, grp))
    return out


def _convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 3))


def _conv_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Images (2 x 4 x 4) with the labels and groups of :func:`_global_batches`."""
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(BATCH, 2, 4, 4, generator=g), y, grp) for _, y, grp in _global_batches()]


def _local(batches, r: int):
    n = BATCH // WORLD
    return [tuple(t[r * n:(r + 1) * n] for t in b) for b in batches]


def _baq(model: nn.Module) -> BAQWrapper:
    init = {n: (5,) * m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return BAQWrapper(model, init_bits=init, target_bits=3.0, lambda_bit=1.0, lambda_fair=1.0)


BAQ_FIT = {"weight_lr": 1e-2, "logit_lr": 0.05, "progress": False}
QAT_MAP = {"0": 4, "2": 3}
# per-output-channel mixed bits on the conv (rows 0-2 on rank 0's shard, 3-5 on rank 1's)
CONV_QAT_MAP = {"0": QuantConfig(8, scope="channel", channel_bits=(2, 4, 8, 4, 3, 8)), "4": 4}
QAT_FIT = {"lr": 1e-2, "lambda_fair": 1.0, "progress": False}


def _baq_state(w: BAQWrapper) -> dict[str, torch.Tensor]:
    out = {f"theta/{n}": p.theta.detach().clone() for n, p in w.params.items()}
    out.update({f"w/{i}": p.detach().clone() for i, p in enumerate(w.weights())})
    return out


class _Net(nn.Module):
    """Student / teacher for the distillation case: ``net(x=..., labels=...)`` -> logits."""

    def __init__(self, hidden: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def forward(self, x, labels=None):
        return self.body(x)


def _kd_batches(batches):
    return [{"x": x, "labels": y} for x, y, _ in batches]


def _distiller(student: nn.Module) -> Distiller:
    return Distiller(_Net(32, seed=5), student, alpha=0.5, temperature=2.0,
                     task_loss=lambda out, batch: F.cross_entropy(out, batch["labels"]))


def _one_group_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Even batches hold group 0 only, odd batches group 1 only: with 2 ranks each rank sees a single group."""
    return [(x, y, torch.full_like(g, i % 2)) for i, (x, y, g) in enumerate(_global_batches())]


def _allocator() -> FairQuantAllocator:
    return FairQuantAllocator(bits=(2, 4, 8), proportions=(0.3, 0.4, 0.3), max_batches=STEPS, progress=False)


def _worker(r: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD)
    try:
        glob = _global_batches()
        local = _local(glob, r)
        res: dict[str, dict[str, torch.Tensor]] = {}
        bits: dict[str, dict] = {}
        # BAQ, global objective (the method under test)
        w = _baq(_mlp(seed=r))  # different initial weights per rank: fit broadcasts rank 0's
        hist = fit_baq_distributed(w, local, **BAQ_FIT)
        res["baq"] = _baq_state(w)
        bits["baq"] = {"bits": w.bits(project=False), "loss": [h["loss"] for h in hist]}
        # control 1: every rank trains on its own batches
        w = _baq(_mlp())
        with pytest.warns(UserWarning, match="without distributed=True"):
            w.fit(local, **BAQ_FIT)
        res["baq_local"] = _baq_state(w)
        bits["baq_local"] = {k: list(v) for k, v in w.bits(project=False).items()}
        # control 2: gradients averaged (DDP-like) but loss and fairness penalty of the rank's own batch
        w = _baq(_mlp())
        w._global_loss = lambda losses, groups, group, world, w=w: w.loss(losses, groups)
        w.fit(local, distributed=True, **BAQ_FIT)
        res["baq_naive"] = _baq_state(w)
        # FQ-QAT on a DDP-wrapped model
        model = _mlp()
        qat = fq_qat(DDP(model), QAT_MAP, local, export=False, **QAT_FIT)
        assert qat.model is model
        res["qat"] = {k: v.clone() for k, v in model.state_dict().items()}
        bits["qat"] = {"loss": [h["loss"] for h in qat.history], "fair": [h["fair"] for h in qat.history]}
        exported = fq_qat(DDP(_mlp()), QAT_MAP, local, **QAT_FIT).model
        res["qat_export"] = {k: v.clone() for k, v in exported.state_dict().items()}
        # FQ-QAT with FSDP2: the plain model in, sharded inside fq_qat (different initial weights: rank 0's win)
        model = _mlp(seed=r)
        qat = fq_qat(model, QAT_MAP, local, export=False, fsdp=True, **QAT_FIT)
        shard = model[0].parametrizations.weight.original  # the model passed in stays sharded
        bits["qat_fsdp_shard"] = [list(shard.to_local().shape), list(shard.shape)]
        res["qat_fsdp"] = {k: v.clone() for k, v in qat.model.state_dict().items()}
        bits["qat_fsdp"] = {"loss": [h["loss"] for h in qat.history]}
        res["qat_fsdp_export"] = fq_qat(_mlp(), QAT_MAP, local, fsdp=True, **QAT_FIT).model.state_dict()
        res["qat_fsdp_conv"] = fq_qat(_convnet(seed=r), CONV_QAT_MAP, _local(_conv_batches(), r), fsdp=True,
                                      **QAT_FIT).model.state_dict()
        # BAQ with FSDP2: sharded weights, replicated bit logits
        m = _mlp(seed=r)
        w = _baq(m)
        hist = w.fit(local, distributed=True, fsdp=True, **BAQ_FIT)
        shard = m[0].parametrizations.weight.original
        bits["baq_fsdp_shard"] = [list(shard.to_local().shape), list(shard.shape)]
        bits["baq_fsdp"] = {"bits": w.bits(project=False), "loss": [h["loss"] for h in hist]}
        res["baq_fsdp_theta"] = {f"theta/{n}": p.theta.detach().clone() for n, p in w.params.items()}
        res["baq_fsdp_export"] = w.export().state_dict()
        # an already fully_shard-ed model is refused by fq_qat and BAQWrapper
        from torch.distributed.fsdp import fully_shard

        errors = []
        for call in (lambda m: fq_qat(m, QAT_MAP, local, **QAT_FIT), lambda m: _baq(m)):
            try:
                call(fully_shard(_mlp()))
            except ValueError as e:
                errors.append(str(e))
        bits["fsdp_errors"] = errors
        # Distiller with a DDP-wrapped student
        student = _Net(8, seed=3)
        d = _distiller(DDP(student))
        losses = d.fit(_kd_batches(local), lr=1e-2, progress=False)
        res["kd"] = {k: v.clone() for k, v in student.state_dict().items()}
        bits["kd"] = {"loss": losses}
        # Distiller with an FSDP2-sharded student (each rank stores half of every weight)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        student = _Net(8, seed=3)
        for layer in (student.body[0], student.body[2], student):
            fully_shard(layer, mesh=mesh)
        assert student.body[0].weight.to_local().shape == (8 // WORLD, 6)
        _distiller(student).fit(_kd_batches(local), lr=1e-2, progress=False)
        res["kd_fsdp"] = {k: v.full_tensor() for k, v in student.state_dict().items()}
        # FairQuant importance when each rank sees one group
        alloc = fit_allocator_distributed(_allocator(), _mlp(), _one_group_batches())
        bits["alloc"] = {k: list(v) for k, v in alloc.bit_map().items()}
        # a NaN loss on rank 1 only, at the second step of a DDP loop: every rank stops before that step
        res["nan_stop"], bits["nan_stop"] = _nan_stop_case(r, local)
        for k, v in res.items():
            save_file({n: t.contiguous() for n, t in v.items()}, f"{out}/{k}{r}.safetensors")
        with open(f"{out}/bits{r}.json", "w") as f:
            json.dump(bits, f)
    finally:
        dist.destroy_process_group()


def _nan_stop_case(r: int, local) -> tuple[dict[str, torch.Tensor], dict]:
    """``train_steps`` over a DDP-wrapped MLP where rank 1's second batch is NaN (rank 0's stays finite): the
    parameters each rank ends with, the error message each rank got, and the parameters after the first step alone
    (a second run with ``max_steps=1``)."""
    out: dict[str, torch.Tensor] = {}

    def run(max_steps):
        model = _mlp()
        ddp = DDP(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        data = [(x, y) for x, y, _g in local[:3]]
        if r == 1:
            data[1] = (torch.full_like(data[1][0], float("nan")), data[1][1])

        def loss_fn(batch):
            loss = F.cross_entropy(ddp(batch[0]), batch[1])
            return loss, float(loss.detach())

        try:
            train_steps(loss_fn, data, opt, list(model.parameters()), max_steps=max_steps, progress=False)
            err = None
        except FloatingPointError as e:
            err = str(e)
        return model, err

    model, err = run(None)
    out.update({f"stopped/{k}": v.detach().clone() for k, v in model.state_dict().items()})
    one, _ = run(1)
    out.update({f"one_step/{k}": v.detach().clone() for k, v in one.state_dict().items()})
    return out, {"error": err}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)

    def get(name: str, r: int):
        if name == "bits":
            return json.loads((d / f"bits{r}.json").read_text())
        return load_file(str(d / f"{name}{r}.safetensors"))
    return get


def _plain(state: dict) -> dict:
    """A state dict of a fake-quant parametrized model (``fq_qat(export=False)``) under the plain weight names."""
    return {k.replace("parametrizations.weight.original", "weight"): v for k, v in state.items()}


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_global_objective_matches_single_process_loss_and_gradient():
    """Without a process group the surrogate is the single-process loss; its gradient is that of
    mean + lambda * (max_g L_g - min_g L_g)."""
    torch.manual_seed(0)
    x = torch.randn(10, requires_grad=True)
    groups = torch.tensor([0, 0, 2, 2, 2, 3, 3, 0, 2, 3])
    sur, task, fair = global_group_objective(x.exp(), groups, lambda_fair=0.7)
    (gs,) = torch.autograd.grad(sur, x)
    ref = x.exp().mean() + 0.7 * fairness_penalty(x.exp(), groups)
    (gr,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(sur, ref)
    torch.testing.assert_close(gs, gr)
    torch.testing.assert_close(task + 0.7 * fair, ref.detach())
    # negative and huge ids: the same objective as the single-process loss (ids only name the groups)
    for ids in (groups - 3, groups * 10**12 - 5):
        sur2, task2, fair2 = global_group_objective(x.exp(), ids, lambda_fair=0.7)
        torch.testing.assert_close(torch.autograd.grad(sur2, x)[0], gr)
        torch.testing.assert_close((task2, fair2), (task, fair))
    with pytest.raises(ValueError, match="integers"):
        global_group_objective(x, groups.float())


def test_global_objective_ties_give_the_single_process_gradient():
    """Two groups tied for the largest mean loss: torch's max() splits the gradient between them; the surrogate
    must do the same (not pick one group), in value and gradient equal to the single-process loss."""
    losses = torch.tensor([1.0, 1.0, 0.2, 0.2, 0.6], requires_grad=True)
    groups = torch.tensor([4, 9, 2, 2, 7])
    sur, task, fair = global_group_objective(losses, groups, lambda_fair=1.0)
    ref = losses.mean() + fairness_penalty(losses, groups)
    (gs,) = torch.autograd.grad(sur, losses)
    (gr,) = torch.autograd.grad(ref, losses)
    # hand value: d mean = 1/5; the max (1.0) is shared by groups 4 and 9 (1/2 each), the min is group 2 (2 samples)
    torch.testing.assert_close(gr, torch.tensor([0.2 + 0.5, 0.2 + 0.5, 0.2 - 0.5, 0.2 - 0.5, 0.2]))
    torch.testing.assert_close(gs, gr)
    torch.testing.assert_close(task + fair, ref.detach())


def test_baq_two_processes_equal_single_process(ranks):
    single = _baq(_mlp())
    hist = single.fit(_global_batches(), **BAQ_FIT)
    ref = _baq_state(single)
    ref_bits = {k: list(v) for k, v in single.bits(project=False).items()}
    assert ref_bits != {k: [5] * len(v) for k, v in ref_bits.items()}  # the bits moved from the warm start
    for r in range(WORLD):
        _close(ranks("baq", r), ref)
        got = ranks("bits", r)["baq"]
        assert got["bits"] == ref_bits
        assert got["loss"] == pytest.approx([h["loss"] for h in hist], rel=1e-5)


def test_baq_controls_without_the_reduction_differ(ranks):
    single = _baq(_mlp())
    single.fit(_global_batches(), **BAQ_FIT)
    ref = _baq_state(single)
    # rank-local training: the ranks disagree with each other and with the single process
    a, b = ranks("baq_local", 0), ranks("baq_local", 1)
    assert _max_diff(a, b) > 1e-3
    assert min(_max_diff(a, ref), _max_diff(b, ref)) > 1e-3
    theta = {k: v for k, v in a.items() if k.startswith("theta/")}
    assert _max_diff(theta, {k: b[k] for k in theta}) > 1e-3
    # averaged gradients of rank-local fairness penalties: the ranks agree, but not with the global objective
    bits0, bits1 = ranks("bits", 0)["baq_local"], ranks("bits", 1)["baq_local"]
    ref_bits = {k: list(v) for k, v in single.bits(project=False).items()}
    assert bits0 != bits1 or bits0 != ref_bits
    n0, n1 = ranks("baq_naive", 0), ranks("baq_naive", 1)
    assert _max_diff(n0, n1) == 0.0
    assert _max_diff(n0, ref) > 1e-3


def test_fq_qat_ddp_equals_single_process(ranks):
    model = _mlp()
    qat = fq_qat(model, QAT_MAP, _global_batches(), export=False, **QAT_FIT)
    ref = model.state_dict()
    assert _max_diff(_plain(ref), _mlp().state_dict()) > 1e-3  # training changed the weights
    assert max(h["fair"] for h in qat.history) > 0.05  # the fairness term is active
    for r in range(WORLD):
        _close(ranks("qat", r), ref)
        got = ranks("bits", r)["qat"]
        assert got["loss"] == pytest.approx([h["loss"] for h in qat.history], rel=1e-5)
    exported = fq_qat(_mlp(), QAT_MAP, _global_batches(), **QAT_FIT).model.state_dict()
    for r in range(WORLD):
        e = ranks("qat_export", r)
        assert set(e) == set(exported)
        for k in e:  # packed codes: equal; scales: float tolerance
            if e[k].dtype.is_floating_point:
                torch.testing.assert_close(e[k], exported[k], rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(e[k], exported[k]), k


def _assert_exported_equal(e: dict, ref: dict) -> None:
    assert set(e) == set(ref)
    for k, v in e.items():  # packed codes: equal; scales, biases: float tolerance
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(v, ref[k]), k


def test_fq_qat_fsdp_equals_single_process(ranks):
    model = _mlp()
    qat = fq_qat(model, QAT_MAP, _global_batches(), export=False, **QAT_FIT)
    exported = fq_qat(_mlp(), QAT_MAP, _global_batches(), **QAT_FIT).model.state_dict()
    for r in range(WORLD):
        # each rank stored half of the 16 rows of layer 0 during training
        assert ranks("bits", r)["qat_fsdp_shard"] == [[8, 6], [16, 6]]
        _close(ranks("qat_fsdp", r), model.state_dict())
        assert ranks("bits", r)["qat_fsdp"]["loss"] == pytest.approx([h["loss"] for h in qat.history], rel=1e-5)
        _assert_exported_equal(ranks("qat_fsdp_export", r), exported)
    # Conv2d with mixed per-channel bits
    conv = fq_qat(_convnet(), CONV_QAT_MAP, _conv_batches(), **QAT_FIT).model
    assert conv[0].mixed
    untrained = _convnet()
    quantize_(untrained, CONV_QAT_MAP)
    assert _max_diff(untrained.state_dict(), conv.state_dict()) > 1e-3  # training changed the exported model
    for r in range(WORLD):
        _assert_exported_equal(ranks("qat_fsdp_conv", r), conv.state_dict())


def test_baq_fsdp_equals_single_process(ranks):
    single = _baq(_mlp())
    hist = single.fit(_global_batches(), **BAQ_FIT)
    theta = {f"theta/{n}": p.theta.detach().clone() for n, p in single.params.items()}
    ref_bits = {k: list(v) for k, v in single.bits(project=False).items()}
    exported = single.export().state_dict()
    for r in range(WORLD):
        assert ranks("bits", r)["baq_fsdp_shard"] == [[8, 6], [16, 6]]
        got = ranks("bits", r)["baq_fsdp"]
        assert got["bits"] == ref_bits
        assert got["loss"] == pytest.approx([h["loss"] for h in hist], rel=1e-5)
        _close(ranks("baq_fsdp_theta", r), theta)
        _assert_exported_equal(ranks("baq_fsdp_export", r), exported)


def test_already_sharded_model_is_refused(ranks):
    for r in range(WORLD):
        errs = ranks("bits", r)["fsdp_errors"]
        assert len(errs) == 2 and all("before sharding" in e for e in errs), errs


def test_fsdp_without_process_group_is_refused():
    with pytest.raises(RuntimeError, match="process group"):
        fq_qat(_mlp(), QAT_MAP, _global_batches()[:1], fsdp=True, **QAT_FIT)
    with pytest.raises(ValueError, match="distributed=True"):
        _baq(_mlp()).fit(_global_batches()[:1], fsdp=True, **BAQ_FIT)


def test_distiller_ddp_equals_single_process(ranks):
    student = _Net(8, seed=3)
    losses = _distiller(student).fit(_kd_batches(_global_batches()), lr=1e-2, progress=False)
    ref = student.state_dict()
    assert _max_diff(ref, _Net(8, seed=3).state_dict()) > 1e-3
    for r in range(WORLD):
        _close(ranks("kd", r), ref)
        # each rank logs its own half-batch loss; their mean is the global loss (equal halves)
    mean = [(a + b) / 2 for a, b in zip(ranks("bits", 0)["kd"]["loss"], ranks("bits", 1)["kd"]["loss"])]
    assert mean == pytest.approx(losses, rel=1e-5)
    for r in range(WORLD):  # FSDP2 fully_shard on gloo: gathered weights equal the single-process ones
        _close(ranks("kd_fsdp", r), ref)


def test_a_nan_loss_on_one_rank_stops_every_rank_before_the_step(ranks):
    # rank 1 sees the NaN loss, rank 0 only the NaN gradients DDP averaged into its own: both raise at step 2 (no
    # rank waits in a collective for the other), with the parameters of step 1, the same on both ranks
    assert "training step 2: the loss is nan" in ranks("bits", 1)["nan_stop"]["error"]
    assert "training step 2: another rank's loss is not finite" in ranks("bits", 0)["nan_stop"]["error"]
    states = [ranks("nan_stop", r) for r in range(WORLD)]
    for st in states:
        stopped = {k.removeprefix("stopped/"): v for k, v in st.items() if k.startswith("stopped/")}
        one = {k.removeprefix("one_step/"): v for k, v in st.items() if k.startswith("one_step/")}
        assert stopped.keys() == one.keys() and all(torch.equal(stopped[k], one[k]) for k in one)
        assert all(bool(torch.isfinite(v).all()) for v in stopped.values())
    assert _max_diff(states[0], states[1]) == 0.0


def test_importance_with_one_group_per_rank_equals_single_process(ranks):
    single = _allocator().fit(_mlp(), _one_group_batches())
    ref = {k: list(v) for k, v in single.bit_map().items()}
    assert len({b for v in ref.values() for b in v}) > 1
    for r in range(WORLD):
        assert ranks("bits", r)["alloc"] == ref
    # a single process that sees one group is still refused, and min_groups only takes 1 or 2
    with pytest.raises(ValueError, match="single group"):
        compute_group_importance(_mlp(), _one_group_batches()[::2], progress=False)
    with pytest.raises(ValueError, match="min_groups"):
        compute_group_importance(_mlp(), _one_group_batches(), min_groups=3, progress=False)


# ------------------------------------------------------------------ edge cases: ties, group ids, too few batches
EDGE_A, EDGE_B, EDGE_C, EDGE_D = 10**10, -4, 7, 3
# global per-sample losses and groups, rank 0's first 3 samples, rank 1's last 4: groups A and C tie for the largest
# mean (1.5), B is the smallest (0.5); rank 1 alone holds group D
EDGE_LOSSES = [2.0, 0.5, 1.0, 1.0, 2.0, 0.5, 1.0]
EDGE_GROUPS = [EDGE_A, EDGE_B, EDGE_C, EDGE_A, EDGE_C, EDGE_B, EDGE_D]
EDGE_SPLIT = 3


def _big_id_batches(batches):
    """The global batches with group ids 0 / 1 renamed to a negative and a huge id."""
    return [(x, y, torch.where(g == 0, torch.tensor(-7), torch.tensor(10**10))) for x, y, g in batches]


def _edge_worker(r: int, init_file: str, out: str) -> None:
    import datetime

    from medquant.fairquant.distributed import distributed_group_importance

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    try:
        res: dict[str, torch.Tensor] = {}
        info: dict[str, object] = {}
        sl = slice(0, EDGE_SPLIT) if r == 0 else slice(EDGE_SPLIT, None)
        losses = torch.tensor(EDGE_LOSSES[sl], requires_grad=True)
        sur, task, fair = global_group_objective(losses, torch.tensor(EDGE_GROUPS[sl]), lambda_fair=1.0)
        res["tie_grad"] = torch.autograd.grad(sur, losses)[0]
        res["tie_values"] = torch.stack([task, fair])
        model = _mlp()
        fq_qat(DDP(model), QAT_MAP, _local(_big_id_batches(_global_batches()[:2]), r), export=False, **QAT_FIT)
        res["qat_big_ids"] = {k: v.clone() for k, v in model.state_dict().items()}
        errors = {}
        one_batch = _global_batches()[:1]
        empty_share = [b if i != 1 else tuple(t[:0] for t in b) for i, b in enumerate(_global_batches()[:3])]
        for name, data in (("one_batch", one_batch), ("empty_share", empty_share)):
            errors[name] = error_message(lambda data=data: distributed_group_importance(_mlp(), data, progress=False))
        info["errors"] = errors
        flat = {"tie_grad": res["tie_grad"], "tie_values": res["tie_values"],
                **{f"qat/{k}": v for k, v in res["qat_big_ids"].items()}}
        write_rank_results(out, "edge", r, flat, info)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def edge_ranks(tmp_path_factory):
    return spawn_rank_results(_edge_worker, tmp_path_factory.mktemp("gloo_edge"), "edge", WORLD)


def test_global_objective_ties_and_ids_across_ranks_equal_single_process(edge_ranks):
    losses = torch.tensor(EDGE_LOSSES, requires_grad=True)
    groups = torch.tensor(EDGE_GROUPS)
    ref = losses.mean() + fairness_penalty(losses, groups)
    (gr,) = torch.autograd.grad(ref, losses)
    # each rank's surrogate carries the gradient of its own samples: together the single-process gradient
    got = torch.cat([edge_ranks[r][0]["tie_grad"] for r in range(WORLD)])
    torch.testing.assert_close(got, gr)
    assert float(gr[0]) == pytest.approx(1 / 7 + 1 / 2 / 2)  # A and C tie: half of the max's gradient each
    for r in range(WORLD):
        task, fair = edge_ranks[r][0]["tie_values"].tolist()
        assert task + fair == pytest.approx(float(ref.detach()))


def test_fq_qat_ddp_with_negative_and_huge_group_ids_equals_single_process(edge_ranks):
    model = _mlp()
    fq_qat(model, QAT_MAP, _big_id_batches(_global_batches()[:2]), export=False, **QAT_FIT)
    ref = model.state_dict()
    assert _max_diff(_plain(ref), _mlp().state_dict()) > 1e-4  # trained
    for r in range(WORLD):
        got = {k[len("qat/"):]: v for k, v in edge_ranks[r][0].items() if k.startswith("qat/")}
        _close(got, ref)


def test_importance_with_fewer_batches_than_ranks_raises_on_every_rank(edge_ranks):
    errs = [edge_ranks[r][1]["errors"] for r in range(WORLD)]
    assert errs[0] == errs[1]  # the same error on every rank (none waits in a collective)
    assert errs[0]["one_batch"].startswith("ValueError: fewer calibration batches with samples than processes")
    assert "rank(s) [1] of 2" in errs[0]["one_batch"]
    # 3 batches, the second empty: rank 0 holds batches 0 and 2 (2 x 16 samples), rank 1 only the empty one
    assert "batches per rank [2, 1], samples per rank [32, 0]" in errs[0]["empty_share"]


def test_baq_distributed_without_process_group_is_the_plain_fit():
    a, b = _baq(_mlp()), _baq(_mlp())
    a.fit(_global_batches()[:2], **BAQ_FIT)
    fit_baq_distributed(b, _global_batches()[:2], **BAQ_FIT)
    assert _max_diff(_baq_state(a), _baq_state(b)) == 0.0


def test_unwrap():
    m = _mlp()
    assert unwrap(m) is m
