"""format="compressed-tensors": a layer whose tensors the compressed-tensors package's own decompressor cannot read.

compressed-tensors 0.20.1's ``unpack_from_int32`` fails (``RuntimeError`` from ``Tensor.view``) on 4-bit zero
points packed along N into a single int32 row with several groups: an asymmetric 4-bit group layer of at most 8
output rows, e.g. the classifier head of a vision model with few classes. transformers'
``CompressedTensorsConfig(dequantize=True)`` loader, the only one that reads asymmetric schemes, uses that
decompressor, so such a folder does not load. The export crashed with that raw ``RuntimeError`` from its own
verification (``verify=True``, the default); it now refuses with an ``ExportError`` naming the layers, before
anything is written, and ``verify=False`` (which writes it anyway) notes them in the report."""
from __future__ import annotations

import warnings

import pytest
import torch

import medquant as mq
from medquant.deploy import ExportError, export
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")

FMT = "compressed-tensors"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _package_reads(rows: int, k: int, group: int) -> bool:
    """Whether compressed-tensors' own compressor output for a random 4-bit asymmetric group weight of ``rows``
    outputs is read back by its own decompressor (the reference, independent of medquant)."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    torch.manual_seed(0)
    q = torch.randint(-8, 8, (rows, k), dtype=torch.int8)
    zp = torch.randint(-8, 8, (rows, k // group), dtype=torch.int8)
    tensors = {"weight_packed": pack_to_int32(q, 4), "weight_scale": torch.rand(rows, k // group),
               "weight_zero_point": pack_to_int32(zp, 4, packed_dim=0),
               "weight_shape": torch.tensor([rows, k])}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=group))
    try:
        PackedQuantizationCompressor.decompress(tensors, scheme)
    except Exception:  # noqa: BLE001 - any failure of the package's reader
        return False
    return True


def test_a_layer_the_package_cannot_read_back_is_refused_naming_it(tmp_path):
    from transformers import CompressedTensorsConfig, ViTForImageClassification

    model = ZOO_BY_NAME["vit"].build()  # a 4-class head: 4 rows, K = 128
    mq.quantize_(model, mq.QuantConfig(4, symmetric=False, group_size=32))
    assert model.classifier.out_rows == 4
    readable = _package_reads(4, 128, 32)
    if readable:  # a compressed-tensors that reads such layers: nothing to refuse
        export(model, tmp_path / "ct", format=FMT)
        return
    with pytest.raises(ExportError, match=r"cannot read.*classifier.*symmetric.*channel.*skip"):
        export(model, tmp_path / "ct", format=FMT)
    assert not (tmp_path / "ct").exists() and not list(tmp_path.iterdir())
    # verify=False writes it anyway, with a note; transformers' loader indeed fails on it
    report = export(model, tmp_path / "ct", format=FMT, verify=False)
    notes = [n for n in report.notes if "classifier" in n and "dequantize=True" in n]
    assert len(notes) == 1
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises for the failed conversion
        ViTForImageClassification.from_pretrained(str(tmp_path / "ct"),
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))


@pytest.mark.parametrize("bits,scope", [(4, "channel"), (8, "group"), (3, "group")])
def test_other_small_asymmetric_heads_export_and_load_exactly(tmp_path, bits, scope):
    from transformers import CompressedTensorsConfig, ViTForImageClassification

    model = ZOO_BY_NAME["vit"].build()
    mq.quantize_(model, mq.QuantConfig(bits, symmetric=False, group_size=32, scope=scope))
    report = export(model, tmp_path / "ct", format=FMT)
    assert not any("cannot read" in n for n in report.notes)
    loaded = ViTForImageClassification.from_pretrained(str(tmp_path / "ct"),
                                                       quantization_config=CompressedTensorsConfig(dequantize=True))
    assert torch.equal(loaded.classifier.weight, model.classifier.dequantized_weight(torch.float32))
