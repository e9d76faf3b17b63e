"""``format="onnx"``: a medquant classifier as an ONNX model that ONNX Runtime runs with integer kernels.

Three lines::

    quantize_(model, QuantConfig(bits=8, scope="channel"))            # weights (8-bit per channel)
    sim = calibrate_activations(model, calib_batches)                  # static int8 activations; sim == deployed
    export(sim, "model.onnx", format="onnx", example_inputs=x)         # the file ONNX Runtime loads

``export(model, path, format="onnx", example_inputs=..., calib=...)`` also calibrates in one call.

**Exporter and opset.** The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) traces the
simulated model of :mod:`medquant.deploy.onnx_sim`, whose layers carry their own ONNX lowering (an
``autograd.Function`` with a ``symbolic``): every quantized layer is written as exactly the nodes that compute it,
with its codes and scales as initializers named after the layer (``<layer>.weight_codes``, ``.weight_scale``,
``.weight_zero_point``, ``.input_quant.scale``...). The dynamo exporter would need the same lowering as onnxscript
functions per custom op; the TorchScript one is still shipped by torch 2.13 (with a deprecation warning, which is
silenced here). The graph is written at opset 21, the first with block-wise ``DequantizeLinear`` and int4/uint4
tensors; ``com.microsoft.MatMulNBits`` (domain ``com.microsoft``, version 1) carries 4-bit Linear weights.

**What runs as integer kernels.** Per-channel (or per-tensor) layers are ``DequantizeLinear`` (weights) and
``QuantizeLinear``/``DequantizeLinear`` pairs (activations) around ``Conv`` / ``Gemm``; ONNX Runtime fuses them at
session creation into ``QLinearConv``, ``QGemm``, ``QLinearAdd`` (residual additions), uint8 ``MaxPool``
(:func:`optimized_op_counts` reads the optimized graph). 4-bit group-wise Linear layers run ``MatMulNBits``
(weight-only, float activations); 4-bit convolutions are block-wise int4 ``DequantizeLinear`` + a float ``Conv``:
a smaller file, not a faster one.

**Parity.** The simulation is the model that is exported, so the two compute the same function; the integer
kernels round a value computed in a different float order, which moves a code by one step where the value is
within float rounding of a boundary. :func:`medquant.deploy.onnx_sim.logits_tolerance` bounds the logits from
that; :func:`export` runs the written file on ``example_inputs`` (and on a doubled batch of distinct samples, the
example followed by its negation, to check the dynamic batch axis) and raises :class:`~medquant.deploy.registry.ExportError` if ONNX Runtime leaves the bound
(data-dependent control flow traced for one input, an op exported wrongly) or refuses the graph. The file is
written in a private temporary folder beside the target and moved into place only after these checks: a failed
export leaves no file (and an existing one unchanged; replacing one needs ``overwrite=True``). One file holds the
whole graph: a graph over protobuf's 2 GiB limit (:data:`PROTOBUF_LIMIT`) is refused by size, not written with
external data.
"""
from __future__ import annotations

import itertools
import numbers
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .common import check_forward_hooks
from .onnx_sim import (
    TRACES,
    CalibrationError,
    SimulationInfo,
    act_points,
    as_args,
    calibrate_activations,
    check_calibration_set,
    first_tensor,
    logits_tolerance,
    mark_bias_apart,
    prepare,
)
from .registry import (
    ExportError,
    ExportReport,
    LayerExport,
    made_folders,
    output_file_path,
    publish_mode,
    register_export_format,
)

OPSET = 21
#: the largest graph one ``.onnx`` file holds: protobuf serializes messages under 2 GiB
PROTOBUF_LIMIT = 2**31 - 1
INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
               "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "DynamicQuantizeMatMul",
               "MatMulNBits")

__all__ = [
    "INTEGER_OPS",
    "OPSET",
    "PROTOBUF_LIMIT",
    "CalibrationError",
    "CalibrationRequired",
    "OnnxClassifier",
    "calibrate_activations",
    "check_inputs",
    "export_onnx",
    "int8_kernels_saturate",
    "load_calibration_batches",
    "logits_tolerance",
    "optimized_op_counts",
    "session_options",
]


_NONE = object()  # an empty iterable's first element


class CalibrationRequired(ExportError):
    """The model has layers that run with static int8 activations (per-channel or per-tensor weights, 8-bit or
    fewer bits in the int8 container) and no calibration batches were given; ``layers`` names them."""

    def __init__(self, message: str, layers: list[str]) -> None:
        super().__init__(message)
        self.layers = layers


