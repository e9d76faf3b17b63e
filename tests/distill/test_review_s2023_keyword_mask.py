"""Review (s2023): ``distiller(input_ids, attention_mask=m)`` (a positional batch with keyword inputs, which the
Distiller passes to both models) leaves the padding out of the KD and feature terms, as the dict batch does."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from medquant.distill import Distiller
from medquant.testing.zoo import ZOO_BY_NAME


def _models_and_batch():
    e = ZOO_BY_NAME["llama"]
    torch.manual_seed(0)
    teacher = e.build()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = e.inputs(teacher)
    batch["attention_mask"][1, -3:] = 0  # right padding of sample 1
    return teacher, student, batch


def _kd_reference(zs, zt, mask, temperature):
    """T^2 * KL over the unpadded tokens, with F.kl_div (batchmean over the kept rows)."""
    keep = mask.bool()
    log_ps = F.log_softmax(zs[keep] / temperature, -1)
    log_pt = F.log_softmax(zt[keep] / temperature, -1)
    return temperature ** 2 * F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")


def test_the_kd_term_of_a_positional_batch_with_a_keyword_mask_leaves_out_the_padding():
    teacher, student, batch = _models_and_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    d = Distiller(teacher, student, alpha=1.0, temperature=2.0)
    with torch.no_grad():
        zs = student(input_ids=ids, attention_mask=mask).logits
        zt = teacher(input_ids=ids, attention_mask=mask).logits
        want = _kd_reference(zs, zt, mask, 2.0)
        got = d(ids, attention_mask=mask)["kd"]
        as_dict = d({"input_ids": ids, "attention_mask": mask})["kd"]
    torch.testing.assert_close(as_dict, want)
    torch.testing.assert_close(got, want)


def test_the_feature_term_of_a_positional_batch_with_a_keyword_mask_leaves_out_the_padding():
    teacher, student, batch = _models_and_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    d = Distiller(teacher, student, alpha=1.0, feature_pairs=[(1, 1)])
    with torch.no_grad():
        hs = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        ht = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        keep = mask.bool()
        want = (hs[keep] - ht[keep]).pow(2).mean()  # identity projection (same width)
        got = d(ids, attention_mask=mask)["features"]
    torch.testing.assert_close(got, want)
