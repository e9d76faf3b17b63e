"""Pruning the cross-attention heads of encoder-decoder blocks (BART's / Whisper's ``encoder_attn``, the
``crossattention`` of a BERT decoder in a ``VisionEncoderDecoderModel``: the ViT + BERT layout of report
generators) with the block's ``head_ratio``: a second attention unit with its own scores and its own kept heads.

Reference: a deep copy of the unpruned model whose output projections (``out_proj`` / ``output.dense``) have the
input columns of every removed head (self- and cross-attention) zeroed, and whose FFN output projections have the
columns of the removed neurons zeroed, computed with plain torch; the pruned model must equal it on real forward
passes, and ``save_pruned`` / ``load_pruned`` must give the pruned model's logits back bit for bit."""
from __future__ import annotations

import copy
import json
import shutil
from typing import Any

import pytest
import torch
from torch import nn

from medquant.io import MANIFEST_NAME, META_NAME, CheckpointWarning, atomic
from medquant.models import transformer_blocks
from medquant.prune import PrunePlan, StructuredPruner, load_pruned, parameter_report, save_pruned
from tests.models import seq2seq_models as s2s

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ved() -> nn.Module:
    """A tiny ViT encoder + BERT decoder (``VisionEncoderDecoderModel``): 2 decoder layers of 4 heads of 16 with
    ``crossattention`` (``self.query/key/value`` + ``output.dense``)."""
    import transformers as tf

    torch.manual_seed(0)
    enc = tf.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=96)
    dec = tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, is_decoder=True, add_cross_attention=True, max_position_embeddings=32)
    cfg = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id = 1, 0
    return s2s._randomize_norms(tf.VisionEncoderDecoderModel(config=cfg), 0).eval()


def _ved_inputs(seed: int = 1) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen),
            "decoder_input_ids": torch.randint(3, 128, (2, 6), generator=gen)}


def _build(arch: str) -> tuple[nn.Module, dict[str, Any]]:
    if arch == "ved":
        return _ved(), _ved_inputs()
    return s2s.build(arch), s2s.inputs(arch)


def _held(arch: str) -> dict[str, Any]:
    return _ved_inputs(seed=9) if arch == "ved" else s2s.inputs(arch, seed=9)


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model(**batch, use_cache=False).logits


