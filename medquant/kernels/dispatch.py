"""The one place that decides which backend runs a kernel: a small registry consulted by the custom-op bodies.

Two kinds of entries:

* a **backend** (:func:`register_backend`): a name plus ``unavailable(device) -> str | None``, the reason the
  backend cannot run on ``device`` at all (``None`` = it can). Built in: ``"torch"`` (the plain-torch references,
  always available), ``"triton"`` (needs Triton, and a CUDA device or ``TRITON_INTERPRET=1`` for CPU tensors) and
  ``"cpu"`` (:mod:`medquant.kernels.cpu`, CPU tensors; ``packed_linear`` only).
* a **kernel** (:func:`register_kernel`; :func:`unregister_backend` removes a backend with its kernels): one backend's implementation of one op (``"packed_linear"``,
  ``"fake_quantize_rows"``, ``"fake_quantize_static"``), a predicate ``accepts(*args) -> bool`` on the op's
  arguments (device, dtype, shape, the :class:`~medquant.kernels.bundle.PackedWeight`) and a priority.

Choice (:func:`select_kernel`), given the op and its arguments (the first argument is the activation/input tensor,
its device is the device of the call):

1. a backend forced with :func:`force_backend` (in the calling thread: the forcing is per thread) runs if it
   implements the op and is available on the device (otherwise ``RuntimeError`` with the backend's reason); its
   implementation validates the arguments itself;
2. otherwise (``"auto"``) the kernels of the op are tried by decreasing priority (then registration order), and
   the first whose predicate accepts the arguments and whose backend is available runs. The torch references
   accept everything at the lowest priority, so there is always an answer; Triton (priority 0) accepts CUDA
   tensors of float16 / bfloat16 / float32 (not the interpreter: it is for tests); the CPU backend (priority 10)
   accepts ``packed_linear`` on CPU tensors for every row group one of its paths takes, and computes in its
   compute dtype (bfloat16 by default on a CPU with native bf16 arithmetic, else float32; accuracy in
   ``docs/guides/cpu_inference.md``, "Compute dtype"). So ``"auto"`` runs Triton on CUDA, the CPU backend on CPU
   where it takes the row group, and the torch reference otherwise; ``force_backend("torch")`` gives the
   reference anywhere.

Implementations have the op's argument list: ``packed_linear(x, weight: PackedWeight) -> y``,
``fake_quantize_rows(x2, bits, symmetric, eps, want_mask) -> (out, mask | None)``,
``fake_quantize_static(x2, scales, zeros, bits, symmetric, group_size | None, want_mask) -> (out, mask | None)``.
A new fast path (e.g. a CPU int4 matmul through aten's ``_weight_int4pack_mm_for_cpu``) registers a backend and a
kernel from its own module; the quantized modules and the custom ops do not change.

Nothing here imports Triton at import time: ``TRITON_INTERPRET`` is read by Triton when it is first imported (and
when a kernel is decorated), so ``import medquant`` must leave the import to the first kernel call.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

OPS = ("packed_linear", "fake_quantize_rows", "fake_quantize_static")
AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    """A backend: ``unavailable(device)`` is the reason it cannot run there, or ``None`` when it can."""

    name: str
    unavailable: Callable[[torch.device], str | None]


@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of one op, chosen under ``"auto"`` when ``accepts(*args)`` holds.

    ``prepare(*args[1:])`` (optional) returns a callable ``fn(x)`` equal to ``impl(x, *args[1:])`` with the work
    that depends only on the other arguments (repacking, dtype choice, validation) done once: see :func:`prepare`.
    ``input_dependent``: ``accepts`` may answer differently for two inputs on one device (it reads their dtype,
    shape...), so a prepared callable re-checks the choice at each call (:func:`prepare`).
    """

    op: str
    backend: str
    impl: Callable
    accepts: Callable[..., bool]
    priority: int
    prepare: Callable[..., Callable | None] | None = None
    input_dependent: bool = False


_BACKENDS: dict[str, Backend] = {}
_KERNELS: dict[str, list[Kernel]] = {op: [] for op in OPS}
#: the backend forced by the innermost :func:`force_backend` block of the current thread (or asyncio task), or None;
#: a context variable, so a block (and ``packed_linear(..., backend=...)``, which opens one) in one thread neither
#: reaches nor, on leaving, overwrites the choice of another
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("medquant_forced_backend", default=None)
#: a number per backend name ever forced, never reused: :func:`generation` folds the current thread's in
_force_ids: dict[str, int] = {}
_force_ids_lock = threading.Lock()
_generation = 0
#: True while ``medquant.kernels`` registers its built-in kernels, whose predicates read only the input's device
#: (Triton's also its dtype, for CUDA tensors): they do not make prepared callables re-check their choice
_registering_builtins = True


