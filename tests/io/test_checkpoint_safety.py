"""Checkpoints that never load wrong: the folder switch, the manifest, bounded and confined loads, the schema,
the transformers path, upgrade. (Random kills, bit-flip sweeps and concurrent saves: test_fault_injection.py.)"""
import importlib.util
import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import medquant as mq
import medquant.hf
from medquant.io import MANIFEST_NAME, META_NAME, WEIGHTS_NAME, CheckpointError, CheckpointWarning, atomic
from medquant.io.manifest import read_manifest
from medquant.testing.zoo import ZOO_BY_NAME
from tests.io._helpers import without_exchange


def tiny(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16),
                         nn.Linear(16, 8, bias=False)).to(dtype)


def quantized(seed=0, bits=4, dtype=torch.float32):
    m = tiny(seed, dtype)
    mq.quantize_(m, {"0": mq.QuantConfig(8, scope="channel"), "re:.*": mq.QuantConfig(bits, group_size=32)})
    return m


FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "v1"
X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def siblings(path):
    return sorted(e for e in os.listdir(path.parent) if e.startswith(f".{path.name}.mq-"))


def drop_manifest(path):
    (path / MANIFEST_NAME).unlink()


# ------------------------------------------------------------------------------------------------ the folder switch
def test_save_makes_a_version_link_and_switches_it(tmp_path):
    """Where Linux ``renameat2(RENAME_EXCHANGE)`` is missing, a save over a real folder makes the path a version link,
    and later saves switch that link. (With the call the path stays a real folder: test_atomic_real_folder.py.)"""
    p = tmp_path / "ck"
    a, b = quantized(0), quantized(1)
    mq.save(a, p)  # a first save publishes a real folder (renamed into place whole)
    assert p.is_dir() and not p.is_symlink() and siblings(p) == [".ck.mq-lock"]
    assert same_state(mq.load(p, model=tiny(5)), a)
    with without_exchange():
        mq.save(a, p)  # the next one renames it aside and a version link into place
    assert p.is_symlink() and atomic.is_version_link(p) and p.is_dir()
    first = os.readlink(p)
    assert not os.path.isabs(first) and (tmp_path / first).is_dir()
    assert siblings(p) == [".ck.mq-lock", first]  # the real folder renamed aside is removed
    mq.save(b, p)  # a version link stays a link, with RENAME_EXCHANGE or without
    assert os.readlink(p) != first and not (tmp_path / first).exists()  # the old version is removed
    assert siblings(p) == [".ck.mq-lock", os.readlink(p)]
    assert same_state(mq.load(p, model=tiny(5)), b)
    assert sorted(os.listdir(p)) == sorted([WEIGHTS_NAME, META_NAME, MANIFEST_NAME])


@pytest.mark.parametrize("exchange", [True, False])
def test_a_real_folder_is_replaced_and_its_other_files_carried_over(tmp_path, monkeypatch, exchange):
    """A real folder (written before the folder scheme) is exchanged with the new folder, so the path stays a real
    folder; where renameat2(RENAME_EXCHANGE) is missing it becomes a version link."""
    if not exchange:  # systems without renameat2(RENAME_EXCHANGE): rename aside, then the link into place
        monkeypatch.setattr(atomic, "_EXCHANGE", None)
    p = tmp_path / "ck"
    p.mkdir()
    (p / "tokenizer.json").write_text('{"t": 1}')
    (p / "sub").mkdir()
    (p / "sub" / "notes.txt").write_text("n")
    (p / WEIGHTS_NAME).write_bytes(b"stale")  # a file the save owns: replaced
    (p / "config.json").write_text("{}")  # the user's: no earlier medquant save wrote it, so it is carried over
    m = quantized()
    mq.save(m, p)
    assert atomic.is_version_link(p) == (not exchange) and p.is_symlink() == (not exchange)
    assert (p / "tokenizer.json").read_text() == '{"t": 1}' and (p / "sub" / "notes.txt").read_text() == "n"
    assert (p / "config.json").read_text() == "{}"
    assert set(read_manifest(p)["files"]) == {WEIGHTS_NAME, META_NAME, "tokenizer.json", "sub/notes.txt",
                                              "config.json"}
    assert same_state(mq.load(p, model=tiny(3)), m)
    assert siblings(p) == [".ck.mq-lock"] + ([] if exchange else [os.readlink(p)])


