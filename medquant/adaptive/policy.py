"""Learned bit-width policy: complexity features -> level (an addition to the fixed level -> bits map of the
complexity-adaptive scheme: the level is predicted, not read off the complexity score).

Labels. For each calibration sample ``i`` and each candidate bit-width ``b`` of the bit map, ``L_b(i)`` is the
sample's loss when the whole batch runs at ``b`` activation bits; ``L_fp(i)`` its loss with float activations
(the same weight-quantized model). The label is the lowest width that stays within ``epsilon``::

    label(i) = min { b : L_b(i) <= L_fp(i) + epsilon }      (the highest width when none qualifies)

Model. ``LearnedPolicy`` standardises the five raw complexity metrics (mean / std of the fit set) and maps
them with a small MLP (5 -> hidden -> n_levels) to level logits ``g(x)``. Training minimises

    CE(g(x), label) + penalty * relu(mean_i sum_k softmax(g(x_i))_k * bits_k - budget) / max_bits

(the expected average bits under the policy's soft assignment, pushed under the budget). Decision:
``level = argmax_k g_k(x) - lam * bits_k / max_bits`` with ``lam >= 0`` found by bisection on the fit set so that
the average bits there is at most ``budget`` (``lam = 0`` when the plain argmax already fits).

The policy computes in float32 whatever the model's dtype: ``.to(device)`` moves it, a dtype cast (``.half()``,
``.to(torch.bfloat16)``, also of a quantizer it belongs to) leaves its float32 values as they are, so the decisions
stay those the budget was calibrated for. Its state (``state_dict``) loads only into a policy with the same widths
per level (the bit map it was fitted with).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import threading
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..models.runner import eval_mode
from .quantizer import DEFAULT_BIT_MAP, AdaptiveQuantizer, _check_bit_map


def policy_labels(loss_by_bits: Mapping[int, torch.Tensor], full_precision_loss: torch.Tensor,
                  epsilon: float) -> torch.Tensor:
    """Per-sample label: the lowest bit-width whose loss is within ``epsilon`` of full precision.

    ``label_i = min{b : loss_b[i] <= fp[i] + epsilon}``, the highest width when none qualifies.

    Args:
        loss_by_bits: bits -> per-sample losses ``(N,)``.
        full_precision_loss: ``(N,)`` per-sample losses with float activations.
        epsilon: tolerance (>= 0), in the loss's units.

    Returns:
        ``(N,)`` int64 bit-widths.

    Raises:
        ValueError: ``loss_by_bits`` is empty, ``epsilon`` negative or not finite, loss vectors of another shape
            than ``full_precision_loss``, or losses that are NaN or infinite.
    """
    if not loss_by_bits:
        raise ValueError("loss_by_bits is empty")
    # numbers.Real: numpy scalars too (an epsilon computed from float32 losses is a np.float32)
    if not (isinstance(epsilon, numbers.Real) and math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")
    fp = torch.as_tensor(full_precision_loss, dtype=torch.float64)
    bits = sorted(loss_by_bits)
    vectors = [torch.as_tensor(loss_by_bits[b], dtype=torch.float64) for b in bits]
    if fp.dim() != 1 or any(v.shape != fp.shape for v in vectors):  # before stacking vectors of unequal lengths
        raise ValueError(f"every loss vector must have the shape of full_precision_loss {tuple(fp.shape)}")
    losses = torch.stack(vectors)
    if not bool(torch.isfinite(losses).all()) or not bool(torch.isfinite(fp).all()):
        raise ValueError("losses contain NaN or inf")
    ok = losses <= fp.unsqueeze(0) + epsilon  # (K, N)
    ok[-1] = True  # nothing qualifies -> the highest width
    first = ok.to(torch.int64).argmax(dim=0)  # first True along the ascending bit list
    return torch.tensor(bits, dtype=torch.int64)[first]


@torch.no_grad()
def per_sample_losses(aq: AdaptiveQuantizer, inputs: torch.Tensor, targets: torch.Tensor,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bits_list=None,
                      batch_size: int = 256) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per-sample losses at each uniform activation width of ``bits_list``, and with float activations.

    ``loss_fn(logits, targets)`` must return one loss per sample (``reduction="none"``, summed over labels if
    needed). The quantizer's statistics (:meth:`AdaptiveQuantizer.stats`) are left as they were.

    Args:
        aq: the :class:`AdaptiveQuantizer` wrapping the model.
        inputs: the inputs ``(N, ...)``.
        targets: the targets.
        loss_fn: per-sample loss of ``(logits, targets)``.
        bits_list: the widths to try (default the bit map's widths).
        batch_size: samples per forward pass.

    Returns:
        ``(bits -> (N,) losses, float-activation losses (N,))``.
    """
    saved = (dict(aq._count_by_level), dict(aq._bits_by_level), dict(aq._hist))  # not part of the user's stats
    bits_list = sorted(set(bits_list or aq.bit_map.values()))
    out: dict[int, list[torch.Tensor]] = {b: [] for b in bits_list}
    fp: list[torch.Tensor] = []
    try:
        with eval_mode(aq):
            for i in range(0, len(inputs), batch_size):
                x, y = inputs[i:i + batch_size], targets[i:i + batch_size]
                n = x.shape[0]
                fp.append(_per_sample(loss_fn(aq(x, bits=torch.full((n,), 32, dtype=torch.int64)), y), n))
                for b in bits_list:
                    out[b].append(_per_sample(loss_fn(aq(x, bits=torch.full((n,), b, dtype=torch.int64)), y), n))
    finally:
        aq._count_by_level, aq._bits_by_level, aq._hist = saved
    return {b: torch.cat(v) for b, v in out.items()}, torch.cat(fp)


