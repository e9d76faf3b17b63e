"""Fifth review of the ONNX export: the batch-axis check of ``verify`` for integer inputs (token ids).

References: ONNX Runtime running the written file on a batch of distinct samples the export never saw, compared
with the PyTorch model itself.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from medquant.deploy import ExportError, export

VOCAB = 40


class _TinyText(nn.Module):
    """Token ids ``(B, L)`` + attention mask ``(B, L)`` -> 3 logits: embeddings, masked mean pooling, a linear head.

    ``batch_from_len`` centres the token embeddings with the batch size read by ``len(ids)``, a Python int the
    tracer bakes in (1 for a one-sample example): the traced graph then centres over the tokens of the whole batch,
    mixing its samples."""

    def __init__(self, batch_from_len: bool = False) -> None:
        super().__init__()
        self.batch_from_len = batch_from_len
        self.emb, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        if self.batch_from_len:
            g = h.reshape(len(ids), -1, 8)
            h = (g - g.mean(1, keepdim=True)).reshape(ids.size(0), -1, 8)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled)


def _ort(path, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]


def _one_sample() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[2, 17, 5, 33, 3, 0, 0]])  # [CLS] tokens [SEP] [PAD] [PAD]
    return ids, (ids != 0).to(torch.int64)


def _distinct_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[2, 9, 30, 3, 0, 0, 0], [2, 11, 12, 13, 14, 21, 3], [2, 39, 1, 7, 7, 3, 0]])
    return ids, (ids != 0).to(torch.int64)


def test_batch_mixing_is_caught_for_a_one_sample_integer_example(tmp_path):
    """The doubled batch of the verification held the integer example twice (``a.flip(0)`` of one sample is that
    sample), so a graph mixing the samples of a batch passed for token ids and was written. Reference: the model on
    three distinct samples."""
    torch.manual_seed(0)
    wrong = _TinyText(batch_from_len=True).eval()
    example, batch = _one_sample(), _distinct_batch()
    names = ["input_ids", "attention_mask"]
    with torch.no_grad():
        want = wrong(*batch).numpy()
    export(wrong, tmp_path / "unverified.onnx", format="onnx", example_inputs=example, input_names=names,
           verify=False)  # the file really is wrong on distinct samples (written unverified to show it)
    assert np.abs(_ort(tmp_path / "unverified.onnx", *batch) - want).max() > 1e-2
    with pytest.raises(ExportError, match="differ from the model"):
        export(wrong, tmp_path / "m.onnx", format="onnx", example_inputs=example, input_names=names)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_a_text_classifier_with_ids_and_mask_exports_and_verifies(tmp_path, dtype):
    """A classifier that keeps its samples apart is written and verified from a one-sample integer example
    (padded, so the mask holds zeros), and the file computes the model on distinct samples."""
    torch.manual_seed(0)
    right = _TinyText().eval()
    ids, mask = _one_sample()
    report = export(right, tmp_path / "ok.onnx", format="onnx", example_inputs=(ids.to(dtype), mask.to(dtype)),
                    input_names=["input_ids", "attention_mask"])
    assert any("verified" in n for n in report.notes)
    bi, bm = _distinct_batch()
    with torch.no_grad():
        assert np.abs(_ort(report.files[0], bi.to(dtype), bm.to(dtype)) - right(bi, bm).numpy()).max() < 1e-5


def test_second_sample_of_an_integer_example_stays_valid_and_distinct():
    """The doubled batch's second half for integer inputs: values stay within the example's own range (valid ids
    for an embedding that took the example), each one differs, 0/1 inputs (masks, token types) are kept. Reference:
    the shift worked out by hand."""
    from medquant.deploy.onnx import _second_half

    ids = torch.tensor([[2, 17, 5, 33, 3, 0, 0]])
    assert _second_half(ids).tolist() == [[3, 18, 6, 0, 4, 1, 1]]  # (v - 0 + 1) % 34 + 0
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    assert torch.equal(_second_half(mask), mask)
    assert torch.equal(_second_half(torch.ones(1, 4, dtype=torch.int64)), torch.ones(1, 4, dtype=torch.int64))
    two = torch.tensor([[250, 255], [251, 254]], dtype=torch.uint8)  # the range [250, 255], no overflow
    assert _second_half(two).tolist() == [[252, 255], [251, 250]]  # shifted, then the batch reversed
    assert _second_half(two).dtype == torch.uint8
    neg = torch.tensor([[-3, 4]])
    assert _second_half(neg).tolist() == [[-2, -3]]
    x = torch.tensor([[1.5, -2.0]])
    assert torch.equal(_second_half(x), -x)