def _end_builtin_registration() -> None:
    """Called once by ``medquant.kernels`` after its built-in kernels are registered: from now on a kernel
    registered with an ``accepts`` predicate counts as input-dependent unless it says otherwise."""
    global _registering_builtins
    _registering_builtins = False


def generation() -> int:
    """A counter that changes whenever a kernel choice may change.

    It changes when a backend or kernel is (un)registered, a backend forced or released, or a backend's own
    setting changed (:func:`bump_generation`). A callable from :func:`prepare` stays valid while it is unchanged
    (and the tensors it was prepared for are unchanged). The forced backend is per thread (:func:`force_backend`),
    so the value also encodes the calling thread's forced backend: a thread inside a ``force_backend`` block and
    one outside it never read the same value, and neither reuses a callable the other prepared.

    Returns:
        The current value (an int; compare for equality only).
    """
    forced = _forced.get()
    if forced is None:
        return _generation
    return (_force_ids[forced] << 64) | _generation


def bump_generation() -> None:
    """Invalidate every prepared callable (call it when a setting that a kernel's choice reads changes)."""
    global _generation
    _generation += 1


def register_backend(name: str, unavailable: Callable[[torch.device], str | None]) -> None:
    """Add (or replace) a backend.

    Args:
        name: the backend name (``force_backend(name)``, ``backend=name``); not empty, not ``"auto"``.
        unavailable: ``unavailable(device)`` returns why the backend cannot run on ``device`` (a sentence), or
            None when it can.

    Raises:
        ValueError: an empty name or ``"auto"``.
    """
    if not isinstance(name, str) or not name or name == AUTO:
        raise ValueError(f"backend name must be a non-empty string other than {AUTO!r}, got {name!r}")
    _BACKENDS[name] = Backend(name, unavailable)
    bump_generation()


def register_kernel(op: str, backend: str, impl: Callable, accepts: Callable[..., bool] | None = None,
                    *, priority: int = 0, prepare: Callable[..., Callable | None] | None = None,
                    input_dependent: bool | None = None) -> None:
    """Add ``backend``'s implementation of ``op`` (replacing a previous one of the same backend).

    Args:
        op: one of :data:`OPS`.
        backend: a name given to :func:`register_backend` before.
        impl: the implementation, with the op's argument list.
        accepts: ``accepts(*args) -> bool`` (default: always): whether ``"auto"`` may choose it for these
            arguments; kernels with a higher ``priority`` are tried first. It may read anything in the arguments,
            the input's dtype and shape included.
        priority: order among the kernels of ``op`` (higher first; the torch references sit at -1000).
        prepare: optional ``prepare(*args[1:]) -> fn | None`` giving ``fn(x) == impl(x, *args[1:])`` with the
            per-weight work done once (:func:`prepare`); ``None`` from it means "call ``impl``".
        input_dependent: whether ``accepts`` may answer differently for two inputs on one device. Default: True
            when ``accepts`` is given. Then a prepared callable (:func:`prepare`, which the quantized layers use)
            whose choice this kernel could change chooses again at each call; pass False for a predicate that reads
            only the input's device and the other arguments (the weight) to spare that per-call check.

    Raises:
        ValueError: an unknown op or backend.
    """
    if op not in _KERNELS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: register_backend({backend!r}, ...) first")
    if input_dependent is None:
        input_dependent = accepts is not None and not _registering_builtins
    kernels = [k for k in _KERNELS[op] if k.backend != backend]
    kernels.append(Kernel(op, backend, impl, accepts or (lambda *args: True), int(priority), prepare,
                          bool(input_dependent)))
    kernels.sort(key=lambda k: -k.priority)  # stable: registration order among equal priorities
    _KERNELS[op] = kernels
    bump_generation()


def unregister_backend(name: str) -> None:
    """Remove a backend and all its kernels (the built-in ``"torch"`` backend stays: it is the fallback).

    Args:
        name: the backend name; an unknown name is ignored.

    Raises:
        ValueError: ``name`` is ``"torch"``.
    """
    if name == "torch":
        raise ValueError("the torch reference backend cannot be removed: it is the answer when nothing else runs")
    _BACKENDS.pop(name, None)
    for op, kernels in _KERNELS.items():
        _KERNELS[op] = [k for k in kernels if k.backend != name]
    bump_generation()