def _per_sample(loss: torch.Tensor, n: int) -> torch.Tensor:
    loss = loss.reshape(n, -1).sum(dim=1) if loss.dim() > 1 else loss
    if loss.shape != (n,):
        raise ValueError(f"loss_fn must return one loss per sample ({n}), got shape {tuple(loss.shape)}")
    return loss.detach().double().cpu()


_one_thread_lock = threading.Lock()
_one_thread_local = threading.local()  # .depth: this thread's open sections
_one_thread_open = 0  # sections open in all threads
_one_thread_outer = 1  # the count read by the section that opened while none was open


@contextlib.contextmanager
def _one_thread():
    """Training this 5 -> 16 -> K MLP is thousands of tiny ops; with several intra-op threads on a busy CPU the
    thread hand-offs dominate (measured 5x slower on a loaded 2-core machine). Restored afterwards.

    Concurrent fits: each section restores, in its own thread, the count that thread had on entry (the intra-op
    count is per thread under OpenMP, so a single restore by the last section to leave would leave the other
    threads at 1). A count of 1 read on entry while another thread's section is open is not taken as the thread's
    own: torch gives a thread that first runs torch code then the count last set (the 1 of that section), and a
    thread pool shared by all threads reads 1 then too; such a section restores the count read by the section that
    opened while none was open. (So a thread set to 1 on purpose that enters then gets that count back, not 1.)"""
    global _one_thread_open, _one_thread_outer
    mine = getattr(_one_thread_local, "depth", 0)
    with _one_thread_lock:
        n = torch.get_num_threads()
        if _one_thread_open == 0:
            _one_thread_outer = n
        elif n == 1 and mine == 0:
            n = _one_thread_outer
        _one_thread_open += 1
        torch.set_num_threads(1)
    _one_thread_local.depth = mine + 1
    try:
        yield
    finally:
        _one_thread_local.depth = mine
        with _one_thread_lock:
            _one_thread_open -= 1
            torch.set_num_threads(n)


