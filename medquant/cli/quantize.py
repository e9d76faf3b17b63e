"""``medquant quantize``: quantize a Hugging Face model folder (RTN, AWQ or GPTQ) and save it loadable by
``from_pretrained``.

Example::

    medquant quantize path/to/model out/ --bits 4 --group-size 128
    medquant quantize path/to/model out/ --bits 4 --method gptq --calib reports.txt --skip @vision @head
    medquant quantize path/to/model out/ --method gptq --calib reports.txt --block-by-block --stream --device cuda

The folder is loaded with its config's architecture class (``AutoModelForCausalLM`` / ``AutoModel`` otherwise) in
its stored dtypes (a bfloat16 folder stays bfloat16, as ``from_pretrained`` loads it; ``bytes before`` is its size
in them), quantized (``rtn``: :func:`medquant.quantize_`; ``awq``: :func:`medquant.calibrate.awq_quantize_`;
``gptq``: :func:`medquant.calibrate.gptq_quantize_`, both calibrated on ``--calib``, a UTF-8 text file tokenized
with the folder's tokenizer into ``--calib-samples`` sequences of ``--seq-len`` tokens (default 32 of 512; without
``--calib`` they would be read for nothing and are refused); with ``--calib-images`` a VLM is calibrated on images
each paired with a paragraph through the folder's processor, so its vision tower is calibrated too:
:func:`medquant.cli.prune.image_calibration_batches`) and saved with :func:`medquant.hf.save_pretrained` (the
tokenizer files are saved with it, as part of the checkpoint: listed in its manifest, so a rerun into the same
``OUT_DIR`` leaves a folder that verifies). Reload with ``import medquant`` and the ``from_pretrained(OUT_DIR)`` of
the folder's class (printed: ``LlavaForConditionalGeneration`` for a LLaVA folder, ``LlamaForCausalLM``...; an Auto
class with ``trust_remote_code=True`` for a folder's own code). A summary table (layers quantized, average bits,
bytes before and after, which path ran) is printed; ``--json`` prints it as JSON, with ``calibration``: the
sequences and tokens calibrated on (``null`` for ``rtn``; a ``--calib`` file with fewer tokens than
``--calib-samples`` x ``--seq-len`` calibrates on what it holds, with a warning).

``--block-by-block`` (``awq`` / ``gptq``): :func:`medquant.calibrate.awq_quantize_sequential` /
:func:`medquant.calibrate.gptq_quantize_sequential` instead, one decoder / vision block at a time on ``--device``
(default ``cpu``), each block calibrated on the outputs of the already quantized blocks before it; the finished
blocks go back to the CPU. ``--stream`` (with ``--block-by-block``) never holds the float model whole: it is built
on the meta device from the folder's ``config.json`` (``accelerate.init_empty_weights()``: the architecture class,
the stored dtype, tied weights as ``from_pretrained`` ties them) and each block's float weights are read from the
folder's safetensors (``model.safetensors`` or a sharded index) when it is processed, under the names
``from_pretrained`` gives them (:func:`medquant.models.checkpoint_renaming`: transformers renames the stored tensors
of some checkpoints while loading, e.g. VLMs saved in their older layout, ``language_model.model.layers.0...`` read
as ``model.language_model.layers.0...``). Refused before any work: a folder that holds no safetensors, a folder
already quantized by another library (a ``quantization_config`` in its ``config.json``: its codes are no float
weights), tensors that transformers converts while loading (fuses, splits or permutes: MoE experts stored per
expert and stacked into one 3-D tensor, as ``save_pretrained`` writes Mixtral-style models), which cannot be read
one by one, a folder that lacks some of the model's tensors once renamed, and a tensor of another shape than the
model's.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .args import (
    bit_width,
    compute_device,
    existing_file,
    existing_folder,
    existing_path,
    hf_config_file,
    output_folder_message,
    output_is_input_message,
    positive_int,
    role_or_name,
    sequence_length,
    trusts_remote_code,
    utf8_text,
)
from .prune import (
    CALIB_SPLIT_HELP,
    _load,
    _refuse_medquant_folder,
    folder_processor,
    folder_tokenizer,
    image_calibration_batches,
    model_class,
    save_preprocessing,
)

CALIB_SAMPLES = 32  # --calib-samples by default: calibration sequences
SEQ_LEN = 512  # --seq-len by default: tokens per calibration sequence
PATHS = {"whole-model": "whole model", "block-by-block": "block by block",
         "block-by-block-streamed": "block by block, float weights streamed from the folder's safetensors"}


def _paragraphs(text: str) -> list[str]:
    """The non-empty lines of a calibration text file, stripped (``\\r\\n`` line ends read as ``\\n``)."""
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n") if p.strip()]


def calibration_batches(tok, path: str, samples: int, seq_len: int, text: str | None = None) -> list[dict]:
    """``samples`` batches of one ``seq_len``-token sequence each, cut in order from the text of ``path``
    (paragraphs joined; fewer when the text is short; the last piece may be shorter, and is dropped below 2 tokens).
    ``seq_len`` must be at least 2 (``ValueError`` otherwise). ``text``: the file's text when already read (a file
    that is not UTF-8 is a ``SystemExit`` naming ``--calib``)."""
    import torch

    if seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (tokens per calibration sequence), got {seq_len}")

    if tok is None:
        raise SystemExit("--calib needs the model folder's tokenizer; none could be loaded")
    if text is None:
        text = utf8_text(path, "--calib")
    paragraphs = _paragraphs(text)
    ids: list[int] = []
    for p in paragraphs:
        ids.extend(tok(p, add_special_tokens=True)["input_ids"])
        if len(ids) >= samples * seq_len:
            break
    chunks = [ids[i:i + seq_len] for i in range(0, min(len(ids), samples * seq_len), seq_len)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise SystemExit(f"--calib: {path} holds no text to calibrate on (fewer than 2 tokens)")
    return [{"input_ids": torch.tensor([c]), "attention_mask": torch.ones(1, len(c), dtype=torch.long)}
            for c in chunks]


def _tensor_aliases(model) -> dict[str, set[str]]:
    """State-dict name -> every name of the same tensor: names bound to one parameter / buffer object and the
    Hugging Face tied-weight keys (``lm_head.weight`` <-> ``model.embed_tokens.weight``), both directions."""
    pairs: list[tuple[str, str]] = []
    first: dict[int, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        pairs.append((name, first.setdefault(id(t), name)))
    for prefix, mod in model.named_modules():
        keys = getattr(mod, "all_tied_weights_keys", None)
        if isinstance(keys, dict):
            p = f"{prefix}." if prefix else ""
            pairs += [(p + a, p + b) for a, b in keys.items()]
    groups: dict[str, set[str]] = {}
    for a, b in pairs:
        merged = groups.get(a, {a}) | groups.get(b, {b})
        for n in merged:
            groups[n] = merged
    return groups


def _first_float_dtype(files: Sequence[Path]):
    """The dtype of the first floating-point tensor of the safetensors ``files`` (headers only), ``None`` if none:
    a :class:`medquant.calibrate.CheckpointSource`'s ``files`` (``model.safetensors``, else the shards of
    ``model.safetensors.index.json``: the file ``from_pretrained`` reads where both are there)."""
    import torch
    from safetensors import safe_open

    floats = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                dtype = floats.get(fh.get_slice(k).get_dtype())
                if dtype is not None:
                    return dtype
    return None


def _keep_in_float32(model, dtype) -> None:
    """Give the tensors that ``from_pretrained`` keeps in float32 (the model's ``_keep_in_fp32_modules`` for a
    float16 load, ``_keep_in_fp32_modules_strict`` for float16 / bfloat16: T5's ``wo``) float32, as it does (its
    dtype plan's patterns searched in each state-dict name); a parameter keeps its object (ties kept)."""
    import re

    import torch

    plan = getattr(model, "_get_dtype_plan", None)
    plan = plan(dtype) if plan is not None and dtype is not None else {}
    if not plan:
        return
    pattern = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in plan))
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.is_floating_point() or not pattern.search(name):
            continue
        want = plan[next(p for p in plan if re.search(p.replace("*", ".*"), name))]
        if isinstance(t, torch.nn.Parameter):
            t.data = t.data.to(want)
        else:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = t.to(want)


