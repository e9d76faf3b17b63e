"""Second review of :func:`medquant.pipeline.compress`.

* The dry run (the training loss of the first batch, checked before any stage runs) leaves every random state and
  the model as it found them: ``compress`` then trains exactly as the same training done by hand (no dry run) from
  the same seeds, with a model whose forward draws from Python's ``random``, NumPy's global generator and torch's
  generator, and has BatchNorm running statistics that a train-mode forward would update.
* ``layer_select`` with ``drop_blocks`` assigns the per-block ratios over the blocks that remain, so the ratios
  asked for are removed from the remaining model (counted with plain torch on the parameters).
"""
from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medquant.pipeline import PruneStage, TrainStage, compress
from medquant.testing.zoo import ZOO_BY_NAME

VOCAB, HIDDEN = 32, 8


class _Noisy(nn.Module):
    """A tiny causal LM whose forward draws random numbers in every mode (Python ``random`` picks a layer to skip,
    NumPy and torch add noise) and, with ``bn``, normalises with BatchNorm (running statistics updated by every
    train-mode forward, even without gradients)."""

    def __init__(self, *, noise: bool = True, bn: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=HIDDEN)  # read by the distiller's feature projections
        self.noise = noise
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.norm = nn.BatchNorm1d(HIDDEN) if bn else nn.Identity()
        self.layers = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, labels=None, attention_mask=None, output_hidden_states=False):
        h = self.norm(self.emb(input_ids).transpose(1, 2)).transpose(1, 2)
        skip = -1
        if self.noise:
            h = h + 0.1 * torch.from_numpy(np.random.standard_normal(tuple(h.shape)).astype(np.float32)).to(h.device)
            h = h + 0.1 * torch.randn(h.shape, device=h.device)  # torch's generator of the model's device
            skip = random.randrange(len(self.layers))
        hs = [h]
        for i, layer in enumerate(self.layers):
            if i != skip:
                h = h + torch.tanh(layer(self.drop(h)))
            hs.append(h)
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return SimpleNamespace(logits=logits, loss=loss, hidden_states=tuple(hs) if output_hidden_states else None)


def _batch(device: str = "cpu") -> dict[str, torch.Tensor]:
    ids = torch.arange(2 * 10, device=device).reshape(2, 10) % VOCAB
    return {"input_ids": ids, "labels": ids}


