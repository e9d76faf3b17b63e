"""Checkpoint bugs a fuzzer found: renamed / moved / dangling version links, user files that look like transformers
files, a quantized layer under two names, a header dtype edited to another kind, deeply nested JSON."""
import hashlib
import json
import os
import shutil
import struct
import warnings

import pytest
import torch
from torch import nn

import medquant as mq
from medquant.cli import main
from medquant.io import MANIFEST_NAME, META_NAME, WEIGHTS_NAME, CheckpointError, CheckpointWarning, atomic
from medquant.testing.zoo import ZOO_BY_NAME
from tests.io._helpers import without_exchange


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 24)
        self.b = nn.Linear(24, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def net(seed=0, quantize=True):
    torch.manual_seed(seed)
    m = Net().eval()
    if quantize:
        mq.quantize_(m, mq.QuantConfig(4, group_size=8))
    return m


X = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def hidden(parent, name):
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.mq-") and not e.endswith("-lock"))


def save_as_link(model, path):
    """Save twice: the first save publishes a real folder, the second, without ``renameat2(RENAME_EXCHANGE)``, makes
    ``path`` a version link (with the call it would exchange the real folder and ``path`` would stay one)."""
    mq.save(model, path)
    assert not os.path.islink(path)
    with without_exchange():
        mq.save(model, path)
    assert atomic.is_version_link(path)


# ------------------------------------------------------------------------------------- data loss of version folders
def test_a_renamed_checkpoint_survives_a_save_under_its_old_name(tmp_path):
    m0, m1, m2 = net(0), net(1), net(2)
    save_as_link(m0, tmp_path / "ck")
    os.rename(tmp_path / "ck", tmp_path / "ck_best")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the renamed link's version is referenced: nothing to warn about
        mq.save(m1, tmp_path / "ck")
    assert same(mq.load(tmp_path / "ck_best", model=net(5, quantize=False)), m0)
    assert same(mq.load(tmp_path / "ck", model=net(5, quantize=False)), m1)
    # saving to the renamed link gives it a version of its own and removes the one it replaced
    first = os.readlink(tmp_path / "ck_best")
    mq.save(m2, tmp_path / "ck_best")
    assert not (tmp_path / first).exists() and os.readlink(tmp_path / "ck_best").startswith(".ck_best.mq-v-")
    assert same(mq.load(tmp_path / "ck_best", model=net(5, quantize=False)), m2)
    assert same(mq.load(tmp_path / "ck", model=net(5, quantize=False)), m1)


def test_a_copy_of_the_link_keeps_the_version_it_points_to(tmp_path):
    m0 = net(0)
    save_as_link(m0, tmp_path / "ck")
    os.symlink(os.readlink(tmp_path / "ck"), tmp_path / "pinned")
    mq.save(net(1), tmp_path / "ck")
    assert same(mq.load(tmp_path / "pinned", model=net(5, quantize=False)), m0)


def test_a_link_moved_into_another_folder_keeps_its_data_and_the_load_says_where(tmp_path, capsys):
    m0 = net(0)
    save_as_link(m0, tmp_path / "ck")
    version = os.readlink(tmp_path / "ck")
    (tmp_path / "archive").mkdir()
    os.rename(tmp_path / "ck", tmp_path / "archive" / "ck")
    expected = str(tmp_path / "archive" / version)
    for fn in (lambda p: mq.load(p, model=net(5, quantize=False)), mq.io.verify, mq.io.read_metadata):
        with pytest.raises(CheckpointError, match="link to the version folder") as info:
            fn(tmp_path / "archive" / "ck")
        assert expected in str(info.value) and "cp -rL" in str(info.value) and "parent folder" in str(info.value)
    assert main(["verify", str(tmp_path / "archive" / "ck")]) == 2
    assert expected in capsys.readouterr().err
    with pytest.warns(atomic.UnreferencedVersionWarning, match=f"{version}.*rm -r"):
        mq.save(net(1), tmp_path / "ck")  # a new save under the old name keeps the moved link's data
    assert (tmp_path / version / WEIGHTS_NAME).is_file()
    os.rename(tmp_path / "archive" / "ck", tmp_path / "ck_old")  # back beside its data: it loads as saved
    assert same(mq.load(tmp_path / "ck_old", model=net(5, quantize=False)), m0)


def test_a_dangling_version_link_is_replaced_by_a_save_and_nothing_else_removed(tmp_path):
    save_as_link(net(0), tmp_path / "other")
    other = os.readlink(tmp_path / "other")
    save_as_link(net(0), tmp_path / "ck")
    shutil.rmtree(atomic.resolve(tmp_path / "ck"))
    m1 = net(1)
    mq.save(m1, tmp_path / "ck")
    assert atomic.is_version_link(tmp_path / "ck") and hidden(tmp_path, "ck") == [os.readlink(tmp_path / "ck")]
    assert same(mq.load(tmp_path / "ck", model=net(5, quantize=False)), m1)
    assert os.readlink(tmp_path / "other") == other and (tmp_path / other / WEIGHTS_NAME).is_file()


def test_a_killed_save_leaves_only_what_the_next_save_removes(tmp_path, monkeypatch):
    p = tmp_path / "ck"
    save_as_link(net(0), p)
    old = os.readlink(p)
    real_replace = os.replace

    def killed(src, dst):  # the new version is complete and its temporary link made, the switch never happens
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        mq.save(net(1), p)
    monkeypatch.setattr(os, "replace", real_replace)
    assert os.readlink(p) == old and hidden(tmp_path, "ck") == [old]
    m2 = net(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mq.save(m2, p)
    assert hidden(tmp_path, "ck") == [os.readlink(p)]
    assert same(mq.load(p, model=net(5, quantize=False)), m2)


def test_files_the_user_added_are_carried_over_whatever_their_names(tmp_path):
    p = tmp_path / "ck"
    m = net(0)
    mq.save(m, p)
    mine = {"config.json": '{"lr": 0.001, "epochs": 30}', "README.md": "notes",
            "pytorch_model.bin": "original fp32 weights", "generation_config.json": "{}"}
    for f, text in mine.items():
        (p / f).write_text(text)
    mq.save(m, p)
    assert {f: (p / f).read_text() for f in mine} == mine
    # a first save into an existing real folder keeps them too
    q = tmp_path / "real"
    q.mkdir()
    for f, text in mine.items():
        (q / f).write_text(text)
    mq.save(m, q)
    assert {f: (q / f).read_text() for f in mine} == mine
    assert same(mq.load(q, model=net(5, quantize=False)), m)


def test_a_transformers_save_s_own_config_is_dropped_by_a_plain_save(tmp_path):
    p = tmp_path / "ck"
    mq.save(ZOO_BY_NAME["llama"].build(), p)  # medquant.json records a transformers model: config.json is its own
    assert (p / "config.json").is_file()
    (p / "README.md").write_text("notes")
    mq.save(net(0), p)
    assert not (p / "config.json").exists() and (p / "README.md").read_text() == "notes"


# --------------------------------------------------------------------------------------------- silently wrong loads
class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = self.a
        self.c = nn.Linear(32, 8)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


class Unshared(Shared):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(32, 32)


@pytest.mark.parametrize("fresh", [Shared, Unshared])
def test_a_quantized_layer_under_two_names_loads_shared_and_bit_exact(tmp_path, fresh):
    torch.manual_seed(0)
    m = Shared().eval()
    mq.quantize_(m, mq.QuantConfig(4, group_size=16))
    assert m.a is m.b
    with torch.no_grad():
        y = m(X)
    mq.save(m, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / META_NAME).read_text())["shared_modules"] == {"b": "a"}
    torch.manual_seed(1)
    got = mq.load(tmp_path / "ck", model=fresh().eval())
    assert got.a is got.b and isinstance(got.a, mq.QuantLinear)
    with torch.no_grad():
        assert torch.equal(got(X), y)
    assert same(got, m)


def test_a_shared_layer_saved_before_it_was_recorded_loads_shared(tmp_path):
    torch.manual_seed(0)
    m = Shared().eval()
    mq.quantize_(m, mq.QuantConfig(4, group_size=16))
    mq.save(m, tmp_path / "ck")
    root = atomic.resolve(tmp_path / "ck")
    meta = json.loads((root / META_NAME).read_text())
    del meta["shared_modules"]
    (root / META_NAME).write_text(json.dumps(meta))
    (root / MANIFEST_NAME).unlink()
    with pytest.warns(CheckpointWarning):
        got = mq.load(tmp_path / "ck", model=Shared().eval())
    assert got.a is got.b
    with torch.no_grad():
        assert torch.equal(got(X), m(X))


def _edit_header(path, key, dtype):
    """Rewrite ``key``'s dtype in the safetensors header (same byte count), drop the manifest, fix the weights
    hash in medquant.json: an old checkpoint with an edited header."""
    root = atomic.resolve(path)
    (root / MANIFEST_NAME).unlink()
    wp = root / WEIGHTS_NAME
    data = bytearray(wp.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    hdr = json.loads(data[8:8 + n])
    hdr[key]["dtype"] = dtype
    new = json.dumps(hdr, separators=(",", ":")).encode().ljust(n, b" ")
    assert len(new) == n
    data[8:8 + n] = new
    wp.write_bytes(bytes(data))
    meta = json.loads((root / META_NAME).read_text())
    meta["weights"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (root / META_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize("key", ["a.weight", "a.bias"])
def test_a_float_tensor_whose_header_says_integer_is_refused(tmp_path, key):
    torch.manual_seed(0)
    m = Net().eval()
    mq.quantize_(m, {"b": mq.QuantConfig(4, group_size=8)})  # a stays float
    mq.save(m, tmp_path / "ck")
    _edit_header(tmp_path / "ck", key, "I32")  # F32 -> I32: the same byte count, a load would cast garbage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointError, match=rf"{key} as I32 \(integer\); Net expects a floating-point tensor "
                                                  r"there \(float32\)"):
            mq.load(tmp_path / "ck", model=net(5, quantize=False))


def test_packed_codes_stored_as_floats_are_refused(tmp_path):
    mq.save(net(0), tmp_path / "ck")
    _edit_header(tmp_path / "ck", "a.qweight_4", "F32")  # int32 codes read as float32: same byte count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointError, match="qweight_4"):
            mq.load(tmp_path / "ck", model=net(5, quantize=False))


def test_legitimate_dtypes_still_load(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16)).to(torch.bfloat16).eval()  # int64 num_batches_tracked
    m.register_buffer("mask", torch.tensor([True, False]))
    mq.quantize_(m, mq.QuantConfig(4, group_size=16, scale_dtype="float32"))
    mq.save(m, tmp_path / "ck")
    fresh = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))
    fresh.register_buffer("mask", torch.zeros(2, dtype=torch.bool))
    assert same(mq.load(tmp_path / "ck", model=fresh), m)


