"""AWQ, AdaRound and block-by-block round-to-nearest on VLM batches with the image merged into the sequence.

The batches are those of tests/calibrate/test_vlm_image_sweep.py (image placeholder tokens in ``input_ids``, the
pixel inputs the forward scatters into them) for its 11 models, the main zoo's VLMs and the extra zoo's Mllama,
Qwen3-VL and LLaVA-Med (their own image-token inputs); two batches, padded differently: the first's second row ends
in 2 padding tokens, the second's first row in 3 (so a mask applied to the wrong batch shows).

References, computed here from the docstrings' formulas: the AWQ grid search (``a_j = mean_t |X_tj|``, the summed
squared output error of each ``alpha``) on the group's input rows in the float model (whole model) or in the float
block run on the inputs the finished quantized model gives it (block by block: forward pre-hooks on the finished
model), padding rows left out in the language model and every row kept in the vision tower / projector; for
AdaRound, each unit's error recomputed from the finished model's unit outputs against the float model's (or, with
``target="input"``, the float unit's on the same input) and each ``act_bits`` range from the finished model's unit
inputs; for round-to-nearest block by block, :func:`medquant.quantize_`'s codes. Mllama, Qwen3-VL and LLaVA-Med
are in because their batches here carry image tokens (the zoo's own Mllama / Qwen3-VL inputs do not).
"""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_model
from torch import nn

import medquant.hf
from medquant import QuantConfig, quantize_
from medquant.calibrate.adaround import adaround_quantize_
from medquant.calibrate.awq import ScaleGroup, awq_groups, awq_quantize_sequential, search_and_fold
from medquant.calibrate.sequential import quantize_sequential
from medquant.models import block_stacks
from medquant.models.introspect import model_roles
from medquant.quant.core import fake_quantize
from medquant.testing.zoo import IMAGE_TOKEN, PAD_ID, ZOO_BY_NAME
from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME
from tests.calibrate.test_sequential_between_blocks import _mllama, _qwen3_vl
from tests.calibrate.test_vlm_image_sweep import CASES, _logits, _model_and_batches, _with_mask
from tests.hf._helpers import state_equal

