"""Review of medquant.models.structure: text encoder-decoders whose second stack was left without a role, an output
"head" that was a token table, vision hints in a text-only model, and a tied patch embedding inside the text encoder.

References: the module trees and configs of transformers 5 (layer counts from the configs, the vocabulary
projection found by a forward hook on the logits, parameter identity for tied weights), independent of the code
under test.
"""
import pytest
import torch
import transformers as tf
from torch import nn

from medquant.models import language_model_layers, model_roles, role_of, unassigned_modules, vision_layers
from medquant.models.introspect import unassigned_parameters

tf.logging.set_verbosity_error()

_BERT = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 64}


def _param_roles(model: nn.Module, prefix: str) -> set[str | None]:
    return {role_of(model, n) for n, _ in model.named_parameters() if n == prefix or n.startswith(prefix + ".")}


# ------------------------------------------------------------------------- text encoder-decoders: both stacks language
def test_bert2bert_decoder_is_language_not_unassigned():
    """EncoderDecoderModel (bert2bert): the encoder owns the input embedding; the decoder (a BertLMHeadModel with
    3 layers, from config.decoder) is the text decoder, so its body is language and its ``cls`` the head."""
    torch.manual_seed(0)
    cfg = tf.EncoderDecoderConfig.from_encoder_decoder_configs(
        tf.BertConfig(**_BERT), tf.BertConfig(**{**_BERT, "num_hidden_layers": 3}))
    with torch.device("meta"):
        model = tf.EncoderDecoderModel(config=cfg)
    roles = model_roles(model)
    assert roles["language"] == ["encoder", "decoder.bert"]
    assert roles["head"] == ["decoder.cls"]
    assert _param_roles(model, "decoder.bert") == {"language"}
    n_dec = cfg.decoder.num_hidden_layers
    assert sum(1 for n, _ in model.named_modules() if role_of(model, n) == "language"
               and n.startswith("decoder.bert.encoder.layer.") and n.count(".") == 4) == n_dec
    assert unassigned_modules(model) == [] and unassigned_parameters(model) == []


def test_seamless_text_to_text_encoder_is_language():
    """SeamlessM4TForTextToText: get_input_embeddings() is the decoder's table; the text encoder beside it (its own
    token table and config.encoder_layers layers) is language too, not left outside every role."""
    c = tf.SeamlessM4TConfig(vocab_size=100, hidden_size=32, encoder_layers=2, decoder_layers=3,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, speech_encoder_layers=1, t2u_encoder_layers=1, t2u_decoder_layers=1,
                             max_position_embeddings=64, pad_token_id=0)
    with torch.device("meta"):
        model = tf.SeamlessM4TForTextToText(c)
    roles = model_roles(model)
    assert "text_encoder" in roles["language"] and "text_decoder" in roles["language"]
    assert len(model.text_encoder.layers) == c.encoder_layers
    assert _param_roles(model, "text_encoder") == {"language"}
    assert roles["head"] == ["lm_head"]
    assert unassigned_modules(model) == []


def _fsmt() -> nn.Module:
    cfg = tf.FSMTConfig(src_vocab_size=100, tgt_vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=3,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
                        langs=["en", "de"], max_position_embeddings=64)
    torch.manual_seed(0)
    return tf.FSMTForConditionalGeneration(cfg).eval()


