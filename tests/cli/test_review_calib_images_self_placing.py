"""``--calib-images`` with a processor that has no chat template and puts the image's tokens before the text itself
(BLIP-2, InstructBLIP: ``num_query_tokens`` image tokens prepended to every text given with an image): the text goes
to the processor alone, as its own API takes it, not after an image token of its own (which made one image token
too many: the model's forward then failed inside the calibration with torch's ``Number of elements of source < number
of ones in mask``). A tiny BLIP-2 (OPT language model) with MiniLM's real tokenizer; real chest X-rays.

References: the batch of ``processor(images=..., text=...)`` (the processor's own API) and, end to end, the folder
``medquant quantize --method gptq --calib-images`` writes against :func:`medquant.calibrate.gptq_quantize_` on those
batches. A processor that needs the image token in the text (LLaVA without a chat template) still gets it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medquant as mq
from medquant.cli import main
from tests.cli.tiny_folder import kermany_index, report_text_file, tiny_llava_folder
from tests.prune.real_models import minilm_dir

SAMPLES, SEQ, QUERIES = 2, 12, 4



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import (
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    root = tmp_path_factory.mktemp("blip2")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    torch.manual_seed(0)
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14),
        qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, encoder_hidden_size=32, vocab_size=len(tok)),
        text_config=OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                              num_attention_heads=2, word_embed_proj_dim=32),
        num_query_tokens=QUERIES, image_token_index=tok.convert_tokens_to_ids("<image>"))
    Blip2ForConditionalGeneration(cfg).save_pretrained(root / "src")
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 28, "width": 28}), tokenizer=tok,
                   num_query_tokens=QUERIES).save_pretrained(root / "src")
    report_text_file(root)
    return root


def _reference_batches(folder):
    """The processor's own API on the first train images of the index (read with PIL) and the first lines, each cut to
    ``SEQ`` tokens."""
    import csv

    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder / "src")
    rows = [r for r in csv.DictReader(kermany_index().open()) if r["split"] == "train"][:SAMPLES]
    lines = [p.strip() for p in (folder / "t.txt").read_text().split("\n") if p.strip()]
    batches = []
    for row, line in zip(rows, lines):
        image = Image.open(kermany_index().parent / row["path"]).convert("RGB")
        words = processor.tokenizer.decode(processor.tokenizer(line, add_special_tokens=False)["input_ids"][:SEQ])
        batch = processor(images=[image], text=[words], return_tensors="pt")
        batches.append({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    return batches


def test_the_batches_are_the_processors_own(folder):
    from medquant.cli.prune import image_calibration_batches

    lines = [p.strip() for p in (folder / "t.txt").read_text().split("\n") if p.strip()]
    got = image_calibration_batches(str(folder / "src"), str(kermany_index()), lines, SAMPLES, SEQ, trust_remote_code=False)
    ref = _reference_batches(folder)
    image_token = json.loads((folder / "src" / "config.json").read_text())["image_token_index"]
    assert len(got) == len(ref) == SAMPLES
    for a, b in zip(got, ref):
        assert int((a["input_ids"] == image_token).sum()) == QUERIES  # one image's query tokens, no more
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_quantize_calibrates_on_them_as_gptq_in_python(folder, capsys):
    from transformers import Blip2ForConditionalGeneration

    from medquant.calibrate import gptq_quantize_

    out = folder / "q"
    assert main(["quantize", str(folder / "src"), str(out), "--bits", "4", "--group-size", "32", "--method", "gptq",
                 "--calib", str(folder / "t.txt"), "--calib-images", str(kermany_index()), "--calib-samples", str(SAMPLES),
                 "--seq-len", str(SEQ), "--skip", "@vision", "--json"]) == 0
    capsys.readouterr()
    ref = Blip2ForConditionalGeneration.from_pretrained(folder / "src").eval()
    gptq_quantize_(ref, mq.QuantConfig(4, group_size=32), _reference_batches(folder), skip=["@vision"],
                   progress=False)
    got = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    a, b = got.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_processor_that_needs_the_image_token_in_the_text_still_gets_it(tmp_path):
    """LLaVA without a chat template: its processor expands an image token of the text and adds none itself."""
    from transformers import AutoProcessor

    from medquant.cli.prune import image_calibration_batches

    src = tiny_llava_folder(tmp_path / "src")
    for f in ("chat_template.jinja", "chat_template.json"):
        (src / f).unlink(missing_ok=True)
    images = np.random.default_rng(0).integers(0, 256, (2, 30, 40), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=images)
    got = image_calibration_batches(str(src), str(tmp_path / "images.npz"), ["the lungs are clear"], 2, SEQ,
                                    trust_remote_code=False)
    processor = AutoProcessor.from_pretrained(src)
    assert not processor.chat_template
    for batch, image in zip(got, images):
        ref = processor(text=[f"{processor.image_token}\nthe lungs are clear"],
                        images=[np.stack([image] * 3, axis=-1)], return_tensors="pt")
        assert all(torch.equal(v, ref[k]) for k, v in batch.items())
