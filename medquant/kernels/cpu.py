"""The CPU backend of ``packed_linear``: medquant's native 4-bit kernel and torch's weight-only int4 / int8 CPU
kernels.

Registered in :mod:`medquant.kernels.dispatch` as backend ``"cpu"`` (priority above the torch reference), so a
``QuantLinear`` on CPU runs it with nothing extra to call. What runs, for a row group ``W`` (``n`` rows, ``k``
inputs, ``b`` bits) and activations ``x`` of ``M`` rows, with ``cd`` the compute dtype (below):

==============================================  ========================================================
row group                                       path
==============================================  ========================================================
codes in 4-bit containers (4-bit rows, 3-bit     **native4**: medquant's own kernel
rows of the version-1 layout); group scope      (:func:`medquant.kernels.native.native_gemv4`) on the
with a group size that is a multiple of 32, or  layer's packed codes, for ``M < dense_min_m("int4")``
channel / tensor scope; any ``n`` and ``k``;    in every ``cd``; otherwise **gemm** (``cd`` bfloat16, a
a CPU with AVX512F + AVX512BW, or AVX2 + FMA    CPU with AVX512-VNNI) or **dense**. Needs the native
                                                library built with AVX512 or AVX2 + FMA (else the int4
                                                row applies)
codes in 8-bit containers (8-bit rows, 5..7-bit  **native8**: the same kernel on 8-bit codes, same
rows of the version-1 layout); the same scope,  rule on ``M`` (else the int8 / dense rows apply)
group and CPU conditions
the dense 3/5/6/7-bit layout, 1- and 2-bit       **native3** / **native5..7** / **native2** /
containers; the same scope and group             **native1**: the same kernel on the stored bit
conditions; AVX512-VBMI too, or AVX2 + FMA      stream, read in place; same rule on ``M``
``b <= 4`` otherwise (no AVX512 / AVX2, no      **int4**: ``aten._weight_int4pack_mm_for_cpu`` for
VBMI for streams, or ``"aten"``); group         ``M < dense_min_m`` (``cd`` bfloat16 / float16) or
size a multiple of 32, or channel / tensor       ``M == 1`` (``cd`` float32); otherwise **dense**
scope; ``n`` a multiple of 16
``5 <= b <= 8`` otherwise (no AVX512 / VBMI,     **int8**: ``aten._weight_int8pack_mm`` (same rule on M);
or ``"aten"``), channel or tensor                otherwise **dense**
scope (8-bit asymmetric only where ``u - z``
fits int8 in every row)
``5 <= b <= 8`` off the native kernels, group    **dense** at every ``M`` (no aten weight-only kernel takes
scope (e.g. W8 g32 under ``"aten"``); 8-bit      several scales per row), one warning per layer shape
asymmetric rows whose ``u - z`` leaves int8
anything else (a group size not a multiple of   the torch reference (:func:`packed_linear_reference`),
32; ``n`` not a multiple of 16 off the native   with one warning per layer shape naming it
kernel)
==============================================  ========================================================

**native4** computes, for row ``r`` of ``W`` and row ``i`` of ``x``, with ``x~`` the input as the kernel takes
it (``cd`` float32: ``x``; float16: ``x`` rounded to float16; bfloat16 with a float32 ``x``, by
:func:`set_cpu_native4_activations`: ``"int16"``, the default, on a CPU with AVX512-VNNI, or with AVX2 and no
AVX512 (:attr:`~medquant.kernels.native.NativeGemv4.int16_form`), ``t * round_half_even(x / t)`` with ``t`` the largest
magnitude of each 32 columns over 32767, i.e. ``x`` to ``2^-16`` of that magnitude; elsewhere and with
``"split"``, ``hi + lo``, ``hi = bf16(x)``, ``lo = bf16(x - hi)``,
i.e. ``x`` to a relative ``2^-17``; with ``"round"`` ``bf16(x)``; a bfloat16 ``x`` as it is),

    y[i, r] = sum_g s[r, g] * (sum_{j in g} u[r, j] x~[i, j] - z[r, g] * sum_{j in g} x~[i, j])

which is ``x~ @ ((u - z) * s)^T`` with every product exact and float32 sums, and returns float32 (cast to
``x``'s dtype): unlike the int4 / int8 kernels, neither its scales nor its output are rounded to ``cd``. It reads
medquant's packed codes in place, so a layer holds one form of its weight in memory; float16 and float32 scales
and zero points are read in place too (bfloat16 ones are copied to float32; a symmetric zero point is one value).
With ``cd`` bfloat16 and
AVX512-BF16 the products are bfloat16 pairs (``vdpbf16ps``, two per code when split), or int16 pairs
(``vpdpwssd``, AVX512-VNNI; ``vpmaddwd`` in the AVX2 form) for ``"int16"``; otherwise float32 FMA.
Under ``torch.compile`` it runs as the operator ``medquant::gemv4``, or, in a layer bound for a compiled decode step
(``QuantLinear.bind_cpu_kernels``), as ``medquant::gemv4_bound``: the bound matmul called by its handle, so that
the graph takes none of the layer's tensors.

**gemm** (prefill: native row groups from ``dense_min_m("gemm")`` = 16 rows on, and from
``dense_min_m("gemm_split")`` = 8 for float32 ``x`` that native4 would split into two halves (a batch of 8
decoding sequences) or takes as 16-bit integers per block of 32 columns (8-bit containers, the stream widths),
from ``dense_min_m("gemm_int16")`` = 12 for float32 ``x`` that native4's 4-bit form takes as 16-bit integers,
in place of the native kernel and of the dense path, ``cd`` bfloat16, :func:`set_cpu_prefill_kernel` ``"gemm"``, the default): medquant's blocked matmul on the packed codes
(:meth:`medquant.kernels.native.NativeGemv4.gemm`). ``x`` enters as 16-bit integers per block ``c`` of columns
(the group, or 128 / 64 / 32 columns of it; 128 for channel / tensor scope),

    t[i, c] = max_{j in c} |x[i, j]| / 32767,   v[i, j] = round_half_even(x[i, j] / t[i, c])

so ``x~ = t v`` is ``x`` to ``2^-16`` of its block's largest magnitude; the integer products ``v u`` are summed
exactly within a block (``vpdpwssd``), then scaled by ``t s`` and summed in float32, the zero point entering
through the group sums of ``x~`` as in native4. The output is float32 (bfloat16 for a bfloat16 ``x``, rounded
once). The dense path instead rounds the weights and each output to bfloat16 (``2^-9`` relative): on SmolLM2-135M
that alone moved 3-5% of teacher-forced next tokens away from the float32 reference path (the output head's
rounding most), where the gemm path agrees on 99.9-100% (``benchmarks/results/cpu_inference*.json``). It
reads the codes of every layout (a panel of 32 weight rows is widened to 16-bit integers once per call and
reused by every row of ``x``) and holds nothing between calls. Under ``torch.compile`` a bound layer calls it
by handle (``medquant::gemv4_bound`` with ``xmode`` :data:`~medquant.kernels.native.GEMM_XMODE`: a compiled
prefill gives the eager logits; a not-finite ``x`` gets the float32 reference product there). Traced in an
unbound layer, for float32 / float16 compute, with :func:`set_cpu_prefill_kernel` ``"dense"``, or where the
library lacks it (``native_status()["gemm"]``: AVX512-VNNI), the dense path runs; an ``x`` with a value that is
not finite (or a block whose largest magnitude is below ``2^-100``) is handed to the dense path too, which
propagates it as torch does.

**dense**: the codes are dequantized to ``cd`` (``(u - z) * s`` in float32, rounded once to ``cd``: the
reference's float32 weight cast to ``cd``; once per call; float32 instead of a bfloat16 ``cd`` on a CPU
without bfloat16 arithmetic, where a software bfloat16 GEMM is ~5x slower) and ``F.linear`` runs; at large
``M`` (prefill) a dense GEMM beats the weight-only kernels, whose cost grows linearly with ``M``. The
dequantization is one pass of a small C kernel over medquant's packed codes (:mod:`medquant.kernels.native`,
compiled on first use; eager torch ops, bit-identical, where it is unavailable or ``$MEDQUANT_NATIVE=0``). A
weight whose dense form exceeds ``DENSE_CHUNK_MIN_BYTES`` (32 MB: an output head) is dequantized about
``DENSE_CHUNK_BYTES`` (8 MB) of rows at a time into one buffer, each slice's GEMM writing its columns of the
output, so no head-sized temporary is mapped and page-faulted at every call. At ``M = 1`` the dense path reads the packed codes and writes and reads a dense
weight in ``cd`` (for 8-bit rows and a bfloat16 ``cd``: 1 + 2 + 2 bytes per weight, against 4 for the float32
reference path's ``F.linear`` plus its own dequantization).

**Mapping onto the int4 kernel.** It computes ``w = (q - 8) * scale + zero`` per group of ``g`` in {32, 64, 128,
256} elements with codes ``q`` in 0..15. medquant's ``w = (u - z) * s`` maps onto it exactly for every
``b <= 4`` with ``q = u + o``, ``scale = s``, ``zero = (8 - o - z) * s`` (symmetric: ``z = 2^(b-1)``; 1-bit
symmetric ``(2u - 1) * s``: ``scale = 2s``, ``z = 1/2``), where the per-group code offset
``o = clamp(round(8 - z), 0, 16 - 2^b)`` keeps ``q`` in 0..15 and makes ``zero`` 0 (symmetric) or small, so that
no large ``(q - 8) * scale`` and ``zero`` cancel (their rounding to a bfloat16 compute dtype would not). 4-bit
asymmetric codes fill 0..15 (``o = 0``): a row group with a zero point more than 1 from 8 in some group runs the
int4 kernel in float32 only (``M == 1``; the dense path in ``cd`` otherwise, as for a float32 ``cd``), since
rounded to 16 bits its ``(q - 8) * scale`` and ``zero`` of up to 8 scales would cancel to errors many times
``cd``'s rounding. A medquant group of ``G`` elements (``G`` a multiple of 32) is
``G / g`` kernel groups with repeated scales, ``g`` the largest of 256/128/64/32 dividing both ``G`` and ``k``
(then ``x`` needs no padding), else the largest dividing ``G``; channel and tensor scales are repeated over groups
of 128/64/32 chosen likewise (32 when ``k < 128``). Only where ``g`` does not divide ``k`` is K padded to a
multiple of ``g`` inside the repack (zero codes, zero scales) and ``x`` zero-padded to match at each call, so
padding contributes nothing.

**Mapping onto the int8 kernel** (``y = x @ (q * scale)^T``, ``q`` int8, one scale per row): ``q = u - z``
(symmetric ``z = 2^(b-1)``), ``scale = s``, K zero-padded to a multiple of 64 (the kernel returns wrong values
for bfloat16 activations when K is not a multiple of 16); exact whenever ``u - z`` lies in -128..127, which holds for every
5..7-bit row and every symmetric 8-bit row.

**Compute dtype.** ``x`` is cast to ``cd`` and the result back to ``x``'s dtype. ``cd`` is, first match:
the layer's own setting (:func:`set_layer_compute_dtype`, which ``QuantConfig.compute_dtype`` feeds), the
global :func:`set_cpu_compute_dtype` (initially ``$MEDQUANT_CPU_COMPUTE_DTYPE`` if set), else bfloat16 where the CPU has native bf16 arithmetic (AVX512-BF16 or
AMX-BF16, see :func:`cpu_features`) and float32 elsewhere. The int4 kernel is run with float32 activations only
at ``M == 1`` (it is many times slower than ``F.linear`` for larger ``M``). A compute dtype the CPU has no
native support for (bfloat16 without AVX512-BF16/AMX, float16 without AVX512-FP16) still gives the correct
result, with a one-time warning.

**Cache.** The plan of a row group (native4: the bound kernel and its float32 scales; int4 / int8: the kernel's
repacked codes plus its scales and zeros per compute dtype) is built at the first call on a row group and kept
in a weak dictionary keyed by the row group's ``qweight`` tensor: it lives exactly as long as the layer's
storage, is never part of a ``state_dict``, and is rebuilt when the storage changes (``load_state_dict`` copies
new codes: the tensor versions change; ``.to()`` makes new tensors); not after a write that bumps no tensor
version (through ``.data``, or into an inference tensor): call :func:`forget_cpu_plans` after one. A row group on the int4 kernel holds both
forms in memory (medquant's packed codes, which are what ``save`` writes, and the kernel's; 4 bits per weight
each, so 2-bit rows and dense 3-bit rows cost 4 more bits per weight at run time); one on a native kernel
(native4, native8, or a stream width such as native3) holds only medquant's. :func:`clear_cpu_cache` drops the plans; :func:`set_cpu_int4_kernel` chooses between native4 and
the int4 kernel for rows both take.

Threads follow ``torch.set_num_threads``.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ._caller import user_stacklevel
from .bundle import PackedWeight
from .dispatch import bump_generation, register_backend, register_kernel
from .layout import container_bits, symmetric_params, unpack
from .native import (
    GEMM_XMODE,
    INT8_XMODE,
    NativeGemv4,
    dequantize_native,
    gemv4_bound_op,
    native_dequantizer,
    native_gemv4,
    native_status,
)
from .native_op import traced_bound_op
from .reference import check_packed_input, packed_linear_reference

#: group sizes the aten int4 CPU kernel takes, largest first
INT4_GROUPS = (256, 128, 64, 32)
#: the int4 kernel needs the number of rows to be a multiple of this
INT4_ROW_MULTIPLE = 16
#: the int8 kernel gives wrong results (or crashes) with bfloat16 activations unless K is a multiple of 16 (torch
#: 2.13): its K is padded to a multiple of this (zero weights) and x with zeros
INT8_K_MULTIPLE = 64
#: priority of the CPU kernels in the dispatch registry (above the reference at -1000, below nothing built in)
CPU_PRIORITY = 10
#: compute dtypes the CPU kernels take
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: environment variable read at import: the initial global compute dtype (bfloat16 / float16 / float32 / auto)
ENV_COMPUTE_DTYPE = "MEDQUANT_CPU_COMPUTE_DTYPE"
#: environment variable read at import: the initial weight-only kernel choice (auto / aten)
ENV_INT4_KERNEL = "MEDQUANT_CPU_INT4_KERNEL"
#: weight-only kernel choices: "auto" (medquant's native kernels where they take the row group, else aten's int4 /
#: int8 kernels) or "aten" (aten's int4 / int8 kernels wherever they take the row group)
INT4_KERNELS = ("auto", "aten")
#: environment variable read at import: how native4 / native8 take bfloat16-compute activations (int16 / split / round)
ENV_NATIVE4_ACTIVATIONS = "MEDQUANT_CPU_NATIVE4_ACTIVATIONS"
#: how native4 / native8 multiply activations with a bfloat16 compute dtype: "int16" (the default: float32 x as 16-bit
#: integers per 32 columns, one integer product per code, with AVX512-VNNI where the kernel has the form; elsewhere
#: "split"), "split" (x = hi + lo, two bfloat16 halves, x to a relative 2^-17: the float32 reference's result to
#: about 1e-6), "round" (x rounded to bfloat16) or "int8" (opt-in: in the AVX2 form, x as 8-bit integers per 128
#: columns on 4-bit containers, as llama.cpp's CPU kernels take it; elsewhere as "int16")
NATIVE4_ACTIVATIONS = ("int16", "split", "round", "int8")
#: environment variable read at import: what runs rows on the native kernels from dense_min_m on (gemm / dense)
ENV_PREFILL_KERNEL = "MEDQUANT_CPU_PREFILL_KERNEL"
#: large-M choices for row groups on a native kernel with a bfloat16 compute dtype: "gemm" (medquant's blocked
#: integer matmul on the packed codes, ``NativeGemv4.gemm``: x as 16-bit integers per block, exact codes, float32
#: sums and output) or "dense" (dequantize to bfloat16 and torch's bfloat16 GEMM: weights and output rounded)
PREFILL_KERNELS = ("gemm", "dense")
#: default ``M`` from which the dense path (dequantize + ``F.linear``) replaces the int8 weight-only kernel, and
#: (``DEFAULT_DENSE_MIN_M_INT4``) the int4 kernel. Measured by ``benchmarks/dense_crossover.py`` on an idle 2-core
#: AVX512-BF16 CPU, 2 threads, bf16 compute, with the native dequantization feeding the dense path: the kernels'
#: time grows about linearly with M while the dense path's is mostly fixed per call. For 4-bit g128 the two cross
#: at M = 24-32 on layers of >= 0.5M weights and at 64-96 on SmolLM2's 576x576 / 192x576 (median 32); for 8-bit
#: per-channel rows at M = 32-192 (median 72). Summed over one decoder layer's seven projections, switching 4-bit
#: rows at 32 instead of 72 cuts the layer's time at M = 64 by 22% (SmolLM2 shapes) and 34% (1.1B LLaMA shapes);
#: switching 8-bit rows at 32 would make them up to 57% slower at M = 32.
DEFAULT_DENSE_MIN_M = 72
DEFAULT_DENSE_MIN_M_INT4 = 32
#: default ``M`` from which native row groups run medquant's blocked matmul (``gemm``: bfloat16 compute,
#: set_cpu_prefill_kernel "gemm") instead of the native weight-only kernel. Measured by
#: ``benchmarks/dense_crossover.py`` (``dense_crossover_gemm.json``, same machine, order alternated per repeat):
#: the two cross at M = 8-24 over the eight SmolLM2 / 1.1B shapes and 3-, 4- and 8-bit rows (median 16); at M = 24
#: the gemm takes 0.48-0.73x the kernel's time, at M = 8 0.87-1.34x.
DEFAULT_GEMM_MIN_M = 16
#: the same for float32 ``x`` while native4 splits activations into two bfloat16 halves (its default): the native
#: kernel then multiplies every weight twice, the gemm once. Measured in-process (2 threads, 4- and 8-bit rows,
#: 5632 x 2048, 2048 x 5632 and 1536 x 576): at M = 8 the gemm took 0.40-0.70x the native kernel's time
#: (5632 x 2048 W4 g128: 1.28 ms against 3.22), at M = 4 1.3-2.1x; a batch of 8 sequences decodes at M = 8. It is
#: also the switch for float32 x that 8-bit containers and the stream widths take as 16-bit integers per block of
#: 32 columns (each block's integer sum converted and scaled on its own): measured in-process (2 threads, W8 per
#: channel, W3 and W2 g128, the six SmolLM2 / 1.1B shapes), the weight-only kernel took 0.95-1.26x the gemm's time
#: at M = 8, 1.44-1.90x at M = 12.
DEFAULT_GEMM_MIN_M_SPLIT = 8
#: the same for float32 ``x`` that native4 takes as 16-bit integers (activations "int16", its default): one
#: integer product per code. Measured in-process (2 threads, W4 g128, the six
#: SmolLM2 / 1.1B shapes): at M = 8 the weight-only kernel took 0.55-0.96x the gemm's time, at M = 12 0.83-1.47x
#: (median 1.3x), at M = 16 1.18-1.31x.
DEFAULT_GEMM_MIN_M_INT16 = 12
#: the narrowest codes whose layers take float32 x as 16-bit integers under the default activations "int16"; 1- and
#: 2-bit layers split it. Measured on SmolLM2 (20 IU reports x 64 teacher-forced tokens, decode path against the
#: same model's float32 reference): W8, W4 and W3 keep 99.9-100.0% of next tokens with int16 x, the
#: round-to-nearest W2 g128 model 97.4% (96.9% with a float head) against 99.9% split: a model quantized to 2 bits
#: is chaotic enough (perplexity 5.5e8) that x to 2^-16 of each 32 columns' largest magnitude moves its arg-max.
NATIVE_INT16_MIN_BITS = 3
#: the dense path dequantizes a weight whose dense form in the compute dtype exceeds DENSE_CHUNK_MIN_BYTES a
#: slice of rows at a time (about DENSE_CHUNK_BYTES each, a multiple of 16 rows) into one buffer, each slice's
#: GEMM writing its columns of the output. Measured (bf16, 2 threads, idle AVX512-BF16 CPU): a 49152 x 576 4-bit
#: head at M = 256 took 62 ms dequantized whole (a 56 MB tensor, freshly mapped and page-faulted at every call:
#: above glibc's 32 MB mmap threshold) against 48 ms in 8 MB slices and 41 ms for the bf16 GEMM alone; at M = 32,
#: 33 ms against 12 ms. Weights below the threshold gain little (within +-10%) and are dequantized whole.
DENSE_CHUNK_MIN_BYTES = 32 << 20
DENSE_CHUNK_BYTES = 8 << 20

_compute_dtype: torch.dtype | None = None  # set below from $MEDQUANT_CPU_COMPUTE_DTYPE
_dense_min_m: int | None = None  # None: the per-kernel defaults above
_int4_kernel = "auto"  # set below from $MEDQUANT_CPU_INT4_KERNEL
_native4_activations = "int16"  # set below from $MEDQUANT_CPU_NATIVE4_ACTIVATIONS
_prefill_kernel = "gemm"  # set below from $MEDQUANT_CPU_PREFILL_KERNEL
_layer_dtype: WeakIdKeyDictionary = WeakIdKeyDictionary()  # qweight -> compute dtype of that layer
_plans: WeakIdKeyDictionary = WeakIdKeyDictionary()  # qweight -> _Plan
_warned: set[str] = set()
_params_lock = threading.Lock()  # _params: one thread at a time builds a plan's kernel parameters


# ------------------------------------------------------------------------------------------- CPU features
@functools.cache
def cpu_features() -> dict[str, object]:
    """The CPU's features that decide the fast paths, read once from ``/proc/cpuinfo`` (Linux; else unknown).

    Keys: ``avx2``, ``avx512f``, ``avx512_bf16``, ``avx512_fp16``, ``avx512_vnni``, ``avx_vnni``, ``amx_bf16``,
    ``amx_int8`` (bools), ``native_bf16`` (AVX512-BF16 or AMX-BF16), ``capability`` (torch's
    ``torch.backends.cpu.get_cpu_capability()``, e.g. ``"AVX512"``), ``model`` (the CPU model name or ``""``).

    Returns:
        The feature dict (cached after the first call).
    """
    flags: set[str] = set()
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if flags and model:
                    break
    except OSError:
        pass
    names = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    feats: dict[str, object] = {name: name in flags for name in names}
    feats["native_bf16"] = bool(feats["avx512_bf16"] or feats["amx_bf16"])
    try:
        feats["capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001  (older torch)
        feats["capability"] = ""
    feats["model"] = model
    return feats


def default_cpu_compute_dtype() -> torch.dtype:
    """bfloat16 where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16), else float32."""
    return torch.bfloat16 if cpu_features()["native_bf16"] else torch.float32


def _check_compute_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of bfloat16, float16, float32 or None, got {dtype!r}")
    return dtype


def set_cpu_compute_dtype(dtype: torch.dtype | str | None) -> None:
    """Set the activation dtype of the CPU kernels for every layer without its own setting.

    ``None`` restores the default (:func:`default_cpu_compute_dtype`). Accepts a torch dtype or its name.

    Args:
        dtype: ``torch.bfloat16``, ``torch.float16``, ``torch.float32`` (or ``"bfloat16"``...), or None.

    Raises:
        ValueError: any other dtype.
    """
    global _compute_dtype
    _compute_dtype = _check_compute_dtype(dtype)
    bump_generation()


def _from_env() -> torch.dtype | None:
    name = os.environ.get(ENV_COMPUTE_DTYPE, "").strip().lower()  # any case, as the other variables
    if not name or name == "auto":
        return None
    try:
        return _check_compute_dtype(name)
    except ValueError:
        warnings.warn(f"${ENV_COMPUTE_DTYPE}={name!r} is not bfloat16, float16, float32 or auto: ignored",
                      RuntimeWarning, stacklevel=user_stacklevel())
        return None


def get_cpu_compute_dtype() -> torch.dtype:
    """The compute dtype a layer without its own setting uses now.

    Returns:
        The dtype set by :func:`set_cpu_compute_dtype` (or ``$MEDQUANT_CPU_COMPUTE_DTYPE``), else
        :func:`default_cpu_compute_dtype`.
    """
    return _compute_dtype or default_cpu_compute_dtype()


def set_layer_compute_dtype(qweight: torch.Tensor, dtype: torch.dtype | str | None) -> None:
    """Give the row group stored in ``qweight`` its own compute dtype (``None``: follow the global setting).

    The quantized modules call this for every row group of a layer whose ``QuantConfig.compute_dtype`` is set
    (again after ``.to()``, which makes new tensors). Kept in a weak dictionary: it dies with the tensor.

    Args:
        qweight: the row group's packed int32 words (the key).
        dtype: ``bfloat16`` / ``float16`` / ``float32`` (dtype or name), or None.

    Raises:
        ValueError: any other dtype.
    """
    dtype = _check_compute_dtype(dtype)
    if dtype is None:
        if _layer_dtype.pop(qweight, None) is not None:
            bump_generation()
    elif _layer_dtype.get(qweight) != dtype:
        _layer_dtype[qweight] = dtype
        bump_generation()


_compute_dtype = _from_env()


def set_cpu_dense_min_m(m: int | None) -> None:
    """From how many activation rows ``M`` the dense path runs, for every weight-only kernel alike.

    Below it the weight-only kernels run on the packed codes; from it on the weight is dequantized once per call
    and a dense matmul runs (faster for large ``M``). ``None`` restores the measured per-kernel defaults
    (``DEFAULT_DENSE_MIN_M_INT4`` = 32 for native4, native8 and the int4 kernel, ``DEFAULT_DENSE_MIN_M`` = 72
    for the int8 kernel, ``DEFAULT_GEMM_MIN_M`` = 16 where native row groups switch to the blocked matmul,
    ``DEFAULT_GEMM_MIN_M_SPLIT`` = 8 for float32 inputs with split activations, ``DEFAULT_GEMM_MIN_M_INT16`` = 12
    for float32 inputs native4 takes as 16-bit integers).

    Args:
        m: an int >= 2, or None for the defaults.

    Raises:
        ValueError: anything else.
    """
    global _dense_min_m
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 2):
        raise ValueError(f"dense_min_m must be an int >= 2 or None, got {m!r}")
    _dense_min_m = m
    bump_generation()


def dense_min_m(kind: str) -> int:
    """The ``M`` from which the dense path replaces the weight-only kernel ``kind`` (``"int4"`` or ``"int8"``; for
    ``"gemm"``: from which native row groups run the blocked matmul, :func:`set_cpu_prefill_kernel`; for
    ``"gemm_split"``: the same for float32 inputs that native4 would split into two bfloat16 halves; for
    ``"gemm_int16"``: the same for float32 inputs that native4 takes as 16-bit integers).

    The value of :func:`set_cpu_dense_min_m` when one was set, else that kernel's default.

    Args:
        kind: ``"int4"``, ``"int8"``, ``"gemm"``, ``"gemm_split"`` or ``"gemm_int16"``.

    Raises:
        ValueError: another ``kind``.
    """
    defaults = {"int4": DEFAULT_DENSE_MIN_M_INT4, "int8": DEFAULT_DENSE_MIN_M, "gemm": DEFAULT_GEMM_MIN_M,
                "gemm_split": DEFAULT_GEMM_MIN_M_SPLIT, "gemm_int16": DEFAULT_GEMM_MIN_M_INT16}
    if kind not in defaults:
        raise ValueError(f"kind must be one of {', '.join(map(repr, defaults))}, got {kind!r}")
    return defaults[kind] if _dense_min_m is None else _dense_min_m


def set_cpu_int4_kernel(kind: str | None) -> None:
    """Choose between medquant's native weight-only kernels and aten's.

    ``"auto"`` (the default): medquant's native kernel (native4 / native8) where it takes the row group, aten's
    int4 / int8 kernel elsewhere; ``"aten"``: aten's int4 kernel for rows of <= 4 bits and its int8 kernel for
    5..8-bit rows, each with its repacked copy of the weight, wherever it takes the row group (module
    docstring). Row groups already planned are planned again at their next call.

    Args:
        kind: ``"auto"``, ``"aten"``, or None (``"auto"``).

    Raises:
        ValueError: any other value.
    """
    global _int4_kernel
    kind = _choice(kind, INT4_KERNELS, "the 4-bit CPU kernel")
    if kind != _int4_kernel:
        _int4_kernel = kind
        _plans.clear()
        bump_generation()


def get_cpu_int4_kernel() -> str:
    """The kernel choice for rows of <= 4 bits now (:func:`set_cpu_int4_kernel`).

    Returns:
        ``"auto"`` or ``"aten"``.
    """
    return _int4_kernel


def _choice(value: str | None, choices: tuple[str, ...], what: str) -> str:
    """``value``, or ``choices[0]`` (the default) for None; ValueError naming ``what`` for anything else."""
    value = choices[0] if value is None else value
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))} or None, got {value!r}")
    return value


def _env_choice(var: str, choices: tuple[str, ...]) -> str:
    """``$var`` (case-insensitive) when it is one of ``choices``; ``choices[0]`` (the default) when unset, and with
    a warning when it is anything else."""
    name = os.environ.get(var, "").strip().lower()
    if not name:
        return choices[0]
    if name not in choices:
        warnings.warn(f"${var}={name!r} is not {' or '.join(choices)}: ignored", RuntimeWarning,
                      stacklevel=user_stacklevel())
        return choices[0]
    return name


_int4_kernel = _env_choice(ENV_INT4_KERNEL, INT4_KERNELS)


def set_cpu_native4_activations(mode: str | None) -> None:
    """How the native kernels (native4 and native8) take activations when the compute dtype is bfloat16.

    ``"int16"`` (the default): with the library built with AVX512-VNNI, or in its AVX2 form (a CPU with AVX2 and
    no AVX512: ``vpmaddwd``, 16-bit pairs summed into 32-bit integers), on layers of 3 bits or more
    (``NATIVE_INT16_MIN_BITS``: 1- and 2-bit models are chaotic enough to lose next tokens to it), in every
    container and group layout (:attr:`~medquant.kernels.native.NativeGemv4.int16_form`), a float32 ``x`` enters
    as 16-bit integers per 32 columns ``c``,

        t[i, c] = max_{j in c} |x[i, j]| / 32767,   x~[i, j] = t[i, c] * round_half_even(x[i, j] / t[i, c])

    (``x`` to ``2^-16`` of its 32 columns' largest magnitude), multiplied by the codes exactly (``vpdpwssd``, one
    integer product per code), each 32 columns' sum scaled by ``t s`` in float32: the blocked matmul's
    precision (at most its blocks' size). Per call at ``M = 1`` (2 threads, SmolLM2's and the 1.1B model's layers)
    than ``"split"``: 15-23% faster on 4-bit rows, 11-31% on 8-bit rows, 5-16% on 3- and 2-bit streams; in the
    AVX2 form (where ``"split"`` is the float32 FMA form on ``x`` itself) no code is converted to float32.
    Elsewhere (1- and 2-bit layers; an AVX512 library built without AVX512-VNNI; an ``x`` with a value that is not
    finite, or 32 columns whose largest magnitude is below ``2^-100``) it is ``"split"``. ``"split"``:
    ``x = hi + lo`` with ``hi = bf16(x)``, ``lo = bf16(x - hi)``, each multiplied by the codes with
    ``vdpbf16ps``, so ``x`` enters to a relative ``2^-17`` and the result matches the float32 reference to about
    ``1e-6`` (no bfloat16 rounding of activations, weights or output). ``"round"``: ``x`` rounded to bfloat16 (one product per code; the layer's
    output then differs from the float32 reference by about ``2^-9`` relative). A bfloat16 input is exact as it
    is and is multiplied as bfloat16 in every mode. Float32 compute is exact in every mode; the dense path
    (``M >= dense_min_m``) and the aten kernels always round to the compute dtype.

    ``"int8"`` (opt-in, for decoding speed on a CPU with AVX2 and no AVX512): in the AVX2 form, on codes in 4-bit
    containers of at least ``NATIVE_INT16_MIN_BITS`` bits
    (:attr:`~medquant.kernels.native.NativeGemv4.int8_form`), a float32 ``x`` of fewer rows than the dense switch
    enters as 8-bit integers per activation block ``a`` of 128 columns (or the largest of 64 and 32 dividing the
    group),

        t[i, a] = max_{j in a} |x[i, j]| / 127,   x~[i, j] = t[i, a] * round_half_even(x[i, j] / t[i, a])

    (``x`` to ``2^-8`` of its block's largest magnitude, as llama.cpp's CPU kernels take activations), multiplied
    by the codes exactly (``vpmaddubsw``), each block's sum scaled by ``t s``. No code is widened past a byte: per
    W4 g128 layer at ``M = 1`` (Zen 1, 2 threads) 0.71-0.84x the int16 form's time, the 1.1B model's layers at
    about half the memory's rate (int16: a third). The price is precision: each output moves by up to about 1% of
    its scale where ``"int16"`` moves it by ``2^-16``; on SmolLM2 W4 g128 the decode path keeps 87% of the float32
    reference's next tokens (int16: 100%). Measure the model before serving it with this setting
    (``benchmarks/bf16_rounding_attribution.py --int8``, or ``benchmarks/cpu_inference.py``'s accuracy columns
    with the ``W4g128a8`` variant). Everywhere else (other containers, narrower codes, an AVX512 library: there
    with one warning) it is ``"int16"``; non-finite ``x`` runs the float32 form as ``"int16"`` does.

    Args:
        mode: ``"int16"``, ``"split"``, ``"round"``, ``"int8"``, or None (``"int16"``).

    Raises:
        ValueError: any other value.
    """
    global _native4_activations
    mode = _choice(mode, NATIVE4_ACTIVATIONS, "native4 activations")
    if mode != _native4_activations:
        _native4_activations = mode
        bump_generation()


def get_cpu_native4_activations() -> str:
    """How native4 takes bfloat16-compute activations now (:func:`set_cpu_native4_activations`).

    Returns:
        ``"int16"``, ``"split"``, ``"round"`` or ``"int8"``.
    """
    return _native4_activations


_native4_activations = _env_choice(ENV_NATIVE4_ACTIVATIONS, NATIVE4_ACTIVATIONS)


def set_cpu_prefill_kernel(kind: str | None) -> None:
    """Choose what runs many rows (prefill) of native row groups in bfloat16 compute: the blocked matmul or dense.

    From ``dense_min_m("gemm")`` rows on (16 by default; for float32 ``x`` 12, ``dense_min_m("gemm_int16")``, where
    native4 takes it as 16-bit integers, and 8, ``dense_min_m("gemm_split")``, where it splits it, which costs the
    native kernel two products per weight). ``"gemm"`` (the default): medquant's blocked integer matmul on the packed codes
    (:meth:`medquant.kernels.native.NativeGemv4.gemm`): ``x`` as 16-bit integers per block of columns (``x`` to
    ``2^-16`` of the block's largest magnitude), the codes exact, integer sums within a block, float32 across
    blocks and a float32 output: no bfloat16 rounding of weights or outputs, so a prefill agrees with the float32
    reference path as a decode step does. Needs AVX512-VNNI (``native_status()["gemm"]``); elsewhere the dense
    path runs. Under ``torch.compile`` a layer bound to its kernels (``QuantLinear.bind_cpu_kernels``) calls it by
    handle (``medquant::gemv4_bound``); an unbound layer's traced call takes the dense path. ``"dense"``: the
    weight dequantized to bfloat16 and torch's bfloat16 GEMM (weights and outputs rounded to bfloat16: about
    ``2^-9`` relative per output); on a CPU without bfloat16 arithmetic (``cpu_features()["native_bf16"]``
    false: the AVX2 form's CPUs, AVX512 without AVX512-BF16 / AMX-BF16) the dense path runs
    float32 instead (dequantized to float32, float32 GEMM: more precise, and ~5x faster than software bfloat16).
    Float32 and float16 compute dtypes always take the dense path at large ``M``.

    Args:
        kind: ``"gemm"``, ``"dense"``, or None (``"gemm"``).

    Raises:
        ValueError: any other value.
    """
    global _prefill_kernel
    kind = _choice(kind, PREFILL_KERNELS, "the CPU prefill kernel")
    if kind != _prefill_kernel:
        _prefill_kernel = kind
        bump_generation()


def get_cpu_prefill_kernel() -> str:
    """The large-``M`` choice now (:func:`set_cpu_prefill_kernel`).

    Returns:
        ``"gemm"`` or ``"dense"``.
    """
    return _prefill_kernel


_prefill_kernel = _env_choice(ENV_PREFILL_KERNEL, PREFILL_KERNELS)


def clear_cpu_cache() -> None:
    """Drop every repacked weight (they are rebuilt at the next call) and forget which warnings were given."""
    _plans.clear()
    _warned.clear()
    bump_generation()


def forget_cpu_plans(*qweights: torch.Tensor | None) -> None:
    """Drop the repacked weights (plans) of the row groups stored in ``qweights`` (rebuilt at their next call).

    A plan is rebuilt by itself when its tensors are replaced or modified in place, except for inference tensors
    (made under ``torch.inference_mode``), which track no version, and for writes through ``.data``
    (``layer.scales_4.data.mul_(2)``), which bump none: a loader that copies new codes into a layer's
    tensors (``load_state_dict``) calls this so that the next call does not run the previous weights. It also bumps
    the dispatch generation (:func:`medquant.kernels.dispatch.bump_generation`), so that the prepared matmuls the
    quantized layers keep (which hold a plan, and the native dequantizer's copies of bfloat16 scales) are rebuilt
    at their next call too.

    Args:
        qweights: the row groups' packed int32 words (the plans' keys); None and unknown tensors are ignored.
    """
    given = False
    for qweight in qweights:
        if qweight is not None:
            _plans.pop(qweight, None)
            given = True
    if given:
        bump_generation()


def cpu_cache_bytes() -> int:
    """Bytes held by the repacked weights now cached (codes and scales in every compute dtype built).

    Returns:
        The byte count (0 after :func:`clear_cpu_cache`).
    """
    total = 0
    for plan in list(_plans.values()):
        tensors = [plan.packed, plan.scale, plan.zero, *plan.by_dtype.values()]  # masters: None once used
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        if plan.gemv is not None:
            total += plan.gemv.extra_bytes()
    return total


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=user_stacklevel())


def _layer_compute_dtype(weight: PackedWeight) -> torch.dtype:
    dtype = _layer_dtype.get(weight.qweight) or get_cpu_compute_dtype()
    feats = cpu_features()
    if dtype == torch.bfloat16 and not feats["native_bf16"]:
        if native_status()["gemm"]:  # AVX512-VNNI: the integer forms need no bfloat16 arithmetic
            _warn_once("bf16", "medquant CPU kernels: compute dtype bfloat16 on a CPU without AVX512-BF16/AMX-BF16: "
                               "layers on medquant's native kernels take float32 inputs as 16-bit integers "
                               "(AVX512-VNNI: fast here, to 2^-16 of each block's largest magnitude) or run float32 "
                               "FMA; layers off those kernels compute bfloat16 in software (correct, slow)")
        elif native_status()["gemv_avx2"]:  # AVX2 without AVX512: the int16 form (vpmaddwd) at small M
            _warn_once("bf16", "medquant CPU kernels: compute dtype bfloat16 on a CPU without AVX512-BF16/AMX-BF16: "
                               "layers on medquant's native kernels take float32 inputs of fewer than "
                               f"{dense_min_m('int4')} rows as 16-bit integers (AVX2: faster decoding here, to 2^-16 "
                               "of each block's largest magnitude; 8-bit, faster still and to 2^-8, with "
                               "set_cpu_native4_activations('int8')) and run more rows (prefill) in float32; other "
                               "layers compute bfloat16 in software (correct, slow)")
        else:
            _warn_once("bf16", "medquant CPU kernels: compute dtype bfloat16 on a CPU without AVX512-BF16/AMX-BF16 "
                               "runs correctly but slowly; set_cpu_compute_dtype(torch.float32) is faster here")
    elif dtype == torch.float16 and not feats["avx512_fp16"]:
        _warn_once("fp16", "medquant CPU kernels: compute dtype float16 on a CPU without AVX512-FP16 runs "
                           "correctly but slowly; bfloat16 or float32 is faster here")
    return dtype


# ------------------------------------------------------------------------------------------- repacking
@dataclass
class _Plan:
    """The repacked form of one row group (``kind`` None: no fast kernel takes it, ``reason`` says why)."""

    kind: str | None
    reason: str = ""
    group: int = 0  # int4 kernel group
    k4: int = 0  # K padded to a multiple of ``group`` (int4) or of INT8_K_MULTIPLE (int8)
    packed: torch.Tensor | None = None  # int4: aten's packed codes; int8: (n, k) int8
    scale: torch.Tensor | None = None  # int4: (k4 / group, n) float32; int8: (n,) float32
    zero: torch.Tensor | None = None  # int4: (k4 / group, n) float32
    by_dtype: dict = field(default_factory=dict)  # compute dtype -> scales(_and_zeros) in that dtype
    source: tuple = ()  # (scales, zeros, versions) the plan was built from
    gemv: NativeGemv4 | None = None  # native4: the bound native kernel (reads the layer's codes in place)
    # int4: a group's zero is more than one scale away from 0 (4-bit asymmetric rows, whose codes leave no room for
    # an offset): the kernel runs in float32 only, as for a float32 compute dtype (in 16 bits its rounded
    # (q - 8) * scale and zero would cancel: errors of many times the compute dtype's rounding)
    f32_only: bool = False


def tensor_version(t: torch.Tensor | None) -> int:
    """``t``'s in-place version counter, or -1 for ``None`` and for inference tensors (they track none).

    A cache built from a tensor compares it to see whether the tensor was modified in place since.

    Args:
        t: a tensor or ``None``.

    Returns:
        The version, or -1.
    """
    if t is None:
        return -1
    try:
        return t._version
    except RuntimeError:  # inference tensors track no version
        return -1


def _source(weight: PackedWeight) -> tuple:
    return (weight.scales, weight.zeros,
            (tensor_version(weight.qweight), tensor_version(weight.scales), tensor_version(weight.zeros)))


def _same_source(plan: _Plan, weight: PackedWeight) -> bool:
    s, z, versions = plan.source
    return s is weight.scales and z is weight.zeros and versions == (
        tensor_version(weight.qweight), tensor_version(weight.scales), tensor_version(weight.zeros))


def codes_u8(weight: PackedWeight) -> torch.Tensor:
    """The unsigned codes ``(n, K_pad)`` uint8 of a row group, unpacked byte-wise (little-endian int32 words;
    the dense version-2 bit stream of 3/5/6/7-bit rows through :func:`~medquant.kernels.layout.unpack`)."""
    if weight.is_dense or sys.byteorder != "little":
        return unpack(weight.qweight, weight.bits, dense=weight.dense)
    cb = container_bits(weight.bits)
    b = weight.qweight.contiguous().view(torch.uint8)
    n = b.shape[0]
    if cb == 8:
        return b
    if cb == 4:
        return torch.stack((b & 15, b >> 4), dim=-1).reshape(n, -1)
    shifts = torch.arange(0, 8, cb, dtype=torch.uint8, device=b.device)
    return ((b.unsqueeze(-1) >> shifts) & ((1 << cb) - 1)).reshape(n, -1)


def _scale_zero(weight: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(s, z)`` per stored scale such that ``w = (u - z) * s`` (1-bit symmetric: ``2s``, ``1/2``)."""
    s = weight.scales.float()
    if weight.symmetric:
        a, z = symmetric_params(weight.bits)
        return (a * s if a != 1.0 else s), torch.full_like(s, z)
    assert weight.zeros is not None  # asymmetric rows carry zero points (checked by PackedWeight)
    return s, weight.zeros.float()


def _decline(weight: PackedWeight) -> str | None:
    """Why no CPU kernel takes this row group, or None."""
    n, k, bits, scope = weight.n, weight.k, weight.bits, weight.scope
    if n == 0 or k == 0:
        return "empty weight"
    if bits <= 4:
        if n % INT4_ROW_MULTIPLE:
            return f"the int4 kernel needs a multiple of {INT4_ROW_MULTIPLE} rows, this row group has {n}"
        if scope == "group" and weight.group_elems % INT4_GROUPS[-1]:
            return (f"the int4 kernel takes groups of {'/'.join(map(str, INT4_GROUPS[::-1]))} (or multiples of 32), "
                    f"this layer has group size {weight.group_elems}")
        return None
    return None


def _dense_only(weight: PackedWeight) -> str | None:
    """Why a 5..8-bit row group runs the dense path at every ``M`` (no weight-only kernel takes it), or None."""
    if weight.scope == "group":
        return f"no weight-only CPU kernel for {weight.bits}-bit group-wise rows (the int8 kernel takes one scale per row)"
    return None


def _int4_group(k: int, candidates: list[int]) -> int:
    """The int4 kernel group: the largest candidate dividing ``k`` (no padding of ``x`` at every call), else the
    largest candidate (``K`` is then padded)."""
    return next((g for g in candidates if k % g == 0), candidates[0])


def _build_plan(weight: PackedWeight, native: bool = True) -> _Plan:
    """The plan of a row group as chosen now (``native=False``: never the native kernel, the aten kernels' plan
    that :func:`_params` rebuilds its float32 masters from)."""
    if native and weight.n and weight.k and _int4_kernel == "auto":
        gemv = native_gemv4(weight)
        if gemv is not None:
            return _Plan(f"native{gemv.bits}", source=_source(weight), gemv=gemv)
    reason = _decline(weight)
    if reason is not None:
        return _Plan(None, reason, source=_source(weight))
    n, k = weight.n, weight.k
    u = codes_u8(weight)
    s, z = _scale_zero(weight)
    if weight.bits <= 4:
        if weight.scope == "group":
            group = _int4_group(k, [g for g in INT4_GROUPS if weight.group_elems % g == 0])
            rep = weight.group_elems // group
        else:
            group = _int4_group(k, [128, 64, 32] if k >= 128 else [32])
            rep = None
        n_groups = -(-k // group)
        k4 = n_groups * group
        # q = u + off with off near 8 - z (q stays in 0..15): zero = (8 - off - z) * s is then 0 or small, so
        # the kernel's (q - 8) * scale + zero does not cancel two large terms (which bf16 scales would round)
        off = (8 - z).round().clamp(0, 16 - 2**weight.bits)
        zero = (8 - off - z) * s
        if weight.scope == "group":
            off_k = off.repeat_interleave(weight.group_elems, dim=1)[:, :k]
        else:
            off_k = off.expand(n, k)
        codes = torch.zeros(n, k4, dtype=torch.int32)
        codes[:, :k] = u[:, :k].to(torch.int32) + off_k.to(torch.int32)
        if rep is not None:
            s, zero = s.repeat_interleave(rep, dim=1)[:, :n_groups], zero.repeat_interleave(rep, dim=1)[:, :n_groups]
        else:
            s, zero = s.expand(n, n_groups), zero.expand(n, n_groups)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale = s.t().contiguous()
        zero = zero.t().contiguous()
        f32_only = bool(((8 - off - z).abs() > 1).any())
        return _Plan("int4", group=group, k4=k4, packed=packed, scale=scale, zero=zero, source=_source(weight),
                     f32_only=f32_only)
    dense = _dense_only(weight)
    if dense is not None:
        return _Plan("dense", dense, source=_source(weight))
    # 5..8 bits, channel or tensor scope: q = u - z in int8
    q = u[:, :k].to(torch.int16) - z.expand(n, 1).to(torch.int16)
    if q.numel() and (int(q.min()) < -128 or int(q.max()) > 127):
        return _Plan("dense", f"{weight.bits}-bit asymmetric codes minus their zero points leave the int8 range",
                     source=_source(weight))
    k8 = -(-k // INT8_K_MULTIPLE) * INT8_K_MULTIPLE
    packed = torch.zeros(n, k8, dtype=torch.int8)
    packed[:, :k] = q
    return _Plan("int8", k4=k8, packed=packed, scale=s.expand(n, 1).reshape(n).contiguous(), source=_source(weight))


def cpu_plan(weight: PackedWeight) -> _Plan:
    """The (cached) repacked form of a row group; built at the first call and after its storage changed."""
    plan = _plans.get(weight.qweight)
    if plan is None or not _same_source(plan, weight):
        plan = _build_plan(weight)
        _plans[weight.qweight] = plan
        if plan.kind is None:
            _warn_once(f"decline:{weight.describe()}",
                       f"medquant CPU kernels: {weight.describe()} runs the torch reference path "
                       f"(dequantize at every call): {plan.reason}")
        elif plan.kind == "dense":
            _warn_once(f"dense:{weight.describe()}",
                       f"medquant CPU kernels: {weight.describe()} runs the dense path at every M (dequantize to "
                       f"the compute dtype at every call, then a dense matmul): {plan.reason}")
    return plan


def _params(plan: _Plan, weight: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's scales (and zeros) in ``dtype``; only the dtypes in use are kept (the float32 masters are
    dropped once one is built and recomputed from the layer's scales if another dtype is asked for later). Under
    a lock: two threads calling one layer may build two dtypes' parameters at once, and one must not drop the
    masters while the other reads them."""
    t = plan.by_dtype.get(dtype)
    if t is not None:
        return t
    with _params_lock:
        return _params_locked(plan, weight, dtype)


def _params_locked(plan: _Plan, weight: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_params` under its lock."""
    t = plan.by_dtype.get(dtype)
    if t is None:
        if plan.scale is None:
            # the aten form whatever would be chosen now ($MEDQUANT_NATIVE may have changed since: the native
            # kernel's plan holds no masters)
            fresh = _build_plan(weight, native=False)
            plan.scale, plan.zero = fresh.scale, fresh.zero
        assert plan.scale is not None
        if plan.kind == "int4":
            assert plan.zero is not None
            t = torch.stack((plan.scale, plan.zero), dim=-1).to(dtype).contiguous()
        else:
            t = plan.scale.to(dtype)
        plan.by_dtype[dtype] = t
        plan.scale = plan.zero = None
    return t


# ------------------------------------------------------------------------------------------- the kernel
def dequantize_fast(weight: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weights ``(n, k)`` in ``dtype`` for the dense path: ``w = round((u - z) * s)``, evaluated in
    float32 and rounded once to ``dtype``: the reference path's float32 weight cast to ``dtype``.

    Runs the native one-pass kernel (:func:`medquant.kernels.native.dequantize_native`: built on first use,
    ``$MEDQUANT_NATIVE=0`` disables it) when it is available and the call is not being traced, else
    :func:`dequantize_eager`; the two are bit-identical.
    """
    if weight.device.type == "cpu" and not torch.compiler.is_compiling():
        w = dequantize_native(weight, dtype)
        if w is not None:
            return w
    return dequantize_eager(weight, dtype)


def dequantize_eager(weight: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weights ``(n, k)`` in ``dtype``, ``(u - z) * s`` evaluated in float32 by eager torch ops
    (byte-wise unpack) and rounded once to ``dtype``; the fallback of :func:`dequantize_fast`, bit-identical to
    it and to the reference path's float32 weight cast to ``dtype``.
    """
    n, kp = weight.n, weight.k_pad
    ge = weight.group_elems if weight.scope == "group" else kp
    u = codes_u8(weight).view(n, kp // ge, ge)
    w = u.float()
    s, z = _scale_zero(weight)
    s = s.float().expand(n, kp // ge).unsqueeze(-1)
    if weight.symmetric:
        w = w.sub_(symmetric_params(weight.bits)[1])
    else:
        w = w.sub_(z.float().expand(n, kp // ge).unsqueeze(-1))
    w = w.mul_(s).view(n, kp)[:, : weight.k]
    return w if dtype == torch.float32 else w.to(dtype)


#: how a native row group's kernel takes float32 ``x`` with a bfloat16 compute dtype (:func:`_f32_form`) -> the
#: kernel's ``xmode`` (1 rounded to bfloat16, 2 split, 3 16-bit integers) and the :func:`dense_min_m` kind of its
#: switch to the gemm
_F32_FORMS = {"": (1, "gemm"), "split": (2, "gemm_split"), "int16": (3, "gemm_int16"),
              "int16_blocks": (3, "gemm_split"), "int8": (INT8_XMODE, "gemm_int16")}


def _native_below(gemm: bool, form: str = "") -> int:
    """The ``M`` below which a native row group runs its weight-only kernel: ``gemm``, whether large ``M`` runs the
    blocked matmul; ``form``, how the native kernel takes float32 ``x`` (:func:`_f32_form`): ``"split"`` (two
    bfloat16 halves) and ``"int16_blocks"`` move the switch down to ``dense_min_m("gemm_split")``, ``"int16"``
    to ``dense_min_m("gemm_int16")``. The callers pass ``""`` while ``torch.compile`` traces (a traced large-``M``
    call of the prepared matmul takes the dense path; a bound layer's compiled call is decided by
    :func:`_traced_lane`), at call time."""
    if not gemm:
        return dense_min_m("int4")
    return dense_min_m(_F32_FORMS[form][1])


def _f32_form(plan: _Plan) -> str:
    """How a native row group's kernel takes float32 ``x`` with a bfloat16 compute dtype
    (:func:`set_cpu_native4_activations`): ``"int16"`` (where the activations are ``"int16"`` and the kernel has the
    form: :attr:`~medquant.kernels.native.NativeGemv4.int16_form`, and the codes are at least
    ``NATIVE_INT16_MIN_BITS`` wide, on 4-bit containers), ``"int16_blocks"`` (the
    same on 8-bit containers and the stream widths: blocks of 32 columns, whose per-block scaling makes the gemm
    the faster from 8 rows, as for split ``x``), ``"split"`` (the activations ``"split"``, or ``"int16"`` where the
    form is missing or the codes are narrower), ``"int8"`` (the activations ``"int8"`` on a kernel with the form,
    :attr:`~medquant.kernels.native.NativeGemv4.int8_form`, codes of at least ``NATIVE_INT16_MIN_BITS``; otherwise
    ``"int8"`` is taken as ``"int16"``) or ``""`` (``"round"``): a key of ``_F32_FORMS``."""
    if _native4_activations == "round":
        return ""
    gemv = plan.gemv
    int8 = _native4_activations == "int8"
    if int8 and gemv is not None and not native_status()["gemv_avx2"]:
        _warn_once("int8", "medquant CPU kernels: native4 activations 'int8' are the AVX2 form's (a CPU with AVX2 "
                           "and no AVX512); this library is not that form, so layers take float32 x as 'int16' "
                           "does (more precise, the same result as the default)")
        int8 = False
    if (_native4_activations in ("int16", "int8") and gemv is not None and gemv.int16_form
            and gemv.code_bits >= NATIVE_INT16_MIN_BITS):
        if int8 and gemv.int8_form:
            return "int8"
        return "int16" if gemv.bits == 4 else "int16_blocks"
    return "split"


def _path(plan: _Plan, m: int, cd: torch.dtype, form: str = "") -> str:
    if plan.kind is None:
        return "reference"
    if plan.kind == "dense":
        return "dense"
    if plan.kind.startswith("native"):
        gemm = _gemm_enabled(plan, cd)
        if m < _native_below(gemm, "" if torch.compiler.is_compiling() else form):
            return plan.kind
        return "gemm" if gemm and not torch.compiler.is_compiling() else "dense"
    if plan.f32_only:
        cd = torch.float32  # the int4 kernel's rule for float32 compute (the dense path keeps the layer's dtype)
    if m == 1 or (cd != torch.float32 and m < dense_min_m(plan.kind)):
        return plan.kind
    return "dense"


def _gemm_enabled(plan: _Plan, cd: torch.dtype) -> bool:
    """Whether large-``M`` calls on this plan run the native blocked matmul (:func:`set_cpu_prefill_kernel`; the
    prepared matmul traced by ``torch.compile`` takes the dense path all the same, a bound layer's traced lane the
    blocked matmul by handle)."""
    return _prefill_kernel == "gemm" and cd == torch.bfloat16 and plan.gemv is not None and plan.gemv.has_gemm


def cpu_path(x: torch.Tensor, weight: PackedWeight) -> str:
    """Which CPU path runs ``x (M, k) @ dequant(weight)^T`` (module docstring).

    Builds the repacked weight if it is not cached yet.

    Args:
        x: an example input ``(M, k)``: its ``M`` and its dtype matter (with a bfloat16 compute dtype, a float32
            ``x`` on a native row group switches to the blocked matmul from ``dense_min_m("gemm_int16")`` or
            ``dense_min_m("gemm_split")`` rows, other dtypes from ``dense_min_m("gemm")``).
        weight: the packed row group.

    Returns:
        ``"native<b>"`` (``b`` the stored width: ``"native4"``, ``"native8"``, ``"native3"`` for the dense 3-bit
        layout, ...), ``"gemm"`` (the native blocked matmul at large ``M``), ``"int4"``, ``"int8"``, ``"dense"`` or
        ``"reference"``.
    """
    plan = cpu_plan(weight)
    return _path(plan, x.shape[0], _layer_compute_dtype(weight), _f32_form(plan) if x.dtype == torch.float32 else "")


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of an input a kernel cannot read as it is, with a one-time warning."""
    _warn_once("contiguous", "medquant CPU kernels: a non-contiguous input is copied to a contiguous one before "
                             "the kernel (correct, one extra copy per call); pass contiguous activations to avoid it")
    return x.contiguous()


def _runner(plan: _Plan, weight: PackedWeight, cd: torch.dtype):
    """``fn(x)`` running ``x (M, k) @ dequant(W)^T`` on ``plan`` (kind int4 / int8 / dense) in compute dtype
    ``cd``, with everything that depends only on the weight bound once (the hot path of a decode step: one cast
    in, the kernel, one cast out)."""
    assert plan.kind is not None
    packed, group, k, n, pad = plan.packed, plan.group, weight.k, weight.n, plan.k4 - weight.k
    kd = torch.float32 if plan.f32_only else cd  # the weight-only kernel's dtype
    params = _params(plan, weight, kd) if plan.kind in ("int4", "int8") else None
    gemv = plan.gemv
    # native4's x mode: 3 as 16-bit integers, 2 split into two bfloat16 halves, 1 rounded to bfloat16, 0 as it is
    # (float32 FMA)
    form = _f32_form(plan) if cd == torch.bfloat16 else ""
    xmode = _F32_FORMS[form][0] if cd == torch.bfloat16 else 0
    xmode_bf16 = 1 if xmode >= 2 else xmode  # a bfloat16 x is exact as it is: one bfloat16 product per code
    # large M on the native blocked matmul (a settings change rebuilds this runner; traced calls take the dense path)
    gemm = _gemm_enabled(plan, cd)
    # native4 below this M (a settings change bumps the dispatch generation: prepared runners are rebuilt)
    native_below = _native_below(gemm) if gemv is not None else 0
    # float32 x that native4 splits into two halves or takes as integers switches earlier (DEFAULT_GEMM_MIN_M_SPLIT,
    # _INT16); a traced call keeps native_below (checked per call in run: this runner may be built while tracing and
    # reused eagerly)
    f32_below = _native_below(gemm, form) if gemv is not None and xmode >= 2 else native_below
    native_dtypes = (torch.float32, torch.bfloat16) if cd != torch.float16 else ()
    int4 = plan.kind == "int4"
    op4 = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    op8 = torch.ops.aten._weight_int8pack_mm.default

    # the dense path's dtype: cd, but float32 for a bfloat16 cd on a CPU without bfloat16 arithmetic (e.g. the
    # AVX2 form's: no blocked matmul there, and a software bfloat16 GEMM is ~5x slower than float32's; float32 is
    # the more precise of the two), with or without the native library, so disabling it changes no result
    dd = torch.float32 if cd == torch.bfloat16 and not cpu_features()["native_bf16"] else cd
    native: list = []  # [the native dequantizer or None], made at the first dense call (not while tracing)
    esize = torch.empty(0, dtype=dd).element_size()
    chunk_rows = n if n * k * esize <= DENSE_CHUNK_MIN_BYTES else \
        max(INT4_ROW_MULTIPLE, DENSE_CHUNK_BYTES // max(1, k * esize) // INT4_ROW_MULTIPLE * INT4_ROW_MULTIPLE)

    def chunked(xc: torch.Tensor, nd) -> torch.Tensor | None:
        """``xc @ W^T`` with ``W`` dequantized ``chunk_rows`` rows at a time into one reusable buffer."""
        y = xc.new_empty(xc.shape[0], n)
        buf = xc.new_empty(min(chunk_rows, n), k)
        for r0 in range(0, n, chunk_rows):
            r1 = min(n, r0 + chunk_rows)
            b = buf[: r1 - r0]
            if not nd.into(r0, r1, b):
                return None
            torch.mm(xc, b.t(), out=y[:, r0:r1])
        return y

    def dense(xc: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            if not native:
                native.append(native_dequantizer(weight, dd))
            nd = native[0]
            if nd is not None:
                if chunk_rows < n:
                    y = chunked(xc, nd)
                    if y is not None:
                        return y
                else:
                    w = nd()
                    if w is not None:
                        return F.linear(xc, w)
        return F.linear(xc, dequantize_eager(weight, dd))

    def decode(x: torch.Tensor) -> torch.Tensor | None:
        """``y (..., n)`` for a contiguous float32 / bfloat16 ``x (..., k)`` of fewer rows than the native
        kernel's switch, straight into the kernel (no reshape, no re-checks: the caller has made eager_inference's
        checks), or None where ``run`` must take it (other rows, dtypes or layouts, or a declined call)."""
        dt = x.dtype
        if (dt is not torch.float32 and dt is not torch.bfloat16) or x.shape[-1] != k or not x.is_contiguous():
            return None
        m = x.numel() // k if k else 0
        if m == 0 or m >= (f32_below if dt is torch.float32 else native_below):
            return None
        y = torch.empty((*x.shape[:-1], n), dtype=dt)
        assert gemv is not None  # decode is attached to native row groups only
        return y if gemv.into(x, m, y, xmode_bf16 if dt is torch.bfloat16 else xmode) else None

    def run(x: torch.Tensor) -> torch.Tensor:
        # a decode step calls this once per layer with the caches cold from the previous layer's weights, where
        # every Python-level torch call costs microseconds: no-op casts and repeated checks are skipped
        if x.dim() != 2 or x.shape[1] != k or not x.is_floating_point():
            raise ValueError(f"x must be a 2-D float tensor (M, {k}), got {tuple(x.shape)} {x.dtype}")
        m, dt = x.shape[0], x.dtype
        if m == 0:
            return x.new_empty(0, n)
        if m < f32_below or (m < native_below and (dt != torch.float32 or torch.compiler.is_compiling())):
            # the kernel reads float32 or bfloat16 x and splits or rounds it itself (xmode); a float16 compute
            # dtype rounds here and passes float32 (exact); a bfloat16 x is its own hi half (no lo half to multiply)
            xk = x if dt in native_dtypes else x.to(cd)
            if xk.dtype == torch.float16:
                xk = xk.float()
            # the kernel reads rows k apart: unit column stride, and rows that do not overlap (expand's stride 0)
            if (k > 1 and xk.stride(1) != 1) or (m > 1 and xk.stride(0) < k):
                xk = _contiguous(xk)
            assert gemv is not None  # native_below is 0 without the native kernel
            # the kernel writes x's dtype: a float32 output for an x rounded here (float16 x, bfloat16 cd), cast
            # once to dt below (its output is not rounded to cd)
            y = gemv.run(xk, xmode_bf16 if xk.dtype == torch.bfloat16 else xmode,
                         None if xk is x or xk.dtype == dt else torch.float32)
            if y is not None:
                return y if y.dtype == dt else y.to(dt)
            return dense(x.to(dd).contiguous()).to(dt)
        if gemm and not torch.compiler.is_compiling():
            # float32 or bfloat16 x as it is (the kernel makes its integers from it); float32 out, bfloat16 for
            # a bfloat16 x (rounded once)
            xk = x if dt in (torch.float32, torch.bfloat16) else x.float()
            if (k > 1 and xk.stride(1) != 1) or (m > 1 and xk.stride(0) < k):
                xk = _contiguous(xk)
            assert gemv is not None
            y = gemv.gemm(xk)
            if y is not None:
                return y if y.dtype == dt else y.to(dt)
        # a native row group holds no repacked weight for the aten kernels: what its weight-only kernel or the
        # blocked matmul does not take (the gemm's decline of a not-finite x below the native switch) is dense
        on_dense = gemv is not None or _path(plan, m, cd) in ("dense", "gemm")
        xd = dd if on_dense else kd
        xc = x if dt == xd else x.to(xd)
        if not xc.is_contiguous():
            xc = _contiguous(xc)
        if on_dense:
            y = dense(xc)
        else:
            if pad:
                xc = F.pad(xc, (0, pad))
            assert packed is not None and params is not None
            y = op4(xc, packed, group, params) if int4 else op8(xc, packed, params)
        return y if y.dtype == dt else y.to(dt)

    if gemv is not None and native_dtypes:
        run.decode = decode  # type: ignore[attr-defined]
        # a compiled graph's call: the native kernel by handle (_traced_lane), below the switch the weight-only
        # form, from it the blocked one where eager calls run it (else the traced dense path)
        lane = (gemv.handle, k, n, f32_below, native_below, gemm, xmode, xmode_bf16)

        def bind_traced():
            # called by binding (QuantLinear.bind_cpu_kernels): the operator is chosen here, eagerly (the C++ one
            # where it builds, medquant.kernels.native_op; else the Python one), so a traced call reads a constant
            op = traced_bound_op(gemv.handle)
            op_by = traced_bound_op(gemv.handle, by_tensor=True)

            def traced(x: torch.Tensor) -> torch.Tensor | None:
                return _traced_lane(lane, x, op)

            def by_tensor(handle_of):
                # the lane of a program compiled ahead of time (medquant.quant.aot): the handle is read, when the
                # program is traced, from the tensor handle_of() returns (one the program is handed at load)
                def traced_by(x: torch.Tensor) -> torch.Tensor | None:
                    # every M on the bound kernel (the weight-only form where the blocked one is not built): the
                    # traced dense path would put this layer's weights into the program as constants of its own
                    return _traced_lane(lane, x, op_by, handle_of(), every_m=True)

                return traced_by

            # what medquant.quant.aot records of the lane: its handle, its choices, the operator a program calls
            traced.handle, traced.lane, traced.op_name = gemv.handle, lane, op_by.name()  # type: ignore[attr-defined]
            traced.by_tensor = by_tensor  # type: ignore[attr-defined]
            return traced

        run.bind_traced = bind_traced  # type: ignore[attr-defined]
    return run


def _traced_lane(lane: tuple, x: torch.Tensor, op=gemv4_bound_op, handle: torch.Tensor | None = None,
                 every_m: bool = False) -> torch.Tensor | None:
    """Under ``torch.compile``: ``y (..., n)`` for ``x (..., k)`` as one ``medquant::gemv4_bound`` call (the native
    kernel bound once, called by its handle: the graph takes no weight tensors, so it guards and checks none at
    each call), choosing by ``M`` as an eager call does: below the native switch the weight-only kernel, from it
    the blocked matmul (:data:`~medquant.kernels.native.GEMM_XMODE`) where the prefill kernel is ``"gemm"``, so
    a compiled prefill gives the eager result. None where the prepared matmul must run it (the traced dense path:
    large ``M`` without the blocked matmul; a dtype the kernel does not read; a gradient).

    Args:
        lane: ``(handle, k, n, rows below which float32 x runs the weight-only kernel, the same for bfloat16 x,
            whether large M runs the blocked matmul, xmode for float32 x, xmode for bfloat16 x)``.
        x: the activations.
        op: ``medquant::gemv4_bound`` (its Python kernel) or ``medquant::gemv4_bound_native`` (the same product
            in C++, :mod:`medquant.kernels.native_op`); with ``handle``, their ``_by`` forms.
        handle: None (the lane's handle, an integer, is passed), or a one-element int64 tensor holding the handle
            (passed in its place: a program compiled ahead of time, :mod:`medquant.quant.aot`).
        every_m: run the weight-only form at and above the switch too when there is no blocked matmul (a program
            compiled ahead of time holds no weights: the traced dense path would compile them in).

    Returns:
        ``y`` in ``x``'s dtype (the kernel's float32 sums, rounded once for bfloat16), or None.
    """
    _, k, n, below_f32, below_bf16, gemm, xmode, xmode_bf16 = lane
    dt = x.dtype
    if x.device.type != "cpu" or dt not in (torch.float32, torch.bfloat16) or x.shape[-1] != k or \
            (x.requires_grad and torch.is_grad_enabled()):
        return None
    m = x.numel() // k if k else 0
    if m == 0:
        return None
    if m < (below_f32 if dt == torch.float32 else below_bf16) or (every_m and not gemm):
        mode = xmode if dt == torch.float32 else xmode_bf16
    elif gemm:
        mode = GEMM_XMODE
    else:
        return None
    x2 = x.reshape(m, k)
    # the kernel reads rows k apart: unit column stride, and rows that do not overlap (expand's stride 0)
    if (k > 1 and x2.stride(1) != 1) or (m > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    y = op(x2, lane[0] if handle is None else handle, n, mode)
    return (y if dt == torch.float32 else y.to(dt)).reshape(*x.shape[:-1], n)


def cpu_packed_linear(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """``x (M, k) @ dequant(W)^T`` on CPU: int4 / int8 weight-only kernels or the dense path (module docstring)."""
    check_packed_input(x, weight)
    plan = cpu_plan(weight)
    if plan.kind is None:
        return packed_linear_reference(x, weight)
    return _runner(plan, weight, _layer_compute_dtype(weight))(x)


def _prepare(weight: PackedWeight):
    """The prepared form of :func:`cpu_packed_linear` for one row group (``None``: no fast kernel takes it)."""
    plan = cpu_plan(weight)
    if plan.kind is None:
        return None
    return _runner(plan, weight, _layer_compute_dtype(weight))


def _accepts(x: torch.Tensor, weight: PackedWeight) -> bool:
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    return cpu_plan(weight).kind is not None


def _unavailable(device: torch.device) -> str | None:
    return None if device.type == "cpu" else f"the CPU kernels run CPU tensors only, not {device}"


register_backend("cpu", _unavailable)
register_kernel("packed_linear", "cpu", cpu_packed_linear, accepts=_accepts, priority=CPU_PRIORITY,
                prepare=_prepare)
