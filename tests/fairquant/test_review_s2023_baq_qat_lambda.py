"""FQ-QAT review: a ``lambda_fair`` that is NaN or infinite is refused up front (as ``BAQWrapper`` refuses it),
not turned into a NaN / inf loss that the training loop reports as a learning rate too high."""
import math

import pytest
import torch
from torch import nn

from medquant.fairquant.qat import fq_qat


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_fq_qat_refuses_a_lambda_fair_that_is_not_a_finite_number_at_least_zero(bad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.randint(0, 2, (8,))) for _ in range(2)]
    with pytest.raises(ValueError, match="lambda_fair"):  # NaN / inf: FloatingPointError blaming the lr
        fq_qat(model, 8, batches, lambda_fair=bad, progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