def _untie_stored_apart(model, source) -> None:
    """Untie, as ``from_pretrained`` does, each tied pair (a model's ``all_tied_weights_keys``, ``target -> source``,
    full names) whose two names the folder both stores with different values (cast to the parameter's dtype): the
    config says ``tie_word_embeddings`` while the checkpoint holds a head of its own. The target gets a meta
    parameter of its own (read from the folder like the others) and the pair leaves every
    ``all_tied_weights_keys`` naming it; a ``UserWarning`` says so (``from_pretrained`` logs the same). A pair
    stored once, or twice with equal values, stays tied."""
    import warnings

    import torch

    dicts = [(f"{prefix}." if prefix else "", keys) for prefix, mod in model.named_modules()
             if isinstance(keys := getattr(mod, "all_tied_weights_keys", None), dict)]
    untied: set[tuple[str, str]] = set()
    for p, keys in dicts:
        for target, src in keys.items():
            t_name, s_name = p + target, p + src
            if (t_name, s_name) in untied or t_name not in source or s_name not in source:
                continue
            try:
                t_param, s_param = model.get_parameter(t_name), model.get_parameter(s_name)
            except AttributeError:  # a buffer or a name the model does not hold: nothing to untie
                continue
            if t_param is not s_param or torch.equal(source.get(t_name).to(t_param.dtype),
                                                     source.get(s_name).to(s_param.dtype)):
                continue
            owner, _, leaf = t_name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(
                torch.empty_like(t_param, device="meta"), requires_grad=t_param.requires_grad)
            untied.add((t_name, s_name))
            warnings.warn(f"the config ties {t_name} to {s_name} (tie_word_embeddings), but the folder stores both "
                          "with different values: they are not tied, each is read from the folder (as "
                          "from_pretrained does)", UserWarning, stacklevel=3)
    for p, keys in dicts:
        for target in [t for t, src in keys.items() if (p + t, p + src) in untied]:
            keys.pop(target)


