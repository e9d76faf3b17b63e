"""Review 2 of medquant.models: the language blocks of encoder-decoders (both stacks, ``side=`` picks one), the
decoder of bert2bert (its BERT stack is named ``encoder``), prediction heads without a role (ELECTRA, DistilBERT,
AltCLIP) and IBert / Canine / Kyutai speech-to-text.

References: transformers' own accessors and module trees (``get_encoder()`` / ``get_decoder()``, the layers held
by the modules they return, forward hooks showing what a head reads), independent of the code under test.
"""
import pytest
import torch
import transformers as tf
from torch import nn

from medquant.models import (
    UnsupportedArchitectureError,
    block_stacks,
    language_model_layers,
    model_roles,
    role_of,
    transformer_blocks,
    unassigned_modules,
)
from medquant.models.blocks import stack_side
from medquant.models.introspect import unassigned_parameters

tf.logging.set_verbosity_error()

_BERT = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 64}


def _names_of(model: nn.Module, blocks: nn.ModuleList) -> list[str]:
    """Module names of the entries of ``blocks`` (found by identity in ``model.named_modules()``)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in blocks]


def _t5() -> nn.Module:
    with torch.device("meta"):
        return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                         num_decoder_layers=3, num_heads=4))


def _bart() -> nn.Module:
    with torch.device("meta"):
        return tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))


def _bert2bert() -> nn.Module:
    cfg = tf.EncoderDecoderConfig.from_encoder_decoder_configs(
        tf.BertConfig(**_BERT), tf.BertConfig(**{**_BERT, "num_hidden_layers": 3}))
    with torch.device("meta"):
        return tf.EncoderDecoderModel(config=cfg)


# ------------------------------------------------------------------ 1. language_model_layers of an encoder-decoder
@pytest.mark.parametrize("build,attr", [(_t5, "block"), (_bart, "layers")])
def test_encoder_decoder_language_layers_are_both_stacks_and_side_picks_one(build, attr):
    """T5 / BART: config.is_encoder_decoder; the language blocks are the encoder's (get_encoder()) then the decoder's
    (get_decoder(), the stack that generates), not the first stack alone; ``side=`` gives one of them."""
    model = build()
    assert model.config.is_encoder_decoder
    enc = _names_of(model, getattr(model.get_encoder(), attr))
    dec = _names_of(model, getattr(model.get_decoder(), attr))
    assert len(enc) == 2 and len(dec) == 3
    assert language_model_layers(model) == enc + dec
    assert language_model_layers(model, side="decoder") == dec
    assert language_model_layers(model, side="encoder") == enc
    assert block_stacks(model) == [enc, dec]
    with pytest.raises(ValueError, match="side"):
        language_model_layers(model, side="middle")


def test_single_stack_language_model_refuses_a_side():
    """A decoder-only LM has one stack (model.layers): that is its language blocks; asking for an encoder / decoder
    side of it is an error naming the reason, not a silent guess."""
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    assert not model.config.is_encoder_decoder
    assert language_model_layers(model) == _names_of(model, model.model.layers)
    for side in ("decoder", "encoder"):
        with pytest.raises(ValueError, match="encoder-decoder"):
            language_model_layers(model, side=side)


# ---------------------------------------------------------------------- 2. bert2bert: the decoder's stack is a decoder
def test_bert2bert_decoder_stack_is_the_decoder_side():
    """EncoderDecoderModel of two BERTs: the decoder (get_decoder(), a BertLMHeadModel with is_decoder) keeps its
    layers in ``decoder.bert.encoder.layer``; that stack is the decoder side, and the model has two stacks."""
    model = _bert2bert()
    dec_model = model.get_decoder()
    assert dec_model.config.is_decoder and dec_model.config.add_cross_attention
    enc = _names_of(model, model.get_encoder().encoder.layer)
    dec = _names_of(model, dec_model.bert.encoder.layer)
    assert len(enc) == 2 and len(dec) == 3
    assert stack_side(dec[0].rpartition(".")[0]) == "decoder"
    assert stack_side(enc[0].rpartition(".")[0]) == "encoder"
    assert block_stacks(model) == [enc, dec]
    assert language_model_layers(model, side="decoder") == dec
    by_stack = {b.name: stack_side(b.stack) for b in transformer_blocks(model)}
    assert {n: by_stack[n] for n in dec} == dict.fromkeys(dec, "decoder")
    assert {n: by_stack[n] for n in enc} == dict.fromkeys(enc, "encoder")


# -------------------------------------------------------------------- 3. prediction heads beside the body: head
def _hook_inputs(model: nn.Module, name: str, **inputs) -> tuple[torch.Tensor, object]:
    seen: list[torch.Tensor] = []
    h = model.get_submodule(name).register_forward_hook(lambda _m, a, _o: seen.append(a[0]))
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        h.remove()
    return seen[0], out


_ELECTRA = {"vocab_size": 100, "embedding_size": 16, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64}


def test_bert_prediction_transform_is_head():
    """The reference the others follow: BERT's cls.predictions.transform (dense + LayerNorm before the vocabulary
    projection) lies in the head role."""
    with torch.device("meta"):
        bert = tf.BertForMaskedLM(tf.BertConfig(**_BERT))
    assert role_of(bert, "cls.predictions.transform.dense") == "head"
    assert role_of(bert, "cls.predictions.transform.LayerNorm.weight") == "head"


def test_electra_prediction_heads_are_head():
    """ELECTRA's generator_predictions / discriminator_predictions read the body's last hidden state (a forward
    hook) and feed the vocabulary / per-token logits, as BERT's cls.predictions.transform does: head."""
    torch.manual_seed(0)
    mlm = tf.ElectraForMaskedLM(tf.ElectraConfig(**_ELECTRA)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    x, out = _hook_inputs(mlm, "generator_predictions", input_ids=ids)
    torch.testing.assert_close(x, out.hidden_states[-1])
    for n in ("generator_predictions", "generator_predictions.dense", "generator_predictions.LayerNorm.weight"):
        assert role_of(mlm, n) == "head", n
    assert unassigned_modules(mlm) == [] and unassigned_parameters(mlm) == []
    with torch.device("meta"):
        disc = tf.ElectraForPreTraining(tf.ElectraConfig(**_ELECTRA))
    assert role_of(disc, "discriminator_predictions.dense_prediction") == "head"
    assert unassigned_modules(disc) == [] and unassigned_parameters(disc) == []
    assert model_roles(disc)["language"] == ["electra"]


def test_distilbert_vocab_transform_is_head():
    """DistilBERT's vocab_transform and vocab_layer_norm read the body's last hidden state and feed vocab_projector
    (get_output_embeddings()): BERT's transform dense / LayerNorm, so head."""
    torch.manual_seed(0)
    model = tf.DistilBertForMaskedLM(tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4,
                                                         hidden_dim=64, max_position_embeddings=64)).eval()
    x, out = _hook_inputs(model, "vocab_transform", input_ids=torch.tensor([[5, 6, 7, 8]]))
    torch.testing.assert_close(x, out.hidden_states[-1])
    assert model.get_output_embeddings() is model.vocab_projector
    for n in ("vocab_transform", "vocab_layer_norm", "vocab_projector"):
        assert role_of(model, n) == "head", n
    assert unassigned_modules(model) == [] and unassigned_parameters(model) == []