def backend_names() -> tuple[str, ...]:
    """Names accepted by :func:`force_backend` and the ``backend=`` arguments: ``"auto"`` and every backend.

    Returns:
        ``("auto", "torch", ...)`` in registration order.
    """
    return (AUTO, *_BACKENDS)


def check_backend(backend: str) -> str:
    if backend not in backend_names():
        raise ValueError(f"backend={backend!r} is not supported; accepted: {', '.join(backend_names())}")
    return backend


@contextlib.contextmanager
def force_backend(backend: str) -> Iterator[None]:
    """Force the body of every medquant custom op to use ``backend`` (e.g. "triton" or "torch") in this block.

    Meant for tests and benchmarks in eager mode (e.g. running the real kernels on CPU tensors under
    ``TRITON_INTERPRET=1``); ``"auto"`` restores the default choice (see the module docstring). The choice is
    local to the calling thread (a :mod:`contextvars` variable: an asyncio task sees its own): other threads keep
    theirs, a new thread starts with ``"auto"``, and blocks in several threads may open and close in any order.

    Args:
        backend: one of :func:`backend_names`.

    Yields:
        Nothing; the previous choice is restored when the block ends (also on error).

    Raises:
        ValueError: ``backend`` is not one of :func:`backend_names`.
    """
    check_backend(backend)
    if backend != AUTO:
        with _force_ids_lock:
            _force_ids.setdefault(backend, len(_force_ids) + 1)
    token = _forced.set(None if backend == AUTO else backend)
    bump_generation()
    try:
        yield
    finally:
        _forced.reset(token)
        bump_generation()


def forced_backend() -> str | None:
    """The backend forced by the calling thread's innermost :func:`force_backend` block, or None."""
    return _forced.get()


def select_kernel(op: str, *args) -> Kernel:
    """The kernel that runs ``op`` on these arguments now (rules in the module docstring).

    Args:
        op: one of :data:`OPS`.
        *args: the op's arguments; ``args[0]``'s device decides availability.

    Returns:
        The forced backend's kernel, else the first registered kernel (highest priority) that accepts the
        arguments and whose backend is available on the device.

    Raises:
        RuntimeError: the forced backend is unavailable or has no kernel for ``op``, or no backend runs it.
    """
    device = args[0].device
    forced = _forced.get()
    if forced is not None:
        for kern in _KERNELS[op]:
            if kern.backend == forced:
                reason = _BACKENDS[forced].unavailable(device)
                if reason is not None:
                    raise RuntimeError(reason)
                return kern
        having = ", ".join(repr(name) for name in (AUTO, *(k.backend for k in _KERNELS[op])))
        raise RuntimeError(f"backend {forced!r} has no {op} kernel; backends that run {op}: {having}")
    for kern in _KERNELS[op]:  # the predicate first: it is cheap, availability may probe Triton
        if kern.accepts(*args) and _BACKENDS[kern.backend].unavailable(device) is None:
            return kern
    raise RuntimeError(f"no registered backend runs {op} for these arguments (device {device})")


def run(op: str, *args):
    """Run ``op`` with the kernel :func:`select_kernel` chooses."""
    return select_kernel(op, *args).impl(*args)


def prepare(op: str, *args) -> Callable:
    """A callable ``fn(x)`` that runs ``op`` on a new first argument with the other arguments fixed.

    ``fn(x)`` equals ``run(op, x, *args[1:])`` for any ``x`` of the device, dtype and kind of ``args[0]``, as long
    as :func:`generation` is unchanged and the tensors in ``args[1:]`` are not modified. For hot loops (a decode
    step calls the same layers hundreds of times): the kernel's ``prepare`` does its per-weight work (repacking,
    dtype choice, validation) once.

    The kernel is chosen once, for ``args``, when no kernel tried up to the chosen one (by priority) has an
    input-dependent predicate (:func:`register_kernel`). The built-in kernels of ``packed_linear`` have none (on
    one device their choice does not depend on the dtype or the rows of ``x``: the quantized layers reuse one
    ``fn`` for every input of their device) and their prepared callables do no per-call dispatch. Otherwise ``fn``
    chooses at each call, as :func:`run` does (a registered kernel's ``accepts`` may take, e.g., only bfloat16
    inputs or ``M == 1``), for any ``x`` of the device, and runs the chosen kernel's prepared form (made at its
    first use); ``fn.per_call_choice`` is then True.

    Args:
        op: one of :data:`OPS`.
        *args: the op's arguments; ``args[0]`` is an example of the input that will be passed to ``fn``.

    Returns:
        ``fn(x) -> the op's result``.

    Raises:
        RuntimeError: no backend runs ``op`` for these arguments (as :func:`select_kernel`).
    """
    kern = select_kernel(op, *args)
    rest = args[1:]
    if _forced.get() is None and _choice_reads_input(op, kern):
        return _choose_per_call(op, rest)
    return _prepare_kernel(kern, rest)


