"""Adversarial review of the checkpoint schema (:mod:`medquant.io.schema`) and how :mod:`medquant.io.checkpoint`
uses it: a recipe / header combination the schema accepts must load as it was saved, and every other one must be
refused before any tensor is built, naming the file, the key and what was expected."""
import hashlib
import itertools
import json
import struct
import warnings

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import medquant as mq
from medquant.io import MANIFEST_NAME, META_NAME, WEIGHTS_NAME, CheckpointError, atomic
from medquant.io.schema import ST_DTYPES, SchemaError, parse_layer, read_header
from medquant.quant.modules import QuantEmbedding, tie_quantized_head, tied_to
from medquant.quant.recipe import layer_recipe


# ----------------------------------------------------------------------------------------------------- helpers
class Net(nn.Module):
    """An embedding, a quantized linear layer and a float one."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 32, padding_idx=1)
        self.fc = nn.Linear(32, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, ids):
        return self.out(self.fc(self.emb(ids)))


def quantized_net(seed=0):
    torch.manual_seed(seed)
    m = Net().eval()
    mq.quantize_(m, {"fc": mq.QuantConfig(4, group_size=32)})
    m.emb = QuantEmbedding.from_float(m.emb, mq.QuantConfig(4, group_size=32))
    return m


class Tied(nn.Module):
    """A quantized embedding and a head sharing its packed tensors."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 32)
        self.head = nn.Linear(32, 10, bias=False)

    def forward(self, ids):
        return self.head(self.emb(ids))


def tied_net(seed=0):
    torch.manual_seed(seed)
    m = Tied().eval()
    cfg = mq.QuantConfig(4, group_size=32)
    m.emb = QuantEmbedding.from_float(m.emb, cfg)
    m.head = mq.QuantLinear.from_float(m.head, cfg)
    tie_quantized_head(m.head, m.emb)
    return m


class Shared(nn.Module):
    """One linear layer under two names; the second name (``a``) sorts before the first (``z``)."""

    def __init__(self):
        super().__init__()
        self.z = nn.Linear(16, 16)
        self.a = self.z

    def forward(self, x):
        return self.a(self.z(x))


IDS = torch.tensor([[0, 3, 9, 1]])


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def legacy(path):
    """The checkpoint folder without its manifest (hand edits then only need the weights hash fixed)."""
    root = atomic.resolve(path)
    (root / MANIFEST_NAME).unlink()
    return root


def edit_meta(root, fn):
    meta = json.loads((root / META_NAME).read_text())
    fn(meta)
    (root / META_NAME).write_text(json.dumps(meta))


def write_weights(root, tensors):
    """Replace the weights file by ``tensors`` and record its size and hash in medquant.json."""
    save_file(tensors, str(root / WEIGHTS_NAME), metadata={"format": "pt"})
    raw = (root / WEIGHTS_NAME).read_bytes()
    edit_meta(root, lambda m: m["weights"].update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest()))