def test_altclip_text_transformation_is_head_like_clip_text_projection():
    """AltCLIP's text tower projects the RoBERTa output with pre_LN then transformation (to project_dim), as
    CLIP's text_projection does: head, and nothing of the model is left outside a role."""
    cfg = tf.AltCLIPConfig(
        text_config={"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "intermediate_size": 64, "project_dim": 16, "max_position_embeddings": 64},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                       "image_size": 32, "patch_size": 8}, projection_dim=16)
    with torch.device("meta"):
        model = tf.AltCLIPModel(cfg)
        clip = tf.CLIPModel(tf.CLIPConfig(
            text_config={"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                         "intermediate_size": 64},
            vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                           "intermediate_size": 64, "image_size": 32, "patch_size": 8}, projection_dim=16))
    assert model.text_model.transformation.out_features == cfg.text_config.project_dim
    assert role_of(clip, "text_projection") == "head"
    assert role_of(model, "text_model.transformation") == "head"
    assert role_of(model, "text_model.pre_LN.weight") == "head"
    assert role_of(model, "text_model.roberta.encoder") == "language"
    assert unassigned_modules(model) == [] and unassigned_parameters(model) == []


# ----------------------------------------------------------------------- 4. IBert / Canine / Kyutai speech-to-text
def test_kyutai_speech_to_text_language_and_codec():
    """Kyutai STT: get_input_embeddings() wraps one nn.Embedding (text + audio-codebook tokens) beside the decoder
    stack model.layers; lm_head is get_output_embeddings(); the Mimi audio codec (config.codec_config) has no role."""
    cfg = tf.KyutaiSpeechToTextConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, ffn_dim=64, codebook_vocab_size=50, num_codebooks=2,
                                      audio_pad_token_id=200, audio_bos_token_id=201, bos_token_id=1)
    with torch.device("meta"):
        model = tf.KyutaiSpeechToTextForConditionalGeneration(cfg)
    assert isinstance(model.get_input_embeddings().embed_tokens, nn.Embedding)
    roles = model_roles(model)
    assert roles == {"language": ["model"], "head": ["lm_head"]}
    assert model.get_output_embeddings() is model.lm_head
    assert language_model_layers(model) == _names_of(model, model.get_decoder().layers)
    codec = [n for n, _ in model.named_parameters() if n.startswith("codec_model.")]
    assert codec and unassigned_parameters(model) == codec


def test_ibert_is_refused_naming_its_own_quant_modules():
    """IBert keeps its token table in a QuantEmbedding and its projections in QuantLinear (transformers' integer-only
    modules, not nn.Embedding / nn.Linear): refused, saying so."""
    with torch.device("meta"):
        model = tf.IBertForMaskedLM(tf.IBertConfig(**_BERT))
    emb = model.get_input_embeddings()
    assert not isinstance(emb, nn.Embedding) and type(emb).__name__ == "QuantEmbedding"
    q = model.ibert.encoder.layer[0].attention.self.query
    assert not isinstance(q, nn.Linear) and type(q).__name__ == "QuantLinear"
    with pytest.raises(UnsupportedArchitectureError, match="QuantEmbedding") as e:
        model_roles(model)
    assert "QuantLinear" in str(e.value) and "nn.Linear" in str(e.value)


def test_canine_is_refused_saying_it_has_no_token_table():
    """Canine hashes Unicode code points (get_input_embeddings() is not implemented) and runs three block stacks
    around convolutional down / up-sampling: refused, and the message says the token embedding is missing and why."""
    with torch.device("meta"):
        model = tf.CanineModel(tf.CanineConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64))
    with pytest.raises(NotImplementedError):
        model.get_input_embeddings()
    with pytest.raises(UnsupportedArchitectureError, match="get_input_embeddings") as e:
        model_roles(model)
    assert "NotImplementedError" in str(e.value)