def test_a_user_symlink_is_followed(tmp_path):
    real = tmp_path / "data" / "ck"
    real.parent.mkdir()
    (tmp_path / "link").symlink_to(real.parent)
    m = quantized()
    mq.save(m, tmp_path / "link" / "ck")
    assert real.is_dir() and not real.is_symlink()  # a first save: a real folder where the link leads
    mq.save(m, tmp_path / "link" / "ck")
    assert real.is_dir() and not real.is_symlink()  # the real folder there was exchanged with the new one
    user = tmp_path / "mine"
    user.symlink_to(real)
    mq.save(quantized(1), user)  # the user's link to a real folder: the scheme runs at its target
    assert user.is_symlink() and os.readlink(user) == str(real) and not real.is_symlink()
    assert same_state(mq.load(user, model=tiny(3)), quantized(1))
    with without_exchange():
        mq.save(m, user)  # without RENAME_EXCHANGE the target becomes a version link
    assert atomic.is_version_link(real) and os.readlink(user) == str(real)
    mq.save(quantized(1), user)  # the user's link to a version link: the scheme runs at its target
    assert user.is_symlink() and os.readlink(user) == str(real) and atomic.is_version_link(real)
    assert same_state(mq.load(user, model=tiny(3)), quantized(1))


def test_orphans_are_removed_and_an_interrupted_switch_is_finished(tmp_path):
    p = tmp_path / "ck"
    mq.save(quantized(0), p)
    with without_exchange():
        mq.save(quantized(0), p)  # a version link (the first save published a real folder)
    current = os.readlink(p)
    # a killed save's staging folder, folder renamed aside, and unpublished version behind its temporary link
    for name in (".ck.mq-v-0123456789abcdef", ".ck.mq-old-0123456789abcdef", ".ck.mq-tmp-0123456789abcdef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / WEIGHTS_NAME).write_bytes(b"x" * 100)
    (tmp_path / ".ck.mq-link-0123456789abcdef").symlink_to(".ck.mq-v-0123456789abcdef")
    (tmp_path / ".ck.mq-x.mq-v-0123456789abcdef").mkdir()  # another checkpoint's name: kept
    mq.save(quantized(1), p)
    assert siblings(p) == sorted([".ck.mq-lock", ".ck.mq-x.mq-v-0123456789abcdef", os.readlink(p)])
    assert os.readlink(p) != current
    # the fallback switch killed between its two renames: the path is absent, the link to the new version waits
    target = os.readlink(p)
    os.rename(p, tmp_path / ".ck.mq-link-fedcba9876543210")
    mq.save(quantized(2), p)
    assert atomic.is_version_link(p)
    assert siblings(p) == sorted([".ck.mq-lock", ".ck.mq-x.mq-v-0123456789abcdef", os.readlink(p)])
    assert not (tmp_path / target).exists()
    assert same_state(mq.load(p, model=tiny(3)), quantized(2))


@pytest.mark.parametrize("kind", ["real folder", "version link"])
def test_a_failed_save_changes_nothing_and_leaves_nothing(tmp_path, monkeypatch, kind):
    p = tmp_path / "ck"
    mq.save(quantized(0), p)
    if kind == "version link":
        with without_exchange():
            mq.save(quantized(0), p)
    else:
        mq.save(quantized(0), p)  # the real folder is exchanged with the new one: still a real folder
    assert p.is_symlink() == (kind == "version link")
    before = (atomic.identity(p), siblings(p))  # the folder read (its name and st_dev / st_ino)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("medquant.io.checkpoint.save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        mq.save(quantized(1), p)
    assert (atomic.identity(p), siblings(p)) == before
    assert same_state(mq.load(p, model=tiny(3)), quantized(0))


@pytest.mark.parametrize("bad", ["", " ", "."])
def test_empty_or_current_folder_paths_are_refused(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="empty|current folder"):
        mq.save(quantized(), bad)
    with pytest.raises(ValueError, match="current folder"):
        mq.save(quantized(), tmp_path.parent)
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="str or os.PathLike"):
        mq.save(quantized(), None)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        mq.save(quantized(), f)


# ------------------------------------------------------------------------------------------------- the manifest
def test_manifest_lists_every_file_and_two_saves_are_identical(tmp_path):
    m = quantized()
    mq.save(m, tmp_path / "a", extras={"b": 1, "a": [1, 2]})
    mq.save(m, tmp_path / "b", extras={"b": 1, "a": [1, 2]})
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    man = read_manifest(tmp_path / "a")
    assert set(man["files"]) == {WEIGHTS_NAME, META_NAME}
    raw = (tmp_path / "a" / WEIGHTS_NAME).read_bytes()
    header = raw[8:8 + struct.unpack("<Q", raw[:8])[0]]
    assert header.startswith(b'{"__metadata__":{"format":"pt","medquant_format_version":"1"}')