@torch.no_grad()
def _zeroed(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """The independent reference: removed heads' / neurons' input columns of the output projections zeroed."""
    ref = copy.deepcopy(model)
    blocks = {b.name: b for b in transformer_blocks(ref, "all", clamp_wrappers=True)}
    for name in plan.heads:
        a = blocks[name].attention
        for h in plan.removed_heads(name):
            ref.get_submodule(a.o).weight[:, h * a.head_dim:(h + 1) * a.head_dim] = 0
    for name in plan.cross_heads:
        c = blocks[name].cross_attention
        for h in plan.removed_cross_heads(name):
            ref.get_submodule(c.o).weight[:, h * c.head_dim:(h + 1) * c.head_dim] = 0
    for name in plan.neurons:
        ref.get_submodule(blocks[name].ffn.output).weight[:, plan.removed_neurons(name)] = 0
    return ref


CROSS = {"bart": "encoder_attn", "whisper": "encoder_attn", "ved": "crossattention"}
DECODER = {"bart": "model.decoder.layers", "whisper": "model.decoder.layers", "ved": "decoder.bert.encoder.layer"}


def _cross_dims(model: nn.Module, arch: str, block: str) -> tuple[int, ...]:
    c = model.get_submodule(f"{block}.{CROSS[arch]}")
    if arch == "ved":
        return (c.self.query.out_features, c.self.key.out_features, c.self.value.out_features,
                c.output.dense.in_features, c.self.num_attention_heads, c.self.all_head_size)
    return c.q_proj.out_features, c.k_proj.out_features, c.v_proj.out_features, c.out_proj.in_features


@pytest.mark.parametrize("importance", ["magnitude", "activation", "taylor"])
@pytest.mark.parametrize("arch", ["bart", "whisper", "ved"])
def test_cross_attention_heads_are_pruned_exactly_and_reload(tmp_path, arch, importance):
    model, batch = _build(arch)
    decoder = [f"{DECODER[arch]}.{i}" for i in range(2)]
    blocks = {b.name: b for b in transformer_blocks(model)}
    for name in decoder:
        assert blocks[name].cross_attention is not None and blocks[name].cross_attention.n_heads == 4
        assert "heads" not in blocks[name].unsupported
    pruner = StructuredPruner([0.5] * len(blocks) if arch != "ved" else [0.25, 0.5], 0.25,
                              importance=importance, progress=False)
    plan = pruner.plan(model, calib=[batch])
    assert sorted(plan.cross_heads) == decoder and plan.skipped == {}
    removed = {b: plan.removed_cross_heads(b) for b in decoder}
    want = [1, 2] if arch == "ved" else [2, 2]
    assert [len(removed[b]) for b in decoder] == want
    assert all(plan.sizes[b]["cross_heads"] == 4 for b in decoder)
    ref_model = _zeroed(model, plan)
    ref = _logits(ref_model, batch)
    before = parameter_report(model)["params"]
    pruner.apply(model, plan)
    out = _logits(model, batch)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model, _held(arch)), _logits(ref_model, _held(arch)), rtol=1e-5, atol=1e-5)
    for b, n in zip(decoder, want):
        kept = (4 - n) * 16
        dims = _cross_dims(model, arch, b)
        assert dims[:4] == (kept,) * 4
        if arch == "ved":
            assert dims[4:] == (4 - n, kept)
    # the report counts the removed parameters, the cross-attention's among them: q/k/v rows (weight + bias) and
    # o columns of every removed head
    blocks_after = {b.name: b for b in transformer_blocks(model)}
    assert all(blocks_after[b].cross_attention.n_heads == 4 - n for b, n in zip(decoder, want))
    cross_removed = sum(n * 16 * (64 + 1) * 3 + n * 16 * 64 for n in want)
    after = parameter_report(model)["params"]
    assert before - after > cross_removed
    # reload: the shape table records the cross-attention, the loaded logits equal the pruned model's
    save_pruned(model, tmp_path / "p", plan=plan)
    again = load_pruned(tmp_path / "p").eval()
    assert torch.equal(_logits(again, batch), out)
    assert [_cross_dims(again, arch, b) for b in decoder] == [_cross_dims(model, arch, b) for b in decoder]


def test_parameter_report_counts_exactly_the_cross_attention_heads_removed():
    """Only cross-attention heads removed (a plan edited by hand): the report drops by exactly their q / k / v
    rows (with biases) and o columns."""
    model, _ = _build("bart")
    plan = StructuredPruner(0.5, 0.0, progress=False).plan(model)
    for name in plan.heads:
        plan.heads[name] = list(range(plan.sizes[name]["heads"]))
        plan.kv_heads[name] = list(range(plan.sizes[name]["kv_heads"]))
    before = parameter_report(model)["params"]
    StructuredPruner(0.5, 0.0, progress=False).apply(model, plan)
    n = sum(len(plan.removed_cross_heads(b)) for b in plan.cross_heads)
    assert n == 4
    assert before - parameter_report(model)["params"] == n * (3 * 16 * (64 + 1) + 16 * 64)


@pytest.mark.parametrize("arch", ["bart", "ved"])
def test_magnitude_removes_the_lowest_norm_cross_attention_heads(arch):
    """Per-head ``sqrt(||q rows||^2 + ||o columns||^2)`` of the cross-attention, computed by hand, against the
    heads the plan removes (one head of every block's cross-attention is scaled down, so the lowest is clear)."""
    model, _ = _build(arch)
    decoder = [f"{DECODER[arch]}.{i}" for i in range(2)]
    weak = {decoder[0]: 2, decoder[1]: 1}
    names = {"bart": ("q_proj", "out_proj"), "ved": ("self.query", "output.dense")}[arch]
    with torch.no_grad():
        for b, h in weak.items():
            q = model.get_submodule(f"{b}.{CROSS[arch]}.{names[0]}")
            q.weight[h * 16:(h + 1) * 16] *= 0.1
    plan = StructuredPruner(0.25, 0.0, progress=False).plan(model)
    for b in decoder:
        q = model.get_submodule(f"{b}.{CROSS[arch]}.{names[0]}").weight.detach()
        o = model.get_submodule(f"{b}.{CROSS[arch]}.{names[1]}").weight.detach()
        norms = torch.stack([(q[h * 16:(h + 1) * 16].pow(2).sum() + o[:, h * 16:(h + 1) * 16].pow(2).sum()).sqrt()
                             for h in range(4)])
        assert plan.removed_cross_heads(b) == [int(norms.argmin())] == [weak[b]]
        assert plan.cross_heads[b] == [h for h in range(4) if h != weak[b]]


