"""A layer whose every calibration row is a padding position: GPTQ's error says so (how many rows, which mask).

Before, the message said the calibration batches were *empty* ("no samples, or no tokens, e.g. input_ids of shape
(1, 0)") while the batches held tokens, all of them marked as padding by the ``attention_mask`` (or, in an
encoder-decoder's decoder, the ``decoder_attention_mask``). The row counts asserted below are the batch shapes
(``batch * tokens``), counted here by hand.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from medquant import QuantConfig
from medquant.calibrate.gptq import HessianAccumulator, gptq_quantize_, gptq_quantize_sequential
from medquant.testing.zoo import ZOO_BY_NAME
from tests.calibrate.test_encoder_decoder_masks import _bart, _batches

CFG = QuantConfig(4, group_size=16)


def _run(sequential: bool, model, batches, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*stay in floating point")
        if sequential:
            return gptq_quantize_sequential(model, CFG, batches, progress=False, offload_device=None, **kw)
        return gptq_quantize_(model, CFG, batches, progress=False, **kw)


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "block_by_block"])
def test_a_calibration_set_of_padding_only_is_named_as_padding_not_as_empty(sequential):
    model = ZOO_BY_NAME["llama"].build()
    ids = torch.randint(4, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.zeros(2, 8, dtype=torch.long)}
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        _run(sequential, model, [batch, batch])
    msg = str(err.value)
    assert msg.startswith("layer model.layers.0.self_attn.q_proj")
    assert "empty" not in msg and "padding" in msg and "32" in msg  # 2 batches x 2 samples x 8 tokens
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # left as it was


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "block_by_block"])
def test_a_decoder_whose_decoder_attention_mask_is_all_zeros_is_named_as_padding(sequential):
    """BART, decoder side planned: every decoder row is padding (the encoder's rows are real)."""
    batches = _batches("decoder_mask")
    for b in batches:
        b["decoder_attention_mask"] = torch.zeros_like(b["decoder_attention_mask"])
    with pytest.raises(ValueError) as err:
        _run(sequential, _bart(), batches, skip=["@head", r"re:model\.encoder\..*"])
    msg = str(err.value)
    assert msg.startswith("layer model.decoder.layers.0.self_attn.")
    assert "empty" not in msg and "padding" in msg and "32" in msg  # 2 batches x 2 samples x 8 tokens


def test_truly_empty_batches_keep_their_message():
    """No row at all (and none masked): still the 'empty' message."""
    layer = torch.nn.Linear(4, 3)
    acc = HessianAccumulator(layer, "fc")
    acc.add(torch.zeros(1, 0, 4))
    with pytest.raises(ValueError, match="received 0 input rows: the calibration batches are empty"):
        acc.hessian()
    acc.add(torch.ones(1, 2, 4), mask=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="padding"):
        acc.hessian()