def test_every_changed_file_or_manifest_byte_is_refused(tmp_path):
    p = tmp_path / "ck"
    mq.save(ZOO_BY_NAME["llama"].build(), p)  # a float HF model: config.json is covered too
    for name in ("config.json", META_NAME, WEIGHTS_NAME, MANIFEST_NAME):
        original = (p / name).read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x04
        (p / name).write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="altered|modified|corrupted|digest"):
            mq.load(p)
        (p / name).write_bytes(original)
    mq.load(p)
    (p / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        mq.load(p)


def test_files_added_after_saving_are_ignored_and_listed_ones_are_required(tmp_path):
    p = tmp_path / "ck"
    m = quantized()
    mq.save(m, p)
    (p / "README.md").write_text("later")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same_state(mq.load(p, model=tiny(2)), m)
    mq.save(m, p)  # and the next save carries it over and lists it
    assert "README.md" in read_manifest(p)["files"]


def test_old_checkpoints_load_with_a_warning_and_upgrade(tmp_path):
    p = tmp_path / "ck"
    m = quantized()
    mq.save(m, p)
    drop_manifest(p)
    with pytest.warns(CheckpointWarning, match="only its weights are verified"):
        assert same_state(mq.load(p, model=tiny(2)), m)
    mq.io.upgrade(p)
    assert MANIFEST_NAME in os.listdir(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same_state(mq.load(p, model=tiny(2)), m)
    mq.io.upgrade(p)  # already in the new form: nothing to do


def _writer():
    spec = importlib.util.spec_from_file_location("medquant_v1_fixture_writer", FIXTURE / "write_v1.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_v1_fixture_upgrades(tmp_path):
    shutil.copytree(FIXTURE / "plain", tmp_path / "plain")
    shutil.copytree(FIXTURE / "llama", tmp_path / "llama")
    mq.io.upgrade(tmp_path / "plain")
    mq.io.upgrade(tmp_path / "llama")
    for name in ("plain", "llama"):
        for f in os.listdir(FIXTURE / name):
            assert (tmp_path / name / f).read_bytes() == (FIXTURE / name / f).read_bytes()
        assert MANIFEST_NAME in os.listdir(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        model = mq.load(tmp_path / "plain", model=_writer().build_plain())
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert same_state(model, mq.load(FIXTURE / "plain", model=_writer().build_plain()))
    with pytest.raises(CheckpointError, match="not a medquant checkpoint"):
        (tmp_path / "empty").mkdir()
        mq.io.upgrade(tmp_path / "empty")


# --------------------------------------------------------------------------------------- bounded and confined loads
def _edit(p, fn):
    meta = json.loads((p / META_NAME).read_text())
    fn(meta)
    (p / META_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize("size", [2**22, 2**40, 2**31 - 1])
def test_recipe_shapes_are_checked_against_the_header_before_anything_is_built(tmp_path, size):
    p = tmp_path / "ck"
    mq.save(quantized(), p)
    drop_manifest(p)
    _edit(p, lambda m: m["modules"]["3"].update(in_features=size))
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="needs .*3.qweight_4|integer in 1..2147483647"):
        mq.load(p, model=tiny())


def test_crafted_safetensors_headers_are_refused(tmp_path):
    p = tmp_path / "ck"
    mq.save(quantized(), p)
    drop_manifest(p)
    w = p / WEIGHTS_NAME
    raw = w.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    for crafted in (struct.pack("<Q", 2**60) + raw[8:],  # a header larger than the file
                    raw[:8] + raw[8:8 + n].replace(b'"shape":[8,', b'"shape":[9,', 1) + raw[8 + n:]):
        w.write_bytes(crafted)
        meta = json.loads((p / META_NAME).read_text())
        meta["weights"].update(bytes=len(crafted), sha256=__import__("hashlib").sha256(crafted).hexdigest())
        (p / META_NAME).write_text(json.dumps(meta))
        with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="header|bytes for shape"):
            mq.load(p, model=tiny())
    assert header  # parsed fine before the edits


@pytest.mark.parametrize("name", ["../victim/model.safetensors", "/etc/passwd", "..", "a/b", "sub\\x", ""])
def test_weights_file_must_be_a_plain_name_inside_the_folder(tmp_path, name):
    p = tmp_path / "ck"
    mq.save(quantized(), p)
    (tmp_path / "victim").mkdir()
    shutil.copy(p / WEIGHTS_NAME, tmp_path / "victim" / WEIGHTS_NAME)
    drop_manifest(p)
    _edit(p, lambda m: m["weights"].update(file=name))
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="plain file name"):
        mq.load(p, model=tiny())


def test_symlinked_files_are_not_read(tmp_path):
    p = tmp_path / "ck"
    mq.save(quantized(), p)
    (tmp_path / "elsewhere.safetensors").write_bytes((p / WEIGHTS_NAME).read_bytes())
    (p / WEIGHTS_NAME).unlink()
    (p / WEIGHTS_NAME).symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        mq.load(p, model=tiny())
    drop_manifest(p)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="not a regular file"):
        mq.load(p, model=tiny())


# ------------------------------------------------------------------------------------------------- the schema
@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("modules"), "key.*modules"),
    (lambda m: m.update(extraz={}), "only the keys"),
    (lambda m: m["modules"]["3"].pop("out_features"), "out_features"),
    (lambda m: m["modules"]["3"]["config"].update(bits=True), "integer bit-width"),
    (lambda m: m["modules"]["3"]["config"].update(group_size=0), "group_size.*1.."),
    (lambda m: m["modules"]["0"].update(stride=[0, 1]), "stride.*1.."),
    (lambda m: m["modules"]["0"].update(padding="same", stride=[2, 2]), "same"),
    (lambda m: m["modules"]["0"].update(groups=3), "divisor"),
    (lambda m: m["modules"]["0"].update(padding=[1, -1]), "padding"),
    (lambda m: m["modules"]["3"].update(dtype="float36"), "dtype"),
    (lambda m: m["modules"]["3"]["config"].update(channel_bits=[4] * 3), "16 bit-widths"),
    (lambda m: m["modules"]["3"]["config"].update(compute_dtype="float64"), "compute_dtype.*'bfloat16'"),
    (lambda m: m["modules"]["3"]["config"].update(compute_dtype=None), "compute_dtype.*'float32'"),
    (lambda m: m["weights"].update(bytes="12"), "bytes"),
    (lambda m: m["weights"].update(sha256=None), "sha256"),
    (lambda m: m["model"].update(kind="pickle"), "kind"),
    (lambda m: m.update(format_version=1.0), "format_version"),
    (lambda m: m.update(extras=[]), "extras"),
    (lambda m: m["modules"].update({"": {}}), "module names"),
    (lambda m: m["modules"].update(x=[]), "recipe object"),
])
def test_malformed_recipes_are_checkpoint_errors_naming_file_and_key(tmp_path, edit, match):
    p = tmp_path / "ck"
    mq.save(quantized(), p)
    drop_manifest(p)
    _edit(p, edit)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match=match) as info:
        mq.load(p, model=tiny())
    assert "medquant.json" in str(info.value)