CONFIG = QuantConfig(4, group_size=32)
GRID = 10
# the zoo entries whose own inputs hold the image placeholder tokens (text last)
ZOO_VLMS = ["llava", "paligemma", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3_vlm"]
EXTRA: dict[str, Callable[[], tuple[nn.Module, dict[str, Any]]]] = {
    "mllama": _mllama, "qwen3_vl": _qwen3_vl,
    "llava_med": lambda: (m := EXTRA_ZOO_BY_NAME["llava_med"].build(), EXTRA_ZOO_BY_NAME["llava_med"].inputs(m)),
}
# Qwen2-VL with one more text token: 16 tokens a row, so the vision tower's flattened patch rows (2 x 16) are as
# many as the batch's tokens: the padding mask would fit them, and must still not be applied to them
SAME_COUNT = "qwen2_vl_patch_rows_as_many_as_tokens"
NAMES = [*CASES, *ZOO_VLMS, *EXTRA, SAME_COUNT]
# Florence-2's BART is post-norm: each of its norms comes after its sublayer (refused on the calibration forward), so
# only the attentions' v -> o groups fold (the DaViT tower has none); this sweep's reference rows know no decoder side
# (its decoder reads decoder_input_ids): the folds are checked on the float outputs only
POST_NORM_SEQ2SEQ = {"florence2"}
# groups refused on the calibration forward: Mllama's cross-attention layer reads the image states in k / v, not
# the output of its input_layernorm
# layers an image + text forward does not run (Phi-4-multimodal's audio encoder, Janus's image-generation VQ model and
# heads, Chameleon's VQ decoder input conv): learned rounding refuses a layer without calibration data
NOT_RUN = {"phi4mm": [r"re:model\.embed_tokens_extend\.audio_embed\..*"],
           "janus": [r"re:model\.(vqmodel|generation_\w+)\..*"],
           "chameleon": [r"re:model\.vqmodel\.post_quant_conv"]}
REFUSED = {"mllama": ["model.language_model.layers.1.input_layernorm"]}

pytestmark = [pytest.mark.filterwarnings("ignore:.*stay in floating point:UserWarning"),
              pytest.mark.filterwarnings("ignore:AWQ. scales not folded:UserWarning")]


def _repad(batch: dict[str, Any], row: int, n: int) -> dict[str, Any]:
    """``batch`` with only row ``row``'s last ``n`` tokens as padding (``attention_mask`` 0, id ``PAD_ID``)."""
    mask = torch.ones_like(batch["attention_mask"])
    mask[row, -n:] = 0
    return dict(batch, input_ids=batch["input_ids"].masked_fill(mask == 0, PAD_ID), attention_mask=mask)


def _batches(name: str) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The float model and two image batches (second row padded by 2 in the first, first row by 3 in the second)."""
    if name == SAME_COUNT:
        model, batches = _batches("qwen2_vl")
        for b in batches:
            for key in ("input_ids", "attention_mask"):
                b[key] = torch.cat([b[key][:, :-3], b[key][:, -4:-3], b[key][:, -3:]], 1)
            b["mm_token_type_ids"] = (b["input_ids"] == IMAGE_TOKEN).int()
        assert batches[0]["input_ids"].numel() == batches[0]["pixel_values"].shape[0]
        return model, batches
    if name in CASES:
        model, batches = _model_and_batches(name, 2)
    else:
        if name in EXTRA:
            model, first = EXTRA[name]()
            gen = torch.Generator().manual_seed(1)
            second = dict(first, input_ids=first["input_ids"].clone())
            text = second["input_ids"][:, -3:]  # the text tokens at the end: new ones
            second["input_ids"][:, -3:] = torch.randint(4, 200, text.shape, generator=gen)
        else:
            entry = ZOO_BY_NAME[name]
            model = entry.build()
            gen = torch.Generator().manual_seed(0)
            first, second = entry.inputs_fn(model, gen), entry.inputs_fn(model, gen)
        batches = [_with_mask(b["input_ids"], **{k: v for k, v in b.items() if k not in ("input_ids",
                                                                                          "attention_mask")})
                   for b in (first, second)]
    model.eval()
    return model, [_repad(batches[0], 1, 2), _repad(batches[1], 0, 3)]


def _image_parts(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the vision tower and the projector (their rows are image patches: never padding)."""
    roles = model_roles(model)
    return tuple(p + "." for r in ("vision", "projector") for p in roles.get(r, []))


def _in(name: str, parts: tuple[str, ...]) -> bool:
    """Whether the module ``name`` is one of ``parts`` (prefixes ending in ``"."``) or inside one."""
    return (name + ".").startswith(parts)


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` flattened to rows; with ``mask`` (a ``(batch, tokens)`` batch mask, ``x`` of ``(batch, tokens, K)``)
    only the real tokens' rows."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    assert tuple(x.shape[:-1]) == tuple(mask.shape), "a language-model input that is not (batch, tokens, K)"
    return x[mask != 0]


def _search(ws: list[torch.Tensor], x: torch.Tensor) -> list[float]:
    """``sum_i || X W_i^T - X (Q(W_i diag(s)) diag(s)^-1)^T ||^2`` for each ``alpha`` of the grid,
    ``s = a^alpha / sqrt(max(a^alpha) min(a^alpha))`` with ``a_j = mean_t |X_tj|`` (``alpha = 0``: ``s = 1``)."""
    a = x.abs().mean(0)
    errs = []
    for i in range(GRID + 1):
        p = a.pow(i / GRID)
        s = torch.ones_like(a) if i == 0 else p / (p.max() * p.min()).sqrt()
        errs.append(sum(float((x @ (w - fake_quantize(w * s, CONFIG) / s).T).pow(2).sum()) for w in ws))
    return errs


def _check_searched(groups: list[ScaleGroup], xs: dict[str, torch.Tensor], float_model: nn.Module) -> None:
    """Each group's ``alpha`` / ``err_rtn`` / ``err_awq`` are the grid search's on the rows ``xs[first linear]``."""
    assert groups
    for g in groups:
        errs = _search([float_model.get_submodule(n).weight.detach().float() for n in g.linears], xs[g.linears[0]])
        assert g.err_rtn == pytest.approx(errs[0], rel=1e-4), g.prev
        assert g.err_awq == pytest.approx(min(errs), rel=1e-4), g.prev
        assert errs[round(g.alpha * GRID)] == pytest.approx(min(errs), rel=1e-4), g.prev


def _group_inputs(model: nn.Module, groups: list[ScaleGroup], run: Callable[[int], Any],
                  masks: list[torch.Tensor | None], image: tuple[str, ...], prefix: str = "") -> dict[str, list]:
    """The rows each group's first linear (full name ``prefix + name`` relative to ``model``) reads in ``run(i)``
    for each batch ``i``: the real tokens' rows in the language model, every row in the vision tower / projector."""
    got: dict[str, list[torch.Tensor]] = {}
    current = [0]
    hooks = []
    for g in groups:
        full = g.linears[0]

        def pre(mod, args, full=full):
            m = None if _in(full, image) else masks[current[0]]
            got.setdefault(full, []).append(_rows(args[0].detach().float(), m))
        hooks.append(model.get_submodule(full[len(prefix):]).register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            for i in range(len(masks)):
                current[0] = i
                run(i)
    finally:
        for h in hooks:
            h.remove()
    return got


# ---------------------------------------------------------------------------------------------- AWQ
@pytest.mark.parametrize("name", NAMES)
def test_awq_folding_keeps_the_float_outputs_and_searches_on_the_real_tokens_and_every_patch(name):
    model, batches = _batches(name)
    if name in POST_NORM_SEQ2SEQ:
        before = [_logits(model, b) for b in batches]
        groups = search_and_fold(model, CONFIG, batches, scope="all", max_rows=None, progress=False)
        assert groups and all(g.prev.endswith(".v_proj") for g in groups)
        for b, ref in zip(batches, before):
            torch.testing.assert_close(_logits(model, b), ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))
        return
    float_model = copy.deepcopy(model)
    before = [_logits(model, b) for b in batches]
    groups = search_and_fold(model, CONFIG, batches, scope="all", max_rows=None, progress=False)
    # the padding's token ids change nothing: the padded positions are no calibration data and, right-padded,
    # reach no real token
    other = [dict(b, input_ids=b["input_ids"].masked_fill(b["attention_mask"] == 0, 7)) for b in batches]
    again = search_and_fold(copy.deepcopy(float_model), CONFIG, other, scope="all", max_rows=None, progress=False)
    assert [(g.prev, g.alpha, g.err_rtn, g.err_awq) for g in again] == \
        [(g.prev, g.alpha, g.err_rtn, g.err_awq) for g in groups]
    for b, ref in zip(batches, before):  # folding is exact: the float function is unchanged
        torch.testing.assert_close(_logits(model, b), ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))
    image = _image_parts(model)
    assert sorted(g.prev for g in groups) == sorted(g.prev for g in awq_groups(float_model, "all")
                                                    if g.prev not in REFUSED.get(name, []))
    masks = [b["attention_mask"] for b in batches]
    xs = _group_inputs(float_model, groups, lambda i: float_model(**batches[i]), masks, image)
    _check_searched(groups, {k: torch.cat(v) for k, v in xs.items()}, float_model)


@pytest.mark.parametrize(("name", "norms"), [("lfm2_vl", ("operator_norm", "ffn_norm")),
                                            ("ovis2", ("rms_norm1", "rms_norm2"))])
def test_awq_folds_into_the_pre_norms_of_lfm2_and_aimv2_blocks(name, norms):
    """LFM2's language blocks (``operator_norm`` before the attention or convolution, ``ffn_norm`` before w1 / w3)
    and Ovis2's AIMv2 vision blocks (``rms_norm1`` / ``rms_norm2``) are pre-norm blocks: their norms absorb the
    scales of the linears they feed (the calibration forward checks that they feed exactly them)."""
    model, _ = _batches(name)
    prevs = [g.prev.rpartition(".")[2] for g in awq_groups(model, "all")]
    assert set(norms) <= set(prevs)


def _block_calls(model: nn.Module, names: list[str], batches: list[dict[str, Any]]) -> dict[str, list]:
    """Each block's ``(args, kwargs)`` in a forward of ``model`` on each batch (one call per batch), KV caches
    dropped (a re-run of the block must not append to them)."""
    got: dict[str, list] = {n: [] for n in names}
    hooks = []
    for n in names:
        def pre(mod, args, kwargs, n=n):
            kw = {k: None if k in ("past_key_values", "past_key_value") or hasattr(v, "get_seq_length") else v
                  for k, v in kwargs.items()}
            got[n].append((args, kw))
        hooks.append(model.get_submodule(n).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    assert all(len(v) == len(batches) for v in got.values())
    return got


# block by block from a float checkpoint into a meta skeleton as well, on layouts whose image path holds modules
# outside the blocks: the merger (Qwen2-VL), image_newline on the model (OneVision), two vision stacks and
# cross-attention (Mllama), the perceiver connector (Idefics2), LLaVA-Med's own layout
FROM_CHECKPOINT = ["qwen2_vl", "llava_onevision", "mllama", "idefics2", "gemma3_vlm", "llava_med"]


@pytest.mark.parametrize("name", [n for n in NAMES if n not in POST_NORM_SEQ2SEQ])
def test_awq_block_by_block_searches_each_block_on_the_inputs_the_quantized_model_gives_it(name, tmp_path):
    model, batches = _batches(name)
    float_model = copy.deepcopy(model)
    if name in FROM_CHECKPOINT:
        save_model(model, str(tmp_path / "float.safetensors"))
        with init_empty_weights():
            skeleton, _ = _batches(name)
    groups = awq_quantize_sequential(model, CONFIG, batches, scope="all", max_rows=None, device="cpu",
                                     progress=False)
    assert groups
    image = _image_parts(model)
    blocks = {next(b for g2 in block_stacks(model) for b in g2 if g.prev.startswith(b + ".")) for g in groups}
    calls = _block_calls(model, sorted(blocks), batches)  # the finished model's block inputs
    float_calls = _block_calls(float_model, sorted(blocks), batches)
    assert any(not torch.equal(calls[b][i][0][0], float_calls[b][i][0][0]) for b in blocks for i in range(2)
               if calls[b][i][0]), "no block input changed by quantization: the check below could not fail"
    masks = [b["attention_mask"] for b in batches]
    xs: dict[str, list[torch.Tensor]] = {}
    for blk in sorted(blocks):
        block = float_model.get_submodule(blk)
        mine = [g for g in groups if g.prev.startswith(blk + ".")]
        xs.update(_group_inputs(block, mine, lambda i, blk=blk, block=block: block(*calls[blk][i][0],
                                                                                    **calls[blk][i][1]),
                                masks, image, blk + "."))
    _check_searched(groups, {k: torch.cat(v) for k, v in xs.items()}, float_model)
    # every foldable group the float model has was searched, but those whose norm does not feed them
    assert sorted(g.prev for g in groups) == sorted(g.prev for g in awq_groups(float_model, "all")
                                                    if g.prev not in REFUSED.get(name, []))
    if name not in FROM_CHECKPOINT:
        return
    # a meta skeleton streamed from the float checkpoint gives the same scales and codes
    again = awq_quantize_sequential(skeleton, CONFIG, batches, scope="all", max_rows=None, device="cpu",
                                    checkpoint=tmp_path / "float.safetensors", progress=False)
    assert [(g.prev, g.alpha) for g in again] == [(g.prev, g.alpha) for g in groups]
    a, b = model.state_dict(), skeleton.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


# ---------------------------------------------------------------------------------------------- AdaRound
def _first(out: Any) -> torch.Tensor:
    return (out[0] if isinstance(out, (tuple, list)) else out).detach().float()


def _unit_outputs(model: nn.Module, units: list[str], batches: list[dict[str, Any]],
                  rerun: nn.Module | None = None) -> dict[str, list]:
    """Each unit's first output tensor of every call, with the index of its batch, in forward order; with
    ``rerun``, ``(batch, output, rerun's unit's output on the same inputs)``."""
    got: dict[str, list] = {u: [] for u in units}
    current = [0]
    hooks = []
    for u in units:
        def post(mod, args, kwargs, out, u=u):
            if rerun is None:
                got[u].append((current[0], _first(out)))
                return
            kw = {k: None if k in ("past_key_values", "past_key_value") or hasattr(v, "get_seq_length") else v
                  for k, v in kwargs.items()}
            got[u].append((current[0], _first(out), _first(rerun.get_submodule(u)(*args, **kw))))
        hooks.append(model.get_submodule(u).register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                current[0] = i
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return got


def _real(d: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The elements of ``d`` at real tokens when ``d`` is ``(batch, tokens, F)`` or ``(batch * tokens, F)`` with
    the mask's tokens; all of ``d`` otherwise."""
    if mask is None:
        return d
    if d.dim() == 3 and tuple(d.shape[:2]) == tuple(mask.shape):
        return d[mask != 0]
    if d.dim() == 2 and d.shape[0] == mask.numel():
        return d[mask.reshape(-1) != 0]
    return d


# target="input" on a few layouts: flattened vision patches (Qwen2-VL), two vision stacks and cross-attention
# (Mllama), bidirectional attention over the image (Gemma 3), a perceiver connector (Idefics2), AnyRes (OneVision)
TARGET_INPUT = ["qwen2_vl", "mllama", "gemma3_vlm", "idefics2", "llava_onevision"]


@pytest.mark.parametrize(("name", "target"), [(n, "float") for n in NAMES] + [(n, "input") for n in TARGET_INPUT])
def test_adaround_with_images_reconstructs_the_float_outputs_and_reloads(name, target, tmp_path):
    model, batches = _batches(name)
    float_model = copy.deepcopy(model)
    stacks = [b for g in block_stacks(model) for b in g]
    records = adaround_quantize_(model, CONFIG, batches, skip=["@head", *NOT_RUN.get(name, [])], blocks=stacks,
                                 iters=3, target=target, progress=False)
    assert records
    units = sorted({r["block"] for r in records.values()})
    assert set(stacks) <= set(units)  # every block a unit
    for n, r in records.items():
        assert set(r) == {"method", "block", "iters", "lr", "reg", "warmup", "target", "samples", "seed", "mse_rtn",
                          "mse", "mse_learned", "fallback"}, n
        assert r["method"] == "adaround" and r["iters"] == 3 and r["samples"] == 2 and r["target"] == target, n
        assert (n == r["block"]) or n.startswith(r["block"] + "."), n
        assert math.isfinite(r["mse_rtn"]) and math.isfinite(r["mse_learned"]) and r["mse_rtn"] >= 0, n
        assert r["fallback"] in (None, "rtn")
        assert r["mse"] == (r["mse_rtn"] if r["fallback"] else r["mse_learned"]) <= r["mse_rtn"], n
        assert model.get_submodule(n).calibration == r
    # each unit's error: its quantized output in the finished model (on the quantized model's input) against the
    # float model's output on the float input ("float") or the float unit's on the same input ("input"), over the
    # real tokens in the language model, every patch in the vision tower / projector
    image = _image_parts(model)
    if target == "float":
        got, ref = _unit_outputs(model, units, batches), _unit_outputs(float_model, units, batches)
        pairs = {u: [(i, out, r) for (i, out), (_, r) in zip(got[u], ref[u])] for u in units}
        assert all([i for i, _ in got[u]] == [i for i, _ in ref[u]] for u in units)
    else:
        pairs = _unit_outputs(model, units, batches, rerun=float_model)
    for u in units:
        assert pairs[u], u
        sse, count = 0.0, 0
        for i, out, ref_out in pairs[u]:
            d = _real(out - ref_out, None if _in(u, image) else batches[i]["attention_mask"])
            sse += float(d.pow(2).sum(dtype=torch.float64))
            count += d.numel()
        rec = next(r for r in records.values() if r["block"] == u)
        assert rec["mse"] == pytest.approx(sse / count, rel=1e-3, abs=1e-9), u
    if target != "float":
        return
    expected = _logits(model, batches[0])
    medquant.hf.save_pretrained(model, tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = type(model).from_pretrained(tmp_path / "q").eval()
    state_equal(model, back)
    assert torch.equal(_logits(back, batches[0]), expected)


@pytest.mark.parametrize("name", ["qwen2_vl", "gemma3_vlm", "idefics2", "florence2", "llava_onevision"])
def test_adaround_activation_ranges_cover_the_real_tokens_and_every_patch(name):
    """``act_bits``: each unit's static input range is that of its inputs in the quantized model (earlier units and
    their input quantizers in place), over the real tokens in the language model and every row in the vision tower
    / projector: ``s = (max(hi, 0) - min(lo, 0)) / (2^8 - 1)``."""
    model, batches = _batches(name)
    stacks = [b for g in block_stacks(model) for b in g]
    records = adaround_quantize_(model, CONFIG, batches, skip=["@head"], blocks=stacks, iters=2, act_bits=8,
                                 progress=False)
    units = sorted({r["block"] for r in records.values()})
    image = _image_parts(model)
    got: dict[str, list] = {u: [] for u in units}
    current = [0]
    hooks = [model.get_submodule(u).register_forward_pre_hook(  # before the unit's own input quantizer
        lambda mod, args, u=u: got[u].append(_real(args[0].float(), None if _in(u, image)
                                                   else batches[current[0]]["attention_mask"])), prepend=True)
        for u in units]
    with torch.no_grad():
        for i, b in enumerate(batches):
            current[0] = i
            model(**b)
    for h in hooks:
        h.remove()
    for u in units:
        lo, hi = min(0.0, *(float(x.min()) for x in got[u])), max(0.0, *(float(x.max()) for x in got[u]))
        act = next(r for r in records.values() if r["block"] == u)["act"]
        assert act["scale"] == pytest.approx((hi - lo) / 255, rel=1e-5), u
        assert act["zero"] == round(-lo / act["scale"]), u


def test_adaround_activation_quantization_of_a_block_called_with_keyword_inputs_is_refused_before_any_change():
    """Mllama's vision encoder calls its layers with ``hidden_states=`` (no positional input for the input
    quantizer): refused on the float forward that counts the calls, before the first unit (the patch embedding)
    is quantized, not part way."""
    model, batches = _batches("mllama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stacks = [b for g in block_stacks(model) for b in g]
    with pytest.raises(ValueError, match=r"block model\.vision_model\.transformer\.layers\.0: activation "
                                         r"quantization .*keyword.*leave it out of blocks="):
        adaround_quantize_(model, CONFIG, batches, skip=["@head"], blocks=stacks, iters=2, act_bits=8,
                           progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # its layers as units of their own (called with their input first) are fine
    outside = [b for b in stacks if not b.startswith("model.vision_model.")]
    records = adaround_quantize_(model, CONFIG, batches, skip=["@head"], blocks=outside, iters=2, act_bits=8,
                                 progress=False)
    assert all("act" in r for r in records.values())


def test_adaround_keeps_the_decoder_rows_of_an_encoder_decoder_whose_encoder_is_padded():
    """Florence-2 with a decoder as long as the encoder's sequence (23 tokens), the decoder not padded (no
    ``decoder_attention_mask``): every decoder position is a real token, so the decoder block's error counts them
    all, even where the encoder's ``attention_mask`` is 0."""
    model, batches = _batches("florence2")
    gen = torch.Generator().manual_seed(5)
    for b in batches:
        b["decoder_input_ids"] = torch.randint(4, 200, b["input_ids"].shape, generator=gen)
    float_model = copy.deepcopy(model)
    unit = "model.language_model.decoder.layers.0"
    records = adaround_quantize_(model, CONFIG, batches, skip=["@head"], blocks=[unit], iters=2, progress=False)
    got, ref = _unit_outputs(model, [unit], batches)[unit], _unit_outputs(float_model, [unit], batches)[unit]
    d = torch.cat([(out - r).flatten() for (_, out), (_, r) in zip(got, ref)])
    assert records[unit + ".fc1"]["mse"] == pytest.approx(float(d.pow(2).mean()), rel=1e-4)


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_an_encoder_decoder_batch_with_equal_lengths_is_not_warned_about(method):
    """The masks follow Florence-2's encoder / decoder sides (the test above): a batch whose decoder sequence has the
    padded encoder's length is calibrated as it should be and says nothing about it (the warning is left for a model
    whose sides medquant cannot tell apart: tests/calibrate/test_encoder_decoder_masks.py)."""
    from medquant.calibrate import gptq_quantize_

    model, batches = _batches("florence2")
    length = batches[0]["input_ids"].shape[1]
    assert any((b["attention_mask"] == 0).any() for b in batches)  # the encoder is padded
    gen = torch.Generator().manual_seed(5)
    for b in batches:
        b["decoder_input_ids"] = torch.randint(4, 200, (b["input_ids"].shape[0], length), generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if method == "gptq":
            gptq_quantize_(model, CONFIG, batches, skip=["@head"], progress=False)
        else:
            adaround_quantize_(model, CONFIG, batches, skip=["@head"], iters=1, progress=False,
                               blocks=["model.language_model.decoder.layers.0"])
    assert not [w for w in caught if "decoder" in str(w.message)]


# ---------------------------------------------------------------------------------------------- RTN block by block
@pytest.mark.parametrize("name", [n for n in NAMES if n not in CASES])  # the sweep checks the 11 others
def test_rtn_block_by_block_calibrates_on_the_quantized_models_inputs_and_gives_quantize_s_codes(name):
    model, batches = _batches(name)
    reference = copy.deepcopy(model)
    seen: dict[str, list] = {}

    def per_block(block, block_inputs):
        seen[block_inputs.name] = [h.clone() for h in block_inputs.hidden_states]

    quantize_sequential(model, CONFIG, batches, device="cpu", per_block_fn=per_block)
    quantize_(reference, CONFIG)
    a, b = model.state_dict(), reference.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    stacks = [n for g in block_stacks(model) for n in g]
    assert list(seen) == stacks
    calls = _block_calls(model, stacks, batches)
    for n in stacks:
        ref = [args[0] if args else kw["hidden_states"] for args, kw in calls[n]]
        assert len(seen[n]) == len(ref) and all(torch.equal(x, y) for x, y in zip(seen[n], ref)), n


@pytest.mark.parametrize("name", ["qwen2_vl", "mllama", "llava_onevision", "florence2", "qwen3_vl"])
def test_rtn_block_by_block_over_the_last_stack_only_calibrates_it_on_the_quantized_image_path(name):
    """``blocks=`` the last stack (the language model, Florence-2's decoder): the rest, the vision tower included,
    is quantized first, leaf by leaf, so the listed blocks get the inputs of the finished model; the codes are
    :func:`medquant.quantize_`'s."""
    model, batches = _batches(name)
    reference = copy.deepcopy(model)
    last = block_stacks(model)[-1]
    seen: dict[str, list] = {}

    def per_block(block, block_inputs):
        seen[block_inputs.name] = [h.clone() for h in block_inputs.hidden_states]

    quantize_sequential(model, CONFIG, batches, device="cpu", blocks=[last], per_block_fn=per_block)
    quantize_(reference, CONFIG)
    a, b = model.state_dict(), reference.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert list(seen) == list(last)
    calls = _block_calls(model, list(last), batches)
    for n in last:
        ref = [args[0] if args else kw["hidden_states"] for args, kw in calls[n]]
        assert all(torch.equal(x, y) for x, y in zip(seen[n], ref, strict=True)), n


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "block_by_block"])
def test_awq_names_the_layers_of_a_refused_group_in_full(sequential):
    """Mllama's cross-attention layer: its k / v read the image states, not its input_layernorm; the warning names
    the layers as the model does (block by block too, where the check runs on the block alone)."""
    model, batches = _batches("mllama")
    run = awq_quantize_sequential if sequential else search_and_fold
    kw = {"device": "cpu"} if sequential else {}
    with pytest.warns(UserWarning, match=r"scales not folded into model\.language_model\.layers\.1\.input_layernorm "
                                         r"\(model\.language_model\.layers\.1\.cross_attn\.k_proj does not read the "
                                         r"output of model\.language_model\.layers\.1\.input_layernorm\)"):
        run(model, CONFIG, batches, scope="language", progress=False, **kw)


def _gemma4_clamps(model, bound: float | None):
    """Gemma 4's vision projections sit in clamp wrappers (``Gemma4ClippableLinear``), which clamp only with
    ``use_clipped_linears`` (off in the tiny config; released checkpoints load their bounds into buffers built at
    +-inf). ``bound``: turn the first block's q / k / v clamps on with input bounds ``+-bound`` (outputs +-inf)."""
    if bound is not None:
        attn = model.model.vision_tower.encoder.layers[0].self_attn
        for p in ("q_proj", "k_proj", "v_proj"):
            w = getattr(attn, p)
            w.use_clipped_linears = True
            for name, v in (("input_min", -bound), ("input_max", bound), ("output_min", -math.inf),
                            ("output_max", math.inf)):
                w.register_buffer(name, torch.tensor(v))
    return model


@pytest.mark.parametrize("bound", [None, math.inf, 0.5], ids=["no_clamps", "infinite", "finite"])
def test_gemma4_vision_groups_read_through_clamp_wrappers(bound):
    """Gemma 4's vision q / k / v / o and gate / up / down are wrapped in clamp modules: no group was formed, so the
    tower was rounded to nearest. Now the groups read the wrapped linears where the bounds are infinite; a finite
    input bound (``clamp(x / s) != clamp(x) / s``) refuses that block's attention group with a warning. v -> o is never
    formed: a per-head RMSNorm (``v_norm``) sits between them. Reference: the float tower's own output."""
    from medquant.calibrate.awq import awq_groups, search_and_fold
    from medquant.testing.zoo_vlm import IMAGE_PATH

    model, batches = _batches("gemma4")
    model = _gemma4_clamps(model, bound)
    finite = bound is not None and math.isfinite(bound)
    pre = "model.vision_tower.encoder.layers.0."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer0 = {g.prev: g.linears for g in awq_groups(model, "vision") if g.prev.startswith(pre)}
    attn = {pre + "input_layernorm": [pre + f"self_attn.{p}.linear" for p in ("q_proj", "k_proj", "v_proj")]}
    ffn = {pre + "pre_feedforward_layernorm": [pre + "mlp.gate_proj.linear", pre + "mlp.up_proj.linear"],
           pre + "mlp.up_proj.linear": [pre + "mlp.down_proj.linear"]}
    assert layer0 == (ffn if finite else {**attn, **ffn})
    refused = [str(w.message) for w in caught if "scales not folded" in str(w.message)]
    assert bool(refused) == finite and (not finite or "clamp their input to a finite range" in refused[0])

    def tower(m):
        return torch.cat([IMAGE_PATH["gemma4"](m, b).last_hidden_state.flatten() for b in batches])
    with torch.no_grad():
        ref = tower(model)
    groups = search_and_fold(model, CONFIG, batches, scope="vision", progress=False)
    assert any(g.alpha for g in groups if g.prev.startswith("model.vision_tower."))
    with torch.no_grad():
        torch.testing.assert_close(tower(model), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))

