"""Review of the Distiller against independent references (plain torch, hand-computed values)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from medquant.distill import Distiller, kd_loss
from medquant.testing.zoo import ZOO_BY_NAME
from tests.distill.test_distiller import _teacher_and_perturbed_student


def _bert(cls, seed, **kw):
    from transformers import BertConfig

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, num_labels=3, **kw)
    return cls(cfg).eval()


def _token_batch(vocab=50):
    torch.manual_seed(3)
    b = {"input_ids": torch.randint(5, vocab, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    b["attention_mask"][1, -2:] = 0
    return b


def test_kd_loss_two_classes_by_hand_and_torch_kl_div():
    """2 classes: KL(p || q) = p log(p/q) + (1-p) log((1-p)/(1-q)) with p = sigmoid((t1 - t0)/T)."""
    s, t, T = torch.tensor([[0.3, -0.9], [1.2, 0.4]]), torch.tensor([[1.0, -1.0], [-0.5, 0.5]]), 2.0
    want = 0.0
    for (s0, s1), (t0, t1) in zip(s.tolist(), t.tolist()):
        p, q = 1 / (1 + math.exp(-(t1 - t0) / T)), 1 / (1 + math.exp(-(s1 - s0) / T))
        want += T * T * (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))) / 2
    ref = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
    assert float(ref) == pytest.approx(want, rel=1e-5)
    assert float(kd_loss(s, t, T)) == pytest.approx(want, rel=1e-5)


def test_gradients_reach_the_student_and_projections_only():
    """Against a plain-torch reference: same student gradient, projection gradient, no teacher gradient."""
    e = ZOO_BY_NAME["llama"]
    teacher, student = _teacher_and_perturbed_student(e)
    b = e.inputs(teacher)
    b["attention_mask"][1, -3:] = 0
    d = Distiller(teacher, student, alpha=1.0, temperature=2.0, feature_pairs=[(1, 2)], feature_weight=0.5)
    ref_s, ref_w = copy.deepcopy(student), d.projections[0].weight.detach().clone().requires_grad_(True)
    d(b)["loss"].backward()
    m = b["attention_mask"].bool()
    out_s = ref_s(**b, output_hidden_states=True)
    with torch.no_grad():
        out_t = teacher(**b, output_hidden_states=True)
    kl = F.kl_div(F.log_softmax(out_s.logits / 2, -1), F.softmax(out_t.logits / 2, -1), reduction="none").sum(-1)
    fm = (out_s.hidden_states[1] @ ref_w.t() - out_t.hidden_states[2]).pow(2).mean(-1)
    (4.0 * kl[m].mean() + 0.5 * fm[m].mean()).backward()
    w, rw = student.model.layers[0].mlp.up_proj.weight, ref_s.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(w.grad, rw.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(d.projections[0].weight.grad, ref_w.grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_masked_lm_student_without_labels_is_not_given_a_next_token_loss():
    """Token logits (B, S, V) with ``input_ids`` and no labels got the causal next-token cross-entropy whatever
    the model: a masked LM was silently trained to predict the next token, a token classifier failed with
    ``IndexError: Target .. is out of bounds``. Only causal LMs have that default task loss."""
    from transformers import BertForMaskedLM, BertForTokenClassification

    b = _token_batch()
    for cls in (BertForMaskedLM, BertForTokenClassification):
        teacher, student = _bert(cls, 0), _bert(cls, 1)
        with pytest.raises(ValueError, match="no task loss"):
            Distiller(teacher, student, alpha=0.5)(b)
        parts = Distiller(teacher, student, alpha=1.0)(b)  # KD alone needs no task loss
        with torch.no_grad():
            zs, zt = student(**b).logits, teacher(**b).logits
        kl = F.kl_div(F.log_softmax(zs / 2, -1), F.softmax(zt / 2, -1), reduction="none").sum(-1)
        assert float(parts["kd"]) == pytest.approx(float(4.0 * kl[b["attention_mask"].bool()].mean()), rel=1e-4)


def test_causal_lms_keep_the_next_token_loss():
    """A Hugging Face causal LM (here BERT as a decoder) and a plain module with token logits keep it."""
    from transformers import BertLMHeadModel

    b = _token_batch()
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    teacher, student = _bert(BertLMHeadModel, 0, is_decoder=True), _bert(BertLMHeadModel, 1, is_decoder=True)

    class Plain(torch.nn.Module):  # no config: taken as a causal LM
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 50)

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    for t, s in ((teacher, student), (Plain(), Plain())):
        parts = Distiller(t, s, alpha=0.5)(b)
        with torch.no_grad():
            z = s(**b)
            z = getattr(z, "logits", z)
        ce = F.cross_entropy(z[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
        assert float(parts["task"].detach()) == pytest.approx(float(ce), rel=1e-5)


def test_a_distiller_cast_to_bfloat16_matches_features():
    """``Distiller(...).to(torch.bfloat16)`` (student and projections cast together) failed in the feature term:
    ``expected m1 and m2 to have the same dtype`` (float32 hidden states into a bfloat16 projection)."""
    e = ZOO_BY_NAME["llama"]
    teacher = e.build()
    student = copy.deepcopy(teacher)
    b = e.inputs(teacher)
    b["attention_mask"][0, -2:] = 0
    d = Distiller(teacher, student, alpha=0.5, feature_pairs=[(1, 2)]).to(torch.bfloat16)
    assert d.projections[0].weight.dtype == torch.bfloat16
    with torch.no_grad():
        d.projections[0].weight.add_(0.05 * torch.randn_like(d.projections[0].weight))
        parts = d(b)
        hs = student(**b, output_hidden_states=True).hidden_states[1]
        ht = teacher(**b, output_hidden_states=True).hidden_states[2].float()
        diff = (F.linear(hs, d.projections[0].weight).float() - ht).pow(2).mean(-1)
        m = b["attention_mask"].bool()
    assert float(parts["features"]) == pytest.approx(float(diff[m].mean()), rel=1e-3)
    parts = d(b)
    parts["loss"].backward()
    assert d.projections[0].weight.grad is not None


def test_a_vlms_default_task_loss_leaves_out_the_image_placeholder_tokens():
    """A token batch of a vision-language model (``pixel_values`` and ``input_ids`` with image placeholder tokens,
    no labels): the default next-token loss counted the placeholders as targets (here 32 of the 50 tokens), so
    the student was trained to predict ``<image>`` after ``<image>`` and the text's loss was diluted. They are
    left out (``labels = -100``), as the padding."""
    e = ZOO_BY_NAME["llava"]
    teacher, student = _teacher_and_perturbed_student(e)
    b = e.inputs(teacher)
    b["attention_mask"][1, -2:] = 0
    image = teacher.config.image_token_id
    assert int((b["input_ids"] == image).sum()) > 0
    parts = Distiller(teacher, student, alpha=0.5)(b)
    with torch.no_grad():
        z = student(**b).logits
    labels = b["input_ids"].masked_fill((b["attention_mask"] == 0) | (b["input_ids"] == image), -100)
    ce = F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float(parts["task"].detach()) == pytest.approx(float(ce), rel=1e-5)


def _t5(seed):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=40, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, decoder_start_token_id=0,
                   pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def test_an_encoder_decoders_token_kd_is_masked_by_the_decoders_positions():
    """The logits of an encoder-decoder are the decoder's ``(B, S_dec, V)``; the batch's ``attention_mask`` is the
    encoder's. It was applied to the decoder positions: silently wrong when both have the same length (decoder
    padding counted, real targets dropped), a mask-shape error otherwise. The decoder's positions are those of
    ``decoder_attention_mask``, else of ``labels != -100`` (the logits at position p predict ``labels[p]``)."""
    teacher, student = _t5(0), _t5(1)
    torch.manual_seed(4)
    b = {"input_ids": torch.randint(1, 40, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
         "labels": torch.randint(1, 40, (2, 6))}
    b["attention_mask"][0, -1:] = 0
    b["labels"][1, -3:] = -100

    def ref(batch, m):
        with torch.no_grad():
            zs, zt = student(**batch).logits, teacher(**batch).logits
        kl = F.kl_div(F.log_softmax(zs / 2, -1), F.softmax(zt / 2, -1), reduction="none").sum(-1)
        return float(4.0 * kl[m.bool()].mean())

    d = Distiller(teacher, student, alpha=0.5)
    assert float(d(b)["kd"]) == pytest.approx(ref(b, b["labels"] != -100), rel=1e-4)
    # decoder length 4 (encoder 6), with a decoder_attention_mask: it is the mask
    b2 = dict(b, labels=b["labels"][:, :4].contiguous(), decoder_attention_mask=torch.tensor([[1, 1, 1, 1],
                                                                                               [1, 1, 0, 0]]))
    assert float(d(b2)["kd"]) == pytest.approx(ref(b2, b2["decoder_attention_mask"]), rel=1e-4)


def test_hf_trainer_saves_a_distiller_whose_student_ties_its_embeddings(tmp_path):
    """``Trainer(model=distiller)`` saves a non-``PreTrainedModel`` with ``safetensors.torch.save_file`` of its
    ``state_dict``: with a student whose ``lm_head`` is tied to its embedding (Qwen2.5-0.5B, Llama-3.2-1B, Gemma)
    this raised ``RuntimeError: Some tensors share memory`` at the first checkpoint (step 500 by default). The
    Distiller's state dict keeps one name per tied parameter, and loading it fills the other names."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(cfg)
    student = LlamaForCausalLM(cfg)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    d = Distiller(teacher, student, alpha=0.5, feature_pairs=[(1, 2)])
    with torch.no_grad():
        d.projections[0].weight.add_(0.5)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                             remove_unused_columns=False)
    Trainer(model=d, args=args).save_model(str(tmp_path))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "student.lm_head.weight" not in saved  # one name for the tied tensor
    want = {f"student.{k}": v for k, v in student.state_dict().items()}
    want["projections.0.weight"] = d.projections[0].weight.detach()
    assert set(saved) == set(want) - {"student.lm_head.weight"}
    assert all(torch.equal(saved[k], want[k]) for k in saved)
    # the round trip: a fresh Distiller loads it strictly, its student tied as before
    torch.manual_seed(1)
    d2 = Distiller(teacher, LlamaForCausalLM(cfg), alpha=0.5, feature_pairs=[(1, 2)])
    d2.load_state_dict(saved)
    s2 = d2.student
    assert s2.lm_head.weight is s2.model.embed_tokens.weight
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in s2.state_dict().items())
    torch.testing.assert_close(d2.projections[0].weight, d.projections[0].weight)
    d2.load_state_dict(d.state_dict())  # and the full dict of an untied save loads too
    d2.load_state_dict(want)


