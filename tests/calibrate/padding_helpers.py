"""Right-padded calibration batches and their unpadded sequences, shared by the GPTQ and AWQ padding tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def padded_pair(vocab: int, lengths: tuple[int, int] = (12, 5), seed: int = 7, prefix: torch.Tensor | None = None,
                low: int = 1) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two random token sequences (ids in ``[low, vocab)``) of ``lengths`` (the first the longer): as one
    right-padded batch (pad id 0) with its attention mask, and unpadded, one batch each (attention mask all ones).

    ``prefix``: token ids put before both sequences (e.g. a VLM's image tokens), counted in neither length.
    """
    g = torch.Generator().manual_seed(seed)
    long, short = lengths
    a, b = torch.randint(low, vocab, (1, long), generator=g), torch.randint(low, vocab, (1, short), generator=g)
    if prefix is not None:
        a, b = torch.cat([prefix[None], a], 1), torch.cat([prefix[None], b], 1)
    pad = long - short
    padded = {"input_ids": torch.cat([a, F.pad(b, (0, pad))]),
              "attention_mask": torch.cat([torch.ones_like(a), F.pad(torch.ones_like(b), (0, pad))])}
    separate = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in (a, b)]
    return padded, separate


def repadded(batch: dict[str, torch.Tensor], vocab: int, seed: int = 11, low: int = 1) -> dict[str, torch.Tensor]:
    """``batch`` with other token ids (random, in ``[low, vocab)``) at its padding positions (attention mask 0): a
    calibration that leaves the padding out gives the same result on both, to the bit."""
    mask = batch["attention_mask"] == 0
    ids = batch["input_ids"].clone()
    ids[mask] = torch.randint(low, vocab, (int(mask.sum()),), generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(ids, batch["input_ids"])
    return {**batch, "input_ids": ids}
