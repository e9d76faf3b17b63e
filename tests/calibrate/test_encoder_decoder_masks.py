"""Padding masks that follow the encoder / decoder sides of an encoder-decoder (GPTQ whole model and block by block,
AWQ, AdaRound).

The batches: a tiny BART (and a tiny T5Gemma for AWQ, whose pre-norm decoder blocks have scale groups) whose encoder
``attention_mask`` is padded, with a decoder sequence of the *encoder's length* - the case where a mask chosen by
shape alone would drop decoder rows where the encoder is padded - and:

* batch 0: a padded ``decoder_attention_mask`` (padding at other positions than the encoder's);
* batch 1: decoder inputs without a ``decoder_attention_mask`` (every decoder row is data);
* batch 2 (GPTQ, AdaRound): ``labels`` only (the model shifts them into its decoder inputs), padded with ``-100``:
  no decoder mask is read from them, so every decoder row is data.

References are computed here with plain forward hooks on the float model: a layer's rows are those of the
encoder's mask when the layer is in the encoder or is a cross-attention ``k`` / ``v`` projection (it reads the
encoder's output), else those of the ``decoder_attention_mask`` (all rows without one), picked by the layer's
*name* (not by the library's rule); GPTQ's Hessian ``2 X^T X / n`` on those rows, AWQ's grid search on them,
AdaRound's error over the unit's real output rows.
"""
from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from medquant.calibrate import gptq as gptq_mod
from medquant.calibrate._forward import MaskSides, batch_masks, call_encoder_states
from medquant.calibrate.adaround import adaround_quantize_
from medquant.calibrate.awq import (
    ScaleGroup,
    _collect,
    awq_quantize_,
    awq_quantize_sequential,
    search_and_fold_block,
)
from medquant.calibrate.gptq import gptq_quantize_, gptq_quantize_sequential
from medquant.calibrate.sequential import BlockInputs
from medquant.testing.zoo import ZOO_BY_NAME
from tests.calibrate.test_vlm_image_sweep_awq import CONFIG, GRID, _search

T = 8  # encoder and decoder length
VOCAB = 64
ENC = r"re:model\.encoder\..*"
pytestmark = [pytest.mark.filterwarnings("ignore:.*stay in floating point:UserWarning"),
              pytest.mark.filterwarnings("ignore:Version v4.12.0 introduces:FutureWarning")]  # bert2bert's labels


def _bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    return BartForConditionalGeneration(cfg).eval()


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def _bert2bert() -> nn.Module:
    """bert2bert with a wider decoder: the encoder's output goes through ``enc_to_dec_proj`` (outside both stacks)
    before the decoder's cross-attention reads it, so the decoder blocks' encoder_hidden_states is not the
    encoder's output tensor."""
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel
    torch.manual_seed(0)
    enc = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)
    dec = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, is_decoder=True, add_cross_attention=True)
    cfg = EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id = 2, 0
    return EncoderDecoderModel(config=cfg).eval()


# (builder, name prefix of the encoder / decoder stacks, layers left float in every run). BART passes
# encoder_hidden_states to its decoder layers as the third positional argument, T5 as the fourth (to T5Block, its
# cross-attention k / v are layer.1.EncDecAttention.k / .v), bert2bert by keyword (crossattention.self.key / value
# reading enc_to_dec_proj's output; the pooler reads the first token only)
ARCHS = {"bart": (_bart, "model.", []), "t5": (_t5, "", []),
         "bert2bert": (_bert2bert, "", [r"re:.*pooler.*", "enc_to_dec_proj"])}