def load_quiet(path, model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mq.load(path, model=model, **kw)


def verify_quiet(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mq.io.verify(path)


def embedding_recipe(**changes):
    r = layer_recipe(QuantEmbedding(10, 32, mq.QuantConfig(4, group_size=32), padding_idx=1))
    r.update(changes)
    return r


# --------------------------------------------------------------------- recipes the real layers agree with
def _header_of(module):
    return {k: (ST_DTYPES[str(t.dtype).removeprefix("torch.")], tuple(t.shape)) for k, t in module.state_dict().items()}


def _expected(module):
    spec = parse_layer(layer_recipe(module), "m", META_NAME)
    return {k: (v.dtype, v.shape) for k, v in spec.expected_tensors().items()}


@pytest.mark.parametrize("layout", [1, 2])
def test_expected_tensors_are_what_quantize_builds_over_a_grid(layout):
    """Every combination of bits, scheme, scope, group size (dividing or not), scale dtype, bias, conv geometry and
    mixed rows (packed, float 16/32, pruned): the recipe's expected tensors are exactly the layer's state dict."""
    rng = torch.Generator().manual_seed(0)
    grid = itertools.product([1, 3, 4, 5, 8, 16, 0], [None, True, False], ["tensor", "channel", "group"], [7, 32])
    checked = 0
    for i, (bits, sym, scope, gs) in enumerate(grid):
        if scope != "group" and gs != 32:
            continue
        sd = ("float16", "bfloat16", "float32")[i % 3]
        cb = tuple(int(b) for b in torch.tensor([0, 2, 3, 6, 8, 16, 32])[torch.randint(0, 7, (6,), generator=rng)])
        for channel_bits in (None, cb):
            cfg = mq.QuantConfig(bits, symmetric=sym, scope=scope, group_size=gs, scale_dtype=sd,
                                 channel_bits=channel_bits)
            torch.manual_seed(i)
            model = nn.Sequential(nn.Linear(45, 6, bias=i % 2 == 0), nn.Conv2d(6, 6, (3, 2), groups=2, bias=True))
            model = model.to(torch.bfloat16 if i % 4 == 1 else torch.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mq.quantize_(model, cfg)
            for layer in model:
                if isinstance(layer, (mq.QuantLinear, mq.QuantConv2d)):
                    if layout == 1:
                        layer.to_layout(1)
                    assert _expected(layer) == _header_of(layer), (layer, cfg)
                    checked += 1
        if 1 <= bits <= 8:
            emb = QuantEmbedding.from_float(nn.Embedding(7, 45), mq.QuantConfig(bits, symmetric=sym, scope=scope,
                                                                                group_size=gs), layout=layout)
            assert _expected(emb) == _header_of(emb)
    assert checked > 50


# -------------------------------------------------------------------------------------- values in the recipe
@pytest.mark.parametrize("layout", [2.0, 1.0])
def test_a_float_layout_is_refused(tmp_path, layout):
    """``"layout": 2.0`` is a float, not the integer the schema promises (it used to be taken as 2)."""
    with pytest.raises(SchemaError, match=r"medquant.json, key modules\['fc'\]\['layout'\]: expected 1 or 2"):
        parse_layer({**layer_recipe(quantized_net().fc), "layout": layout}, "fc", META_NAME)
    mq.save(quantized_net(), tmp_path / "ck")
    edit_meta(legacy(tmp_path / "ck"), lambda m: m["modules"]["fc"].update(layout=layout))
    with pytest.raises(CheckpointError, match="layout"):
        load_quiet(tmp_path / "ck", Net())


@pytest.mark.parametrize("pidx", [-11, -1, 0, 9, 10, 99, 2**70])
def test_padding_idx_must_be_a_row_of_the_table(pidx):
    """The range nn.Embedding takes (``-rows <= padding_idx < rows``); others used to load and fail later, in
    ``to_float``, with torch's AssertionError."""
    try:
        nn.Embedding(10, 4, padding_idx=pidx)
        valid = True
    except AssertionError:
        valid = False
    assert valid == (-10 <= pidx < 10)  # the reference
    if valid:
        spec = parse_layer(embedding_recipe(padding_idx=pidx), "emb", META_NAME)
        assert spec.raw["padding_idx"] == pidx
    else:
        with pytest.raises(SchemaError, match=r"key modules\['emb'\]\['padding_idx'\]: expected an integer in -10..9"):
            parse_layer(embedding_recipe(padding_idx=pidx), "emb", META_NAME)


def test_an_out_of_range_padding_idx_is_refused_by_load(tmp_path):
    mq.save(quantized_net(), tmp_path / "ck")
    edit_meta(legacy(tmp_path / "ck"), lambda m: m["modules"]["emb"].update(padding_idx=10))
    with pytest.raises(CheckpointError, match="padding_idx"):
        verify_quiet(tmp_path / "ck")


@pytest.mark.parametrize("bits", [0, 16, 32])
def test_an_embedding_recipe_takes_only_packed_bits(bits):
    """QuantEmbedding refuses 0 / 16 / 32 bits (the reference); the schema accepted them, so a file holding the
    implied ``fweight_16`` passed every check and then failed while building the layer."""
    cfg = mq.QuantConfig(bits)
    with pytest.raises(ValueError, match="1..8"):
        QuantEmbedding(10, 32, cfg)
    with pytest.raises(SchemaError, match=r"key modules\['emb'\]\['config'\]\['bits'\]: expected 1..8"):
        parse_layer(embedding_recipe(config=cfg.to_dict()), "emb", META_NAME)


# ---------------------------------------------------------------------------------- tensors the recipes imply
def test_packed_tensors_of_a_module_without_recipe_are_refused(tmp_path):
    """A recipe removed from medquant.json: verify used to pass and ``load(strict=False)`` to give the float layer
    of the model passed in, its packed tensors ignored."""
    mq.save(quantized_net(), tmp_path / "ck")
    edit_meta(legacy(tmp_path / "ck"), lambda m: m["modules"].pop("fc"))
    for check in (lambda: verify_quiet(tmp_path / "ck"), lambda: load_quiet(tmp_path / "ck", Net(), strict=False)):
        with pytest.raises(CheckpointError, match=r"holds the packed tensor fc\.qweight_4.*medquant.json records no "
                                                  r"module 'fc'"):
            check()


def test_a_tied_head_stored_under_both_names_is_refused(tmp_path):
    """A shared tensor is stored once. With a second copy under the head's name, ``load(strict=False)`` wrote that
    copy into the embedding's table (one tensor, loaded twice)."""
    m = tied_net()
    mq.save(m, tmp_path / "ck")
    root = legacy(tmp_path / "ck")
    sd = load_file(str(root / WEIGHTS_NAME))
    assert sorted(sd) == ["emb.qweight_4", "emb.scales_4"]
    sd.update({"head.qweight_4": torch.zeros_like(sd["emb.qweight_4"]), "head.scales_4": sd["emb.scales_4"].clone()})
    write_weights(root, sd)
    for check in (lambda: verify_quiet(tmp_path / "ck"), lambda: load_quiet(tmp_path / "ck", Tied(), strict=False)):
        with pytest.raises(CheckpointError, match=r"both emb\.qweight_4 and head\.qweight_4"):
            check()


def test_a_tied_head_loads_from_either_name(tmp_path):
    m = tied_net()
    with torch.no_grad():
        y = m(IDS)
    mq.save(m, tmp_path / "ck")
    root = legacy(tmp_path / "ck")
    sd = load_file(str(root / WEIGHTS_NAME))
    write_weights(root, {k.replace("emb.", "head."): v for k, v in sd.items()})  # stored under the head's name
    got = load_quiet(tmp_path / "ck", Tied())
    assert tied_to(got.head, got.emb)
    with torch.no_grad():
        assert torch.equal(got(IDS), y)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["modules"]["head"].update(tied_to="nowhere"), "'nowhere'.*not a QuantEmbedding recorded"),
    (lambda m: m["modules"]["head"].update(tied_to="head"), "'head'.*not a QuantEmbedding recorded"),
    (lambda m: m["modules"]["head"]["config"].update(symmetric=True), "same config"),  # same tensors, other config
])
def test_tied_to_must_name_a_matching_recorded_embedding(tmp_path, edit, match):
    """verify used to pass these; load refused them only after swapping layers."""
    mq.save(tied_net(), tmp_path / "ck")
    edit_meta(legacy(tmp_path / "ck"), edit)
    with pytest.raises(CheckpointError, match=r"medquant.json, key modules\['head'\]\['tied_to'\].*" + match):
        verify_quiet(tmp_path / "ck")


