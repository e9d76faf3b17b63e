"""format="compressed-tensors" against the compressed-tensors package's own reading of a folder: the ``ignore`` list
its own config builder (``QuantizationConfig.from_pretrained``, what llm-compressor writes) derives for the same
quantized layers, and what transformers' loaders read from a folder with several config groups."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import medquant as mq
from medquant.deploy import export
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")

from tests.deploy.test_compressed_tensors import _qconfig

FMT = "compressed-tensors"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2)
    return Qwen3MoeForCausalLM(cfg).eval()


def test_moe_routers_are_in_the_ignore_list_compressed_tensors_derives():
    """compressed-tensors treats MoE routers (``*TopKRouter``, ``*Gate``) as ``Linear`` for config matching, since
    vLLM builds them as linear layers (``get_vllm_module_type``); its own config builder therefore lists every float
    router in ``ignore`` next to the float ``Linear`` layers. medquant listed only ``nn.Linear`` modules, so a
    ``"Linear"`` target also covered the float routers in vLLM's reading."""
    import tempfile
    from pathlib import Path

    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoModelForCausalLM

    model = _tiny_qwen3_moe()
    mq.quantize_(model, mq.QuantConfig(4, symmetric=True, group_size=32), skip=["lm_head", "re:.*experts.*"])
    packed = set(quantized_modules(model))
    assert packed and not any("experts" in n or n.endswith("mlp.gate") for n in packed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ct"
        export(model, folder, format=FMT)
        q = _qconfig(folder)
        # the reference: a float model built from the written config, the written config applied by
        # compressed-tensors itself, then compressed-tensors' own config builder on the result
        ref = AutoModelForCausalLM.from_config(_config_without_quant(folder))
    apply_quantization_config(ref, QuantizationConfig.model_validate(q), show_progress=False)
    schemed = {n for n, m in ref.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    assert schemed == packed  # the targets select exactly medquant's packed layers
    derived = QuantizationConfig.from_pretrained(ref)
    routers = {f"model.layers.{i}.mlp.gate" for i in range(2)}
    assert routers <= set(derived.ignore)
    assert set(q["ignore"]) == set(derived.ignore)


def _config_without_quant(folder):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(folder))
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    return cfg


def _two_scheme_llama(symmetric: bool):
    model = ZOO_BY_NAME["llama"].build()
    return mq.quantize_(model, {"model.layers.1.mlp.up_proj": mq.QuantConfig(8, symmetric=symmetric, group_size=32),
                                "_default": mq.QuantConfig(4, symmetric=symmetric, group_size=32)},
                        skip=["lm_head"])


def test_several_config_groups_warn_about_transformers_dequantize_loader(tmp_path):
    """transformers' ``CompressedTensorsConfig(dequantize=True)`` loader (the documented way to load an asymmetric
    export in transformers) decompresses every layer with the first config group's scheme: with a second group
    (here an 8-bit layer among 4-bit ones) that layer loads with wrong weights and no error. The report must say
    so, naming the layers it misreads; vLLM reads each layer with its own group."""
    from transformers import CompressedTensorsConfig, LlamaForCausalLM

    model = _two_scheme_llama(symmetric=False)
    report = export(model, tmp_path / "ct", format=FMT)
    q = _qconfig(tmp_path / "ct")
    assert len(q["config_groups"]) == 2
    notes = [n for n in report.notes if "dequantize=True" in n]
    assert len(notes) == 1 and "model.layers.1.mlp.up_proj" in notes[0]
    assert "model.layers.0.mlp.up_proj" not in notes[0]  # a layer of the first group is read right
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "ct"),
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    sd = loaded.state_dict()
    wrong = {n for n, layer in quantized_modules(model).items()
             if not torch.equal(sd[f"{n}.weight"], layer.dequantized_weight(torch.float32))}
    assert wrong <= {"model.layers.1.mlp.up_proj"}  # every misread layer is one the note names


def test_several_symmetric_groups_load_exactly_without_dequantize(tmp_path):
    """The note's advice: a symmetric export with several groups loads bit-exactly with transformers' default
    (compressed) loader, which matches each layer to its own group."""
    from transformers import LlamaForCausalLM

    model = _two_scheme_llama(symmetric=True)
    report = export(model, tmp_path / "ct", format=FMT)
    assert any("dequantize=True" in n for n in report.notes)
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "ct")).eval()
    with torch.no_grad():  # the compressed model is decompressed at its first forward
        loaded(input_ids=torch.tensor([[2, 5, 9]]))
    sd = loaded.state_dict()
    for n, layer in quantized_modules(model).items():
        assert torch.equal(sd[f"{n}.weight"], layer.dequantized_weight(torch.float32)), n


def test_one_group_has_no_dequantize_note(tmp_path):
    model = mq.quantize_(copy.deepcopy(ZOO_BY_NAME["llama"].build()), mq.QuantConfig(4, symmetric=False,
                                                                                      group_size=32),
                         skip=["lm_head"])
    report = export(model, tmp_path / "ct", format=FMT)
    assert not any("dequantize=True" in n for n in report.notes)


def _llama_in(dtype: torch.dtype, scale_dtype: str = "float16"):
    model = ZOO_BY_NAME["llama"].build().to(dtype)
    model.config.dtype = dtype  # what from_pretrained records for a checkpoint of that dtype
    return mq.quantize_(model, mq.QuantConfig(4, symmetric=True, group_size=32, scale_dtype=scale_dtype),
                        skip=["lm_head"])


def _reload_weights(folder) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(str(folder)).eval()  # dtype "auto": the config's dtype
    with torch.no_grad():  # decompressed at the first forward
        loaded(input_ids=torch.tensor([[2, 5, 9]]))
    return loaded.state_dict()


def test_bfloat16_config_notes_the_scales_the_runtime_rounds(tmp_path):
    """The runtime holds ``weight_scale`` in the model's dtype (compressed-tensors initializes it in the weight's
    dtype; vLLM in params_dtype): a bfloat16 model's float16 scales are rounded to bfloat16 on load, so the loaded
    weights differ from medquant's although every row is an exact repack. The report must say so."""
    model = _llama_in(torch.bfloat16)
    report = export(model, tmp_path / "ct", format=FMT)
    assert all(r.how in ("exact repack", "float") for r in report.layers)
    notes = [n for n in report.notes if "rounded" in n and "bfloat16" in n]
    assert len(notes) == 1 and "14 packed layer(s)" in notes[0]
    sd = _reload_weights(tmp_path / "ct")
    diffs = {n: float((sd[f"{n}.weight"].float() - layer.dequantized_weight(torch.bfloat16).float()).abs().max())
             for n, layer in quantized_modules(model).items()}
    assert max(diffs.values()) > 0  # the note's premise, measured with transformers' loader
    for n, layer in quantized_modules(model).items():  # about one bfloat16 rounding of the weight
        w = layer.dequantized_weight(torch.float32)
        assert diffs[n] <= 2 ** -6 * float(w.abs().max()), n


@pytest.mark.parametrize("dtype,scale_dtype", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")],
                         ids=["fp16-model-fp16-scales", "bf16-model-bf16-scales"])
def test_scales_of_the_model_dtype_load_exactly_without_a_note(tmp_path, dtype, scale_dtype):
    model = _llama_in(dtype, scale_dtype)
    report = export(model, tmp_path / "ct", format=FMT)
    assert not any("rounded" in n for n in report.notes)
    sd = _reload_weights(tmp_path / "ct")
    for n, layer in quantized_modules(model).items():
        assert torch.equal(sd[f"{n}.weight"], layer.dequantized_weight(dtype)), n