def test_fsmt_head_is_the_vocabulary_projection_not_a_token_table():
    """FSMT's get_output_embeddings() returns the decoder's input table (an nn.Embedding). The module that makes the
    logits is found by a forward hook: its output is the logits. That one is the head; the decoder is language."""
    model = _fsmt()
    outs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _a, o, n=n: outs.setdefault(n, o))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ids = torch.tensor([[5, 6, 7, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=ids).logits
    for h in hooks:
        h.remove()
    producer = [n for n, o in outs.items() if o.shape == logits.shape and torch.equal(o, logits)]
    assert producer == ["model.decoder.output_projection"]
    roles = model_roles(model)
    assert roles["head"] == producer
    assert role_of(model, "model.decoder.embed_tokens") == "language"
    assert _param_roles(model, "model.decoder.layers") == {"language"}
    assert language_model_layers(model)[:2] == ["model.encoder.layers.0", "model.encoder.layers.1"]
    assert unassigned_modules(model) == [] and unassigned_parameters(model) == []


# ------------------------------------------------------------------------------------ a text-only model has no vision
def test_byte_latent_transformer_has_no_vision_role():
    """BLT reads bytes (no vision config, no image argument): its ``patch_embedding_projection`` layers map byte
    patches, not images, so nothing is vision; the global transformer and the local decoder are language."""
    with torch.device("meta"):
        model = tf.BltForCausalLM(tf.CONFIG_MAPPING["blt"]())
    assert not any(k.endswith("vision_config") for k in vars(model.config))
    roles = model_roles(model)
    assert "vision" not in roles and "projector" not in roles
    assert role_of(model, "model.local_encoder.patch_embedding_projection") == "language"
    for stack in ("model.global_transformer.layers", "model.local_decoder.layers", "model.local_encoder.layers"):
        assert _param_roles(model, stack) == {"language"}, stack
    assert roles["head"][0] == "lm_head"
    assert unassigned_modules(model) == []


# ------------------------------------------------------------------- a tied patch embedding inside the text encoder
def test_udop_encoder_patch_embedding_tied_to_the_vision_one_is_vision():
    """UDOP's T5 encoder runs its own ``embed_patches`` on ``pixel_values``; its weights are the very tensors of the
    top-level ``patch_embed`` (vision). The module that sees the image is vision, never language."""
    with torch.device("meta"):
        model = tf.UdopForConditionalGeneration(tf.CONFIG_MAPPING["udop"]())
    assert model.encoder.embed_patches.proj.weight is model.patch_embed.proj.weight  # the reference: shared tensors
    assert role_of(model, "encoder.embed_patches.proj") == "vision"
    assert role_of(model, "patch_embed.proj") == "vision"
    assert role_of(model, "encoder.block.0") == "language"
    assert role_of(model, "decoder.block.0") == "language"
    assert role_of(model, "lm_head") == "head"
    assert unassigned_modules(model) == []


@pytest.mark.parametrize("name", ["gpt_neox", "falcon", "bloom", "opt", "olmo2", "starcoder2", "cohere", "granite"])
def test_causal_lms_outside_the_table(name):
    """Roles and blocks of causal LMs the table does not list: the layer count is the config's num_hidden_layers and
    the head is get_output_embeddings()."""
    cfg = tf.AutoConfig.for_model(name)
    tiny = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    for k, v in tiny.items():
        if hasattr(cfg, k):
            setattr(cfg, k, v)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    out = model.get_output_embeddings()
    head = next(n for n, m in model.named_modules() if m is out)
    roles = model_roles(model)
    assert roles["head"] == [head]
    assert len(language_model_layers(model)) == cfg.num_hidden_layers
    assert vision_layers(model) == [] and "vision" not in roles
    assert unassigned_modules(model) == []


# ----------------------------------------------------------------------------- a dual encoder's text tower is language
@pytest.mark.parametrize("cls_name,model_type,base", [("OwlViTModel", "owlvit", ""),
                                                      ("Owlv2ForObjectDetection", "owlv2", "owlv2.")])
def test_owlvit_text_tower_is_language_not_vision(cls_name, model_type, base):
    """OWL-ViT's text tower (config.text_config, a token table of text_config.vocab_size rows) has no working
    get_input_embeddings(); it is still the language model, never vision, and its layers are the language blocks."""
    cfg = tf.CONFIG_MAPPING[model_type]()
    with torch.device("meta"):
        model = getattr(tf, cls_name)(cfg)
    text = model.get_submodule(base + "text_model")
    assert text.embeddings.token_embedding.num_embeddings == cfg.text_config.vocab_size
    roles = model_roles(model)
    assert roles["vision"] == [base + "vision_model"]
    assert roles["language"] == [base + "text_model"]
    assert _param_roles(model, base + "text_model") == {"language"}
    assert language_model_layers(model) == [f"{base}text_model.encoder.layers.{i}"
                                            for i in range(cfg.text_config.num_hidden_layers)]
    assert len(vision_layers(model)) == cfg.vision_config.num_hidden_layers


# ------------------------------------------------------------------ a list of embedding tables is not the block stack
def test_markuplm_encoder_is_language_and_its_layers_are_the_blocks():
    """MarkupLM's embeddings hold a ModuleList of xpath embedding tables beside the token table; the block stack is
    encoder.layer (config.num_hidden_layers entries), so the language model is the whole body, not its embeddings."""
    cfg = tf.MarkupLMConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64)
    with torch.device("meta"):
        model = tf.MarkupLMModel(cfg)
    assert all(isinstance(m, nn.Embedding) for m in model.embeddings.xpath_embeddings.xpath_tag_sub_embeddings)
    assert language_model_layers(model) == [f"encoder.layer.{i}" for i in range(cfg.num_hidden_layers)]
    assert _param_roles(model, "encoder") == {"language"}
    assert unassigned_modules(model) == []


# ------------------------------------------------------------- a single-stream model's patch embedding reads the image
def test_vilt_patch_embedding_is_vision():
    """ViLT has no vision tower and no vision config: one encoder reads text tokens and image patches. The patch
    embedding (a Conv2d on pixel_values, found by a forward hook) sees the image, so it is vision, not language."""
    cfg = tf.ViltConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, image_size=32, patch_size=8, max_position_embeddings=64,
                        max_image_length=-1)
    torch.manual_seed(0)
    model = tf.ViltModel(cfg).eval()
    seen: list[str] = []
    hooks = [m.register_forward_hook(lambda _m, a, _o, n=n: seen.append(n) if a and a[0].dim() == 4 else None)
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), pixel_values=torch.zeros(1, 3, 32, 32),
              pixel_mask=torch.ones(1, 32, 32, dtype=torch.long))
    for h in hooks:
        h.remove()
    assert seen == ["embeddings.patch_embeddings.projection"]
    assert role_of(model, seen[0]) == "vision"
    assert role_of(model, "embeddings.text_embeddings.word_embeddings") == "language"
    assert role_of(model, "encoder.layer.0.attention.attention.query") == "language"