class _Logits(nn.Module):
    """The model with its output reduced to one tensor (``.logits`` of a Hugging Face output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return first_tensor(self.model(*args))


def _retype_int4(model, names: list[str]) -> None:
    """Store the int8/uint8 weight initializers of the 4-bit block-wise layers (codes in -8..7 / 0..15, and their
    zero points) as INT4/UINT4 (two per byte).

    ``names`` are the ``<layer>.weight_codes`` / ``<layer>.weight_zero_point`` names of those layers. The exporter
    de-duplicates equal initializers, so one tensor (e.g. an all-zero zero point) may be read by a 4-bit and an
    8-bit ``DequantizeLinear`` alike, under either layer's name: the 4-bit nodes are found by their codes, and an
    initializer that a node not in that set also reads is copied (named after the 4-bit layer) instead of retyped.

    Raises:
        ExportError: the codes of a 4-bit layer are also read by another node (two layers with equal codes, one of
            them not 4-bit), so they cannot be retyped.
    """
    import onnx
    from onnx import numpy_helper

    by_name = {t.name: t for t in model.graph.initializer}
    codes_names = {n for n in names if n.endswith(".weight_codes") and n in by_name}
    four = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in codes_names]
    four_ids = {id(n) for n in four}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)

    def packed(src, name: str):
        arr = numpy_helper.to_array(src)
        kind = onnx.TensorProto.INT4 if arr.dtype == np.int8 else onnx.TensorProto.UINT4
        return onnx.helper.make_tensor(name, kind, arr.shape, arr.astype(np.int32).reshape(-1).tolist())

    retyped: set[str] = set()
    for node in four:
        for i in (0, 2):
            if i >= len(node.input) or node.input[i] not in by_name:
                continue
            name = node.input[i]
            if name in retyped:
                continue
            if all(id(r) in four_ids for r in readers[name]):
                by_name[name].CopyFrom(packed(by_name[name], name))
                retyped.add(name)
                continue
            if i == 0:
                raise ExportError(f"the 4-bit weight codes {name} are also read by an 8-bit node (layers with equal "
                                  f"codes); they cannot be stored as int4")
            src = by_name[name]
            own = node.input[0][:-len("weight_codes")] + "weight_zero_point"
            if own == name:  # the shared tensor has this layer's name: give it to one of its other readers
                other = next(r for r in readers[name] if id(r) not in four_ids)
                rename = other.input[0][:-len("weight_codes")] + "weight_zero_point" \
                    if other.input[0].endswith(".weight_codes") else f"{name}.shared"
                if rename in by_name:
                    rename = f"{name}.shared"
                by_name[name].name = rename
                by_name[rename] = by_name.pop(name)
                for r in readers[name]:
                    if id(r) not in four_ids:
                        r.input[:] = [rename if v == name else v for v in r.input]
                readers[rename] = readers.pop(name)
            if own not in retyped:
                model.graph.initializer.append(packed(src, own))
                retyped.add(own)
            node.input[2] = own


def _initializer_consumers_fix(model) -> None:
    """The exporter de-duplicates equal constants through Identity nodes; point every consumer of such an Identity
    at the initializer itself (ONNX Runtime's QDQ fusions need constant scales and zero points)."""
    inits = {t.name for t in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    if not alias:
        return
    outputs = {o.name for o in model.graph.output}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias
                                                  and n.output[0] not in outputs)]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _strip_prefix(model, prefix: str = "model.") -> None:
    """Name the initializers after the medquant model's own modules (the export wrapper adds ``model.``)."""
    rename = {t.name: t.name[len(prefix):] for t in model.graph.initializer if t.name.startswith(prefix)}
    for t in model.graph.initializer:
        t.name = rename.get(t.name, t.name)
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]


def _keep_inputs(model, args: tuple, names: list[str]) -> None:
    """Give the graph every model input, in the model's order: the tracer drops an input that the output does not
    read (e.g. a mask this checkpoint ignores), which would leave a file taking fewer inputs than the model.

    A dropped input is declared again, unused, with its example's element type and shape (``batch`` for axis 0, the
    other axes as traced)."""
    import onnx

    have = {i.name: i for i in model.graph.input}
    if all(n in have for n in names):
        return
    for name, a in zip(names, args):
        if name not in have:
            elem = onnx.TensorProto.BFLOAT16 if a.dtype == torch.bfloat16 else \
                onnx.helper.np_dtype_to_tensor_dtype(torch.empty(0, dtype=a.dtype).numpy().dtype)
            have[name] = onnx.helper.make_tensor_value_info(name, elem, ["batch", *a.shape[1:]])
    rest = [i for i in model.graph.input if i.name not in names]  # initializers listed as inputs, if any
    ordered = [have[n] for n in names] + rest
    del model.graph.input[:]
    model.graph.input.extend(ordered)


def _feeds(names: list[str], args: tuple) -> dict[str, np.ndarray]:
    return {n: a.detach().cpu().numpy() for n, a in zip(names, args)}


