"""One export dispatcher: ``export(model, path, format=...)`` looks the format up in a registry of backends.

A backend is a function ``backend(model, path, **options) -> ExportReport`` registered under a format name with
:func:`register_export_format`. Each backend writes a complete folder (or file) at ``path`` that its runtime reads
without medquant, and returns an :class:`ExportReport`: one :class:`LayerExport` row per weight it wrote, saying
how the weight got there:

* ``exact repack`` -- the codes and scales are copied bit for bit into the target's own layout;
* ``exact re-expression`` -- the target type represents the same dequantised weights exactly, in a different
  parametrisation (e.g. one scale per 128 columns repeated for every block of 32);
* ``near-exact`` -- a re-parametrisation that rounds (e.g. an offset ``m = -z * s`` stored in float16); the row's
  ``max_abs_error`` says by how much;
* ``lossy requantization`` -- the weight was quantized again to a type the target has (only with ``promote=True``),
  ``max_abs_error`` again says by how much;
* ``float`` -- kept in floating point (a layer the medquant model kept float, or the target's float type).

A scheme that a format cannot carry is refused with :class:`ExportError`, naming every layer and its scheme,
never written as a silently different model.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

HOW = ("exact repack", "exact re-expression", "near-exact", "lossy requantization", "float")


class ExportError(ValueError):
    """A model, scheme or option that the chosen export format cannot carry; the message names the layers."""


@dataclass
class LayerExport:
    """How one weight went into the export.

    Attributes:
        name: the module (or tensor) name in the medquant model.
        scheme: medquant's scheme of the weight, e.g. ``"int4 sym g128"`` or ``"float32"``.
        target: the type in the exported file, e.g. ``"Q4_0"``, ``"pack-quantized int4 group"``, ``"F16"``.
        how: one of :data:`HOW`.
        max_abs_error: largest absolute difference between the exported weight (as its runtime dequantises it)
            and medquant's dequantised weight; 0.0 for exact rows, ``None`` where not measured.
        note: anything the user should know about this row (a promotion, a transform).

    Raises:
        ValueError: ``how`` is not one of :data:`HOW`.
    """

    name: str
    scheme: str
    target: str
    how: str
    max_abs_error: float | None = 0.0
    note: str = ""

    def __post_init__(self) -> None:
        if self.how not in HOW:
            raise ValueError(f"LayerExport.how must be one of {HOW}, got {self.how!r}")


@dataclass
class ExportReport:
    """What an export wrote: the format, the output path, the files, and one :class:`LayerExport` per weight.

    Attributes:
        format: the format name (``"compressed-tensors"``, ``"gguf"``, ``"onnx"``...).
        path: the folder or file written.
        layers: one row per weight, in the order written.
        files: the files written (relative to ``path`` for a folder).
        notes: remarks on the whole export (options applied, what the runtime needs).
    """

    format: str
    path: str
    layers: list[LayerExport] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of weights per ``how`` category.

        Returns:
            ``{how: count}``, e.g. ``{"exact repack": 30, "float": 2}``.
        """
        return dict(Counter(row.how for row in self.layers))

    def lossy(self) -> list[LayerExport]:
        """The rows whose exported weight differs from medquant's (near-exact or requantized).

        Returns:
            Those :class:`LayerExport` rows (empty when the export is exact); their ``max_abs_error`` says by how
            much.
        """
        return [row for row in self.layers if row.how in ("near-exact", "lossy requantization")]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data.

        Returns:
            ``{"format", "path", "files", "notes", "counts", "layers": [row dicts]}``.
        """
        return {"format": self.format, "path": self.path, "files": list(self.files), "notes": list(self.notes),
                "counts": self.counts(), "layers": [asdict(row) for row in self.layers]}

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON text.

        Returns:
            The JSON text.
        """
        return json.dumps(self.to_dict(), indent=2)

    def table(self, max_rows: int | None = 40) -> str:
        """A plain-text table: one row per weight (the first ``max_rows``), then the counts per category.

        Args:
            max_rows: rows shown before "... N more rows"; ``None`` shows all.

        Returns:
            The table, the counts line and the notes, newline-separated.
        """
        head = ("layer", "medquant scheme", "exported as", "how", "max |err|")
        rows = [(r.name, r.scheme, r.target, r.how,
                 "-" if r.max_abs_error is None else f"{r.max_abs_error:.3g}") for r in self.layers]
        shown = rows if max_rows is None else rows[:max_rows]
        widths = [max([len(h)] + [len(row[i]) for row in shown]) for i, h in enumerate(head)]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        out = [line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in shown]
        if len(rows) > len(shown):
            out.append(f"... {len(rows) - len(shown)} more rows")
        out.append("; ".join(f"{n} {how}" for how, n in self.counts().items()) + f" -> {self.path} ({self.format})")
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)


