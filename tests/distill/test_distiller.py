"""Distiller: KD loss against a hand computation, masking, teacher untouched, training loop, HF Trainer."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from medquant.distill import Distiller, kd_loss
from medquant.testing.zoo import ZOO_BY_NAME


def _softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _kl_hand(t, s, T):
    pt, ps = _softmax([v / T for v in t]), _softmax([v / T for v in s])
    return T * T * sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))


def test_kd_loss_hand_computation():
    s = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
    t = [[3.0, 1.0, 0.0], [0.0, 0.0, 4.0]]
    for T in (1.0, 2.0, 4.0):
        got = kd_loss(torch.tensor(s), torch.tensor(t), T)
        want = (_kl_hand(t[0], s[0], T) + _kl_hand(t[1], s[1], T)) / 2
        assert float(got) == pytest.approx(want, rel=1e-5)
    # token logits with padding: masked positions do not count
    s3, t3 = torch.tensor([s]), torch.tensor([t])
    got = kd_loss(s3, t3, 2.0, mask=torch.tensor([[1, 0]]))
    assert float(got) == pytest.approx(_kl_hand(t[0], s[0], 2.0), rel=1e-5)
    assert float(kd_loss(torch.tensor(t), torch.tensor(t), 3.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def _lm_batch(model):
    e = ZOO_BY_NAME["llama"]
    b = e.inputs(model)
    b["attention_mask"][1, -3:] = 0  # padding on the right of sample 1
    return b


def test_causal_lm_loss_parts_and_teacher_untouched():
    e = ZOO_BY_NAME["llama"]
    teacher = e.build()
    student = copy.deepcopy(teacher)
    from medquant.prune import StructuredPruner

    StructuredPruner(0.5, 0.3, progress=False).prune(student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = _lm_batch(teacher)
    d = Distiller(teacher, student, alpha=0.7, temperature=2.0)
    parts = d(batch)
    with torch.no_grad():
        zs, zt = student(**batch).logits, teacher(**batch).logits
    m = batch["attention_mask"]
    assert float(parts["kd"]) == pytest.approx(float(kd_loss(zs, zt, 2.0, m)), rel=1e-5)
    labels = batch["input_ids"].masked_fill(m == 0, -100)
    ce = torch.nn.functional.cross_entropy(zs[:, :-1].reshape(-1, zs.shape[-1]), labels[:, 1:].reshape(-1),
                                           ignore_index=-100)
    assert float(parts["task"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(0.7 * float(parts["kd"]) + 0.3 * float(ce), rel=1e-5)
    losses = d.fit([batch] * 6, steps=6, lr=3e-3, progress=False)
    assert losses[-1] < losses[0]
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training


def test_feature_matching_different_width():
    from transformers import LlamaConfig, LlamaForCausalLM

    e = ZOO_BY_NAME["llama"]
    teacher = e.build()
    torch.manual_seed(1)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    batch = _lm_batch(teacher)
    d = Distiller(teacher, student, alpha=1.0, feature_pairs=[(1, 2)], feature_weight=0.5)
    assert d.projections[0].weight.shape == (128, 64)
    parts = d(batch)
    with torch.no_grad():
        hs = student(**batch, output_hidden_states=True).hidden_states[1]
        ht = teacher(**batch, output_hidden_states=True).hidden_states[2]
        diff = (d.projections[0](hs) - ht).pow(2).mean(-1)
        m = batch["attention_mask"].float()
        want = float((diff * m).sum() / m.sum())
    assert float(parts["features"]) == pytest.approx(want, rel=1e-4)
    assert float(parts["loss"]) == pytest.approx(float(parts["kd"]) + 0.5 * want, rel=1e-4)
    w0 = d.projections[0].weight.clone()
    d.fit([batch] * 2, steps=2, lr=1e-2, progress=False)
    assert not torch.equal(w0, d.projections[0].weight)  # projections are learned
    # relative error: the same squared error over the teacher feature's mean square on the unmasked positions
    dn = Distiller(teacher, student, alpha=1.0, feature_pairs=[(1, 2)], feature_weight=0.5, feature_norm=True)
    with torch.no_grad():
        dn.projections[0].weight.copy_(d.projections[0].weight)
        hs = student(**batch, output_hidden_states=True).hidden_states[1]  # the student has trained since
        diff = (dn.projections[0](hs) - ht).pow(2).mean(-1)
        want_n = float((diff * m).sum() / m.sum()) / float((ht.pow(2).mean(-1) * m).sum() / m.sum())
    assert float(dn(batch)["features"]) == pytest.approx(want_n, rel=1e-5)
    assert float(dn(batch)["features"]) != pytest.approx(float((diff * m).sum() / m.sum()), rel=1e-5)


def test_classification_and_errors():
    e = ZOO_BY_NAME["vit"]
    teacher = e.build()
    student = copy.deepcopy(teacher)
    x = e.inputs(teacher)
    x["labels"] = torch.tensor([0, 3])
    d = Distiller(teacher, student, alpha=0.5, temperature=3.0)
    parts = d(x)
    with torch.no_grad():
        out = student(**x)
    assert float(parts["task"]) == pytest.approx(float(out.loss), rel=1e-5)
    assert float(parts["kd"]) == pytest.approx(0.0, abs=1e-6)  # identical copy
    with pytest.raises(ValueError, match="same object"):
        Distiller(teacher, teacher)
    with pytest.raises(ValueError, match="alpha"):
        Distiller(teacher, student, alpha=1.5)


def test_hf_trainer_trains_student(tmp_path):
    from transformers import Trainer, TrainingArguments

    e = ZOO_BY_NAME["llama"]
    teacher = e.build()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    b = e.inputs(teacher)
    rows = [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i]} for i in range(2)]
    d = Distiller(teacher, student, alpha=0.5)
    w0 = student.model.layers[0].mlp.up_proj.weight.clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
                             learning_rate=1e-3, logging_steps=1)
    Trainer(model=d, args=args, train_dataset=rows).train()
    assert not torch.equal(w0, student.model.layers[0].mlp.up_proj.weight)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0, -1.0])
def test_temperature_must_be_finite_and_positive(bad):
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        kd_loss(s, t, bad)
    teacher = ZOO_BY_NAME["llama"].build()
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        Distiller(teacher, copy.deepcopy(teacher), temperature=bad)


def test_kd_loss_teacher_probability_zero_is_xlogy_not_nan():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[float("-inf"), 1.0, 0.0], [0.5, float("-inf"), float("-inf")]])
    T = 2.0
    pt = torch.softmax(t / T, -1)
    ref = T * T * (torch.xlogy(pt, pt) - pt * torch.log_softmax(s / T, -1)).sum(-1).mean()
    got = kd_loss(s, t, T)
    assert torch.isfinite(got) and float(got) == pytest.approx(float(ref), rel=1e-6)
    got.backward()
    assert torch.isfinite(s.grad).all()


def test_fit_on_empty_data_raises_with_the_default_epochs():
    torch.manual_seed(0)
    student = torch.nn.Linear(4, 3)
    before = copy.deepcopy(student.state_dict())
    d = Distiller(torch.nn.Linear(4, 3), student, alpha=1.0)
    for data in ([], iter([])):
        with pytest.raises(ValueError, match="training data is empty"):
            d.fit(data, progress=False)
        with pytest.raises(ValueError, match="training data is empty"):
            d.fit(data, epochs=2, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_kd_loss_on_an_empty_batch_raises_instead_of_nan():
    with pytest.raises(ValueError, match="no position to distil"):
        kd_loss(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="no position to distil"):
        kd_loss(torch.randn(2, 0, 5), torch.randn(2, 0, 5))  # sequences of length 0
    # one row is fine and equals the hand KL (T = 1)
    s, t = torch.tensor([[0.1, 0.7, -0.3]]), torch.tensor([[0.4, -0.2, 0.5]])
    assert float(kd_loss(s, t, temperature=1.0)) == pytest.approx(_kl_hand(t[0].tolist(), s[0].tolist(), 1.0),
                                                                   rel=1e-5)


def test_kd_loss_nan_teacher_logits_are_not_hidden():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]])
    t = torch.tensor([[float("nan"), 1.0, 0.0], [0.5, 0.1, -0.2]])  # e.g. a teacher that overflowed in fp16
    assert torch.isnan(kd_loss(s, t, 2.0))
    # the finite row alone is the hand KL
    assert float(kd_loss(s[1:], t[1:], 2.0)) == pytest.approx(_kl_hand(t[1].tolist(), s[1].tolist(), 2.0), rel=1e-5)


def test_teacher_switched_back_to_train_mode_is_run_in_eval_and_not_changed():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.5),
                                  torch.nn.Linear(6, 3))
    with torch.no_grad():
        teacher[1].running_mean.uniform_(-1, 1)
    student = torch.nn.Linear(4, 3)
    d = Distiller(teacher, student, alpha=1.0, temperature=2.0)
    reference = copy.deepcopy(teacher).eval()
    before = copy.deepcopy(teacher.state_dict())
    teacher.train()  # e.g. shared with the student, which the training loop puts in train mode
    x = torch.randn(8, 4)
    got = d(x)["kd"]
    with torch.no_grad():
        want = kd_loss(student(x), reference(x), 2.0)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # BatchNorm statistics too
    assert teacher.training  # its mode is given back


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_feature_weight_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match="feature_weight must be a finite number >= 0"):
        Distiller(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), feature_weight=bad)


@pytest.mark.parametrize("bad", [True, False, "2.0", None, torch.tensor(True), torch.tensor([1.0, 2.0])])
def test_temperature_must_be_a_real_number_not_a_bool(bad):
    """temperature=True was silently T = 1 (a bool is an int)."""
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(TypeError, match="temperature must be a real number .*not a bool"):
        kd_loss(s, t, bad)
    with pytest.raises(TypeError, match="temperature must be a real number .*not a bool"):
        Distiller(torch.nn.Linear(4, 5), torch.nn.Linear(4, 5), temperature=bad)


def test_temperature_as_int_or_one_element_tensor_is_the_number():
    s, t = [[1.0, 2.0, 3.0]], [[3.0, 1.0, 0.0]]
    want = _kl_hand(t[0], s[0], 3.0)
    for T in (3, 3.0, torch.tensor(3.0)):
        assert float(kd_loss(torch.tensor(s), torch.tensor(t), T)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(-1.0))
    assert Distiller(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), temperature=3).temperature == 3.0


@pytest.mark.parametrize("pairs, got", [
    ([(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))], r"feature_pairs\[0\] is \(Linear, Linear\)"),
    ([("model.layers.0", "model.layers.1")], r"feature_pairs\[0\] is \(str, str\)"),
    ([(1, True)], r"feature_pairs\[0\] is \(int, bool\)"),
    ([(1, 2, 3)], r"feature_pairs\[0\] is \(int, int, int\)"),
    ((1, 2), r"feature_pairs\[0\] is int"),  # one pair, not a list of pairs
    (torch.nn.Linear(4, 4), "got Linear"),
])
def test_feature_pairs_must_be_pairs_of_int_indices(pairs, got):
    teacher = ZOO_BY_NAME["llama"].build()
    with pytest.raises(TypeError, match=r"pairs of int indices into the models' hidden_states.*" + got):
        Distiller(teacher, copy.deepcopy(teacher), feature_pairs=pairs)


def test_feature_pairs_with_plain_modules_fail_at_construction_not_in_training():
    """A plain nn.Module (forward(x) -> tensor) has no hidden_states: this failed at the first forward pass with
    "forward() got an unexpected keyword argument 'output_hidden_states'" (or an AttributeError on a tensor)."""
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    student = torch.nn.Linear(4, 3)
    with pytest.raises(TypeError, match="student that returns hidden_states .* Linear's forward does not take "
                                        "output_hidden_states"):
        Distiller(teacher, student, feature_pairs=[(0, 0)], student_dim=3, teacher_dim=3)
    hf = ZOO_BY_NAME["llama"].build()
    with pytest.raises(TypeError, match="teacher that returns hidden_states .* Sequential's forward"):
        Distiller(teacher, hf, feature_pairs=[(0, 0)], student_dim=128, teacher_dim=6)
    Distiller(teacher, student)  # without feature pairs plain modules are fine

    class TakesKwargs(torch.nn.Linear):  # accepts output_hidden_states but returns a bare tensor
        def forward(self, x, **kwargs):
            return super().forward(x)

    d = Distiller(TakesKwargs(4, 3), TakesKwargs(4, 3), alpha=1.0, feature_pairs=[(0, 0)], student_dim=3,
                  teacher_dim=3)
    with pytest.raises(TypeError, match="student's output to carry hidden_states .* returned a Tensor"):
        d(torch.randn(2, 4))


def _teacher_and_perturbed_student(entry):
    """A zoo teacher and a student copy of it with seeded noise (std 0.05) added to every parameter."""
    teacher = entry.build()
    student = copy.deepcopy(teacher)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def _bert_classifier(seed):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def test_feature_matching_of_a_sequence_classifier_leaves_out_padding():
    """Class logits (B, C) have no token positions, but the hidden states (B, S, H) do: the padded tokens of a
    classifier's batch were counted in the feature term (the attention mask was only read for token logits)."""
    teacher, student = _bert_classifier(0), _bert_classifier(1)
    torch.manual_seed(2)
    batch = {"input_ids": torch.randint(0, 100, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long),
             "labels": torch.tensor([0, 2])}
    batch["attention_mask"][1, -6:] = 0  # sample 1 is 4 tokens long
    for norm in (False, True):
        d = Distiller(teacher, student, alpha=0.5, feature_pairs=[(1, 2)], feature_norm=norm)
        with torch.no_grad():
            d.projections[0].weight.add_(0.1 * torch.randn_like(d.projections[0].weight))
            parts = d(batch)
            hs = student(**batch, output_hidden_states=True).hidden_states[1]
            ht = teacher(**batch, output_hidden_states=True).hidden_states[2]
            m = batch["attention_mask"].float()
            want = ((d.projections[0](hs) - ht).pow(2).mean(-1) * m).sum() / m.sum()
            if norm:
                want = want / ((ht.pow(2).mean(-1) * m).sum() / m.sum())
            zs, zt = student(**batch).logits, teacher(**batch).logits
            kd = 4.0 * torch.nn.functional.kl_div(torch.log_softmax(zs / 2, -1), torch.log_softmax(zt / 2, -1),
                                                  log_target=True, reduction="batchmean")
        assert float(parts["features"]) == pytest.approx(float(want), rel=1e-5)
        assert float(parts["kd"]) == pytest.approx(float(kd), rel=1e-5)  # one position per example, unmasked