def load_skeleton(path: str, trust_remote_code: bool | None = None):
    """The model of the Hugging Face folder ``path`` built on the meta device, and the source of its float weights.

    The model is built as ``from_pretrained`` builds it (``accelerate.init_empty_weights()``: no float weights in
    memory) - its config's architecture class (``AutoModelForCausalLM`` / ``AutoModel`` otherwise), the stored dtype
    (``config.dtype``, else the first floating-point tensor's; ``_keep_in_fp32_modules`` kept in float32), tied
    weights tied (not a pair the folder stores twice with different values: as ``from_pretrained``, each is then
    read on its own, with a ``UserWarning``), eval mode, the folder's ``generation_config.json`` - with its
    persistent buffers read from the folder. The source is the :class:`medquant.calibrate.CheckpointSource` of the
    folder's safetensors, from which ``checkpoint=`` reads the blocks, with the stored names renamed as
    ``from_pretrained`` renames them (:func:`medquant.models.checkpoint_renaming`: a VLM saved in its older layout,
    ``language_model.model.layers.0...``, is read as ``model.language_model.layers.0...``; a base-model folder read
    into a model with a head). The rules that renamed a stored name are kept as the model's ``_weight_conversions``,
    as ``from_pretrained`` keeps them, so that ``save_pretrained`` writes the quantized folder in the layout of the
    input folder, as after ``from_pretrained``.

    Args:
        path: the model folder.
        trust_remote_code: let transformers run the folder's own Python code (its config's ``auto_map``), as
            ``--trust-remote-code``; ``None``: the running command's flag. An untrusted folder with such code is
            refused before any of it runs.

    Returns:
        ``(model, source)``.

    Raises:
        SystemExit: before any work: a folder another library quantized (its ``config.json`` has a
            ``quantization_config``: bitsandbytes' int8 codes are stored under ``weight``, in the float weight's
            shape, and would be read as float weights), refused as every command refuses it; naming ``--stream``:
            a folder without ``model.safetensors`` / ``model.safetensors.index.json`` or whose safetensors cannot
            be read; stored tensors that transformers converts while loading (fused, split or permuted: per-expert
            MoE weights stacked into one 3-D tensor), which cannot be read one by one under a new name; two stored
            tensors read under one name; tensors that do not carry the name of every parameter of the model's
            state dict once renamed (or another name of the same tensor: a tied ``lm_head.weight`` stored once); a
            stored tensor whose shape is not the model's (``from_pretrained`` refuses it too).
    """
    import os

    _refuse_medquant_folder(path, None, "quantize")
    trust = trusts_remote_code(trust_remote_code)
    hf_config_file(path, trust)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from ..calibrate import CheckpointSource
    from ..models import checkpoint_renaming

    folder = Path(path)
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        raise SystemExit(f"--stream reads the float weights from the folder's safetensors; {path} has neither "
                         "model.safetensors nor model.safetensors.index.json: run without --stream")
    try:
        stored = CheckpointSource(folder)  # the headers, checked before the model is built
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--stream: {path}: {e}") from None
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    cls = model_class(cfg)
    dtype = getattr(cfg, "dtype", None) or _first_float_dtype(stored.files)  # from_pretrained's "auto"
    with init_empty_weights():  # a model class builds through _from_config, an Auto class through from_config
        if hasattr(cls, "_from_config"):
            model = cls._from_config(cfg, dtype=dtype)
        else:  # the folder's own class (auto_map) is built by the Auto class, which records it for the save
            model = cls.from_config(cfg, dtype=dtype, trust_remote_code=trust)
    model.tie_weights()
    model.eval()
    _keep_in_float32(model, dtype)
    if model.can_generate() and (folder / "generation_config.json").is_file():  # as from_pretrained reads it
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    state = model.state_dict(keep_vars=True)
    renaming = checkpoint_renaming(model)
    if renaming is not None:
        # the tensors from_pretrained would hand to a WeightConverter (the name it gives them is the model's)
        converted = sorted(k for k in stored.keys()  # noqa: SIM118 (a CheckpointSource is not iterable)
                           if (r := renaming.rename(k))[1] is not None and r[0] in state)
        if converted:
            raise SystemExit(f"--stream: transformers converts these tensors while loading {path} (fuses, splits or "
                             "permutes them into other tensors, e.g. per-expert MoE weights stacked into one 3-D "
                             f"tensor), which reading them one by one under their names cannot do: {len(converted)} "
                             f"tensors ({', '.join(converted[:3])}{', ...' if len(converted) > 3 else ''}); run "
                             "without --stream (the model is then loaded whole)")
        try:
            source = CheckpointSource(folder, rename=renaming)
        except ValueError as e:
            raise SystemExit(f"--stream: {e}; run without --stream (the model is then loaded whole)") from None
        # as from_pretrained keeps them: save_pretrained writes the tensors back under the folder's layout
        model._weight_conversions = renaming.used()
    else:  # pragma: no cover - a transformers without weight conversions: the stored names are the model's
        source = stored
    _untie_stored_apart(model, source)  # a tie the folder contradicts, as from_pretrained unties it
    state = model.state_dict(keep_vars=True)
    aliases = _tensor_aliases(model)
    # the meta tensors (a buffer built real that the folder lacks keeps its initial value, as from_pretrained's)
    missing = [k for k, t in state.items() if t.is_meta and not any(a in source for a in aliases.get(k, {k}))]
    if missing:
        raise SystemExit(f"--stream: the safetensors of {path} do not hold {len(missing)} of the model's "
                         f"{len(state)} tensors, under its own names or those from_pretrained renames the stored "
                         f"ones to ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); run without "
                         "--stream (the model is then loaded whole)")
    buffers = dict(model.named_buffers())
    # shapes from the headers, before any work (from_pretrained refuses a mismatch while loading; reading it when
    # its block comes would fail after the blocks before it were calibrated)
    wrong = []
    for k, t in state.items():
        if not t.is_meta and not (k in buffers and k in source):
            continue
        name = next(a for a in (k, *sorted(aliases.get(k, {k}) - {k})) if a in source)
        got = source.shape(name)
        if got != tuple(t.shape):
            wrong.append(f"{source.stored_name(name)} {got}, the model's {k} {tuple(t.shape)}")
    if wrong:
        raise SystemExit(f"--stream: {len(wrong)} tensor(s) of {path} have another shape than the model built from "
                         f"its config.json ({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}); "
                         "from_pretrained refuses them too: the weights and config.json do not belong together")
    for k, t in state.items():  # persistent buffers are built real (not on meta): take the stored values
        if k in buffers and t.device.type != "meta" and k in source:
            owner, _, leaf = k.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = source.get(k).to(t.dtype)
    return model, source