def _example_args(example_inputs: Any, from_calib: bool) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as the model's positional arguments, checked as :func:`as_args` checks a calibration batch
    (a tensor or a non-empty tuple/list of tensors, none empty, no NaN/inf) but named ``example_inputs`` in the error;
    ``from_calib``: they are the first calibration batch and keep that name."""
    args = as_args(example_inputs, 0 if from_calib else "example_inputs")
    scalars = [i for i, a in enumerate(args) if a.dim() == 0]
    if scalars:
        raise ExportError(f"{'calibration batch 0' if from_calib else 'example_inputs'}: input(s) {scalars} are 0-d "
                          "(a scalar): the file declares axis 0 of every input as its dynamic batch axis; accepted: "
                          "tensors with a leading batch axis (a scalar per sample: shape (batch,))")
    return args


def export_onnx(model: nn.Module, path: str | Path, *, example_inputs: Any = None, calib: Any = None,
                method: str | None = None, percentile: float | None = None, promote: bool = False,
                input_names: list[str] | None = None, output_name: str = "logits", verify: bool = True,
                overwrite: bool = False, **unknown: Any) -> ExportReport:
    """Write ``model`` as an ONNX file (``path`` ending in ``.onnx``, else ``path/model.onnx``).

    Args:
        model: a model returned by :func:`calibrate_activations`, or a (quantized) classifier together with
            ``calib`` (the calibration batches). A model without per-channel / per-tensor quantized layers
            (float, weight-only group-wise 4-bit) needs no calibration; 4-bit per-channel layers need it as 8-bit
            ones do (their codes go into the int8 container, with static int8 activations).
        example_inputs: a tensor or tuple of tensors with the input shapes (any batch size: the batch axis is
            dynamic); defaults to the first calibration batch.
        calib, method, percentile, promote: passed to :func:`calibrate_activations` (defaults ``"minmax"``,
            ``99.99``, ``False``); ``percentile`` needs ``method="percentile"``. A model returned by
            :func:`calibrate_activations` is calibrated already: ``calib``, or a ``method`` / ``percentile`` other
            than its own, would have no effect and is refused.
        input_names: the ONNX input names, a list with one distinct name per input (default ``pixel_values``,
            then ``input_1``...). Every input stays an input of the file, in this order, also one the output does
            not read (declared unused, with its example's type and shape, batch axis dynamic).
        output_name: the name of the output tensor (not one of the input names).
        verify: run the file with ONNX Runtime on ``example_inputs``, on a doubled batch (the example followed by
            its negation in reverse sample order, for floating inputs: distinct samples, also for a one-sample
            example, so a graph that mixes the samples of a batch is caught) and on their negation, and compare with
            the simulation (:func:`logits_tolerance`).
        overwrite: replace an existing file (otherwise an existing file is refused). A folder where the file goes
            (a folder named ``x.onnx``, or ``model.onnx`` inside the target folder) is always refused, asking for a
            file path.

    The file is written in a temporary folder beside its target (which also takes any tensor files the tracer
    writes for a graph over 2 GiB), checked (``onnx.checker`` with types and shapes)
    and verified, then moved into place: an export that fails leaves no file behind (and an existing one as it
    was), and removes the folders it had to create for the file (folders that existed before are kept).

    Returns:
        An :class:`ExportReport` with one row per Conv/Linear layer.

    Raises:
        ExportError: an unknown option, a non-bool ``overwrite`` / ``verify``, a path refused by
            :func:`~medquant.deploy.registry.output_file_path`, calibration options for a model calibrated already,
            ``percentile`` without ``method="percentile"``, forward hooks the file would lose (an
            ``AdaptiveQuantizer``'s, or any on a Conv2d / Linear / ReLU / MaxPool2d / BatchNorm, which the export
            replaces; hooks on the modules it keeps are traced), a model that is itself one quantized layer
            (pass ``nn.Sequential(layer)``), no ``example_inputs`` or ``calib``, a 0-d example input (no batch
            axis), ``input_names`` that is a string or not a list / tuple, of the wrong length, with a repeated,
            empty or non-string name, an ``output_name`` among them, empty or not a string, a model that cannot
            run on the doubled batch of ``verify`` (axis 0 of an input is not its batch axis), a graph that cannot
            be written
            (one whose tensors exceed :data:`PROTOBUF_LIMIT`, 2 GiB: one ``.onnx`` file, no external data)
            or that ONNX Runtime refuses or computes differently (:class:`CalibrationRequired`: static-activation
            layers and no ``calib``).
        CalibrationError: ``example_inputs`` that are not a tensor or tuple of tensors, or hold an empty tensor or
            NaN/inf values (the message names ``example_inputs``); a bad batch of ``calib`` (the message names the
            calibration batch, ``calibration batch 0`` also when that first batch is the example); ``calib``
            that is a single tensor (pass ``x.split(32)``: iterating a tensor would drop its batch axis).
    """
    if unknown:
        raise ExportError(f"format='onnx' got unknown option(s) {sorted(unknown)}; accepted: example_inputs, calib, "
                          f"method, percentile, promote, input_names, output_name, verify, overwrite")
    for flag, value in (("overwrite", overwrite), ("verify", verify)):
        if not isinstance(value, bool):
            raise ExportError(f"{flag} must be True or False, got {value!r}")
    file = output_file_path(path, overwrite, suffix=".onnx", format="onnx")
    info: SimulationInfo | None = getattr(model, "medquant_onnx", None)
    if info is not None:  # the simulation is traced as it is, its hooks too, but not an AdaptiveQuantizer's bits
        check_forward_hooks(model, "onnx", keeps=lambda name, module: True, writes=TRACES)
    if info is not None:  # calibrated already: options that would recalibrate have no effect
        ignored = (["calib=<batches>"] if calib is not None else []) \
            + ([f"method={method!r}"] if method is not None and method != info.method else []) \
            + ([f"percentile={percentile!r}"] if percentile is not None and percentile != info.percentile else [])
        if ignored:
            raise ExportError(
                f"format='onnx': the model is already calibrated (returned by calibrate_activations, "
                f"method={info.method!r}, percentile={info.percentile!r}, {info.batches} batch(es)); "
                f"{', '.join(ignored)} would have no effect. Export it without them (example_inputs=<a batch>), "
                "or pass the quantized model before calibrate_activations to calibrate in the export call")
    if info is None and percentile is not None and method != "percentile":
        raise ExportError(f"format='onnx': percentile={percentile!r} applies to method='percentile'; the "
                          f"calibration method is method={method or 'minmax'!r}: pass method='percentile' too")
    if isinstance(input_names, (str, bytes)):
        raise ExportError(f"input_names must be a list of names (one per model input), got str {input_names!r}: "
                          f"pass [{input_names!r}]")
    if input_names is not None and not isinstance(input_names, (list, tuple)):
        raise ExportError(f"input_names must be a list of names (one per model input), got "
                          f"{type(input_names).__name__} {input_names!r}")
    bad_names = [n for n in (input_names or []) if not isinstance(n, str) or not n]
    if bad_names or not isinstance(output_name, str) or not output_name:
        raise ExportError(f"input_names must be non-empty strings and output_name a non-empty string, got "
                          f"input_names={input_names!r}, output_name={output_name!r}: ONNX names each input and "
                          "output (an empty name would be replaced by a number)")
    method = "minmax" if method is None else method
    percentile = 99.99 if percentile is None else percentile
    if calib is not None:
        check_calibration_set(calib)  # a single tensor: refused before it is iterated sample by sample
    if example_inputs is None and calib is not None:  # the first batch, kept for calibration (a generator is
        it = iter(calib)                                # spent once calibrate_activations has read it)
        first = next(it, _NONE)
        calib = it if first is _NONE else itertools.chain([first], it)
        example_inputs = None if first is _NONE else first
        example_from_calib = first is not _NONE
    else:
        example_from_calib = False
        if example_inputs is not None:  # checked before any calibration runs
            _example_args(example_inputs, False)

    if info is None:
        if calib is not None:
            model = calibrate_activations(model, calib, method=method, percentile=percentile, promote=promote)
        else:
            if example_inputs is None:
                raise ExportError("format='onnx' needs example_inputs (or calib batches) to trace the model")
            sim = prepare(model, _example_args(example_inputs, example_from_calib), method=method,
                          percentile=percentile, promote=promote)
            needs = [p.name for p in cast(SimulationInfo, sim.medquant_onnx).layers if p.kind == "qdq"]
            if needs:
                raise CalibrationRequired(
                    f"format='onnx' writes static int8 activation scales for {len(needs)} layer(s) "
                    f"({', '.join(needs[:5])}{'...' if len(needs) > 5 else ''}): pass calib=<batches> "
                    "or a model returned by medquant.deploy.onnx.calibrate_activations", needs)
            model = sim
        info = cast(SimulationInfo, model.medquant_onnx)
    if example_inputs is None:
        raise ExportError("format='onnx' needs example_inputs (a tensor with the input shape) to trace the model")
    args = _example_args(example_inputs, example_from_calib)
    names = list(input_names) if input_names else ["pixel_values"] + [f"input_{i}" for i in range(1, len(args))]
    if len(names) != len(args):
        raise ExportError(f"input_names has {len(names)} names for {len(args)} inputs")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ExportError(f"input_names must be distinct (one per model input), got {names}: {repeated} repeated")
    if output_name in names:
        raise ExportError(f"output_name {output_name!r} is also an input name ({names}): ONNX names each value once; "
                          f"choose another output_name or input_names")
    # written and checked in a private folder beside the target, moved into place only when complete (a failed
    # export leaves no file, and no folder it had to create); the tracer writes the tensors of a graph over 2 GB as
    # files beside the graph: they stay in that folder and go with it
    with made_folders(file.parent):
        work = Path(tempfile.mkdtemp(prefix=f".{file.stem}-", dir=file.parent))
        try:
            tmp = work / file.name
            report = _write(model, tmp, args, names, output_name, verify)
            publish_mode(tmp)
            os.replace(tmp, file)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report.path, report.files = str(file), [str(file)]
    return report


def _write(model: nn.Module, file: Path, args: tuple, names: list[str], output_name: str, verify: bool) -> ExportReport:
    """Trace ``model`` (a prepared simulation) into ``file``, post-process and check the graph, verify it with ONNX
    Runtime."""
    import onnx

    info = cast(SimulationInfo, model.medquant_onnx)
    wrapped = _Logits(model).eval()
    nbits = any(p.kind == "nbits" for p in info.layers)
    apart = set(mark_bias_apart(model))  # biases ORT's int32 kernels cannot hold: a float Add after the op
    dyn = {n: {0: "batch"} for n in names}
    dyn[output_name] = {0: "batch"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, args, str(file), dynamo=False, opset_version=OPSET, input_names=names,
                              output_names=[output_name], dynamic_axes=dyn,
                              custom_opsets={"com.microsoft": 1} if nbits else None,
                              do_constant_folding=True)
    except ExportError:
        raise
    except Exception as e:  # torch.onnx reports the op it cannot express
        raise ExportError(f"torch.onnx could not express the model: {type(e).__name__}: {e}".strip()[:2000]) from e
    proto = onnx.load(str(file))
    # the tensors stored in the graph (protobuf's own ByteSize refuses a message over 2 GiB with an EncodeError)
    size = sum(len(t.raw_data) or onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * int(np.prod(t.dims))
               for t in proto.graph.initializer)
    if size > PROTOBUF_LIMIT:
        raise ExportError(f"the ONNX graph holds {size} bytes of tensors ({size / 2**30:.2f} GiB), over the protobuf "
                          f"limit of one .onnx file ({PROTOBUF_LIMIT} bytes, 2 GiB); format='onnx' writes one file, without "
                          "external data: quantize more layers (8-bit weights take a quarter of float32, 4-bit an "
                          "eighth) or export the model in parts")
    _initializer_consumers_fix(proto)
    _strip_prefix(proto)
    _keep_inputs(proto, args, names)
    _retype_int4(proto, info.int4_tensors)
    proto.producer_name = "medquant"
    meta = {"medquant.calibration": f"{info.method} ({info.batches} batches)",
            "medquant.folded_batchnorm": ", ".join(f"{b}->{c}" for c, b in info.folded.items())}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    try:  # full_check: types and shapes too (e.g. a DequantizeLinear whose codes and zero point differ in type)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"the ONNX graph is invalid, not written: {type(e).__name__}: {e}".strip()[:2000]) from e
    onnx.save(proto, str(file))
    report = ExportReport(format="onnx", path=str(file), files=[str(file)])
    for plan in info.layers:
        note = plan.note
        if plan.name in apart:
            note = (note + "; " if note else "") + ("bias added as a float Add after the op (a float Conv / Gemm): "
                                                    "|bias| / (s_x * s_w) overflows the int32 bias of the integer "
                                                    "kernel (a tiny folded weight scale)")
        report.layers.append(LayerExport(plan.name, plan.scheme, plan.container, plan.how, plan.max_abs_error, note))
    report.notes.append(f"opset {OPSET} (TorchScript exporter); activations: "
                        f"{info.method} calibration on {info.batches} batch(es); BatchNorm folded: {len(info.folded)}")
    if verify:
        tol = _verify(model, file, args, names)
        report.notes.append(f"verified with onnxruntime on the example inputs, a doubled batch and the negated "
                            f"inputs: max |diff| "
                            f"{tol[0]:.3g} <= tolerance {tol[1]:.3g}")
        if any(p.mode == "quantize" for p in act_points(model)) and int8_kernels_saturate():
            report.notes.append("verified unfused (ORT_ENABLE_BASIC): onnxruntime's fused 8-bit kernels saturate on "
                                "this CPU (no VNNI); OnnxClassifier runs it unfused here too")
    return report


def _verify(sim: nn.Module, file: Path, args: tuple, names: list[str]) -> tuple[float, float]:
    import onnxruntime as ort

    try:  # the options OnnxClassifier uses (unfused 8-bit steps where this CPU's fused kernels saturate)
        sess = ort.InferenceSession(str(file), session_options(file, dequantize_weights=False),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime's own reason (a type or an op it does not take)
        raise ExportError(f"onnxruntime cannot load the exported graph, not written: {e}".strip()[:2000]) from e
    worst, bound = 0.0, 0.0
    # the example, a doubled batch (dynamic batch axis) and the negated example (a traced data-dependent branch).
    # The doubled batch is the example followed by other samples (_second_half): samples that differ, also for a
    # one-sample example, so a graph that mixes the samples of a batch (a batch size traced as a constant)
    # computes other values than the model on it
    variants = (args, tuple(torch.cat([a, _second_half(a)]) for a in args),
                tuple(-a if a.is_floating_point() else a for a in args))
    for batch in variants:
        try:
            with torch.no_grad():
                want = first_tensor(sim(*batch)).float().numpy()
        except Exception as e:  # a doubled batch the model cannot take: axis 0 is not its batch axis
            raise ExportError(f"the model cannot run on a batch of {batch[0].shape[0]} (the example inputs "
                              f"{[tuple(a.shape) for a in args]} doubled along axis 0), not written: the file "
                              f"declares axis 0 of every input as its dynamic batch axis, so the inputs need a "
                              f"leading batch axis (e.g. x[None] for one unbatched sample): "
                              f"{type(e).__name__}: {e}".strip()[:2000]) from e
        try:
            got = sess.run(None, _feeds(names, batch))[0]
        except Exception as e:
            raise ExportError(f"onnxruntime failed to run the exported graph on a batch of {batch[0].shape[0]}, not "
                              f"written: {e}".strip()[:2000]) from e
        finite = np.isfinite(want)
        tol = logits_tolerance(sim)
        if tol is None:  # no bound derived: float rounding only, or flips propagated through float ops
            quantized = any(p.mode == "quantize" for p in act_points(sim))
            tol = (5e-2 if quantized else 1e-3) * float(np.abs(want[finite]).max(initial=0.0)) + 1e-3
        if got.shape != want.shape:
            raise ExportError(f"onnxruntime returned shape {got.shape} for inputs of batch {batch[0].shape[0]}, the "
                              f"model {want.shape}: a shape was traced as a constant (use only the batch axis "
                              f"dynamically, no data-dependent control flow)")
        # NaN (or the same inf) on both sides agree; NaN on one side only is an infinite difference (a NaN max
        # would compare False with the tolerance and pass)
        agree = (np.isnan(got) & np.isnan(want)) | (~finite & (got == want))
        diff = float(np.nan_to_num(np.where(agree, 0.0, np.abs(got - want)), nan=np.inf).max(initial=0.0))
        if diff > tol:
            raise ExportError(f"onnxruntime's outputs differ from the model by {diff:.4g} (> tolerance {tol:.4g}) "
                              f"on a batch of {batch[0].shape[0]}: the trace does not represent the model (data-"
                              f"dependent control flow, or a Python value computed from the input)")
        worst, bound = max(worst, diff), tol
    return worst, bound


def _second_half(a: torch.Tensor) -> torch.Tensor:
    """The samples :func:`_verify` appends to an example input for the doubled batch, in reverse batch order:
    distinct from the example's, so a graph that mixes the samples of a batch is caught, also for one sample.

    Floating inputs: ``-a``. Integer inputs (token ids): each value moved one step within the example's own range
    ``[lo, hi]``, ``(v - lo + 1) mod (hi - lo + 1) + lo`` (ids an embedding that took the example takes too), except
    inputs whose values all lie in ``{0, 1}`` (attention masks, token types; the padding of shifted ids stays
    masked) and booleans, which are kept."""
    if a.is_floating_point() or a.is_complex():
        return -a.flip(0)
    if a.dtype == torch.bool or a.numel() == 0:
        return a.flip(0)
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi <= 1:
        return a.flip(0)
    shifted = (a.to(torch.int64) - lo + 1) % (hi - lo + 1) + lo  # in int64: no wrap-around of small types
    return shifted.to(a.dtype).flip(0)


def optimized_op_counts(path: str | Path, optimized_path: str | Path | None = None) -> Counter:
    """The op types of the graph ONNX Runtime runs after its session-time fusions, counted.

    The level is ``ORT_ENABLE_EXTENDED`` (the QDQ -> QLinearConv / QGemm / QLinearAdd fusions); compare the counts
    with :data:`INTEGER_OPS` to see whether the integer kernels run.

    Args:
        path: the exported ``.onnx`` file.
        optimized_path: where to keep the optimized graph (default a temporary file, deleted).

    Returns:
        ``Counter`` of op type -> number of nodes.
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = str(optimized_path) if optimized_path else str(Path(tmp) / "optimized.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = out
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(out).graph.node)


CALIB_SUFFIXES = (".npy", ".npz", ".safetensors")
#: the integer pixel types whose maximum is the white level: scaled to [0, 1] by 255 / 65535
PIXEL_TYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


def _read_calibration_arrays(path: Path, key: str | None) -> list[np.ndarray]:
    """The samples of a calibration file or folder, as one array per sample or one stacked array."""
    if path.is_dir():
        if key is not None:
            raise CalibrationError(f"{path}: a key ({key!r}) applies to .npz / .safetensors files, not folders")
        from ..data import load_images

        images, _ = load_images(path)
        return list(images)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if key is not None:
            raise CalibrationError(f"{path}: a .npy file holds one array; a key ({key!r}) applies to .npz / "
                                   ".safetensors files")
        return [np.load(path, allow_pickle=False)]
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
    else:
        raise CalibrationError(f"{path}: expected a {', '.join(CALIB_SUFFIXES)} file or an image folder")
    if key is not None:
        if key not in arrays:
            raise CalibrationError(f"{path} has no array {key!r}; it has {sorted(arrays)}")
        return [arrays[key]]
    if len(arrays) != 1:
        raise CalibrationError(f"{path} holds {len(arrays)} arrays {sorted(arrays)}: name the one with the "
                               "calibration images (key)")
    return [next(iter(arrays.values()))]


def _chw(a: np.ndarray, where: str, stacked: bool) -> np.ndarray:
    """One sample ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` (``stacked``: ``(N, ...)`` of those) as ``CHW``."""
    lead = 1 if stacked else 0
    rank = a.ndim - lead
    if rank == 2:
        return np.expand_dims(a, lead)
    if rank == 3:
        c_first, c_last = a.shape[lead], a.shape[-1]
        if c_first not in (1, 3, 4) and c_last in (1, 3, 4):  # channels last (H, W, C)
            return np.moveaxis(a, -1, lead)
        return a
    raise CalibrationError(f"{where}: expected images (H, W), (H, W, C) or (C, H, W)"
                           f"{' stacked as (N, ...)' if stacked else ''}, got shape {tuple(a.shape)}")


def load_calibration_batches(path: str | Path, *, batch_size: int = 32, limit: int | None = 256,
                             image_size: int | tuple[int, int] | None = None, channels: int | None = None,
                             key: str | None = None, mean: list[float] | float | None = None,
                             std: list[float] | float | None = None) -> list[torch.Tensor]:
    """Calibration batches for :func:`calibrate_activations` from a file or an image folder.

    Sources: a ``.npy`` array, one array of an ``.npz`` or ``.safetensors`` file (the only one, or ``key``), each
    holding samples stacked as ``(N, C, H, W)``, ``(N, H, W, C)`` or ``(N, H, W)``; or a folder of images / DICOM
    files (``index.csv`` honoured, see :func:`medquant.data.load_images`). Integer data are pixels, uint8 or
    uint16 (other integer types have no fixed white level and are refused): scaled to ``[0, 1]`` by the type's
    maximum (``x / 255``, ``x / 65535``). Every image of a folder is a pixel image too (DICOM files arrive in
    ``[0, 1]`` already; each image is scaled by its own type, so a folder may mix them). Pixels are normalized
    ``(x - mean) / std`` per channel when ``mean`` / ``std`` are given; a gray image is repeated to 3 channels and
    an RGB one averaged to 1 when ``channels`` asks for it. Floating arrays of a file are taken as already
    preprocessed (no scaling, normalization or channel conversion). Samples are resized (bilinear, antialiased) to ``image_size``.

    Args:
        path: the file or folder.
        batch_size: samples per batch.
        limit: use at most this many samples (the first ones; None: all).
        image_size: the model's input size, ``S`` or ``(H, W)``; required when the samples differ in size.
        channels: the model's input channels (None: as the data have them).
        key: the array of an ``.npz`` / ``.safetensors`` file holding several.
        mean: per-channel (or one: a list of one value, or a number) means for pixel data (integer arrays, image /
            DICOM folders).
        std: per-channel (or one) standard deviations for pixel data.

    Returns:
        A list of float32 tensors ``(B, C, H, W)``.

    Raises:
        CalibrationError: an unsupported file, a missing or ambiguous array, an empty set, a shape that is not
            images, integer samples other than uint8 / uint16 (int64, int32 mode-I TIFFs, int16...), samples that
            are not real numbers (complex, strings), ``mean`` / ``std`` that are not numbers, samples
            of different sizes without ``image_size``, NaN/inf values, ``mean`` / ``std`` for floating data or
            of the wrong length (the message names the file and the sample).
        FileNotFoundError: ``path`` does not exist.
    """
    import torch.nn.functional as F

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    norm: dict[str, list[float] | None] = {}
    for name, v in (("mean", mean), ("std", std)):  # one number: the value of every channel, as [v]
        number = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
        if v is not None and not number and (isinstance(v, (str, bytes, bool)) or not hasattr(v, "__len__")):
            raise CalibrationError(f"{name} must be a number or a list of numbers, got {type(v).__name__} {v!r}")
        norm[name] = [float(cast(float, v))] if number else cast("list[float] | None", v)
    mean, std = norm["mean"], norm["std"]
    if batch_size < 1 or (limit is not None and limit < 1):
        raise CalibrationError(f"batch_size and limit must be >= 1, got {batch_size} and {limit}")
    raw = _read_calibration_arrays(path, key)
    stacked = not path.is_dir()
    samples: list[np.ndarray] = []
    if stacked:
        arr = _chw(raw[0], str(path), True)
        samples = list(arr[:limit] if limit is not None else arr)
    else:
        samples = [_chw(a, f"{path} image {i}", False) for i, a in enumerate(raw[:limit] if limit else raw)]
    if not samples:
        raise CalibrationError(f"{path}: no calibration samples (an empty array or a folder without images)")
    # pixels: integer data, and every image of a folder (its DICOM files arrive as floats already in [0, 1]);
    # floating arrays of a file are taken as preprocessed model inputs
    integer = np.issubdtype(samples[0].dtype, np.integer) or samples[0].dtype == np.bool_
    pixels = integer or not stacked
    for i, s in enumerate(samples):  # x / 2^31-1 of 8-bit pixels held in int32 / int64 is ~1e-7 / ~3e-17
        if not (s.dtype == np.bool_ or np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating)):
            raise CalibrationError(  # complex samples would lose their imaginary part in the float32 cast
                f"{path}: {'sample' if stacked else 'image'} {i} has type {s.dtype.name}: expected uint8 / uint16 "
                f"pixels or floating samples preprocessed as the model's inputs")
        if np.issubdtype(s.dtype, np.integer) and s.dtype not in PIXEL_TYPES:
            raise CalibrationError(
                f"{path}: {'sample' if stacked else 'image'} {i} has integer type {s.dtype.name}: only uint8 or "
                f"uint16 pixels have a fixed scaling to [0, 1] (by 255 / 65535); convert the pixels to uint8 / "
                f"uint16 (CT numbers windowed first), or give float samples preprocessed as the model's inputs")
    if not pixels and (mean is not None or std is not None):
        raise CalibrationError(f"{path}: the samples are floating point (taken as preprocessed); mean / std "
                               "apply to pixel data only (integer arrays, image / DICOM folders)")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size) if image_size else None
    if size is None and len({s.shape[1:] for s in samples}) > 1:
        shapes = sorted({s.shape[1:] for s in samples})[:3]
        raise CalibrationError(f"{path}: the images differ in size ({', '.join(map(str, shapes))}...): give the "
                               "model's input size (image_size)")
    out = []
    for i, s in enumerate(samples):
        x = torch.from_numpy(np.ascontiguousarray(s)).to(torch.float32)
        if s.dtype == np.bool_ or np.issubdtype(s.dtype, np.integer):  # each image by its own type (a folder
            x = x / (float(np.iinfo(s.dtype).max) if s.dtype != np.bool_ else 1.0)  # may mix PNG and DICOM)
        if not torch.isfinite(x).all():
            raise CalibrationError(f"{path}: sample {i} contains {int((~torch.isfinite(x)).sum())} NaN/inf values")
        if channels is not None and x.shape[0] != channels:
            if pixels and x.shape[0] == 1:
                x = x.expand(channels, -1, -1)
            elif pixels and channels == 1 and x.shape[0] in (3, 4):
                x = x[:3].mean(0, keepdim=True)
            else:
                raise CalibrationError(
                    f"{path}: sample {i} has {x.shape[0]} channel(s), the model takes {channels}"
                    + ("" if pixels else " (floating samples are taken as preprocessed: channels are not converted)"))
        if size is not None and tuple(x.shape[1:]) != size:
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        out.append(x)
    c = out[0].shape[0]
    if any(o.shape[0] != c for o in out):
        raise CalibrationError(f"{path}: the samples differ in channels; give the model's channels")
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) not in (1, c):
            raise CalibrationError(f"{name} has {len(v)} values for {c}-channel images (give 1 or {c})")
    if std is not None and any(float(t) == 0.0 for t in std):
        raise CalibrationError("std must not contain 0")
    x = torch.stack(out)
    if pixels and mean is not None:
        x = x - torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    if pixels and std is not None:
        x = x / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return list(x.split(batch_size))


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(float16)": np.float16}