def _seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds the CUDA generators


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def _rng_states() -> dict[str, object]:
    states: dict[str, object] = {"random": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states["numpy"] = (kind, keys.tolist(), pos, has_gauss, gauss)
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _assert_same_rng(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    assert a["random"] == b["random"], "Python random"
    assert a["numpy"] == b["numpy"], "NumPy global generator"
    assert torch.equal(a["torch"], b["torch"]), "torch CPU generator"  # type: ignore[arg-type]
    for x, y in zip(a.get("cuda", []), b.get("cuda", [])):  # type: ignore[call-overload]
        assert torch.equal(x, y), "CUDA generator"


@pytest.mark.parametrize("mode", ["finetune", "distil"])
def test_dry_run_then_training_equals_the_training_alone_with_random_and_numpy_draws(mode):
    from medquant.distill import Distiller

    torch.manual_seed(1)
    model = _Noisy(noise=True)
    ref = copy.deepcopy(model)
    batch = _batch()
    _seed_all(0)
    res = compress(model, train=TrainStage(mode, steps=3, lr=1e-2), train_data=[batch], progress=False)
    after_compress = _rng_states()
    # the same training by hand, from the same seeds, with no dry run before it
    _seed_all(0)
    teacher = copy.deepcopy(ref).eval()
    d = Distiller(teacher, ref, alpha=0.5 if mode == "distil" else 0.0, temperature=2.0)
    losses = d.fit([batch], steps=3, lr=1e-2, progress=False, desc=mode)
    assert res.train_losses == losses
    _assert_same_state(_state(model), _state(ref))
    _assert_same_rng(after_compress, _rng_states())


def test_feature_count_forward_changes_neither_batchnorm_statistics_nor_the_training():
    # with feature_pairs the dry run calls the model twice (loss, then hidden-state count); a train-mode model with
    # BatchNorm would update its running statistics in both calls, and the teacher (copied after the dry run) and the
    # student would start from statistics the data never gave them
    from medquant.distill import Distiller

    torch.manual_seed(1)
    model = _Noisy(noise=False, bn=True).train()
    ref = copy.deepcopy(model)
    batch = _batch()
    pairs = [(1, 1), (-1, -1)]
    torch.manual_seed(0)
    res = compress(model, train=TrainStage("distil", steps=2, lr=1e-2, feature_pairs=pairs), train_data=[batch],
                   progress=False)
    torch.manual_seed(0)
    teacher = copy.deepcopy(ref).eval()
    losses = Distiller(teacher, ref, feature_pairs=pairs).fit([batch], steps=2, lr=1e-2, progress=False)
    assert res.train_losses == losses
    _assert_same_state(_state(model), _state(ref))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_a_refused_dry_run_leaves_the_model_and_every_random_state_as_it_found_them(device):
    # both dry-run forwards run (the loss, then the hidden-state count), then the pair is refused: nothing may have
    # changed, neither the BatchNorm statistics of the train-mode model nor any generator (CUDA's included)
    torch.manual_seed(1)
    model = _Noisy(noise=True, bn=True).to(device).train()
    model.head.eval()  # a submodule in its own mode keeps it
    before = _state(model)
    _seed_all(0)
    rng = _rng_states()
    with pytest.raises(ValueError, match=r"feature pair .* out of range"):
        compress(model, train=TrainStage("distil", steps=1, feature_pairs=[(99, 1)]), train_data=[_batch(device)],
                 progress=False)
    _assert_same_rng(rng, _rng_states())
    _assert_same_state(_state(model), before)
    assert [m.training for m in model.modules()] == [m is not model.head for m in model.modules()]


def _four_block_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**text_kwargs(num_hidden_layers=4))).eval()


def _part_params(block: nn.Module) -> tuple[int, int]:
    """(query + output projection weights, FFN weights) of a LLaMA block: the parameters heads / neurons own."""
    a = block.self_attn.q_proj.weight.numel() + block.self_attn.o_proj.weight.numel()
    f = sum(getattr(block.mlp, n).weight.numel() for n in ("gate_proj", "up_proj", "down_proj"))
    return a, f


@pytest.mark.parametrize("drop", [1, ["model.layers.2"]])
def test_layer_select_with_dropped_blocks_meets_the_asked_ratios_on_the_remaining_blocks(drop):
    model = _four_block_llama()
    inputs = ZOO_BY_NAME["llama"].inputs(model)
    attn0, ffn0 = _part_params(model.model.layers[0])  # every block has the same size before pruning
    res = compress(model, calib=[inputs], progress=False,
                   prune=PruneStage(0.5, 0.25, importance="magnitude", layer_select=True, spread=0.5,
                                    drop_blocks=drop))
    kept = list(model.model.layers)
    assert len(kept) == 3
    if drop == 1:  # the dropped block is the least influential one
        least = min(res.block_influence, key=lambda s: (s["cosine"], s["index"]))["block"]
        assert res.plan.drop_blocks == [least]
    attn = sum(_part_params(b)[0] for b in kept)
    ffn = sum(_part_params(b)[1] for b in kept)
    head_removed = 1 - attn / (3 * attn0)
    ffn_removed = 1 - ffn / (3 * ffn0)
    # 3 blocks of 4 heads / 256 neurons with spread 0.5: 0.75 / 0.5 / 0.25 of the heads (3 + 2 + 1 of 12) and
    # 0.375 / 0.25 / 0.125 of the neurons (96 + 64 + 32 of 768) are whole numbers, so the means are met exactly
    assert head_removed == pytest.approx(0.5, abs=1e-12)
    assert ffn_removed == pytest.approx(0.25, abs=1e-12)
    # the per-block ratios differ (layer selection ran): not a uniform split
    assert len({b.mlp.up_proj.out_features for b in kept}) == 3