def test_a_shared_layer_whose_other_name_sorts_first_saves_and_loads(tmp_path):
    """``model.a = model.z``: the layer is recorded under ``z`` (first in ``named_modules``) and safetensors stored
    its tensors once, under the alphabetically first name ``a``: the checkpoint could not be loaded at all."""
    torch.manual_seed(0)
    m = Shared().eval()
    mq.quantize_(m, mq.QuantConfig(4, group_size=16))
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m(x)
    mq.save(m, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / META_NAME).read_text())
    assert list(meta["modules"]) == ["z"] and meta["shared_modules"] == {"a": "z"}
    assert {k.split(".")[0] for k in load_file(str(atomic.resolve(tmp_path / "ck") / WEIGHTS_NAME))} == {"z"}
    mq.io.verify(tmp_path / "ck")
    torch.manual_seed(3)
    got = mq.load(tmp_path / "ck", model=Shared().eval())
    assert got.a is got.z and isinstance(got.z, mq.QuantLinear)
    assert same_state(got, m)
    with torch.no_grad():
        assert torch.equal(got(x), y)


def test_a_shared_layer_stored_under_both_names_is_refused(tmp_path):
    torch.manual_seed(0)
    m = Shared().eval()
    mq.quantize_(m, mq.QuantConfig(4, group_size=16))
    mq.save(m, tmp_path / "ck")
    root = legacy(tmp_path / "ck")
    sd = load_file(str(root / WEIGHTS_NAME))
    src, dst = ("a.", "z.") if any(k.startswith("a.") for k in sd) else ("z.", "a.")  # stored under one of them
    sd.update({k.replace(src, dst, 1): torch.zeros_like(v) for k, v in sd.items() if k.startswith(src)})
    write_weights(root, sd)
    with pytest.raises(CheckpointError, match=r"both .*a\.qweight_4 and z\.qweight_4|both z\.qweight_4 and "
                                              r"a\.qweight_4"):
        load_quiet(tmp_path / "ck", Shared(), strict=False)