def test_a_key_given_twice_is_refused(tmp_path):
    p = tmp_path / "ck"
    mq.save(quantized(), p)
    drop_manifest(p)
    text = (p / META_NAME).read_text()
    (p / META_NAME).write_text(text.replace('"extras": {}', '"extras": {}, "extras": {"x": 1}'))
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="given twice"):
        mq.load(p, model=tiny())


def test_bf16_model_without_bias_keeps_its_dtype(tmp_path):
    m = quantized(dtype=torch.bfloat16)
    with torch.no_grad():
        y = m(X.to(torch.bfloat16))
    mq.save(m, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / META_NAME).read_text())
    assert meta["modules"]["4"]["weight_dtype"] == "bfloat16" and "weight_dtype" not in meta["modules"]["3"]
    again = mq.load(tmp_path / "ck", model=tiny())  # a float32 instance: the saved dtypes come back
    assert again.get_submodule("4").weight.dtype == torch.bfloat16
    assert same_state(again, m)
    with torch.no_grad():
        assert torch.equal(again(X.to(torch.bfloat16)), y)


def test_a_recipe_that_does_not_fit_the_model_is_refused(tmp_path):
    mq.save(quantized(), tmp_path / "ck")
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Conv2d(8, 16, 1),
                          nn.Linear(32, 8, bias=False))
    with pytest.raises(CheckpointError, match="does not fit"):
        mq.load(tmp_path / "ck", model=other)


# -------------------------------------------------------------------------------------------- the transformers path
@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    mq.quantize_(model, {"re:.*mlp.*": mq.QuantConfig(4, group_size=32), "re:.*self_attn.*": 8})
    p = tmp_path_factory.mktemp("hf") / "q"
    medquant.hf.save_pretrained(model, p)
    return p, model


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=False)
    return dst


def _from_pretrained(p):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(p)