# ------------------------------------------------------------------------------------------------- unclear errors
@pytest.mark.parametrize("file", [MANIFEST_NAME, META_NAME])
def test_deeply_nested_json_is_a_checkpoint_error(tmp_path, file):
    mq.save(net(0), tmp_path / "ck")
    root = atomic.resolve(tmp_path / "ck")
    if file == META_NAME:
        (root / MANIFEST_NAME).unlink()
    (root / file).write_text("[" * 100000 + "]" * 100000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        for fn in (lambda p: mq.load(p, model=net(5, quantize=False)), mq.io.verify):
            with pytest.raises(CheckpointError, match=f"{file} is corrupted.*nested too deeply"):
                fn(tmp_path / "ck")


# ------------------------------------------------------------------------------- files a save does not own, unchanged
def _unsorted_safetensors(path):
    """A valid safetensors file whose header metadata keys are not sorted (as other tools write them)."""
    data = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    header = b'{"__metadata__":{"zeta":"1","alpha":"2"},"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_a_save_leaves_the_bytes_of_files_it_carries_over(tmp_path):
    """Files a save carries into the new version are hard links to the old version's: a save changed them in place
    (it sorted the header metadata of every ``*.safetensors`` after carrying them over), which changed the user's
    own file linked into the folder and broke the manifest of a kept older version that lists the file. Reference:
    the SHA-256 of the bytes written, and safetensors' own reader."""
    from safetensors.torch import load_file

    m = net(0)
    mine = tmp_path / "my_adapter.safetensors"
    _unsorted_safetensors(mine)
    want = hashlib.sha256(mine.read_bytes()).hexdigest()
    p = tmp_path / "ck"
    mq.save(m, p)
    os.link(mine, p / "adapter.safetensors")  # the user's file linked into the checkpoint, not copied
    mq.save(m, p)
    assert hashlib.sha256(mine.read_bytes()).hexdigest() == want
    assert (p / "adapter.safetensors").read_bytes() == mine.read_bytes()
    assert torch.equal(load_file(str(p / "adapter.safetensors"))["w"], torch.arange(4.0))
    # an upgraded checkpoint lists such a file; a second link keeps that version through a later save
    legacy = tmp_path / "legacy"
    shutil.copytree(p, legacy, symlinks=False)
    (legacy / MANIFEST_NAME).unlink()
    _unsorted_safetensors(legacy / "extra.safetensors")
    with warnings.catch_warnings(), without_exchange():  # the upgrade makes ``legacy`` a version link
        warnings.simplefilter("ignore", CheckpointWarning)
        mq.io.upgrade(legacy)
    os.symlink(os.readlink(legacy), tmp_path / "legacy_best")
    mq.save(net(1), legacy)
    mq.io.verify(tmp_path / "legacy_best")
    assert same(mq.load(tmp_path / "legacy_best", model=net(5, quantize=False)), m)
