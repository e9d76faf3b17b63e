"""Layer selection from activations: block influence scores against an independent computation; ratio allocation;
dropping whole blocks equals skipping them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from medquant.prune import (
    StructuredPruner,
    allocate_ratios,
    block_influence,
    influence_table,
    least_influential,
    load_pruned,
    plot_influence,
    save_pruned,
)
from medquant.testing.zoo import ZOO_BY_NAME


def test_block_influence_matches_hidden_states(tmp_path):
    e = ZOO_BY_NAME["bert"]  # BERT's hidden_states[i] / [i+1] are exactly block i's input / output
    model = e.build()
    batches = [e.inputs(model)]
    scores = block_influence(model, batches, progress=False)
    with torch.no_grad():
        hs = model(**batches[0], output_hidden_states=True).hidden_states
    for i, s in enumerate(scores):
        x, y = hs[i].reshape(-1, 128), hs[i + 1].reshape(-1, 128)
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()
        assert s["cosine"] == pytest.approx(float(1 - cos), rel=1e-4, abs=1e-6)
        w1 = wasserstein_distance(x.flatten().numpy(), y.flatten().numpy()) / float(x.flatten().std())
        assert s["wasserstein"] == pytest.approx(w1, rel=1e-3)
    table = influence_table(scores)
    assert table.count("\n") == 1 + len(scores) and "encoder.layer.1" in table
    png = plot_influence(scores, tmp_path / "scores.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_allocate_ratios_mean_and_order():
    scores = [{"block": f"b{i}", "index": i, "cosine": c, "wasserstein": 0.0}
              for i, c in enumerate([0.5, 0.1, 0.3, 0.9])]
    r = allocate_ratios(scores, 0.3, spread=0.5)
    assert np.mean(list(r.values())) == pytest.approx(0.3)
    assert r["b1"] == pytest.approx(0.45) and r["b3"] == pytest.approx(0.15)  # least / most influential
    assert r["b1"] > r["b2"] > r["b0"] > r["b3"]
    assert least_influential(scores, 2) == ["b1", "b2"]
    with pytest.raises(ValueError, match="can drop"):
        least_influential(scores, 4)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_drop_block_equals_skipping_it(tmp_path, name):
    e = ZOO_BY_NAME[name]
    model = e.build()
    inputs = e.inputs(model)
    scores = block_influence(model, [inputs], progress=False)
    drop = least_influential(scores, 1)
    blk = model.get_submodule(drop[0])
    h = blk.register_forward_hook(lambda m, a, kw, out: (a[0] if a else kw["hidden_states"]) if
                                  isinstance(out, torch.Tensor) else (a[0] if a else kw["hidden_states"],) +
                                  tuple(out[1:]), with_kwargs=True)
    with torch.no_grad():
        ref = e.output(model, inputs)
    h.remove()
    plan = StructuredPruner(drop_blocks=drop, progress=False).prune(model)
    assert plan.drop_blocks == drop
    with torch.no_grad():
        out = e.output(model, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    save_pruned(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(e.output(load_pruned(tmp_path), inputs), out)
    if name == "llama":
        gen = model.generate(inputs["input_ids"], max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


def test_layer_selected_pruning_exact():
    from medquant.testing.zoo import HEAD_DIM
    from tests.prune._reference import removed_from_plan, zeroed_copy

    e = ZOO_BY_NAME["llava"]
    model = e.build()
    inputs = e.inputs(model)
    scores = block_influence(model, [inputs], progress=False)
    ratios = allocate_ratios(scores, 0.3, spread=0.6)
    pruner = StructuredPruner(ratios, ratios, importance="activation", progress=False)
    plan = pruner.plan(model, calib=[inputs])
    with torch.no_grad():
        ref = e.output(zeroed_copy(model, removed_from_plan(plan), HEAD_DIM), inputs)
    pruner.apply(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(e.output(model, inputs), ref, rtol=1e-4, atol=1e-5)


def test_drop_decoder_block_of_encoder_decoder_updates_its_own_config_key(tmp_path):
    # BART: num_hidden_layers is an alias of encoder_layers; dropping a decoder block must change decoder_layers
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)
    model = BartForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    skip = model.model.decoder.layers[0].register_forward_hook(  # the reference: the block passes its input on
        lambda m, a, kw, out: (a[0] if a else kw["hidden_states"]) if isinstance(out, torch.Tensor) else
        (a[0] if a else kw["hidden_states"],) + tuple(out[1:]), with_kwargs=True)
    with torch.no_grad():
        ref = model(**inputs).logits
    skip.remove()
    plan = StructuredPruner(drop_blocks=["model.decoder.layers.0"], progress=False).prune(model)
    with torch.no_grad():
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (model.config.encoder_layers, model.config.decoder_layers) == (3, 1)
    assert plan.hf_config_exact is True
    model.save_pretrained(tmp_path / "hf")
    again = BartForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert (len(again.model.encoder.layers), len(again.model.decoder.layers)) == (3, 1)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, out)


def test_drop_blocks_refuses_an_index_outside_the_block_list():
    from medquant.prune import drop_blocks

    model = ZOO_BY_NAME["llama"].build()
    with pytest.raises(ValueError, match=r"'model.layers.7' is not an entry of a block list.*has 2 blocks"):
        drop_blocks(model, ["model.layers.7"])
    with pytest.raises(ValueError, match=r"'model.layers.5' is not an entry"):
        drop_blocks(model, ["model.layers.0", "model.layers.5"])
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
