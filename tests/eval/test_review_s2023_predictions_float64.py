"""``predictions`` gives the same labels for a float64 tensor as for the same numbers in a numpy array: the tensor
used to be rounded to float32 first, so scores that differ below float32's resolution tied (argmax took the first
class) and a probability just above the threshold fell onto it (not above)."""
from __future__ import annotations

import numpy as np
import torch

from medquant.eval import predictions


def test_float64_tensor_keeps_its_precision():
    logits = np.array([[1.0, 1.0 + 1e-9], [0.3, 0.2]])
    assert predictions(torch.tensor(logits)).tolist() == np.argmax(logits, -1).tolist() == [1, 0]
    probs = np.array([0.5 + 1e-9, 0.5, 0.2])
    want = (probs > 0.5).astype(int).tolist()
    assert predictions(torch.tensor(probs), "binary", scores="probabilities").tolist() == want == [1, 0, 0]


def test_bfloat16_tensor_still_accepted():
    z = torch.tensor([[0.1, 0.5], [0.7, -0.2]], dtype=torch.bfloat16)
    assert predictions(z).tolist() == z.float().argmax(-1).tolist()