def _is_float(dtype: np.dtype) -> bool:
    """numpy's floating types, and the ``ml_dtypes`` ones numpy has no kind for (bfloat16, float8_*)."""
    return bool(np.issubdtype(dtype, np.floating)) or (dtype.kind == "V" and dtype.name.startswith(("bfloat", "float")))


def check_inputs(session, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
    """Check ``feeds`` against an ``onnxruntime.InferenceSession``'s inputs: names, shapes, dtypes, finite values.

    Args:
        session: the ``onnxruntime.InferenceSession``.
        feeds: input name -> tensor or array; floating inputs (float16, bfloat16, float64...) are cast to the
            model's float type.

    Returns:
        Input name -> numpy array, ready for ``session.run``.

    Raises:
        ValueError: missing or unexpected names, a shape or a non-float dtype the model does not take (naming the
            input, what it got and what is expected), NaN/inf in a floating input (naming the samples: ONNX
            ``QuantizeLinear`` saturates inf and maps NaN to a code, so an activation-quantized graph would return
            finite logits for them).
    """
    expected = {i.name: i for i in session.get_inputs()}
    missing = sorted(set(expected) - set(feeds))
    extra = sorted(set(feeds) - set(expected))
    if missing or extra:
        raise ValueError(f"inputs {sorted(feeds)} do not match the model's {sorted(expected)}"
                         + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
    out = {}
    for name, value in feeds.items():
        spec = expected[name]
        if isinstance(value, torch.Tensor):  # float types numpy lacks (bfloat16, float8): via float32, exactly
            value = value.detach().cpu()
            if value.is_floating_point() and value.dtype not in (torch.float16, torch.float32, torch.float64):
                value = value.float()
            arr = value.numpy()
        else:
            arr = np.asarray(value)
        shape = ["batch" if not isinstance(d, int) else d for d in spec.shape]
        if arr.ndim != len(shape) or any(isinstance(d, int) and d != a for d, a in zip(shape, arr.shape)):
            raise ValueError(f"input {name!r} has shape {tuple(arr.shape)}, the model expects "
                             f"({', '.join(str(d) for d in shape)})")
        want = _ORT_TYPES.get(spec.type)
        if want is not None and arr.dtype != want:
            if _is_float(arr.dtype) and np.issubdtype(want, np.floating):
                arr = arr.astype(want)
            else:
                accepted = "any floating dtype (cast)" if np.issubdtype(want, np.floating) else np.dtype(want).name
                raise ValueError(f"input {name!r} has dtype {arr.dtype}, the model expects {spec.type} "
                                 f"(accepted: {accepted})")
        if np.issubdtype(arr.dtype, np.floating):
            bad = ~np.isfinite(arr)
            if bad.any():
                rows = np.flatnonzero(bad.reshape(len(arr), -1).any(1)) if arr.ndim else np.array([0])
                raise ValueError(f"input {name!r} contains {int(bad.sum())} NaN/inf value(s) (sample "
                                 f"{', '.join(map(str, rows[:5]))}{'...' if len(rows) > 5 else ''}): the int8 "
                                 "graph would quantize them to ordinary codes and return finite logits")
        out[name] = arr
    return out


def int8_kernels_saturate() -> bool:
    """Whether ONNX Runtime's fused 8-bit kernels (QLinearConv, QGemm...) can saturate on this CPU.

    Without a VNNI dot product (AVX512-VNNI, AVX-VNNI or AMX-INT8) ONNX Runtime multiplies unsigned 8-bit
    activations by signed 8-bit weights with ``vpmaddubsw``, which adds two products ``a_1 w_1 + a_2 w_2`` in a
    saturating 16-bit integer: ``2 * 255 * 127 = 64770 > 32767``, so sums above ``32767`` are clipped (logit
    errors of the size of the logits on a quantized CNN). The graph itself is right: unfused, the same session
    matches the simulation to float rounding.

    Returns:
        ``True`` on an x86 CPU without VNNI (AVX2 only, or AVX512 without VNNI).
    """
    from ..kernels import cpu_features

    f = cpu_features()
    x86 = bool(f.get("avx2") or f.get("avx512f"))
    return x86 and not (f.get("avx512_vnni") or f.get("avx_vnni") or f.get("amx_int8"))


def session_options(path: str | Path, threads: int | None = None, dequantize_weights: bool | None = None,
                    fuse_int8: bool | None = None):
    """``onnxruntime.SessionOptions`` for an exported file.

    Args:
        path: the ``.onnx`` file (read without external data to inspect the graph).
        threads: intra-op threads (None: ONNX Runtime's default).
        dequantize_weights: set ``session.disable_quant_qdq`` so the weight ``DequantizeLinear`` nodes are
            constant-folded once; None: on when the graph quantizes no activations (see :class:`OnnxClassifier`).
        fuse_int8: let ONNX Runtime fuse the QuantizeLinear / DequantizeLinear pairs of a graph that quantizes
            activations into its 8-bit kernels (its default). None: fused unless those kernels saturate on this CPU
            (:func:`int8_kernels_saturate`); then the session runs at ``ORT_ENABLE_BASIC`` (the quantize and
            dequantize steps as written, float convolutions: correct, slower) with a one-time warning.

    Returns:
        The ``SessionOptions``.
    """
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
    quantizes_activations = False
    if dequantize_weights is None or fuse_int8 is None:  # decided by the graph: read it (without external data)
        graph = onnx.load(str(path), load_external_data=False).graph
        quantizes_activations = any(n.op_type == "QuantizeLinear" for n in graph.node)
    if dequantize_weights is None:
        dequantize_weights = not quantizes_activations
    if dequantize_weights:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if fuse_int8 is None and quantizes_activations and int8_kernels_saturate():
        fuse_int8 = False
        if not _warned_unfused:
            _warned_unfused.append(True)
            warnings.warn("onnxruntime's fused 8-bit kernels saturate on this CPU (no VNNI: 16-bit pair sums of "
                          "u8 x s8 products); the activation-quantized graph runs unfused (ORT_ENABLE_BASIC): "
                          "correct, slower. Deploy on a CPU with AVX512-VNNI / AVX-VNNI for the integer kernels, "
                          "or pass fuse_int8=True to run them anyway", RuntimeWarning, stacklevel=2)
    if fuse_int8 is False:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return so


_warned_unfused: list[bool] = []


class OnnxClassifier:
    """An ONNX Runtime session with checked inputs: ``OnnxClassifier("model.onnx")(images) -> logits``.

    Args:
        path: the ``.onnx`` file (or the folder holding ``model.onnx``).
        threads: intra-op threads (None: ONNX Runtime's default).
        dequantize_weights: dequantize the block-wise int4/int8 weights of float convolutions once at session
            creation (session option ``session.disable_quant_qdq``: ONNX Runtime then constant-folds the weight
            ``DequantizeLinear`` nodes) instead of at every call: float-convolution speed, float weights in memory,
            the file stays small. None (default): on when the graph quantizes no activations (a weight-only
            export), where no int8 fusion is lost.
        fuse_int8: run an activation-quantized graph on ONNX Runtime's fused 8-bit kernels; None (default): unless
            they saturate on this CPU (no VNNI, :func:`int8_kernels_saturate`), then unfused with a warning.
    """

    def __init__(self, path: str | Path, threads: int | None = None, dequantize_weights: bool | None = None,
                 fuse_int8: bool | None = None) -> None:
        import onnxruntime as ort

        p = Path(path)
        p = p / "model.onnx" if p.is_dir() else p
        so = session_options(p, threads, dequantize_weights, fuse_int8)
        self.session = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: Any) -> np.ndarray:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the model takes {len(self.input_names)} input(s) {self.input_names}, got {len(inputs)}")
        feeds = check_inputs(self.session, dict(zip(self.input_names, inputs)))
        try:
            return self.session.run(None, feeds)[0]
        except Exception as e:  # ORT's own message, with the input named
            raise ValueError(f"onnxruntime failed on inputs "
                             f"{ {k: tuple(v.shape) for k, v in feeds.items()} }: {e}") from e


def _backend(model: nn.Module, path: Path, **options: Any) -> ExportReport:
    return export_onnx(model, path, **options)


register_export_format("onnx", _backend, description="ONNX Runtime: int8 QDQ (QLinearConv/QGemm), MatMulNBits "
                       "4-bit, static activation scales", requires=("onnx", "onnxruntime"), replace=True)
