"""``medquant.digest.sha256_file`` against hashlib over the whole file in memory."""

from __future__ import annotations

import hashlib

import pytest

from medquant.digest import sha256_file


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 7, 3 * (1 << 20) + 5])
def test_sha256_file_equals_hashlib(tmp_path, size):
    data = bytes((i * 131 + 7) % 251 for i in range(size))
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_sha256_file_sees_one_changed_byte_past_the_first_block(tmp_path):
    data = bytearray(2 * (1 << 20))
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(data))
    before = sha256_file(path)
    data[(1 << 20) + 3] = 1
    path.write_bytes(bytes(data))
    assert sha256_file(path) != before


def test_sha256_file_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "absent.bin")


def test_io_manifest_reexports_the_same_helper():
    from medquant.io import manifest

    assert manifest.sha256_file is sha256_file