def test_hf_trainer_evaluate_reports_the_distillation_loss(tmp_path):
    """``Trainer.evaluate()`` on a Distiller reported no ``eval_loss`` (the Trainer finds no label argument in
    ``forward`` and so never asked for the loss): ``load_best_model_at_end`` / ``metric_for_best_model="loss"``
    then failed with a KeyError. ``forward`` declares ``return_loss=True`` (as CLIP does), so the Trainer computes
    it; here against ``0.5 * T^2 * KL + 0.5 * CE`` in plain torch on the one eval batch."""
    from transformers import Trainer, TrainingArguments

    e = ZOO_BY_NAME["llama"]
    teacher, student = _teacher_and_perturbed_student(e)
    b = e.inputs(teacher)
    b["attention_mask"][1, -3:] = 0
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    rows = [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i], "labels": labels[i]}
            for i in range(2)]
    d = Distiller(teacher, student, alpha=0.5, temperature=2.0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False,
                             per_device_eval_batch_size=2, disable_tqdm=True)
    got = Trainer(model=d, args=args, eval_dataset=rows).evaluate()
    with torch.no_grad():
        zs, zt = student(**b).logits, teacher(**b).logits
    kl = F.kl_div(F.log_softmax(zs / 2, -1), F.softmax(zt / 2, -1), reduction="none").sum(-1)
    kd = 4.0 * kl[b["attention_mask"].bool()].mean()
    ce = F.cross_entropy(zs[:, :-1].reshape(-1, zs.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert "eval_loss" in got
    assert got["eval_loss"] == pytest.approx(float(0.5 * kd + 0.5 * ce), rel=1e-4)


def test_keyword_inputs_next_to_a_positional_batch_reach_the_models():
    """``distiller(x, levels=lv)`` (the call form of ``AdaptiveQuantizer``: ``aq(x, levels=lv)``) silently dropped
    the keyword inputs when a positional batch was given: the models ran without them. They are passed to both
    models (merged into a mapping batch)."""

    class Scaled(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.lin = torch.nn.Linear(4, 5)

        def forward(self, x, scale=1.0):
            return self.lin(x) * scale

    teacher, student = Scaled(0), Scaled(1)
    x = torch.randn(6, 4)
    d = Distiller(teacher, student, alpha=1.0, temperature=2.0)
    with torch.no_grad():
        zs, zt = student(x, scale=3.0), teacher(x, scale=3.0)
    want = 4.0 * F.kl_div(F.log_softmax(zs / 2, -1), F.softmax(zt / 2, -1), reduction="batchmean")
    assert float(d(x, scale=3.0)["kd"]) == pytest.approx(float(want), rel=1e-5)
    assert float(d({"x": x}, scale=3.0)["kd"]) == pytest.approx(float(want), rel=1e-5)
    assert float(d(x=x, scale=3.0)["kd"]) == pytest.approx(float(want), rel=1e-5)
