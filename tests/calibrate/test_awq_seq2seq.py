"""AWQ on encoder-decoders: pre-norm Whisper / mBART / T5 fold into their norms (the decoder's cross-attention norm
feeds only the cross-attention query: its k / v read the encoder output), post-norm BART folds into none of its
norms (the calibration forward shows they come after their sublayers); folding never changes the float logits
of a seq2seq forward, and at 3 bits AWQ beats plain round-to-nearest on Whisper with a few outlier channels."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from medquant import QuantConfig, quantize_
from medquant.calibrate.awq import awq_groups, awq_quantize_, search_and_fold
from tests.models.seq2seq_models import ARCHS, PRE_NORM, build, inputs, logits

CFG3 = QuantConfig(3, group_size=32)


def _norm_values(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "layer_norm" in n}


def _expected_whisper_mbart(block: str, decoder: bool) -> dict[str, list[str]]:
    attn = [f"{block}.self_attn.{p}_proj" for p in "qkv"]
    out = {f"{block}.self_attn_layer_norm": attn, f"{block}.self_attn.v_proj": [f"{block}.self_attn.out_proj"],
           f"{block}.final_layer_norm": [f"{block}.fc1"]}
    if decoder:
        out[f"{block}.encoder_attn_layer_norm"] = [f"{block}.encoder_attn.q_proj"]
        out[f"{block}.encoder_attn.v_proj"] = [f"{block}.encoder_attn.out_proj"]
    return out


def _expected_t5(block: str, decoder: bool) -> dict[str, list[str]]:
    attn = [f"{block}.layer.0.SelfAttention.{p}" for p in "qkv"]
    ffn = f"{block}.layer.{2 if decoder else 1}"
    out = {f"{block}.layer.0.layer_norm": attn,
           f"{block}.layer.0.SelfAttention.v": [f"{block}.layer.0.SelfAttention.o"],
           f"{ffn}.layer_norm": [f"{ffn}.DenseReluDense.wi_0", f"{ffn}.DenseReluDense.wi_1"],
           f"{ffn}.DenseReluDense.wi_1": [f"{ffn}.DenseReluDense.wo"]}
    if decoder:
        out[f"{block}.layer.1.layer_norm"] = [f"{block}.layer.1.EncDecAttention.q"]
        out[f"{block}.layer.1.EncDecAttention.v"] = [f"{block}.layer.1.EncDecAttention.o"]
    return out


@pytest.mark.parametrize("arch", ["whisper", "mbart", "t5"])
def test_pre_norm_groups(arch):
    model = build(arch)
    blocks = (["encoder.block.0", "decoder.block.0"] if arch == "t5"
              else ["model.encoder.layers.0", "model.decoder.layers.0"])
    expected = _expected_t5 if arch == "t5" else _expected_whisper_mbart
    groups = {g.prev: g.linears for g in awq_groups(model)}
    for block, decoder in zip(blocks, (False, True)):
        got = {p: ls for p, ls in groups.items() if p.startswith(block + ".")}
        assert got == expected(block, decoder)
    # the cross-attention's k / v read the encoder output: never in a group of a norm
    for prev, linears in groups.items():
        if "norm" in prev:
            assert not any(("encoder_attn" in n or "EncDecAttention" in n) and not n.endswith((".q_proj", ".q"))
                           for n in linears), (prev, linears)


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_keeps_seq2seq_logits(arch):
    model = build(arch)
    batch = inputs(arch)
    held = inputs(arch, seed=5)
    ref, ref_held = logits(model, batch), logits(model, held)
    norms = _norm_values(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = search_and_fold(model, CFG3, [batch], progress=False)
    tol = 1e-4 * max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(logits(model, batch), ref, rtol=1e-4, atol=tol)
    torch.testing.assert_close(logits(model, held), ref_held, rtol=1e-4, atol=tol)
    changed = [n for n, v in _norm_values(model).items() if not torch.equal(v, norms[n])]
    folded_norms = [g.prev for g in groups if "norm" in g.prev and g.alpha]
    if arch in PRE_NORM:
        assert folded_norms and changed  # something was really folded into the norms
        assert {"encoder", "decoder"} <= {p.split(".")[1 if arch != "t5" else 0] for p in folded_norms}
    else:  # post-norm BART: every norm comes after its sublayer; the dataflow check refuses them
        assert not [g for g in groups if "norm" in g.prev] and not changed
        assert any("layer_norm" in str(w.message) and "does not read" in str(w.message) for w in caught)


def test_whisper_awq_beats_rtn_at_3_bits():
    base = build("whisper")
    with torch.no_grad():  # a few outlier channels at every pre-norm
        for name, m in base.named_modules():
            if name.endswith("layer_norm") and ".layers." in name:
                m.weight[[3, 17, 40]] *= 10.0
    calib = [inputs("whisper", seed=s, batch=4) for s in (1, 2)]
    ref = [logits(base, b) for b in calib]
    rtn, awq = copy.deepcopy(base), copy.deepcopy(base)
    quantize_(rtn, CFG3, skip=["@head"])
    groups = awq_quantize_(awq, CFG3, calib, progress=False)
    assert any(g.alpha for g in groups if "encoder_attn_layer_norm" in g.prev)
    assert sum(g.err_awq for g in groups) < sum(g.err_rtn for g in groups)
    err_awq = sum(float((logits(awq, b) - r).pow(2).sum()) for b, r in zip(calib, ref))
    err_rtn = sum(float((logits(rtn, b) - r).pow(2).sum()) for b, r in zip(calib, ref))
    assert err_awq < err_rtn


def test_kosmos2_text_blocks_fold_into_their_pre_norms_not_v_through_inner_attn_ln():
    """Kosmos-2's text blocks are pre-norm with BART's norm names, but their attention normalises the heads' output
    (``inner_attn_ln``) before ``out_proj``: a v -> o fold would change the float model, so it is refused."""
    from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME

    e = EXTRA_ZOO_BY_NAME["kosmos2"]
    model = e.build()
    batch = e.inputs(model)
    text = {g.prev: g.linears for g in awq_groups(model, "all") if g.prev.startswith("text_model.model.layers.0.")}
    block = "text_model.model.layers.0"
    assert text == {f"{block}.self_attn_layer_norm": [f"{block}.self_attn.{p}_proj" for p in "qkv"],
                    f"{block}.final_layer_norm": [f"{block}.ffn.fc1"]}
    with torch.no_grad():
        ref = e.output(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = search_and_fold(model, CFG3, [batch], scope="all", progress=False)
    assert any(g.alpha for g in groups if g.prev.startswith("text_model."))
    with torch.no_grad():
        torch.testing.assert_close(e.output(model, batch), ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))


def _more_layouts() -> dict[str, tuple]:
    """More models whose blocks use the ``self_attn_layer_norm`` / ``final_layer_norm`` names: ``(builder, batch,
    the norms a scale folds into)`` (post-norm Marian and OPT with ``do_layer_norm_before=False``: none)."""
    import transformers as tf

    from tests.models.seq2seq_models import VOCAB

    common = {"vocab_size": VOCAB, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 96,
              "decoder_ffn_dim": 96, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
              "decoder_start_token_id": 1}
    opt = {"vocab_size": VOCAB, "hidden_size": 64, "ffn_dim": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
           "word_embed_proj_dim": 64, "max_position_embeddings": 64, "pad_token_id": 0}
    pre = {"self_attn_layer_norm", "final_layer_norm"}
    s2s = {"input_ids": (2, 9), "decoder_input_ids": (2, 6)}
    lm = {"input_ids": (2, 9)}
    return {
        "marian": (lambda: tf.MarianMTModel(tf.MarianConfig(max_position_embeddings=64, **common)), s2s, set()),
        "pegasus": (lambda: tf.PegasusForConditionalGeneration(tf.PegasusConfig(max_position_embeddings=64, **common)),
                    s2s, pre | {"encoder_attn_layer_norm"}),
        "m2m100": (lambda: tf.M2M100ForConditionalGeneration(tf.M2M100Config(max_position_embeddings=64, **common)),
                   s2s, pre | {"encoder_attn_layer_norm"}),
        "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(**opt)), lm, pre),
        "opt_post_norm": (lambda: tf.OPTForCausalLM(tf.OPTConfig(**opt, do_layer_norm_before=False)), lm, set()),
        "biogpt": (lambda: tf.BioGptForCausalLM(tf.BioGptConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=0)), lm, pre),
        "xglm": (lambda: tf.XGLMForCausalLM(tf.XGLMConfig(
            vocab_size=VOCAB, d_model=64, ffn_dim=96, num_layers=2, attention_heads=4, max_position_embeddings=64,
            pad_token_id=0)), lm, pre),
    }


@pytest.mark.parametrize("name", ["marian", "pegasus", "m2m100", "opt", "opt_post_norm", "biogpt", "xglm"])
def test_folding_keeps_the_logits_of_more_layouts_with_these_norm_names(name):
    """The new norm names reach models not built for them: the pre-norm ones fold into their norms, the post-norm
    ones into none (the calibration forward's dataflow check refuses them, with a warning); the float logits never
    change (reference: the model before the fold)."""
    from tests.models.seq2seq_models import VOCAB, _randomize_norms

    build_fn, shapes, foldable = _more_layouts()[name]
    torch.manual_seed(0)
    model = _randomize_norms(build_fn(), 0).eval()
    gen = torch.Generator().manual_seed(1)
    batch = {k: torch.randint(3, VOCAB, s, generator=gen) for k, s in shapes.items()}
    with torch.no_grad():
        ref = model(**batch, use_cache=False).logits.double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = search_and_fold(model, CFG3, [batch], progress=False)
    with torch.no_grad():
        out = model(**batch, use_cache=False).logits.double()
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    assert {g.prev.rsplit(".", 1)[-1] for g in groups if "norm" in g.prev and g.alpha} == foldable
    assert any(g.alpha for g in groups)  # v -> o at least
    assert any("scales not folded" in str(w.message) for w in caught) == (not foldable)