def test_plan_dict_round_trip_and_older_dicts_without_cross_heads():
    model, batch = _build("whisper")
    pruner = StructuredPruner(0.5, 0.0, progress=False)
    plan = pruner.plan(model)
    d = plan.to_dict()
    assert d["cross_heads"] == plan.cross_heads and d["cross_kv_heads"] == plan.cross_kv_heads
    assert PrunePlan.from_dict(d) == plan
    old = {k: v for k, v in d.items() if k not in ("cross_heads", "cross_kv_heads")}
    for s in old["sizes"].values():
        s.pop("cross_heads", None)
        s.pop("cross_kv_heads", None)
    legacy = PrunePlan.from_dict(old)
    assert legacy.cross_heads == {}
    pruner.apply(model, legacy)  # an older plan keeps the cross-attention heads
    for i in range(2):
        c = model.get_submodule(f"model.decoder.layers.{i}.encoder_attn")
        assert c.q_proj.out_features == c.out_proj.in_features == 64
        assert model.get_submodule(f"model.decoder.layers.{i}.self_attn").q_proj.out_features == 32
    assert _logits(model, batch).shape == (2, 6, s2s.VOCAB)


def test_older_shape_table_without_cross_attention_still_loads(tmp_path):
    """A folder saved before the table recorded cross-attention (self-attention pruned only): the cross-attention
    keeps the rebuilt model's shapes."""
    model, batch = _build("bart")
    plan = StructuredPruner(0.5, 0.0, progress=False).plan(model)
    plan.cross_heads, plan.cross_kv_heads = {}, {}
    StructuredPruner(0.5, 0.0, progress=False).apply(model, plan)
    out = _logits(model, batch)
    saved = save_pruned(model, tmp_path / "saved")
    folder = tmp_path / "p"  # a copy without its manifest (an older save), the table edited
    shutil.copytree(atomic.resolve(saved), folder)
    (folder / MANIFEST_NAME).unlink()
    d = json.loads((folder / META_NAME).read_text())
    assert all("cross_attention" in d["extras"]["prune"]["blocks"][f"model.decoder.layers.{i}"] for i in range(2))
    for e in d["extras"]["prune"]["blocks"].values():
        e.pop("cross_attention", None)
    (folder / META_NAME).write_text(json.dumps(d))
    with pytest.warns(CheckpointWarning, match="no medquant.manifest"):
        again = load_pruned(folder)
    assert torch.equal(_logits(again.eval(), batch), out)


def test_a_plan_entry_for_a_cross_attention_that_cannot_be_pruned_is_refused():
    model, _ = _build("bart")
    plan = StructuredPruner(0.5, 0.0, progress=False).plan(model)
    plan.cross_heads["model.encoder.layers.0"] = [0, 1]
    plan.sizes["model.encoder.layers.0"].update(cross_heads=4, cross_kv_heads=4)
    with pytest.raises(ValueError, match="cross_heads.*cannot be applied"):
        StructuredPruner(0.5, 0.0, progress=False).apply(model, plan)
    assert model.model.decoder.layers[0].encoder_attn.q_proj.out_features == 64  # nothing changed


