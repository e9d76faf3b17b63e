"""Save and load quantized models: safetensors + JSON, crash-safe folder swaps, one manifest, no pickle.

A saved folder holds

* ``model.safetensors`` - every tensor of the model's state dict (packed codes, scales, zeros, bit maps, float
  tensors; tied tensors stored once; header metadata keys sorted, so the same model gives the same bytes);
* ``medquant.json`` - format version, the SHA-256 and byte size of ``model.safetensors``, the model class, each
  quantized module's recipe (bits per row, scheme, scope, shapes; ``weight_dtype`` when it is not the bias dtype,
  e.g. bfloat16 layers without bias) and optional JSON ``extras`` (e.g. a fitted ComplexityScorer's state);
* ``config.json`` - for Hugging Face models, their config, so the same class is rebuilt on load (with a medquant
  ``quantization_config`` recording the quantized layers, so that transformers' ``from_pretrained`` rebuilds them
  too); ``generation_config.json`` for those that generate, given back by :func:`load`;
* ``configuration_*.py`` / ``modeling_*.py`` - for a model whose class is a folder's own code (loaded with
  ``trust_remote_code=True``), that code, as transformers' ``save_pretrained`` copies it, named by the config's
  ``auto_map``; :func:`load` runs it only with ``trust_remote_code=True`` (:func:`remote_code_files` lists the code a
  folder would run, reading only its JSON);
* ``medquant.manifest.json`` - the SHA-256 and size of every other file, with a digest of its own
  (:mod:`medquant.io.manifest`).

**Crash-safe**: a save writes a complete new version of the folder next to it and switches the path to it in one
atomic step (:mod:`medquant.io.atomic`: a real folder is exchanged whole with the new one, Linux
``renameat2(RENAME_EXCHANGE)``; where that is missing, the path becomes a symlink to a versioned sibling folder),
so a killed save
leaves the previous checkpoint, a reader never sees a mix of two saves, concurrent saves to one path are serialised
(last writer wins), and the orphans of killed saves are removed by the next one. Files in the folder that a save
does not own (a tokenizer, a README) are carried into the new version.

**Checked loads**: :func:`load` resolves the folder once, checks the manifest (every file's size and SHA-256, and
the manifest's own digest), parses ``medquant.json`` against one schema (:mod:`medquant.io.schema`), checks every
shape and dtype a recipe implies against the safetensors header before any tensor is built, reads only plain file
names inside the folder (no separators, no ``..``, no symlinks), and raises :class:`CheckpointError` naming the
file, the key and what was expected. Folders saved before the manifest existed still load, with a
:class:`CheckpointWarning` that only their weights are verified; :func:`upgrade` (``medquant upgrade PATH``)
rewrites one in the new form.

Inside: :mod:`~medquant.io.checkpoint` (the writer and the reader: :func:`save`, :func:`load`, :func:`verify`,
:func:`upgrade`...), :mod:`~medquant.io.schema` (``medquant.json`` and safetensors headers, checked),
:mod:`~medquant.io.manifest` (file digests), :mod:`~medquant.io.atomic` (the crash-safe folder switch).
"""
from .checkpoint import (
    HF_CONFIG_NAME,
    MANIFEST_NAME,
    META_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointWarning,
    build_hf_model,
    checkpoint_path,
    dense_layouts,
    format_version_of,
    load,
    load_extras,
    read_metadata,
    remote_code_files,
    remote_code_refusal,
    save,
    upgrade,
    verify,
    verify_pretrained,
    write_checkpoint,
)

__all__ = [
    "HF_CONFIG_NAME",
    "MANIFEST_NAME",
    "META_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "CheckpointWarning",
    "build_hf_model",
    "checkpoint_path",
    "dense_layouts",
    "format_version_of",
    "load",
    "load_extras",
    "read_metadata",
    "remote_code_files",
    "remote_code_refusal",
    "save",
    "upgrade",
    "verify",
    "verify_pretrained",
    "write_checkpoint",
]
