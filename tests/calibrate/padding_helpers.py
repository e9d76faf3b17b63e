"""Right-padded calibration batches and their unpadded sequences, shared by the GPTQ, AWQ and AdaRound padding
tests."""
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


def gemma3_image_pair(entry, model) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """:func:`padded_pair` for the zoo's Gemma 3 VLM ``entry`` / ``model``: two images and a right-padded text of 16
    tokens (image tokens first, then 9 and 4 text tokens), with the pixel values and ``token_type_ids`` (1 on image
    tokens) in the padded batch and in each unpadded one. The text is as long as the vision tower's (32 / 8)^2
    patches per image, so a vision layer's output has the mask's shape."""
    from medquant.testing.zoo import BOI_TOKEN, BOS_ID, EOI_TOKEN, IMAGE_TOKEN, TEXT_HIGH

    prefix = torch.tensor([BOS_ID, BOI_TOKEN] + [IMAGE_TOKEN] * model.config.mm_tokens_per_image + [EOI_TOKEN])
    padded, separate = padded_pair(TEXT_HIGH, (9, 4), prefix=prefix, low=4)
    assert padded["input_ids"].shape == (2, 16)
    pixels = entry.inputs(model)["pixel_values"]
    padded.update(pixel_values=pixels, token_type_ids=(padded["input_ids"] == IMAGE_TOKEN).long())
    for i, b in enumerate(separate):
        b.update(pixel_values=pixels[i:i + 1], token_type_ids=(b["input_ids"] == IMAGE_TOKEN).long())
    return padded, separate