# ------------------------------------------------------------------------------------------ safetensors header
def _edit_header(path, edit):
    """Rewrite the JSON header of the safetensors file ``path`` by ``edit(header)`` (in place), data unchanged."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _rewrite_offsets(path, offsets):
    def edit(header):
        for k, o in offsets.items():
            header[k]["data_offsets"] = o
    _edit_header(path, edit)


def _safetensors_loads(path) -> bool:
    """Whether the safetensors library (the reference) reads the file."""
    try:
        load_file(str(path))
    except SafetensorError:
        return False
    return True


@pytest.mark.parametrize("offsets, ok", [
    ({"a": [0, 16], "b": [0, 16]}, False),  # b reads a's bytes
    ({"a": [16, 32], "b": [16, 32]}, False),  # the first 16 bytes belong to no tensor
    ({"a": [16, 32], "b": [0, 16]}, True),  # another order, every byte once: valid
])
def test_header_offsets_must_cover_the_data_once(tmp_path, offsets, ok):
    """The rule the safetensors loader applies (the reference): sorted by offset, the tensors tile the data; a file
    it refuses used to pass :func:`read_header` (and verify) and fail only when read."""
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(4)}, str(p))
    _rewrite_offsets(p, offsets)
    assert _safetensors_loads(p) == ok
    if ok:
        assert set(read_header(p)) == {"a", "b"}
    else:
        with pytest.raises(SchemaError, match=r"t.safetensors, key header\['[ab]'\]\['data_offsets'\]: expected"):
            read_header(p)


def test_trailing_bytes_after_the_last_tensor_are_refused(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4)}, str(p))
    p.write_bytes(p.read_bytes() + b"\0" * 8)
    with pytest.raises(SafetensorError):
        load_file(str(p))  # the reference
    with pytest.raises(SchemaError, match="t.safetensors: the tensors end at byte 16 of 24 data bytes"):
        read_header(p)


@pytest.mark.parametrize("metadata, ok", [
    (5, False), ([1], False), ({"format": 1}, False), ({"x": {"y": "z"}}, False), (None, True), ({"f": "pt"}, True),
])
def test_header_metadata_must_be_an_object_of_strings(tmp_path, metadata, ok):
    """``__metadata__`` as the safetensors loader (the reference) reads it: null or string -> string; it used to be
    skipped unchecked, so verify passed a file that load then could not read."""
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4)}, str(p))
    _edit_header(p, lambda header: header.update(__metadata__=metadata))
    assert _safetensors_loads(p) == ok
    if ok:
        assert set(read_header(p)) == {"a"}
    else:
        with pytest.raises(SchemaError, match=r"t.safetensors, key header\['__metadata__'\].*: expected"):
            read_header(p)


def test_a_tensor_held_by_two_shards_is_refused(tmp_path):
    """Shards are merged into one header: a tensor in two shard files was checked in the last one only, while
    transformers reads the one its index names (here a copy of another shape)."""
    fc = quantized_net().fc
    recipe = {"fc": layer_recipe(fc)}
    sd = {f"fc.{k}": v.contiguous() for k, v in fc.state_dict().items()}
    save_file(sd, str(tmp_path / "model-00002-of-00002.safetensors"))
    other = {"fc.qweight_4": torch.zeros(8, 2, dtype=torch.int32)}  # another shape than the recipe's [8, 4]
    save_file(other, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {k: "model-00002-of-00002.safetensors" for k in sd}}
    index["weight_map"]["fc.qweight_4"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"fc\.qweight_4 .*model-00001-of-00002.safetensors and "
                                              r"model-00002-of-00002.safetensors"):
        mq.io.verify_pretrained(tmp_path, recipe, files=False)
    (tmp_path / "model-00001-of-00002.safetensors").unlink()
    index["weight_map"] = {k: "model-00002-of-00002.safetensors" for k in sd}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    mq.io.verify_pretrained(tmp_path, recipe, files=False)  # one copy: fine