def test_t5gemma_cross_attn_with_grouped_query_heads_round_trips_through_transformers(tmp_path):
    """T5Gemma's ``cross_attn`` (4 query / 2 key/value heads of 16): query heads removed inside every group; the
    uniform result fits the decoder config (``num_attention_heads`` sizes both attentions), so ``from_pretrained``
    gives the pruned model back, as ``load_pruned`` does."""
    import transformers as tf

    stack = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
             "sliding_window": 16}
    torch.manual_seed(0)
    model = tf.T5GemmaForConditionalGeneration(tf.T5GemmaConfig(encoder=stack, decoder=stack, vocab_size=300)).eval()
    gen = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(3, 300, (2, 9), generator=gen),
             "decoder_input_ids": torch.randint(3, 300, (2, 6), generator=gen)}
    pruner = StructuredPruner(0.5, 0.0, importance="activation", progress=False)
    plan = pruner.plan(model, calib=[batch])
    decoder = [f"model.decoder.layers.{i}" for i in range(2)]
    assert sorted(plan.cross_heads) == decoder
    assert all(len(plan.cross_heads[b]) == 2 and plan.cross_kv_heads[b] == [0, 1] for b in decoder)
    assert all(len({h // 2 for h in plan.cross_heads[b]}) == 2 for b in decoder)  # one query head per group
    ref = _logits(_zeroed(model, plan), batch)
    pruner.apply(model, plan)
    out = _logits(model, batch)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    cross = model.model.decoder.layers[0].cross_attn
    assert cross.q_proj.out_features == cross.o_proj.in_features == 32 and cross.k_proj.out_features == 32
    assert plan.hf_config_exact is True, plan.config_notes
    model.save_pretrained(tmp_path / "hf")
    again = type(model).from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(_logits(again, batch), out)
    save_pruned(model, tmp_path / "p", plan=plan)
    assert torch.equal(_logits(load_pruned(tmp_path / "p").eval(), batch), out)


def test_whisper_alignment_heads_follow_the_kept_cross_attention_heads(tmp_path):
    """Whisper's ``generation_config.alignment_heads`` (``[decoder layer, cross-attention head]`` pairs that
    ``generate(return_token_timestamps=True)`` reads from the cross-attention weights) name the same heads after
    pruning: a kept head's pair is renumbered (its weights equal the unpruned model's head), a removed head's pair is
    left out, and token timestamps are computed (they raised IndexError on a removed head's index before)."""
    model, batch = _build("whisper")
    model.set_attn_implementation("eager")
    pairs = [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [1, 3]]
    model.generation_config.alignment_heads = pairs
    pruner = StructuredPruner(0.5, 0.0, progress=False)
    plan = pruner.plan(model, calib=[batch])
    decoder = [f"model.decoder.layers.{i}" for i in range(2)]
    ref = _zeroed(model, plan)
    pruner.apply(model, plan)
    want = [[i, plan.cross_heads[b].index(h)] for i, b in enumerate(decoder) for h in plan.cross_heads[b]]
    assert model.generation_config.alignment_heads == want
    with torch.no_grad():
        out = model(**batch, output_attentions=True, use_cache=False).cross_attentions
        r = ref(**batch, output_attentions=True, use_cache=False).cross_attentions
    for i, b in enumerate(decoder):
        for j, h in enumerate(plan.cross_heads[b]):
            torch.testing.assert_close(out[i][:, j], r[i][:, h], rtol=1e-5, atol=1e-6)
    got = model.generate(input_features=batch["input_features"], return_token_timestamps=True, max_new_tokens=4)
    assert got["token_timestamps"].shape[0] == 2


def test_whisper_alignment_heads_follow_dropped_decoder_layers():
    """Dropping a decoder layer renumbers the layers after it, and ``alignment_heads`` names layers: a dropped
    layer's pairs are left out, later layers' pairs shift down (they pointed one layer too far and raised
    IndexError in ``generate(return_token_timestamps=True)``); the kept pairs read the same heads of the same
    (moved) layer, checked against the unpruned model's cross-attention weights there."""
    model, batch = _build("whisper")
    model.set_attn_implementation("eager")
    model.generation_config.alignment_heads = [[0, 1], [1, 0], [1, 3]]
    pruner = StructuredPruner(0.0, 0.0, drop_blocks=["model.decoder.layers.0"], progress=False)
    plan = pruner.plan(model, calib=[batch])
    layer1 = copy.deepcopy(model.model.decoder.layers[1])
    pruner.apply(model, plan)
    assert model.generation_config.alignment_heads == [[0, 0], [0, 3]]
    assert any("layer" in note and "alignment_heads" in note for note in plan.config_notes)
    assert torch.equal(model.model.decoder.layers[0].encoder_attn.q_proj.weight, layer1.encoder_attn.q_proj.weight)
    got = model.generate(input_features=batch["input_features"], return_token_timestamps=True, max_new_tokens=4)
    assert got["token_timestamps"].shape[0] == 2