def _summary(before, after, n_layers: int, method: str) -> dict:
    return {"method": method, "layers_quantized": n_layers, "average_bits": round(after.effective_bits, 4),
            "bytes_before": before.total_bytes, "bytes_after": after.total_bytes,
            "linear_bytes_before": before.linear_weight_bytes, "linear_bytes_after": after.linear_weight_bytes}


def save_with_tokenizer(model, tok, out: Path, processor=None) -> None:
    """:func:`medquant.hf.save_pretrained` of ``model`` into ``out`` with the tokenizer files of ``tok`` and the
    files of the folder's ``processor`` (when not ``None``: a VLM's or image model's, :func:`.prune.folder_processor`)
    saved as part of the same checkpoint: the folder is replaced as one unit and its manifest lists them, so a later
    run into the same ``out`` (another model, another tokenizer) leaves a folder that verifies.

    Everything is written inside the new version folder of ``out`` that :func:`medquant.io.write_checkpoint`
    yields (a staging folder ``.{name}.mq-tmp-*`` beside ``out``): the model is saved into a scratch sub-folder
    of it, its files are moved up, the scratch removed, and the tokenizer saved beside them. A run killed in the
    middle (even by SIGKILL) leaves only that staging folder, which the next save into ``out`` removes (as every
    checkpoint save does, under ``out``'s lock)."""
    import os
    import shutil

    from ..hf import save_pretrained
    from ..io import write_checkpoint
    from ..io.manifest import MANIFEST_NAME

    if tok is None and processor is None:
        save_pretrained(model, out)
    else:
        with write_checkpoint(out) as folder:
            scratch = folder / ".quantize-scratch"
            save_pretrained(model, scratch)  # a checkpoint of its own, inside the new version folder
            helpers = set(os.listdir(folder))  # the scratch folder and its save's lock file
            for f in sorted(scratch.iterdir()):
                if f.name != MANIFEST_NAME:  # write_checkpoint writes the manifest of the whole folder
                    shutil.move(str(f), str(folder / f.name))
            for name in helpers:
                p = folder / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            save_preprocessing(folder, tok, processor)