def _prepare_kernel(kern: Kernel, rest: tuple) -> Callable:
    """``fn(x) == kern.impl(x, *rest)``, by the kernel's own ``prepare`` where it has one."""
    if kern.prepare is not None:
        fn = kern.prepare(*rest)
        if fn is not None:
            return fn
    impl = kern.impl
    return lambda x: impl(x, *rest)


def _choice_reads_input(op: str, chosen: Kernel) -> bool:
    """Whether another input on the same device may get another kernel than ``chosen``: a kernel tried before it,
    or ``chosen`` itself, has an input-dependent predicate (those tried after it run only if ``chosen`` refuses)."""
    for kern in _KERNELS[op]:
        if kern.input_dependent:
            return True
        if kern is chosen:
            return False
    return False


def _choose_per_call(op: str, rest: tuple) -> Callable:
    """``fn(x)``: :func:`select_kernel` on ``(x, *rest)`` at each call, then that kernel's prepared form."""
    prepared: dict[str, Callable] = {}

    def fn(x):
        kern = select_kernel(op, x, *rest)
        run_kernel = prepared.get(kern.backend)
        if run_kernel is None:
            run_kernel = prepared[kern.backend] = _prepare_kernel(kern, rest)
        return run_kernel(x)

    fn.per_call_choice = True  # type: ignore[attr-defined]
    return fn


# ------------------------------------------------------------------------------------------- Triton
def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    Returns:
        Triton is installed and its interpreter is on (``triton.knobs.runtime.interpret``, or the environment
        variable for older Triton).
    """
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton: the env var is the switch
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken install must not break medquant: fall back to torch)
        return False
    return True


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run on ``device`` (default: CUDA if present, else the interpreter).

    CUDA tensors need Triton and a CUDA device; CPU tensors need Triton in interpreter mode
    (``TRITON_INTERPRET=1`` set before Triton was first imported).

    Args:
        device: the device of the tensors, or None.

    Returns:
        Whether Triton is importable and can run there (False for other device types).
    """
    if not _triton_importable():
        return False
    if device is None:
        return torch.cuda.is_available() or interpreting()
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    if dev.type == "cpu":
        return interpreting()
    return False


def _triton_unavailable(device: torch.device) -> str | None:
    if triton_available(device):
        return None
    if not _triton_importable():
        return ("Triton is not installed (or fails to import); install triton, or use the torch backend "
                "(force_backend('torch'))")
    if device.type == "cpu":
        return ("the Triton kernels need a CUDA device; to run them on CPU tensors set TRITON_INTERPRET=1 "
                "before triton is first imported")
    if device.type == "cuda":
        return (f"the Triton kernels need a CUDA device, and torch sees no CUDA device for {device} "
                f"(torch.cuda.is_available() is False); use the torch backend (force_backend('torch'))")
    return (f"the Triton kernels run on CUDA tensors (and on CPU tensors with TRITON_INTERPRET=1), not on device "
            f"{device}; use the torch backend (force_backend('torch'), or backend='auto', which picks it there)")


def need_triton(device: torch.device | str) -> None:
    """Raise a ``RuntimeError`` saying why the Triton kernels cannot run on ``device``, if they cannot.

    The reasons: Triton not installed (or failing to import); CPU tensors without the interpreter
    (``TRITON_INTERPRET=1`` set before Triton is first imported); a CUDA device torch does not see; a device type
    Triton does not run on (anything but CUDA and CPU). Each message names what is accepted.
    """
    why = _triton_unavailable(torch.device(device))
    if why is not None:
        raise RuntimeError(why)


#: activation dtypes the Triton kernels take
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def on_cuda_triton_dtype(x: torch.Tensor, *rest) -> bool:
    """The ``accepts`` predicate of the Triton kernels: CUDA tensors of float16 / bfloat16 / float32.

    ``"auto"`` never picks the interpreter for CPU tensors; :func:`force_backend` does.
    """
    return x.device.type == "cuda" and x.dtype in TRITON_DTYPES


register_backend("torch", lambda device: None)
register_backend("triton", _triton_unavailable)