def test_projections_are_created_on_the_students_device():
    """The feature projections were always created on the CPU: a student on a GPU then failed in fit() with a
    device mismatch (``proj(h_s)``), unless the Distiller itself was moved with ``.to(device)``."""
    teacher = ZOO_BY_NAME["llama"].build()
    student = copy.deepcopy(teacher).to("meta")  # a device other than the CPU, available everywhere
    d = Distiller(teacher, student, alpha=0.5, feature_pairs=[(1, 1), (2, 2)])
    assert [p.weight.device.type for p in d.projections] == ["meta", "meta"]
    assert all(p.weight.dtype == torch.float32 for p in d.projections)  # features are matched in float32


def test_hf_trainer_with_gradient_accumulation_averages_the_micro_batch_losses(tmp_path):
    """``transformers.Trainer`` reads ``forward(**inputs)`` as "takes loss kwargs": it passed ``num_items_in_batch``
    to the student (a task loss summed over the accumulated tokens) and then skipped its division by the
    accumulation steps, so the KD term weighed ``gradient_accumulation_steps`` times too much."""
    from transformers import Trainer, TrainingArguments

    e = ZOO_BY_NAME["llama"]
    teacher, student = _teacher_and_perturbed_student(e)
    b = e.inputs(teacher)
    rows = [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i], "labels": b["input_ids"][i]}
            for i in range(2)]
    d = Distiller(teacher, student, alpha=0.5)
    w = student.model.layers[0].mlp.up_proj.weight
    # the step's gradient: of the mean of the two micro-batches' losses, L = 0.5 * 4 * KL + 0.5 * CE, in plain torch
    ref_loss = 0
    for r in rows:
        x = {k: v[None] for k, v in r.items()}
        zs = student(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits[0]
        with torch.no_grad():
            zt = teacher(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits[0]
        kl = torch.nn.functional.kl_div(torch.log_softmax(zs / 2, -1), torch.log_softmax(zt / 2, -1),
                                        log_target=True, reduction="batchmean")
        ce = torch.nn.functional.cross_entropy(zs[:-1], x["labels"][0, 1:])
        ref_loss = ref_loss + (0.5 * 4.0 * kl + 0.5 * ce) / 2
    (ref,) = torch.autograd.grad(ref_loss, [w])
    w0 = w.detach().clone()
    lr = 1e-3
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, remove_unused_columns=False, report_to=[], use_cpu=True,
                             save_strategy="no", optim="sgd", learning_rate=lr, lr_scheduler_type="constant",
                             max_grad_norm=0.0, weight_decay=0.0, disable_tqdm=True)
    Trainer(model=d, args=args, train_dataset=rows).train()
    got = (w0 - w.detach()) / lr  # one SGD step: w1 = w0 - lr * g
    assert float((got - ref).norm() / ref.norm()) < 1e-3


def test_a_tokenizers_batch_encoding_is_masked_like_a_dict():
    """A tokenizer's output (``BatchEncoding``, a ``UserDict``, not a ``dict``) lost its attention mask: the padded
    tokens counted in the KD term, and the default task loss refused the batch ("no task loss")."""
    from transformers import BatchEncoding

    e = ZOO_BY_NAME["llama"]
    teacher, student = _teacher_and_perturbed_student(e)
    b = e.inputs(teacher)
    b["attention_mask"][1, -5:] = 0
    d = Distiller(teacher, student, alpha=0.5, temperature=2.0)
    parts = d(BatchEncoding(dict(b)))
    with torch.no_grad():
        zs, zt = student(**b).logits, teacher(**b).logits
        kl = torch.nn.functional.kl_div(torch.log_softmax(zs / 2, -1), torch.log_softmax(zt / 2, -1),
                                        log_target=True, reduction="none").sum(-1)  # (B, S)
        m = b["attention_mask"].bool()
        kd = 4.0 * kl[m].mean()
        labels = b["input_ids"].masked_fill(~m, -100)
        ce = torch.nn.functional.cross_entropy(zs[:, :-1].reshape(-1, zs.shape[-1]), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
    assert float(parts["kd"]) == pytest.approx(float(kd), rel=1e-5)
    assert float(parts["task"]) == pytest.approx(float(ce), rel=1e-5)


def test_a_mask_that_does_not_fit_the_hidden_states_is_said_not_dropped_silently():
    """Hidden states longer than the attention mask (e.g. a model that prepends tokens) cannot be masked: the
    feature term averaged over every position without a word. It still does (nothing else is defined), with a
    warning naming both shapes; a fitting mask warns nothing."""
    from types import SimpleNamespace

    class Prepends(torch.nn.Module):  # hidden states with 2 extra leading positions
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.emb = torch.nn.Embedding(20, 8)
            self.extra = 2

        def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
            h = self.emb(input_ids)
            h = torch.cat([h[:, :1].expand(-1, self.extra, -1), h], 1)
            return SimpleNamespace(logits=h.mean(1)[:, :3], hidden_states=(h, h * 2))

    d = Distiller(Prepends(0), Prepends(1), alpha=1.0, feature_pairs=[(1, 1)], student_dim=8, teacher_dim=8)
    batch = {"input_ids": torch.randint(0, 20, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    with pytest.warns(UserWarning, match=r"attention mask \(2, 5\) does not fit the hidden states \(2, 7\)"):
        parts = d(batch)
    with torch.no_grad():
        hs, ht = d.student(**batch).hidden_states[1], d.teacher(**batch).hidden_states[1]
        want = (d.projections[0](hs) - ht).pow(2).mean()  # over every position
    torch.testing.assert_close(parts["features"], want)


def test_a_module_shared_by_teacher_and_student_is_still_trained():
    """The teacher's parameters were all frozen (``requires_grad_(False)``), shared ones included: a student built
    around a module of the teacher (a shared embedding, the same ``nn.Linear``) silently stopped training it."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 6)
    teacher = torch.nn.Sequential(shared, torch.nn.Tanh(), torch.nn.Linear(6, 3))
    student = torch.nn.Sequential(shared, torch.nn.ReLU(), torch.nn.Linear(6, 3))
    # the reference, in plain torch on copies made before the Distiller touches anything
    ref_s, ref_t = copy.deepcopy(student), copy.deepcopy(teacher)
    x = torch.randn(8, 4)
    with torch.no_grad():
        zt = ref_t(x)
    ref_loss = 4.0 * torch.nn.functional.kl_div(torch.log_softmax(ref_s(x) / 2, -1), torch.log_softmax(zt / 2, -1),
                                                log_target=True, reduction="batchmean")
    ref_w, ref_b = torch.autograd.grad(ref_loss, [ref_s[0].weight, ref_s[0].bias])

    d = Distiller(teacher, student, alpha=1.0, temperature=2.0)
    assert shared.weight.requires_grad and shared.bias.requires_grad  # still the student's to train
    assert not any(p.requires_grad for p in teacher[2].parameters())  # the teacher's own are frozen
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for p in student.parameters()}
    parts = d(x)
    assert float(parts["kd"]) == pytest.approx(float(ref_loss), rel=1e-5)
    parts["loss"].backward()
    torch.testing.assert_close(shared.weight.grad, ref_w)
    torch.testing.assert_close(shared.bias.grad, ref_b)
    assert all(p.grad is None for p in teacher[2].parameters())  # no gradient reaches the teacher's own
    own = copy.deepcopy(teacher[2].state_dict())
    w0 = shared.weight.detach().clone()
    d.fit([x] * 3, steps=3, lr=1e-2, progress=False)
    assert not torch.equal(w0, shared.weight)  # the shared module trains
    assert all(torch.equal(v, own[k]) for k, v in teacher[2].state_dict().items())