def test_save_pretrained_is_crash_safe_with_a_manifest(hf_saved):
    p, model = hf_saved
    assert p.is_dir() and not p.is_symlink() and siblings(p) == [".q.mq-lock"]  # a first save: a real folder
    assert set(read_manifest(p)["files"]) >= {"config.json", "model.safetensors"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        again = _from_pretrained(p)
    assert same_state(again, model)


def test_from_pretrained_refuses_a_flipped_weight_byte(hf_saved, tmp_path):
    p = _copy(hf_saved[0], tmp_path / "c")
    data = bytearray((p / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0x10
    (p / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted"):
        _from_pretrained(p)


def _edit_qc(p, fn):
    cfg = json.loads((p / "config.json").read_text())
    fn(cfg["quantization_config"]["modules"])
    (p / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, match", [
    (lambda mods: mods["model.layers.0.mlp.up_proj"]["config"].update(bits=8), "qweight_8"),
    (lambda mods: mods["model.layers.0.mlp.up_proj"]["config"].update(symmetric=False), "zeros_4"),
    (lambda mods: mods["model.layers.0.mlp.up_proj"]["config"].update(scale_dtype="float32"), "F32"),
    (lambda mods: mods["model.layers.0.mlp.up_proj"]["config"].update(scope="channel"), "scales_4"),
    (lambda mods: mods.pop("model.layers.0.mlp.up_proj"), "records no module"),
    (lambda mods: mods["model.layers.0.mlp.up_proj"].pop("bias"), "bias"),
])
def test_from_pretrained_refuses_a_config_that_disagrees_with_the_tensors(hf_saved, tmp_path, edit, match):
    p = _copy(hf_saved[0], tmp_path / "c")
    _edit_qc(p, edit)
    with pytest.raises(CheckpointError, match="config.json is truncated or altered"):
        _from_pretrained(p)
    drop_manifest(p)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match=match):
        _from_pretrained(p)


def test_from_pretrained_of_a_legacy_folder_checks_recipes_against_tensors(hf_saved, tmp_path):
    p = _copy(hf_saved[0], tmp_path / "c")
    drop_manifest(p)
    with pytest.warns(CheckpointWarning, match="not verified"):
        assert same_state(_from_pretrained(p), hf_saved[1])
    st = load_file(str(p / WEIGHTS_NAME))
    assert any(k.endswith("qweight_4") for k in st)


def test_a_loaded_model_saved_again_with_its_own_save_pretrained_stays_verifiable(hf_saved, tmp_path):
    import copy
    import pickle

    p = _copy(hf_saved[0], tmp_path / "c")
    model = _from_pretrained(p)
    model.save_pretrained(p)  # over the folder it came from: a new folder (exchanged in) with a fresh manifest
    assert p.is_dir() and not p.is_symlink() and MANIFEST_NAME in os.listdir(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        assert same_state(_from_pretrained(p), hf_saved[1])
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        other.save_pretrained(tmp_path / "d")
        assert MANIFEST_NAME in os.listdir(tmp_path / "d")


def test_save_pretrained_is_deterministic_and_shards_are_covered(hf_saved, tmp_path):
    model = hf_saved[1]
    medquant.hf.save_pretrained(model, tmp_path / "a")
    medquant.hf.save_pretrained(model, tmp_path / "b")
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and MANIFEST_NAME in names
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    medquant.hf.save_pretrained(model, tmp_path / "s", max_shard_size="40KB")
    shards = sorted(n for n in os.listdir(tmp_path / "s") if n.startswith("model-"))
    assert len(shards) > 1 and set(shards) <= set(read_manifest(tmp_path / "s")["files"])
    assert same_state(_from_pretrained(tmp_path / "s"), model)
    data = bytearray((tmp_path / "s" / shards[-1]).read_bytes())
    data[-2] ^= 1
    (tmp_path / "s" / shards[-1]).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shards[-1]} is corrupted"):
        _from_pretrained(tmp_path / "s")


def test_load_into_another_class_with_the_same_names_warns_naming_both(tmp_path):
    class Gelu(nn.Sequential):  # the same tensor names as tiny(), another forward
        pass

    p = tmp_path / "ck"
    mq.save(quantized(1), p)
    other = Gelu(*tiny(3))
    other[1] = nn.GELU()
    with pytest.warns(UserWarning, match=r"saved from torch\.nn\.modules\.container\.Sequential; loading it into "
                                         r"a .*test_checkpoint_safety\.Gelu"):
        loaded = mq.load(p, model=other)
    assert same_state(loaded, quantized(1))  # the tensors load as saved; the warning says the class differs
    with warnings.catch_warnings():  # the saved class itself: no warning
        warnings.simplefilter("error")
        mq.load(p, model=tiny(3))