def run(args) -> int:
    from .. import QuantConfig, quantize_
    from ..quant.api import quantized_modules
    from ..quant.size import model_size

    config = QuantConfig(args.bits, symmetric=True if args.symmetric else None, group_size=args.group_size)
    text = utf8_text(args.calib, "--calib") if args.calib else None  # before the model: a bad file is named at once
    source = None
    images = None  # image batches before the model: a folder without a processor is named before any loading
    if args.calib_images:
        assert text is not None  # --calib-images needs --calib (checked with the arguments)
        # a folder refused whatever the data is named as such (a medquant checkpoint has no processor files)
        _refuse_medquant_folder(args.model, None, "quantize")
        hf_config_file(args.model, args.trust_remote_code)
        images = image_calibration_batches(args.model, args.calib_images, _paragraphs(text), args.calib_samples,
                                           args.seq_len, trust_remote_code=args.trust_remote_code,
                                           split=args.calib_split)
    if args.stream:
        model, source = load_skeleton(args.model, trust_remote_code=args.trust_remote_code)
        tok = folder_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    else:
        model, tok = _load(args.model, None, keep_dtype=True, command="quantize",
                           trust_remote_code=args.trust_remote_code)
    if images is not None:
        calib = images
    else:
        calib = calibration_batches(tok, args.calib, args.calib_samples, args.seq_len, text) if args.calib else None
    # what the calibration ran on (a short --calib file gives fewer or shorter sequences than asked)
    counted = None if calib is None else {"sequences": len(calib),
                                          "tokens": sum(int(b["input_ids"].shape[-1]) for b in calib)}
    if images is None and counted is not None and counted["tokens"] < args.calib_samples * args.seq_len:
        import warnings

        warnings.warn(f"--calib {args.calib} holds fewer tokens than --calib-samples {args.calib_samples} x --seq-len "
                      f"{args.seq_len}: calibrating on {counted['sequences']} sequence(s), {counted['tokens']} tokens "
                      "(give a longer file, or smaller --calib-samples / --seq-len)", UserWarning, stacklevel=2)
    before = model_size(model)
    skip = list(args.skip) or None
    progress = not args.json
    device = args.device or "cpu"
    # AWQ scales the language model by default (scope None); batches with images run the vision tower too
    awq_scope = "all" if images is not None else None
    if args.method == "rtn":
        quantize_(model, config, skip=skip, progress=progress)
    elif args.method == "awq" and args.block_by_block:
        from ..calibrate import awq_quantize_sequential

        awq_quantize_sequential(model, config, calib, skip=skip, scope=awq_scope, device=device,
                                offload_device="cpu", checkpoint=source, progress=progress)
    elif args.method == "awq":
        from ..calibrate import awq_quantize_

        awq_quantize_(model, config, calib, skip=skip, scope=awq_scope, progress=progress)
    elif args.block_by_block:
        from ..calibrate import gptq_quantize_sequential

        gptq_quantize_sequential(model, config, calib, skip=skip, device=device, offload_device="cpu",
                                 checkpoint=source, max_hessian_bytes=args.max_hessian_bytes, progress=progress)
    else:
        from ..calibrate import gptq_quantize_

        gptq_quantize_(model, config, calib, skip=skip, progress=progress, max_hessian_bytes=args.max_hessian_bytes)
    if source is not None:
        left = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
        if left:  # nothing read them: save_pretrained would write empty tensors
            raise SystemExit(f"--stream: {len(left)} tensor(s) of the model were not read from {args.model} "
                             f"({', '.join(left[:3])}): run without --stream")
    after = model_size(model)
    summary = _summary(before, after, len(quantized_modules(model)), args.method)
    path = "whole-model" if not args.block_by_block else \
        "block-by-block-streamed" if args.stream else "block-by-block"
    summary.update(path=path, device=device if args.block_by_block else None, calibration=counted)
    out = Path(args.out)
    save_with_tokenizer(model, tok, out, folder_processor(args.model, trust_remote_code=args.trust_remote_code))
    summary["out"] = str(out)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print("| | before | after | change |\n|---|---|---|---|")
        for label, key in [("bytes", "bytes"), ("Linear/Conv2d weight bytes", "linear_bytes")]:
            b, a = summary[f"{key}_before"], summary[f"{key}_after"]
            print(f"| {label} | {b:,} | {a:,} | {100 * (a / b - 1) if b else 0.0:+.1f}% |")
        print(f"layers quantized: {summary['layers_quantized']} ({args.method}), average bits "
              f"{summary['average_bits']:.3f} (weight layers)")
        print(f"path: {PATHS[path]}" + (f", blocks computed on {device}" if args.block_by_block else ""))
        if counted is not None:
            print(f"calibrated on {counted['sequences']} sequence(s), {counted['tokens']:,} tokens")
        # the class the folder is loaded with (its config's architecture; an Auto class for a folder's own code):
        # AutoModelForCausalLM refuses a VLM's or an image model's config
        cls = model_class(model.config).__name__
        remote = ", trust_remote_code=True" if args.trust_remote_code else ""
        print(f"saved to {out} (reload: import medquant; from transformers import {cls}; "
              f"{cls}.from_pretrained({str(out)!r}{remote}))")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a HF model folder (rtn / awq / gptq) and save it",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL_DIR", type=existing_folder, help="Hugging Face model folder")
    p.add_argument("out", metavar="OUT_DIR", help="output folder (not MODEL_DIR itself)")
    p.add_argument("--bits", type=bit_width, default=4, help="bit-width 1..8 (default 4)")
    p.add_argument("--group-size", type=positive_int, default=128, help="input elements per scale (default 128)")
    p.add_argument("--symmetric", action="store_true",
                   help="symmetric scheme (default: asymmetric for <= 3 bits, symmetric above)")
    p.add_argument("--method", choices=["rtn", "awq", "gptq"], default="rtn",
                   help="rtn (round to nearest, no data), awq or gptq (need --calib)")
    p.add_argument("--calib", type=existing_file, default=None, help="UTF-8 calibration text file (awq / gptq)")
    p.add_argument("--calib-images", type=existing_path, default=None, metavar="PATH",
                   help="images (a folder, an index CSV, an .npz or one file) each paired with a --calib paragraph "
                        "through the folder's processor: calibrates a VLM's vision tower too (awq / gptq)")
    p.add_argument("--calib-split", default=None, metavar="NAME", help=CALIB_SPLIT_HELP)
    # None: not given (refused without --calib, read for nothing there); _check puts in the defaults
    p.add_argument("--calib-samples", type=positive_int, default=None,
                   help=f"calibration sequences (with --calib; default {CALIB_SAMPLES})")
    p.add_argument("--seq-len", type=sequence_length, default=None,
                   help=f"tokens per calibration sequence, at least 2 (with --calib; default {SEQ_LEN})")
    p.add_argument("--skip", nargs="+", type=role_or_name, default=[], metavar="PATTERN",
                   help="layers left in float: roles (@vision @projector @language @head), re:<regex> or names "
                        "(default: none, the LM head included, for every --method; the Python awq_quantize_ leaves "
                        "@head float by default)")
    p.add_argument("--max-hessian-bytes", type=positive_int, default=None, metavar="BYTES",
                   help="gptq: the most bytes of Hessian sums held at once (a transformer block is then "
                        "captured in several passes; same result; for MoE models, whose blocks hold one Hessian "
                        "per expert)")
    p.add_argument("--block-by-block", action="store_true",
                   help="awq / gptq: quantize one decoder / vision block at a time (awq_quantize_sequential / "
                        "gptq_quantize_sequential), each calibrated on the outputs of the quantized blocks before it")
    p.add_argument("--device", type=compute_device, default=None, metavar="DEVICE",
                   help="--block-by-block: compute device of the block being quantized (cpu, cuda, cuda:1...; "
                        "default cpu); the finished blocks go back to the CPU")
    p.add_argument("--stream", action="store_true",
                   help="--block-by-block: build the model on the meta device from config.json and read each "
                        "block's float weights from the folder's safetensors when it is processed (the float "
                        "model is never whole in memory; stored names are renamed as from_pretrained renames "
                        "them, e.g. older VLM layouts; tensors transformers fuses or splits while loading, such "
                        "as per-expert MoE weights, are refused)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run, check=lambda args: _check(args, p))


def _check(args, parser: argparse.ArgumentParser) -> None:
    same = output_is_input_message(args.out, args.model, "OUT_DIR")
    if same:
        parser.error(same)
    not_folder = output_folder_message(args.out, "OUT_DIR")
    if not_folder:
        parser.error(not_folder)
    if args.calib_split is not None and not args.calib_images:
        parser.error("--calib-split picks the split of --calib-images: give --calib-images too")
    if args.calib_images and not args.calib:
        parser.error("--calib-images pairs each image with a paragraph of --calib FILE: give both")
    if args.method in ("awq", "gptq") and not args.calib:
        parser.error(f"--method {args.method} needs --calib FILE (calibration text)")
    if args.max_hessian_bytes is not None and args.method != "gptq":
        parser.error(f"--max-hessian-bytes is read by --method gptq, not --method {args.method}")
    if args.method == "rtn" and args.calib:  # it would be read for nothing: the user meant awq or gptq
        parser.error("--calib is read by --method awq or gptq; --method rtn (the default) uses no calibration data")
    given = [f for f, v in (("--calib-samples", args.calib_samples), ("--seq-len", args.seq_len)) if v is not None]
    if given and not args.calib:  # they shape the data read from --calib: read for nothing without it
        parser.error(f"{' / '.join(given)} {'shape' if len(given) > 1 else 'shapes'} the calibration sequences "
                     f"read from --calib FILE (--method awq or gptq); without --calib nothing reads "
                     f"{'them' if len(given) > 1 else 'it'}: give --calib or drop {' / '.join(given)}")
    if args.calib_samples is None:
        args.calib_samples = CALIB_SAMPLES
    if args.seq_len is None:
        args.seq_len = SEQ_LEN
    if args.block_by_block and args.method == "rtn":
        parser.error("--block-by-block is read by --method awq or gptq (calibration one block at a time); "
                     "--method rtn (the default) rounds each layer on its own and has no block-by-block path")
    if args.stream and not args.block_by_block:
        parser.error("--stream reads the float weights one block at a time: it needs --block-by-block "
                     "(and --method awq or gptq)")
    if args.device is not None and not args.block_by_block:
        parser.error("--device is the compute device of --block-by-block; the whole-model path runs where the "
                     "model is loaded (the CPU)")
