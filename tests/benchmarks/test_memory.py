"""benchmarks.common.memory: the RSS reader, peak reset, and full / LoRA / QLoRA training-memory accounting
(moved here from tests/qlora with the module)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.common.memory import (
    enable_gradient_checkpointing,
    measure_training,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
)
from medquant.testing.zoo import ZOO_BY_NAME


def test_peak_rss_reset_and_measure_training():
    big = torch.ones(40_000_000)  # 160 MB
    del big
    assert reset_peak_rss()
    assert peak_rss_mb() < rss_mb() + 50
    entry = ZOO_BY_NAME["llama"]
    ids = entry.inputs(entry.build())["input_ids"]
    batch = {"input_ids": ids, "labels": ids.clone()}
    rep_full, _ = measure_training(entry.build, "full", [batch] * 2, steps=2, lr=1e-3, progress=False)
    rep_q, model_q = measure_training(entry.build, "qlora", [batch] * 2, steps=2, lr=1e-3, progress=False)
    n_all = sum(p.numel() for p in entry.build().parameters())
    assert rep_full.trainable_params == n_all
    assert rep_q.trainable_params == sum(p.numel() for n, p in model_q.named_parameters() if "lora_" in n)
    assert rep_q.trainable_params < n_all / 2
    for rep in (rep_full, rep_q):
        assert rep.steps == 2 and rep.hwm_reset and rep.peak_train_mb >= rep.rss_prepared_mb - 1
        assert rep.train_s > 0


def test_gradient_checkpointing_same_losses_and_flag():
    """Checkpointing recomputes activations: the losses (LoRA dropout included) equal the run without it."""
    entry = ZOO_BY_NAME["llama"]
    ids = entry.inputs(entry.build())["input_ids"]
    batch = {"input_ids": ids, "labels": ids.clone()}
    runs = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        rep, model = measure_training(entry.build, "lora", [batch] * 3, steps=3, lr=1e-2, progress=False,
                                      gradient_checkpointing=ckpt)
        inner = model.get_base_model()
        flag = getattr(type(inner), "is_activation_checkpointing", None)
        assert (inner.is_activation_checkpointing if flag is not None else inner.is_gradient_checkpointing) is ckpt
        runs[ckpt] = rep.losses
    assert runs[True] == pytest.approx(runs[False], rel=1e-5, abs=1e-6)
    assert runs[True][-1] < runs[True][0]  # it trains
    with pytest.raises(TypeError, match="gradient_checkpointing_enable"):
        enable_gradient_checkpointing(nn.Linear(2, 2))
