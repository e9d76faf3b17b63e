"""Review tests of format="gguf": file-level metadata checked with the gguf package's own reader."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

pytest.importorskip("gguf")

from gguf import GGUFReader, LlamaFileType

from medquant.deploy import ExportError, export
from medquant.quant.api import quantize_
from medquant.quant.config import QuantConfig
from medquant.testing.zoo import ZOO_BY_NAME


def _file_type_of_matrices(path) -> LlamaFileType:
    """llama.cpp's ``general.file_type`` for a file whose matrices are all float: the most common matrix type."""
    reader = GGUFReader(str(path))
    counts = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    main = counts.most_common(1)[0][0]
    return {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16}[main]


def _written_file_type(path) -> LlamaFileType:
    return LlamaFileType(int(GGUFReader(str(path)).fields["general.file_type"].contents()))


@pytest.mark.parametrize("promote_type", ["F16", "F32"])
def test_file_type_of_layers_promoted_to_a_float_type_is_that_type(promote_type, tok_dir, tmp_path):
    """Every block promoted to F16 (float_type F32 for the embedding): the file is mostly F16, not all F32."""
    torch.manual_seed(0)
    model = ZOO_BY_NAME["llama"].build().eval()
    quantize_(model, QuantConfig(bits=4, group_size=16, symmetric=True))  # no GGUF block type: promoted
    report = export(model, tmp_path / "m.gguf", format="gguf", source=tok_dir, promote=True,
                    promote_type=promote_type)
    assert {r.target for r in report.layers if r.name.endswith("proj")} == {promote_type}
    assert _written_file_type(tmp_path / "m.gguf") == _file_type_of_matrices(tmp_path / "m.gguf")


def test_a_vlm_keeping_its_language_model_elsewhere_is_refused_saying_what_is_supported(tok_dir, tmp_path):
    """A VLM whose Llama text model is at none of the places the exporter looks (Idefics3's moved from
    model.text_model): the refusal names where it looks and what it supports (it said only 'no language model ...
    found')."""
    model = ZOO_BY_NAME["idefics3"].build().eval()
    assert model.config.get_text_config().model_type == "llama"
    model.model.decoder = model.model.text_model
    del model.model.text_model
    with pytest.raises(ExportError) as e:
        export(model, tmp_path / "m.gguf", format="gguf", source=tok_dir)
    msg = str(e.value)
    assert "model.language_model" in msg and "model.text_model" in msg and "LLaVA" in msg and "Gemma 3" in msg
    assert not (tmp_path / "m.gguf").exists()


def test_the_scheme_of_float_rows_is_the_dtype_of_the_source_tensor(tok_dir, tmp_path):
    """A bfloat16 model: norms, biases and float matrices are reported as bfloat16 (norms and biases said
    float32, the dtype they are written in, not medquant's)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**text_kwargs(num_key_value_heads=2))).eval().to(torch.bfloat16)
    quantize_(model, {"re:.*mlp.*": QuantConfig(bits=4, group_size=32, symmetric=True)})
    report = export(model, tmp_path / "m.gguf", format="gguf", source=tok_dir)
    params = dict(model.named_parameters())
    float_rows = [r for r in report.layers if r.how == "float"]
    assert any(r.name.endswith("norm.weight") for r in float_rows) and any(r.name.endswith(".bias") for r in float_rows)
    for row in float_rows:
        assert row.scheme == str(params[row.name].dtype).split(".")[-1], row


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_the_near_exact_note_names_what_float16_rounded(scale_dtype, tok_dir, tmp_path):
    """Asymmetric 4-bit codes become Q4_1 with ``m = -z * s`` rounded to float16. With float16 scales only the
    offsets are rounded (the note said "float16 scales / offsets rounded"); with float32 scales both are."""
    torch.manual_seed(0)
    model = ZOO_BY_NAME["llama"].build().eval()
    quantize_(model, QuantConfig(bits=4, group_size=32, symmetric=False, scale_dtype=scale_dtype))
    report = export(model, tmp_path / "m.gguf", format="gguf", source=tok_dir)
    layer = model.model.layers[0].mlp.up_proj
    scales = layer.packed_weight(4).scales.float()
    scales_exact = bool((scales.half().float() == scales).all())  # the reference: are the scales float16 numbers
    row = next(r for r in report.layers if r.name == "model.layers.0.mlp.up_proj")
    assert (row.target, row.how) == ("Q4_1", "near-exact")
    assert ("scales" in row.note) == (not scales_exact), row.note
    assert "offsets" in row.note, row.note


def test_general_name_of_a_model_loaded_from_a_local_folder_is_the_folder_name(tok_dir, tmp_path):
    """The default ``general.name`` was the model's ``name_or_path``: for a local checkpoint its absolute path
    (the user's folders) went into the file that is shared for serving."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "private" / "patients" / "my-model"
    ZOO_BY_NAME["llama"].build().save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.name_or_path == str(folder)
    export(model, tmp_path / "m.gguf", format="gguf", source=tok_dir)
    written = GGUFReader(str(tmp_path / "m.gguf")).fields["general.name"].contents()
    assert written == folder.name
    export(model, tmp_path / "n.gguf", format="gguf", source=tok_dir, name="Given Name")
    assert GGUFReader(str(tmp_path / "n.gguf")).fields["general.name"].contents() == "Given Name"
