"""Loader for the Indiana University chest X-ray reports (Open-i ``NLMCXR_reports.tgz``, 3,955 XML files).

Each report has a comparison, indication, findings and impression section and the MeSH terms the
annotators attached to it (``<major>`` terms such as ``"Pleural Effusion/right/small"`` and
``<automatic>`` terms). :func:`load_iu_reports` reads them straight from the ``.tgz`` (or from a folder of
extracted XML files) without unpacking anything to disk.

Splits are fixed and independent of the file order: a report goes to ``"train"``, ``"dev"`` or ``"test"``
according to the first 8 hex digits of the SHA-256 of its id (``"CXR3029"``) read as a fraction ``u`` of
``2^32``: train if ``u < 0.6``, dev if ``u < 0.8``, test otherwise (60/20/20). The rule-based labeler of
:mod:`medquant.eval.labeler` was written looking at ``dev`` (and ``train``) reports only; ``test`` is
held out for scoring it and for the text-generation benchmark.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import tarfile
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .location import default_data_dir

__all__ = ["SPLITS", "Report", "default_reports_path", "load_iu_reports", "report_split"]

SPLITS = ("train", "dev", "test")
_SPLIT_EDGES = (0.6, 0.8)


@dataclass(frozen=True)
class Report:
    """One IU chest X-ray report.

    Attributes:
        uid: report id (``"CXR3029"``).
        comparison: the COMPARISON section (earlier studies compared with; ``""`` when absent). De-identified
            words appear as ``"XXXX"`` as in the source, in every section.
        indication: the INDICATION section (why the study was ordered).
        findings: the FINDINGS section (what the radiologist saw).
        impression: the IMPRESSION section (the conclusion).
        mesh_major: the annotators' MeSH terms (``"Cardiomegaly/mild"``, ``"normal"``...).
        mesh_automatic: the automatically extracted MeSH terms.
        split: ``"train"``, ``"dev"`` or ``"test"`` (see :func:`report_split`).
    """

    uid: str
    comparison: str
    indication: str
    findings: str
    impression: str
    mesh_major: tuple[str, ...] = field(default_factory=tuple)
    mesh_automatic: tuple[str, ...] = field(default_factory=tuple)
    split: str = "train"

    @property
    def text(self) -> str:
        """Findings and impression joined (the part a report labeler reads)."""
        return " ".join(t for t in (self.findings, self.impression) if t)


def report_split(uid: str) -> str:
    """Fixed split of a report id: SHA-256 hash fraction ``u``; train ``u<0.6``, dev ``u<0.8``, else test.

    Args:
        uid: the report id (e.g. ``"CXR1234"``).

    Returns:
        ``"train"``, ``"dev"`` or ``"test"``.
    """
    u = int(hashlib.sha256(uid.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    if u < _SPLIT_EDGES[0]:
        return "train"
    if u < _SPLIT_EDGES[1]:
        return "dev"
    return "test"


def default_reports_path(data_dir: str | os.PathLike | None = None) -> Path:
    """``<data dir>/iu_xray_reports/NLMCXR_reports.tgz``, the default location of the IU reports.

    The data dir comes from :func:`medquant.data.default_data_dir`: ``data_dir``, else ``$MEDQUANT_DATA_DIR``.

    Args:
        data_dir: the data directory, or None.

    Returns:
        The path (not checked for existence).

    Raises:
        DataDirNotSet: no ``data_dir`` and no ``$MEDQUANT_DATA_DIR``.
    """
    return default_data_dir(data_dir) / "iu_xray_reports" / "NLMCXR_reports.tgz"


_WS = re.compile(r"\s+")


def _clean(text: str | None) -> str:
    return _WS.sub(" ", text or "").strip()


def _parse(xml_bytes: bytes, source: str) -> Report:
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as exc:
        raise ValueError(f"{source}: not a valid IU report XML ({exc})") from exc
    uid_el = root.find("uId")
    uid = uid_el.get("id") if uid_el is not None else None
    if not uid:
        raise ValueError(f"{source}: no <uId id=...> element; is this an Open-i NLMCXR report?")
    sections = {}
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "").upper()
        sections[label] = _clean("".join(el.itertext()))
    mesh = root.find("MeSH")
    major = tuple(_clean(e.text) for e in mesh.findall("major")) if mesh is not None else ()
    auto = tuple(_clean(e.text) for e in mesh.findall("automatic")) if mesh is not None else ()
    return Report(uid=uid, comparison=sections.get("COMPARISON", ""), indication=sections.get("INDICATION", ""),
                  findings=sections.get("FINDINGS", ""), impression=sections.get("IMPRESSION", ""),
                  mesh_major=tuple(t for t in major if t), mesh_automatic=tuple(t for t in auto if t),
                  split=report_split(uid))


def load_iu_reports(path: str | os.PathLike | None = None, split: str | None = None,
                    require: tuple[str, ...] | str = ()) -> list[Report]:
    """Read the IU reports, sorted by numeric id.

    Args:
        path: the ``NLMCXR_reports.tgz`` file or a folder holding the XML files (searched recursively; ``~`` is
            expanded; each report id must occur once); default :func:`default_reports_path`.
        split: keep only ``"train"``, ``"dev"`` or ``"test"`` reports; ``None`` keeps all.
        require: section names (``"findings"``, ``"impression"``...) that must be non-empty; one name may be given
            as a string.

    Returns:
        The :class:`Report` list (3,955 reports in the full archive before filtering), sorted by numeric id.

    Raises:
        FileNotFoundError: ``path`` does not exist (:class:`~medquant.data.DataDirNotSet`: no ``path`` and no
            ``$MEDQUANT_DATA_DIR``).
        ValueError: bad ``split`` / ``require``, a malformed XML file, two files with the same report id (the
            error names both; e.g. two extracted copies under one folder), or a file that is not a readable tar
            archive (corrupt or cut short; the error names the file).
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    fields = ("comparison", "indication", "findings", "impression")
    if isinstance(require, str):  # one name, not its characters
        require = (require,)
    bad = [r for r in require if r not in fields]
    if bad:
        raise ValueError(f"require: unknown section(s) {bad}; accepted: {fields}")
    p = Path(path).expanduser() if path is not None else default_reports_path()
    if not p.exists():
        raise FileNotFoundError(f"IU reports not found at {p} (set MEDQUANT_DATA_DIR or pass the path to "
                                "NLMCXR_reports.tgz or to a folder of its XML files)")
    reports: list[Report] = []
    sources: dict[str, str] = {}

    def add(xml_bytes: bytes, source: str) -> None:
        rep = _parse(xml_bytes, source)
        if rep.uid in sources:
            raise ValueError(f"duplicate report id {rep.uid!r} in {sources[rep.uid]} and {source}: {p} must hold "
                             "each report once (one extracted copy of NLMCXR_reports.tgz)")
        sources[rep.uid] = source
        reports.append(rep)

    if p.is_dir():
        for f in sorted(p.rglob("*.xml")):
            add(f.read_bytes(), str(f))
    else:
        try:
            with tarfile.open(p, "r:*") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".xml"):
                        fh = tar.extractfile(member)
                        if fh is not None:
                            add(fh.read(), f"{p}:{member.name}")
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            reason = (str(exc).splitlines() or [""])[0].rstrip(": ")
            raise ValueError(f"{p} is not a readable tar archive ({type(exc).__name__}: {reason}): expected "
                             "NLMCXR_reports.tgz or a folder of its XML files") from exc
    if not reports:
        raise ValueError(f"no XML reports found in {p}")
    reports.sort(key=lambda r: (int(re.sub(r"\D", "", r.uid) or 0), r.uid))
    if split is not None:
        reports = [r for r in reports if r.split == split]
    for name in require:
        reports = [r for r in reports if getattr(r, name)]
    return reports
