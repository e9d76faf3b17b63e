"""Review of medquant.data.reports: duplicate report ids in a folder or archive are an error naming both files.

Reference: the real report ``ecgen-radiology/1.xml`` (CXR1) of ../shared/data, read with the standard tarfile module.
"""
from __future__ import annotations

import io
import tarfile

import pytest

from medquant.data.reports import default_reports_path, load_iu_reports


@pytest.fixture(scope="module")
def real_xml() -> dict[str, bytes]:
    with tarfile.open(default_reports_path()) as tar:
        return {n: tar.extractfile(f"ecgen-radiology/{n}").read() for n in ("1.xml", "2.xml")}


def test_duplicate_ids_in_a_folder_name_both_files(tmp_path, real_xml):
    # two extracted copies under one folder (the search is recursive) used to give every report twice
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "1.xml").write_bytes(real_xml["1.xml"])
    (tmp_path / "a" / "2.xml").write_bytes(real_xml["2.xml"])
    with pytest.raises(ValueError, match="CXR1") as e:
        load_iu_reports(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "a" / "1.xml") in msg and str(tmp_path / "b" / "1.xml") in msg
    # one copy: the two reports, as in the archive
    (tmp_path / "b" / "1.xml").unlink()
    assert [r.uid for r in load_iu_reports(tmp_path)] == ["CXR1", "CXR2"]


def test_duplicate_ids_in_an_archive_name_both_members(tmp_path, real_xml):
    path = tmp_path / "dup.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("x/1.xml", real_xml["1.xml"]), ("x/2.xml", real_xml["2.xml"]),
                           ("y/copy.xml", real_xml["1.xml"])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="duplicate report id 'CXR1'") as e:
        load_iu_reports(path)
    assert "x/1.xml" in str(e.value) and "y/copy.xml" in str(e.value)


def test_the_real_archive_has_unique_ids():
    uids = [r.uid for r in load_iu_reports()]
    assert len(uids) == len(set(uids)) == 3955
