"""Structured pruning of encoder-decoders (Whisper, BART, mBART): self-attention heads of encoder and decoder
blocks, cross-attention (``encoder_attn``) heads of decoder blocks and FFN neurons are removed physically. Reference:
the unpruned model with the removed heads' / neurons' contributions zeroed by forward pre-hooks on the output
projections (``self_attn.out_proj`` / ``encoder_attn.out_proj``: the head's input columns) and on ``fc2`` (the
neuron's input column)."""
from __future__ import annotations

import copy

import pytest
import torch

from medquant.prune import StructuredPruner, load_pruned, save_pruned
from tests.models.seq2seq_models import build, inputs, logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HEAD_DIM = 16
ENCODER = ["model.encoder.layers.0", "model.encoder.layers.1"]
DECODER = ["model.decoder.layers.0", "model.decoder.layers.1"]


def _hooked_reference(model, heads: dict[str, list[int]], neurons: dict[str, list[int]],
                      cross: dict[str, list[int]] | None = None):
    """A copy of the unpruned model whose removed heads / neurons contribute nothing (input columns of out_proj /
    fc2 zeroed on the fly)."""
    ref = copy.deepcopy(model)

    def zero(cols: torch.Tensor):
        def hook(_m, args):
            x = args[0].clone()
            x[..., cols] = 0
            return (x, *args[1:])
        return hook

    for block, hs in heads.items():
        cols = torch.tensor([h * HEAD_DIM + i for h in hs for i in range(HEAD_DIM)], dtype=torch.long)
        ref.get_submodule(f"{block}.self_attn.out_proj").register_forward_pre_hook(zero(cols))
    for block, hs in (cross or {}).items():
        cols = torch.tensor([h * HEAD_DIM + i for h in hs for i in range(HEAD_DIM)], dtype=torch.long)
        ref.get_submodule(f"{block}.encoder_attn.out_proj").register_forward_pre_hook(zero(cols))
    for block, ns in neurons.items():
        ref.get_submodule(f"{block}.fc2").register_forward_pre_hook(zero(torch.tensor(ns, dtype=torch.long)))
    return ref


@pytest.mark.parametrize("arch", ["whisper", "mbart", "bart"])
@pytest.mark.parametrize("per_layer", [False, True], ids=["uniform", "per_layer"])
def test_pruned_equals_zeroed_contributions_and_reloads(tmp_path, arch, per_layer):
    model, batch = build(arch), inputs(arch)
    blocks = ENCODER + DECODER
    head_ratio = [0.5, 0.25, 0.25, 0.5] if per_layer else 0.5
    ffn_ratio = [0.25, 0.5, 0.0, 0.25] if per_layer else 0.25
    pruner = StructuredPruner(head_ratio, ffn_ratio, importance="activation", progress=False)
    plan = pruner.plan(model, calib=[batch])
    assert sorted(plan.heads) == sorted(blocks) and sorted(plan.neurons) == sorted(blocks)
    heads = {b: plan.removed_heads(b) for b in blocks}
    neurons = {b: plan.removed_neurons(b) for b in blocks}
    assert [len(heads[b]) for b in blocks] == ([2, 1, 1, 2] if per_layer else [2] * 4)
    assert [len(neurons[b]) for b in blocks] == ([24, 48, 0, 24] if per_layer else [24] * 4)
    cross = {b: plan.removed_cross_heads(b) for b in DECODER}
    assert sorted(plan.cross_heads) == DECODER
    assert [len(cross[b]) for b in DECODER] == ([1, 2] if per_layer else [2, 2])
    ref_model = _hooked_reference(model, heads, neurons, cross)
    ref = logits(ref_model, batch)
    assert not torch.allclose(ref, logits(model, batch), atol=1e-4)  # what was removed mattered
    pruner.apply(model, plan)
    out = logits(model, batch)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for b in blocks:
        attn = model.get_submodule(f"{b}.self_attn")
        kept = 4 - len(heads[b])
        assert attn.q_proj.out_features == attn.k_proj.out_features == attn.v_proj.out_features == kept * HEAD_DIM
        assert attn.out_proj.in_features == kept * HEAD_DIM
        assert model.get_submodule(f"{b}.fc1").out_features == 96 - len(neurons[b])
    for b in DECODER:  # the cross-attention loses heads with the block's head ratio
        attn = model.get_submodule(f"{b}.encoder_attn")
        assert attn.q_proj.out_features == attn.k_proj.out_features == attn.out_proj.in_features == (
            4 - len(cross[b])) * HEAD_DIM
    held = inputs(arch, seed=9)
    torch.testing.assert_close(logits(model, held), logits(ref_model, held), rtol=1e-5, atol=1e-5)
    save_pruned(model, tmp_path / "pruned", plan=plan)
    again = load_pruned(tmp_path / "pruned").eval()
    assert torch.equal(logits(again, batch), out)


@pytest.mark.parametrize("arch", ["whisper", "mbart"])
def test_uniform_ffn_pruning_reloads_with_from_pretrained(tmp_path, arch):
    """FFN neurons only, the same count in every block: encoder_ffn_dim / decoder_ffn_dim describe the result."""
    model, batch = build(arch), inputs(arch)
    plan = StructuredPruner(0.0, 0.25, progress=False).prune(model)
    assert plan.hf_config_exact is True, plan.config_notes
    assert model.config.encoder_ffn_dim == model.config.decoder_ffn_dim == 72
    out = logits(model, batch)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(again, batch), out)


def test_medquant_load_of_a_pruned_folder_names_the_loader_that_rebuilds_it(tmp_path):
    """mBART with half its FFN neurons pruned per layer (uneven: the config holds one ``encoder_ffn_dim``):
    ``medquant.load`` cannot build the shapes from the config; its error says which loader can, and that loader
    gives the pruned model back (reference: its own logits)."""
    import medquant
    from medquant.io import CheckpointError

    model, batch = build("mbart"), inputs("mbart")
    pruner = StructuredPruner(0.0, [0.25, 0.5, 0.0, 0.25], importance="activation", progress=False)
    pruner.apply(model, pruner.plan(model, calib=[batch]))
    ref = logits(model, batch)
    save_pruned(model, tmp_path / "sp")
    with pytest.raises(CheckpointError, match=r"written by medquant.prune.save_pruned.*load_pruned"):
        medquant.load(tmp_path / "sp")
    medquant.save(model, tmp_path / "plain")
    with pytest.raises(CheckpointError, match=r"save it with medquant.prune.save_pruned"):
        medquant.load(tmp_path / "plain")
    torch.testing.assert_close(logits(load_pruned(tmp_path / "sp"), batch), ref)