def _t5gemma() -> nn.Module:
    from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration, T5GemmaModuleConfig
    torch.manual_seed(0)
    side = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
            "layer_types": ["full_attention"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = T5GemmaConfig(encoder=T5GemmaModuleConfig(**side), decoder=T5GemmaModuleConfig(**side),
                            vocab_size=VOCAB)
    return T5GemmaForConditionalGeneration(cfg).eval()


def _mask(rows: int, pads: dict[int, int]) -> torch.Tensor:
    """A ``(rows, T)`` mask of ones whose row ``r`` ends in ``pads[r]`` zeros."""
    m = torch.ones(rows, T, dtype=torch.long)
    for r, n in pads.items():
        m[r, T - n:] = 0
    return m


KINDS = ["decoder_mask", "no_decoder_mask", "labels"]


def _batches(kind: str = "decoder_mask") -> list[dict[str, Any]]:
    """Two calibration batches (2 rows each, ids in ``[3, VOCAB)``), the encoder padded differently in each, with
    decoder inputs of the encoder's length: ``"decoder_mask"``: a ``decoder_attention_mask``, padded in batch 0 (at
    other positions than the encoder's) and all ones in batch 1; ``"no_decoder_mask"``: ``decoder_input_ids``
    only; ``"labels"``: ``labels`` only (the model shifts them into its decoder inputs), padded with -100."""
    gen = torch.Generator().manual_seed(3)

    def ids() -> torch.Tensor:
        return torch.randint(3, VOCAB, (2, T), generator=gen)

    out = []
    for enc_pad, dec_pad in (({1: 3}, {0: 2}), ({0: 2}, {})):
        b = {"input_ids": ids(), "attention_mask": _mask(2, enc_pad)}
        if kind == "labels":
            lab = ids()
            for r, n in dec_pad.items():
                lab[r, T - n:] = -100
            b["labels"] = lab
        else:
            b["decoder_input_ids"] = ids()
            if kind == "decoder_mask":
                b["decoder_attention_mask"] = _mask(2, dec_pad)
        out.append(b)
    return out


def _encoder_rows(name: str) -> bool:
    """Whether the layer ``name`` reads the encoder's positions (by name: the encoder, cross-attention k / v)."""
    return name.startswith(("model.encoder.", "encoder.")) or name == "enc_to_dec_proj" or bool(
        re.search(r"(encoder_attn|cross_attn)\.[kv]_proj$|EncDecAttention\.[kv]$|crossattention\.self\.(key|value)$",
                  name))


def _rows_of(name: str, x: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The calibration rows of layer ``name``'s input ``x`` (``(batch, T, K)``) in ``batch``."""
    key = "attention_mask" if _encoder_rows(name) else "decoder_attention_mask"
    assert x.shape[:2] == (2, T)
    m = batch.get(key)
    return x.reshape(-1, x.shape[-1]) if m is None else x[m != 0]


def _reference_rows(model: nn.Module, names: list[str], batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Each layer's calibration rows over the batches, from forward pre-hooks on ``model`` (float64)."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    current: list[dict[str, Any]] = [{}]
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: got[n].append(_rows_of(n, args[0].detach().double(), current[0]))) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                current[0] = b
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def _linears(model: nn.Module, prefix: str) -> list[str]:
    """The linears under ``prefix`` but a pooler's (which reads one token per sample)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)
            and ".pooler." not in n]


def _spy_hessians(monkeypatch) -> dict[str, torch.Tensor]:
    """The Hessian GPTQ quantizes each layer with, by full layer name."""
    got: dict[str, torch.Tensor] = {}
    real = gptq_mod._quantize_layer

    def spy(module, hessian, config, damp, block_size, act_order, name, *a, **k):
        got[name] = hessian.detach().clone()
        return real(module, hessian, config, damp, block_size, act_order, name, *a, **k)

    monkeypatch.setattr(gptq_mod, "_quantize_layer", spy)
    return got


def _check_hessians(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], records: dict[str, Any]) -> None:
    """Each quantized layer's Hessian is ``2 X^T X / n`` over its reference rows ``ref[name]``, its record's
    ``rows`` is ``n`` (the layers of ``ref`` not quantized are the LM head's)."""
    assert set(got) == set(records) and set(got) <= set(ref)
    for n, hessian in got.items():
        x = ref[n]
        h = hessian.reshape(x.shape[1], x.shape[1])
        torch.testing.assert_close(h, 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-7, msg=n)
        assert records[n]["rows"] == x.shape[0], n


# ---------------------------------------------------------------------------------------------- the rule
def test_the_sides_of_an_encoder_decoder_and_its_batch_masks():
    model = _bart()
    sides = MaskSides(model)
    assert sides.seq2seq and sides.encoder == "model.encoder"
    b = _batches()
    m0, m1 = (batch_masks(x) for x in b)
    assert torch.equal(m0.encoder, b[0]["attention_mask"] != 0) and torch.equal(m0.decoder,
                                                                                 b[0]["decoder_attention_mask"] != 0)
    assert m1.decoder is None and m1.encoder is not None  # a decoder_attention_mask of ones pads nothing
    m2 = batch_masks(_batches("labels")[0])
    assert m2.decoder is None and m2.encoder is not None  # labels padded with -100 are no decoder mask
    x, enc = torch.zeros(2, T, 4), torch.zeros(2, T, 4)
    assert sides.mask("model.encoder.layers.0.fc1", x, m0) is m0.encoder
    assert sides.mask("model.decoder.layers.0.fc1", x, m0) is m0.decoder
    assert sides.mask("model.decoder.layers.0.encoder_attn.k_proj", enc, m0, [enc]) is m0.encoder
    assert sides.mask("lm_head", x, m0, [enc]) is m0.decoder
    rows, cross = sides.block_masks("model.decoder.layers.0", [m0, m1])
    assert rows == [m0.decoder, None] and cross == [m0.encoder, m1.encoder]
    assert sides.block_masks("model.encoder.layers.0", [m0]) == ([m0.encoder], None)
    # a decoder-only model: one side, the attention_mask everywhere
    assert not MaskSides(ZOO_BY_NAME["llama"].build()).seq2seq


def test_the_encoder_states_of_a_decoder_block_call_by_position_or_keyword():
    block = _bart().model.decoder.layers[0]
    h, enc = torch.zeros(1, 2, 32), torch.zeros(1, 3, 32)
    assert call_encoder_states(block, (h, None, enc), {})[0] is enc  # BART passes it by position
    assert call_encoder_states(block, (h,), {"encoder_hidden_states": enc})[0] is enc
    assert call_encoder_states(block, (h,), {}) == []


# ---------------------------------------------------------------------------------------------- GPTQ
def _other_side(prefix: str, side: str) -> str:
    """The skip pattern of the stack other than ``side``."""
    return rf"re:{re.escape(prefix)}{'decoder' if side == 'encoder' else 'encoder'}\..*"


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_gptq_hessians_take_the_mask_of_each_side(side, kind, arch, monkeypatch):
    """Whole model: the encoder's layers and the cross-attention k / v leave out the encoder's padding, the
    decoder's other layers the decoder's (none without a decoder_attention_mask, none from labels), even with the
    two sequences of one length. The other side stays float, so every input is the float model's."""
    build, prefix, keep = ARCHS[arch]
    model, batches = build(), _batches(kind)
    ref = _reference_rows(copy.deepcopy(model), _linears(model, f"{prefix}{side}."), batches)
    got = _spy_hessians(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning about the equal lengths any more
        warnings.filterwarnings("ignore", ".*stay in floating point")
        records = gptq_quantize_(model, CONFIG, batches, skip=["@head", _other_side(prefix, side), *keep],
                                 progress=False)
    assert any(_encoder_rows(n) for n in got) and (side == "encoder" or not all(_encoder_rows(n) for n in got))
    _check_hessians(got, ref, records)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_gptq_block_by_block_hessians_take_the_mask_of_each_side(side, kind, arch, monkeypatch):
    """Block by block: an encoder block's rows take the encoder's mask; a decoder block's the decoder's, and the
    encoder_hidden_states its k / v read the encoder's (the encoder left float, so the decoder block's recorded
    inputs are the float model's)."""
    build, prefix, keep = ARCHS[arch]
    model, batches = build(), _batches(kind)
    ref = _reference_rows(copy.deepcopy(model), _linears(model, f"{prefix}{side}."), batches)
    got = _spy_hessians(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*stay in floating point")
        records = gptq_quantize_sequential(model, CONFIG, batches, skip=["@head", _other_side(prefix, side), *keep],
                                           progress=False, offload_device=None)
    assert any(_encoder_rows(n) for n in got) and (side == "encoder" or not all(_encoder_rows(n) for n in got))
    _check_hessians(got, ref, records)


def test_gptq_a_layer_reading_the_encoder_output_outside_both_stacks_takes_the_encoder_mask(monkeypatch):
    """bert2bert's enc_to_dec_proj (the only layer planned) reads the encoder's output: the encoder's rows."""
    model, batches = _bert2bert(), _batches()
    ref = _reference_rows(copy.deepcopy(model), ["enc_to_dec_proj"], batches)
    got = _spy_hessians(monkeypatch)
    records = gptq_quantize_(model, CONFIG, batches, skip=[r"re:^(?!enc_to_dec_proj$).*"], progress=False)
    _check_hessians(got, ref, records)
    assert set(got) == {"enc_to_dec_proj"}


# ---------------------------------------------------------------------------------------------- AWQ
def _check_groups(groups: list[ScaleGroup], rows: dict[str, torch.Tensor], float_model: nn.Module,
                  prefix: str = "") -> None:
    assert groups
    for g in groups:
        ws = [float_model.get_submodule(prefix + n).weight.detach().float() for n in g.linears]
        errs = _search(ws, rows[prefix + g.linears[0]].float())
        assert g.err_rtn == pytest.approx(errs[0], rel=1e-4), g.prev
        assert g.err_awq == pytest.approx(min(errs), rel=1e-4), g.prev
        assert errs[round(g.alpha * GRID)] == pytest.approx(min(errs), rel=1e-4), g.prev


@pytest.mark.parametrize("sequential", [False, True])
def test_awq_searches_each_side_on_its_own_real_rows(sequential):
    """T5Gemma's encoder and decoder FFN groups: the encoder's on the encoder's real rows, the decoder's on the
    decoder's (its padding left out in batch 0, every row in batch 1), the sequences of one length."""
    model, batches = _t5gemma(), _batches()
    float_model = copy.deepcopy(model)
    ref = _reference_rows(copy.deepcopy(model), _linears(model, "model."), batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*stay in floating point")
        if sequential:  # the encoder left float: the decoder block's inputs are the float model's
            groups = awq_quantize_sequential(model, CONFIG, batches, skip=["@head", ENC], grid=GRID, max_rows=None,
                                             progress=False, offload_device=None)
            assert all(g.prev.startswith("model.") for g in groups)
        else:
            groups = awq_quantize_(model, CONFIG, batches, grid=GRID, max_rows=None, progress=False)
    sides = {g.prev.split(".")[1] for g in groups}
    assert sides == ({"decoder", "encoder"} if not sequential else sides) and "decoder" in sides
    _check_groups(groups, ref, float_model)


def test_awq_cross_attention_kv_rows_take_the_encoder_mask():
    """A group of the decoder's cross-attention k / v: whole model (the rows collected for it) and block by block
    (:func:`search_and_fold_block` with ``encoder_masks``, on the decoder block's calls recorded here) read the
    encoder's real rows only; without ``encoder_masks`` the decoder's masks apply to them (the shapes match)."""
    model, batches = _t5gemma(), _batches()
    k, v = "model.decoder.layers.0.cross_attn.k_proj", "model.decoder.layers.0.cross_attn.v_proj"
    ref = _reference_rows(copy.deepcopy(model), [k], batches)[k]
    whole = _collect(model, [ScaleGroup("model.encoder.norm", [k, v])], batches, None, False)[k]
    torch.testing.assert_close(whole.double(), ref)

    block_name = "model.decoder.layers.0"
    block = model.get_submodule(block_name)
    inputs = BlockInputs(block_name)
    def record(mod, a, kw):
        inputs.args.append(a)
        inputs.kwargs.append(kw)

    h = block.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)  # no KV cache in the recorded calls: a re-run would append to it
    h.remove()
    masks = [batch_masks(b) for b in batches]
    rel = [ScaleGroup("cross_attn.q_proj", ["cross_attn.k_proj", "cross_attn.v_proj"])]
    float_model = copy.deepcopy(model)
    kept = search_and_fold_block(copy.deepcopy(block), CONFIG, inputs, rel, grid=GRID, max_rows=None,
                                 masks=[m.decoder for m in masks], encoder_masks=[m.encoder for m in masks])
    _check_groups(kept, {f"{block_name}.{n}": x for n, x in (("cross_attn.k_proj", ref),)}, float_model,
                  f"{block_name}.")
    with pytest.raises(ValueError, match="encoder_masks must hold one entry per recorded call"):
        search_and_fold_block(copy.deepcopy(block), CONFIG, inputs, rel, masks=[m.decoder for m in masks],
                              encoder_masks=[None])


# ---------------------------------------------------------------------------------------------- AdaRound
def _unit_sse(model: nn.Module, float_model: nn.Module, unit: str, batches: list[dict[str, Any]]) -> float:
    """The mean squared error of the finished unit's outputs against the float model's over its real rows."""
    outs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for j, m in enumerate((model, float_model)):
        h = m.get_submodule(unit).register_forward_hook(
            lambda mod, a, out, j=j: outs[j].append(out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            for b in batches:
                m(**b)
        h.remove()
    d = torch.cat([_rows_of(unit, o - r, b).flatten() for o, r, b in zip(outs[0], outs[1], batches)])
    return float(d.double().pow(2).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_adaround_errors_count_the_real_rows_of_each_side(kind):
    """Units: the encoder block and the decoder block (their errors over their own side's real rows), and the
    cross-attention k projection as a unit of its own (its output rows are the encoder's positions)."""
    model, batches = _bart(), _batches(kind)
    float_model = copy.deepcopy(model)
    units = ["model.encoder.layers.0", "model.decoder.layers.0"]
    k = "model.decoder.layers.0.encoder_attn.k_proj"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*stay in floating point")
        records = adaround_quantize_(model, CONFIG, batches, skip=["@head"], blocks=units, iters=2, progress=False)
    assert {r["block"] for r in records.values()} == {units[0], units[1]}
    for u in units:
        r = next(r for r in records.values() if r["block"] == u)
        assert r["mse"] == pytest.approx(_unit_sse(model, float_model, u, batches), rel=1e-4), u
    # the cross k projection alone: its own unit (outside the blocks given)
    model, float_model = _bart(), _bart()
    records = adaround_quantize_(model, CONFIG, batches, skip=[r"re:^(?!.*encoder_attn\.k_proj$).*"], iters=2,
                                 progress=False)
    assert set(records) == {k}
    assert records[k]["mse"] == pytest.approx(_unit_sse(model, float_model, k, batches), rel=1e-4)


def test_adaround_refuses_a_side_without_real_tokens_only_where_its_units_are_planned():
    """Every decoder_attention_mask all zeros: the decoder block has no calibration row (refused before any change,
    naming the decoder_attention_mask); the encoder block alone still runs on the encoder's real rows."""
    model, batches = _bart(), _batches()
    for b in batches:
        b["decoder_attention_mask"] = torch.zeros_like(b["decoder_attention_mask"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units = ["model.encoder.layers.0", "model.decoder.layers.0"]
    with pytest.raises(ValueError, match=r"no real token: the decoder_attention_mask of every calibration batch is "
                                         r"all zeros.*model\.decoder\.layers\.0"):
        adaround_quantize_(model, CONFIG, batches, skip=["@head"], blocks=units, iters=2, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    records = adaround_quantize_(model, CONFIG, batches, skip=["@head", r"re:model\.decoder\..*"], blocks=units,
                                 iters=2, progress=False)
    assert {r["block"] for r in records.values()} == {units[0]}


# ---------------------------------------------------------------------------------------------- the warning
class _Unsided(nn.Module):
    """An encoder-decoder medquant has no roles for: one encoder linear, one decoder linear (a toy)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.enc = nn.Linear(16, 16)
        self.dec = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None):
        return self.dec(self.emb(decoder_input_ids) + self.enc(self.emb(input_ids)).mean(1, keepdim=True))


@pytest.mark.parametrize("length", [T, T + 2])
def test_only_an_encoder_decoder_without_known_sides_warns_about_equal_lengths(length):
    """BART's sides are known: no warning. A model whose encoder / decoder stacks medquant cannot tell apart still
    gets the attention_mask on every input of its shape: a batch whose decoder has the padded encoder's length
    says so (one of another length does not)."""
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, VOCAB, (2, T), generator=gen), "attention_mask": _mask(2, {1: 3}),
             "decoder_input_ids": torch.randint(3, VOCAB, (2, length), generator=gen)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gptq_quantize_(_Unsided(), CONFIG, [batch], progress=False)
        gptq_quantize_(_bart(), CONFIG, [batch], skip=["@head"], progress=False)
    said = [str(w.message) for w in caught if "medquant does not tell apart" in str(w.message)]
    assert len(said) == (1 if length == T else 0)
    assert all(f"({T} tokens)" in s for s in said)


# ---------------------------------------------------------------------------------------------- per-sample groups
D = 5  # a decoder length other than the encoder's


class _Flat(nn.Module):
    """A linear reading its input's tokens flattened sample by sample, ``(batch * tokens, K)`` (as an MoE block's
    shared expert reads them)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def _flat_bart() -> nn.Module:
    """The tiny BART with both fc1 layers (the encoder's and the decoder's) reading flattened tokens."""
    model = _bart()
    for stack in (model.model.encoder, model.model.decoder):
        stack.layers[0].fc1 = _Flat(stack.layers[0].fc1)
    return model


def _short_decoder_batches(kind: str) -> list[dict[str, Any]]:
    """:func:`_batches` with a decoder of ``D`` tokens (padded in batch 0 by a ``decoder_attention_mask`` or by -100
    labels; decoder inputs without a mask in ``"no_decoder_mask"``)."""
    gen = torch.Generator().manual_seed(4)
    out = []
    for b, pad in zip(_batches("labels" if kind == "labels" else "decoder_mask"), (2, 0)):
        b = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
        ids = torch.randint(3, VOCAB, (2, D), generator=gen)
        if kind == "labels":
            if pad:
                ids[0, D - pad:] = -100
            b["labels"] = ids
        else:
            b["decoder_input_ids"] = ids
            if kind == "decoder_mask":
                m = torch.ones(2, D, dtype=torch.long)
                m[0, D - pad:] = 0
                b["decoder_attention_mask"] = m
        out.append(b)
    return out


GROUPS = [["a", "b"], ["b", "a"]]  # per-sample labels of the two calibration batches


def _group_hessian(model: nn.Module, name: str, batches: list[dict[str, Any]]) -> tuple[torch.Tensor, dict]:
    """By hand, on the float model: ``sum_g (1 / G) 2 X_g^T X_g / n_g`` of the flattened layer ``name``, row ``r``
    of a batch's ``(2 * L, K)`` input being sample ``r // L``'s (``L``: that side's length) and a calibration row
    where that side's mask (``attention_mask`` for the encoder, ``decoder_attention_mask`` for the decoder) is
    nonzero; and the rows of each group."""
    encoder = name.startswith("model.encoder.")
    rows: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    current = [0]

    def hook(mod, args):
        x = args[0].detach().double()
        b = batches[current[0]]
        length = T if encoder else D
        assert x.shape[0] == 2 * length
        m = b.get("attention_mask" if encoder else "decoder_attention_mask")
        keep = torch.ones(2 * length, dtype=torch.bool) if m is None else m.reshape(-1) != 0
        for r in range(2 * length):
            if keep[r]:
                rows[GROUPS[current[0]][r // length]].append(x[r])

    h = model.get_submodule(name).register_forward_pre_hook(hook)
    with torch.no_grad():
        for i, b in enumerate(batches):
            current[0] = i
            model(**b)
    h.remove()
    xs = {g: torch.stack(v) for g, v in rows.items()}
    return sum(0.5 * 2 * x.T @ x / x.shape[0] for x in xs.values()), {g: x.shape[0] for g, x in xs.items()}


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "block_by_block"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_gptq_per_sample_groups_on_flattened_tokens_count_the_tokens_of_each_side(side, kind, sequential,
                                                                                monkeypatch):
    """Per-sample ``groups=`` labels spread over a layer reading ``(batch * tokens, K)``: an encoder layer's rows
    are the encoder's tokens (8 per sample), a decoder layer's the decoder's (5 per sample, from its
    decoder_input_ids / decoder_attention_mask / labels), each row labelled with its sample and left out where its
    side's mask is 0. The decoder's were counted with the encoder's tokens: refused (10 rows are not 2 samples of 8
    tokens)."""
    model, batches = _flat_bart(), _short_decoder_batches(kind)
    name = f"model.{side}.layers.0.fc1.lin"
    ref, counts = _group_hessian(copy.deepcopy(model), name, batches)
    got = _spy_hessians(monkeypatch)
    run = gptq_quantize_sequential if sequential else gptq_quantize_
    kw = {"offload_device": None} if sequential else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*stay in floating point")
        records = run(model, CONFIG, batches, groups=GROUPS, skip=[rf"re:^(?!{re.escape(name)}$).*"],
                      progress=False, **kw)
    assert set(got) == {name}
    torch.testing.assert_close(got[name].reshape(ref.shape), ref, rtol=1e-5, atol=1e-7)
    assert records[name]["group_rows"] == counts


# ---------------------------------------------------------------------------------------------- Whisper
def _whisper() -> nn.Module:
    """A tiny Whisper: its encoder reads ``input_features`` (log-mel frames, no attention_mask), its decoder tokens;
    only the decoder stack is in the language role."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                        max_source_positions=T, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    return WhisperForConditionalGeneration(cfg).eval()


def _whisper_batches() -> list[dict[str, Any]]:
    """Two batches of 2 clips (``2 T`` frames: ``T`` encoder positions) with decoder inputs of ``T`` tokens, the
    ``decoder_attention_mask`` padded in batch 0."""
    gen = torch.Generator().manual_seed(6)
    return [{"input_features": torch.randn(2, 8, 2 * T, generator=gen),
             "decoder_input_ids": torch.randint(3, VOCAB, (2, T), generator=gen), "decoder_attention_mask": m}
            for m in (_mask(2, {0: 3}), _mask(2, {}))]


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "block_by_block"])
def test_gptq_whisper_decoder_takes_its_decoder_attention_mask(sequential, monkeypatch):
    """Whisper's sides are not two language stacks (its encoder reads audio), but it is an encoder-decoder: the
    decoder's layers leave out the rows where decoder_attention_mask is 0; the cross-attention k / v (the encoder's
    positions, no mask) keep every row. The decoder_attention_mask was not read: the padding rows were data."""
    model, batches = _whisper(), _whisper_batches()
    names = _linears(model, "model.decoder.")
    ref = _reference_rows(copy.deepcopy(model), names, batches)
    got = _spy_hessians(monkeypatch)
    run = gptq_quantize_sequential if sequential else gptq_quantize_
    kw = {"offload_device": None} if sequential else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*stay in floating point")
        records = run(model, CONFIG, batches, skip=["proj_out", r"re:model\.encoder\..*"], progress=False, **kw)
    assert set(got) == set(names)
    _check_hessians(got, ref, records)
    assert MaskSides(model).encoder == "model.encoder"  # the module get_encoder() returns


def test_adaround_whisper_decoder_block_error_counts_its_real_rows():
    """The decoder block's error is over the rows where decoder_attention_mask is nonzero."""
    model, batches = _whisper(), _whisper_batches()
    float_model = copy.deepcopy(model)
    unit = "model.decoder.layers.0"
    records = adaround_quantize_(model, CONFIG, batches, skip=["proj_out", r"re:model\.encoder\..*"], blocks=[unit],
                                 iters=2, progress=False)
    r = next(r for r in records.values() if r["block"] == unit)
    assert r["mse"] == pytest.approx(_unit_sse(model, float_model, unit, batches), rel=1e-4)