class LearnedPolicy(nn.Module):
    """Small MLP from the five complexity metrics to a level, trained on :func:`policy_labels` under a budget.

    ``levels(images=None, metrics=None)`` works like a scorer's, so a fitted policy can be handed to
    :class:`AdaptiveQuantizer` as ``scorer=``. The average-bit budget is met by a penalty while training and a
    bisected offset ``lambda`` on the level scores after it (module docstring).

    Float32 throughout: device moves apply, dtype casts do not; ``load_state_dict`` refuses the state of a policy
    with other widths per level (module docstring).

    Args:
        bit_map: level -> bits (the same map the quantizer uses).
        scorer: a ``ComplexityScorer`` used to compute metrics when ``levels`` gets images.
        hidden: MLP width.
    """

    level_bits: torch.Tensor  # buffers (registered in __init__)
    mean: torch.Tensor
    std: torch.Tensor
    lam: torch.Tensor
    fitted: torch.Tensor

    def __init__(self, bit_map: Mapping[int, int] | None = None, scorer=None, hidden: int = 16):
        super().__init__()
        self.bit_map = _check_bit_map(DEFAULT_BIT_MAP if bit_map is None else bit_map)
        self.level_list = list(self.bit_map)
        self.register_buffer("level_bits", torch.tensor([self.bit_map[k] for k in self.level_list],
                                                        dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(5, hidden), nn.ReLU(), nn.Linear(hidden, len(self.level_list)))
        self.register_buffer("mean", torch.zeros(5))
        self.register_buffer("std", torch.ones(5))
        self.register_buffer("lam", torch.tensor(0.0))
        self.register_buffer("fitted", torch.tensor(False))
        self.scorer = scorer

    @property
    def n_levels(self) -> int:
        """Number of levels (the entries of the bit map)."""
        return len(self.level_list)

    def _apply(self, fn, recurse=True):
        # Follow device moves but never dtype casts: aq.half() must not round the mean / std / lambda / MLP the
        # budget was calibrated with (nor leave float32 features meeting a half-precision MLP).
        def device_only(t):
            moved = fn(t)
            return t.detach().to(moved.device) if t.is_floating_point() and moved.dtype != t.dtype else moved

        return super()._apply(device_only, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = state_dict.get(prefix + "level_bits")
        if isinstance(saved, torch.Tensor) and saved.shape == self.level_bits.shape and \
                not torch.equal(saved.detach().to("cpu", torch.float32), self.level_bits.cpu()):
            raise ValueError(f"this state is of a policy whose bit map has the widths "
                             f"{[int(b) for b in saved.tolist()]} per level, but this policy's bit map "
                             f"{self.bit_map} has {[int(b) for b in self.level_bits.tolist()]}: construct "
                             f"LearnedPolicy(bit_map=...) with the bit map the state was fitted with")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _features(self, metrics) -> torch.Tensor:
        m = torch.as_tensor(metrics, dtype=torch.float32, device=self.mean.device)
        if m.dim() != 2 or m.shape[1] != 5:
            raise ValueError(f"metrics must have shape (N, 5), got {tuple(m.shape)}")
        if not bool(torch.isfinite(m).all()):
            raise ValueError("metrics contain NaN or inf")
        return (m - self.mean) / self.std

    def fit(self, metrics, labels_bits, budget: float | None = None, epochs: int = 300, lr: float = 0.03,
            penalty: float = 1.0, seed: int = 0) -> LearnedPolicy:
        """Train on raw metrics and per-sample label bit-widths (from :func:`policy_labels`).

        Args:
            metrics: raw complexity metrics ``(N, 5)``, N >= 2.
            labels_bits: the label bit-width of every sample ``(N,)``, each a width of the bit map (whole
                numbers; floats such as ``4.0`` are accepted, fractional ones such as ``4.5`` refused).
            budget: target average bits (between the smallest and the largest width of the bit map), or None.
            epochs: full-batch Adam steps.
            lr: Adam learning rate.
            penalty: weight of the budget penalty ``relu(E[bits] - budget) / max bits``.
            seed: seed of the MLP's initial weights.

        Returns:
            ``self``.

        Raises:
            ValueError: shapes other than ``(N, 5)`` and ``(N,)`` with N >= 2, metrics that are NaN or infinite,
                label widths that are fractional, NaN or infinite, label widths not in the bit map, or a budget outside the bit map's range.
        """
        m = torch.as_tensor(metrics, dtype=torch.float32)
        # lists / arrays as float64 first: float32 would round 4.9 and 4.0000001 before the check below
        raw = labels_bits if isinstance(labels_bits, torch.Tensor) else torch.as_tensor(labels_bits,
                                                                                         dtype=torch.float64)
        if raw.dtype.is_floating_point:  # casting to int64 would truncate 4.5 to 4 (and turn NaN into garbage)
            raw = raw.double()
            bad = raw[~torch.isfinite(raw) | (raw != raw.round())]
            if bad.numel():
                raise ValueError(f"label bit-widths must be whole numbers, widths of the bit map "
                                 f"{sorted(set(self.bit_map.values()))}; got {bad.unique().tolist()[:8]}")
        bits = raw.to(torch.int64)
        if m.dim() != 2 or m.shape[1] != 5 or bits.shape != (m.shape[0],) or m.shape[0] < 2:
            raise ValueError(f"need metrics (N, 5) and labels (N,) with N >= 2, got {tuple(m.shape)} and "
                             f"{tuple(bits.shape)}")
        if not bool(torch.isfinite(m).all()):  # refused before the mean / std of a fitted policy are replaced
            raise ValueError("metrics contain NaN or inf")
        width_to_level: dict[int, int] = {}
        for i, lv in enumerate(self.level_list):
            width_to_level.setdefault(self.bit_map[lv], i)
        unknown = sorted(set(bits.tolist()) - set(width_to_level))
        if unknown:
            raise ValueError(f"label bit-widths {unknown} are not in the bit map {self.bit_map}")
        lo, hi = float(self.level_bits.min()), float(self.level_bits.max())
        if budget is not None and not lo <= float(budget) <= hi:
            raise ValueError(f"budget={budget} average bits is impossible with widths {sorted(set(self.bit_map.values()))}"
                             f": it must lie in [{lo}, {hi}]")
        y = torch.tensor([width_to_level[b] for b in bits.tolist()], dtype=torch.int64, device=self.mean.device)
        with _one_thread():
            self._train(m, y, budget, epochs, lr, penalty, seed, hi)
        self.fitted.fill_(True)
        return self

    def _train(self, m, y, budget, epochs, lr, penalty, seed, hi) -> None:
        self.mean.copy_(m.mean(0))
        self.std.copy_(m.std(0).clamp_min(1e-6))
        x = self._features(m)
        g = torch.Generator().manual_seed(seed)
        for p in self.net.parameters():  # deterministic init from the seed
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else p.shape[-1] ** -0.5))
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        ce = nn.CrossEntropyLoss()
        self.net.train()
        for _ in range(epochs):
            logits = self.net(x)
            loss = ce(logits, y)
            if budget is not None:
                expected = (logits.softmax(-1) * self.level_bits).sum(-1).mean()
                loss = loss + penalty * torch.relu(expected - float(budget)) / hi
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.net.eval()
        self.lam.fill_(0.0)
        if budget is not None:
            self.lam.fill_(self._calibrate(x, float(budget)))

    @torch.no_grad()
    def _decide(self, x: torch.Tensor, lam: float) -> torch.Tensor:
        score = self.net(x) - lam * self.level_bits / self.level_bits.max()
        return score.argmax(-1)

    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor, budget: float) -> float:
        def avg(lam):  # float64: a float32 mean rounds 86 / 20 up past a budget of 4.3 that it meets exactly
            return float(self.level_bits[self._decide(x, lam)].double().mean())

        if avg(0.0) <= budget:
            return 0.0
        lo, hi = 0.0, 1.0
        while avg(hi) > budget and hi < 1e6:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if avg(mid) <= budget else (mid, hi)
        return hi

    @torch.no_grad()
    def levels(self, images=None, metrics=None) -> torch.Tensor:
        """Predicted level of each sample, from raw metrics or from images through ``scorer.metrics``.

        Args:
            images: images for the scorer.
            metrics: raw metrics ``(N, 5)`` instead of images.

        Returns:
            An int64 tensor ``(N,)`` of levels of the bit map.

        Raises:
            RuntimeError: the policy is not fitted.
            ValueError: neither or both of images and metrics, or images without a scorer.
        """
        if not bool(self.fitted):
            raise RuntimeError("LearnedPolicy is not fitted: call fit(metrics, labels_bits, budget=...) first")
        if images is not None and metrics is not None:  # one would be silently ignored
            raise ValueError("pass images or metrics=, not both")
        if metrics is None:
            if images is None:
                raise ValueError("pass images or metrics=")
            if self.scorer is None:
                raise ValueError("this policy has no scorer to compute metrics from images: pass metrics=")
            metrics = self.scorer.metrics(images)
        idx = self._decide(self._features(metrics), float(self.lam))
        return torch.tensor(self.level_list, dtype=torch.int64)[idx.cpu()]
