"""Review 3 of medquant.models: the span head of the ``...ForQuestionAnswering`` classes (``qa_outputs``).

References: transformers' own forward (forward hooks show which Linear writes the ``start_logits`` /
``end_logits``: the head that reads the body's last hidden state), independent of the code under test.
"""
import pytest
import torch
import transformers as tf
from torch import nn

from medquant import QuantConfig, quantize_
from medquant.models import model_roles, unassigned_modules

tf.logging.set_verbosity_error()

_LLAMA = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64, "pad_token_id": 0}
_BERT = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 64}
QA_MODELS = {
    "llama": lambda: tf.LlamaForQuestionAnswering(tf.LlamaConfig(**_LLAMA)),
    "qwen2": lambda: tf.Qwen2ForQuestionAnswering(tf.Qwen2Config(**_LLAMA)),
    "bert": lambda: tf.BertForQuestionAnswering(tf.BertConfig(**_BERT)),
}


def _span_writer(model: nn.Module, ids: torch.Tensor) -> str:
    """The Linear whose output columns are the model's start / end logits (found by running the model)."""
    outs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            res = model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    hits = [n for n, o in outs.items() if o.shape[-1] == 2 and torch.equal(o[..., 0], res.start_logits)
            and torch.equal(o[..., 1], res.end_logits)]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.mark.parametrize("name", sorted(QA_MODELS))
def test_question_answering_span_head_is_head_and_skip_head_keeps_it_float(name):
    """``qa_outputs`` maps the body's last hidden state to the span logits, as ``lm_head`` / ``score`` /
    ``classifier`` do: it is the head. Before, it had no role, so ``skip=["@head"]`` quantized it."""
    torch.manual_seed(0)
    model = QA_MODELS[name]().eval()
    ids = torch.randint(1, 100, (2, 9))
    head = _span_writer(model, ids)
    assert model_roles(model)["head"] == [head]
    assert unassigned_modules(model) == []
    before = model.get_submodule(head).weight.detach().clone()
    quantize_(model, QuantConfig(4, group_size=32), skip=["@head"])
    after = model.get_submodule(head)
    assert type(after) is nn.Linear and torch.equal(after.weight, before)