ExportBackend = Callable[..., ExportReport]


@dataclass(frozen=True)
class _Format:
    name: str
    backend: ExportBackend
    description: str
    requires: tuple[str, ...]


_FORMATS: dict[str, _Format] = {}
# formats whose backend module registers itself on import: name -> module (imported on first use)
_BUILTIN = {
    "compressed-tensors": "medquant.deploy.compressed_tensors",
    "gguf": "medquant.deploy.gguf",
    "onnx": "medquant.deploy.onnx",
}


def register_export_format(name: str, backend: ExportBackend, *, description: str = "",
                           requires: tuple[str, ...] | str = (), replace: bool = False) -> None:
    """Register ``backend`` under ``name`` for :func:`export`.

    Args:
        name: the ``format=`` value, e.g. ``"gguf"``.
        backend: ``backend(model, path, **options) -> ExportReport``.
        description: one line for :func:`export_formats` and ``medquant export --help``.
        requires: importable Python packages the backend needs (named in the error when one is missing); a
            single string is one package.
        replace: allow replacing an existing registration (otherwise a second registration raises). A built-in
            name (``"gguf"``, ``"compressed-tensors"``...) counts as registered even before its backend module was
            imported: that module is imported first, so that its own registration comes first and a later import
            of it neither raises nor puts the built-in back over a replacement.

    Raises:
        ValueError: an empty name, or a name already registered (a built-in name included) without
            ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"export format name must be a non-empty string, got {name!r}")
    if name not in _FORMATS and name in _BUILTIN and _BUILTIN[name] not in sys.modules:
        # not the built-in module registering itself (it is in sys.modules while it runs): register it first
        import importlib

        try:
            importlib.import_module(_BUILTIN[name])
        except ImportError:  # the built-in cannot load here: the name is free
            pass
    if name in _FORMATS and not replace:
        raise ValueError(f"export format {name!r} is already registered (pass replace=True to override)")
    _FORMATS[name] = _Format(name, backend, description, (requires,) if isinstance(requires, str) else tuple(requires))


def _lookup(name: str) -> _Format:
    if name not in _FORMATS and name in _BUILTIN:
        import importlib

        try:
            importlib.import_module(_BUILTIN[name])
        except ModuleNotFoundError as e:
            if e.name != _BUILTIN[name]:
                raise
            raise ExportError(f"export format {name!r} is not available in this installation (its backend module "
                              f"{_BUILTIN[name]} is missing)") from None
    if name not in _FORMATS:
        raise ExportError(f"unknown export format {name!r}; available: {', '.join(export_formats())}")
    return _FORMATS[name]


def export_formats() -> list[str]:
    """The names :func:`export` accepts (built-in and registered).

    Returns:
        Sorted format names, e.g. ``["compressed-tensors", "gguf", "onnx"]``.
    """
    return sorted(set(_FORMATS) | set(_BUILTIN))


def format_description(name: str) -> str:
    """The one-line description a backend registered for ``name``.

    Args:
        name: a format name (a built-in backend is imported on first use).

    Returns:
        The description given to :func:`register_export_format` (may be empty).

    Raises:
        ExportError: an unknown format, or a built-in backend missing from this installation.
    """
    return _lookup(name).description


def _check_requirements(fmt: _Format) -> None:
    import importlib.util

    missing = [pkg for pkg in fmt.requires if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ExportError(f"format={fmt.name!r} needs the package(s) {', '.join(missing)}; install them with "
                          f"pip install 'medquant[export]'")


def check_format(name: str) -> None:
    """Raise :class:`ExportError` now if :func:`export` would refuse ``format=name``.

    Callers check this before loading a model.

    Args:
        name: the format name.

    Raises:
        ExportError: an unknown format, a backend that is not installed, or a missing optional package.
    """
    _check_requirements(_lookup(name))


def publish_mode(path: Path) -> None:
    """Give a file or folder written as a private temporary the mode a plain ``open`` / ``mkdir`` would have given.

    ``tempfile.mkstemp`` creates files ``0o600`` and ``mkdtemp`` folders ``0o700``; an export moved into place
    from one would be unreadable to a serving process running as another user. The mode becomes
    ``0o666 & ~umask`` for a file and ``0o777 & ~umask`` for a folder (its contents were written by plain ``open``
    and keep theirs).

    Args:
        path: the temporary file or folder, before it is moved into place.
    """
    mask = os.umask(0o022)  # read the process umask (set back at once)
    os.umask(mask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def made_folders(folder: Path) -> Iterator[Path]:
    """Create ``folder`` and its missing parents for the ``with`` block; remove the ones created if the block fails.

    An export writes its temporary beside the target inside this block, so a failed export leaves the file system
    as it found it: when the block raises, every folder this call created is removed, deepest first. A folder that
    existed before is never removed, nor a created one that is no longer empty (something else wrote into it in
    the meantime). The block's own temporary files must be removed before the block ends.

    Args:
        folder: the folder the export writes into (the parent of the output file or folder).

    Yields:
        ``folder``, which exists.

    Raises:
        ExportError: the nearest existing ancestor of ``folder`` (or ``folder`` itself) is not a folder.
    """
    missing = []
    existing = Path(folder)
    while not os.path.lexists(existing) and existing.parent != existing:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"{existing} exists and is not a folder; the export cannot create {folder} there")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue  # made by another process meanwhile: not this call's to remove
            created.append(d)
        yield Path(folder)
    except BaseException:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:  # not empty: something else wrote into it
                pass
        raise


def output_file_path(path: str | os.PathLike, overwrite: bool, *, suffix: str, format: str) -> Path:
    """The file a single-file export writes: ``path`` itself when it ends in ``suffix`` (in any case: ``m.GGUF`` is
    a file too), else ``path/model<suffix>``. A file path that is a symbolic link is followed (every link,
    ``os.path.realpath``): the file it names is the one written and replaced (its temporary file made beside it),
    and the link stays as it is.

    Args:
        path: the path given to the export.
        overwrite: whether an existing file may be replaced.
        suffix: the format's file suffix, e.g. ``".gguf"``.
        format: the format name, for the messages.

    Returns:
        The file to write.

    Raises:
        ExportError: the file's path is a folder (a ``suffix`` path that is a folder, or a folder
            ``model<suffix>`` inside the target folder, also through a link): no overwrite replaces a folder, so
            the message asks for a file path; ``path`` (without ``suffix``, naming a folder) is a file; the file
            exists and ``overwrite`` is False; the file's path is a link to nothing, or a loop of links.
    """
    path = Path(path)
    default = f"model{suffix}"
    if path.suffix.lower() == suffix.lower():
        if path.is_dir():
            raise ExportError(f"{path} is a folder; a path ending in {suffix} names the file format={format!r} "
                              f"writes: give a file path (e.g. {path / default} to write into that folder)")
        file = path
    else:
        if os.path.lexists(path) and not path.is_dir():
            raise ExportError(f"{path} exists and is not a folder; a path without {suffix} names a folder to write "
                              f"{default} into (give a name ending in {suffix} to write that file)")
        file = path / default
        if file.is_dir():
            raise ExportError(f"{file} is a folder; format={format!r} writes {default} into {path} as a file: give a "
                              f"file path (a name ending in {suffix} elsewhere), or move that folder away")
    if os.path.lexists(file) and not overwrite:
        raise ExportError(f"{file} exists; pass overwrite=True (command line: --overwrite) to replace it")
    if file.is_symlink():  # the file the link names is written (and replaced); the link stays
        real = link_target(file, "file")
        if real.is_dir():
            raise ExportError(f"{file} is a folder (a symbolic link to {real}); format={format!r} writes a file: "
                              f"give a file path")
        file = real
    return file


def link_target(path: Path, kind: str) -> Path:
    """What the symbolic link ``path`` names, every link followed (``os.path.realpath``): the ``kind``
    (``"file"`` or ``"folder"``) an export writes there instead of replacing the link.

    Raises:
        ExportError: a link to something missing (a dangling link: an export does not create a link's target), or
            a loop of links.
    """
    try:
        return Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        raise ExportError(f"{path} is a symbolic link to {os.path.realpath(path)}, which does not exist: the export "
                          f"writes into the {kind} a link names; create that {kind}, or remove the link (or give "
                          "another path)") from None
    except OSError as e:  # ELOOP
        raise ExportError(f"{path} is a symbolic link that cannot be followed ({e.strerror}); give the export a "
                          f"{kind} path") from None


def parse_size(value: int | str) -> int:
    """A byte count from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000"``.

    Decimal units are powers of 1000 (``KB``, ``MB``, ``GB``, ``TB``; ``K``, ``M``, ``G``), binary units powers
    of 1024 (``KiB``, ``MiB``, ``GiB``, ``TiB``); case and spaces are ignored.

    Args:
        value: a positive int, or a number with an optional unit.

    Returns:
        The size in bytes, > 0.

    Raises:
        ExportError: a bool, a non-positive or infinite size, or text that is not a number with a known unit.
    """
    if isinstance(value, bool):
        raise ExportError(f"size must be an integer number of bytes or a string like '5GB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ExportError(f"size must be positive, got {value}")
        return value
    text = str(value).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1, "": 1}
    for unit in sorted(units, key=len, reverse=True):
        number = text[: len(text) - len(unit)] if unit else text
        if text.endswith(unit):
            try:
                size = int(float(number) * units[unit])
            except ValueError:
                continue
            except OverflowError:  # "inf": no byte count
                raise ExportError(f"size must be a finite number of bytes, got {value!r}") from None
            if size <= 0:
                raise ExportError(f"size must be positive, got {value!r}")
            return size
    raise ExportError(f"cannot read the size {value!r}: give bytes (e.g. 1000000) or a number with KB/MB/GB/KiB/MiB/"
                      "GiB (e.g. '5GB')")


def export(model: nn.Module, path: str | Path, format: str, **options: Any) -> ExportReport:
    """Export a (medquant-quantized or float) model to ``path`` in a format that a serving runtime reads.

    Args:
        model: the model; medquant's quantized layers are written as their codes and scales, float layers as float.
        path: the output folder (or file, for single-file formats such as ``"gguf"``).
        format: one of :func:`export_formats`: ``"compressed-tensors"`` (vLLM / SGLang / transformers), ``"gguf"``
            (llama.cpp / Ollama), ``"onnx"`` (ONNX Runtime).
        **options: passed to the backend (e.g. ``promote=True`` to requantize schemes the format cannot carry).

    Returns:
        The backend's :class:`ExportReport` (print ``report.table()`` for the per-layer summary).

    Raises:
        ExportError: unknown format, a missing optional package, or a scheme the format cannot carry (the message
            names the layers).
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"export needs an nn.Module, got {type(model).__name__}")
    fmt = _lookup(format)
    _check_requirements(fmt)
    report = fmt.backend(model, Path(path), **options)
    if not isinstance(report, ExportReport):
        raise TypeError(f"export backend {format!r} returned {type(report).__name__}, not an ExportReport")
    return report
