"""``--calib-images`` calibrates on the ``train`` split of images that have splits (``--calib-split`` names another
one, or ``all``). It read an index in file order, and the Kermany index lists its test images first: the documented
example calibrated on the first 64 *test* images, the ones a user then evaluates on. The reference batches are
built here with PIL and the processor's own API from the rows of the split, read with ``csv``."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medquant.cli import main
from medquant.cli.prune import image_calibration_batches
from tests.cli.tiny_folder import kermany_index, report_text_file, tiny_llava_folder

SAMPLES, SEQ = 2, 12
TEXTS = ["Heart size normal. Lungs are clear.", "No pneumothorax or pleural effusion."]



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib_split")
    tiny_llava_folder(root / "src")
    report_text_file(root)
    return root


def _rows(split: str | None) -> list[dict]:
    with kermany_index().open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if split is None or r["split"] == split][:SAMPLES]


def _reference(folder: Path, rows: list[dict]) -> list[torch.Tensor]:
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder / "src")
    out = []
    for row, text in zip(rows, TEXTS):
        image = np.asarray(Image.open(kermany_index().parent / row["path"]).convert("RGB"))
        words = processor.tokenizer.decode(processor.tokenizer(text, add_special_tokens=False)["input_ids"][:SEQ])
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words}]}]
        prompt = processor.apply_chat_template(turn, add_generation_prompt=False, tokenize=False)
        out.append(processor(text=[prompt], images=[image], return_tensors="pt")["pixel_values"])
    return out


@pytest.mark.parametrize(("requested", "split"), [(None, "train"), ("test", "test"), ("all", None)])
def test_the_images_come_from_the_chosen_split(folder, requested, split):
    rows = _rows(split)
    assert {r["split"] for r in rows} == {split or "test"}  # "all": the file's first rows are test images
    batches = image_calibration_batches(str(folder / "src"), str(kermany_index()), TEXTS, SAMPLES, SEQ, split=requested)
    ref = _reference(folder, rows)
    assert len(batches) == SAMPLES
    for b, r in zip(batches, ref):
        assert torch.equal(b["pixel_values"], r)


def test_a_source_without_train_split_or_an_unknown_split_is_refused(folder, tmp_path):
    src = kermany_index()
    index = tmp_path / "index.csv"
    rows = _rows("test")
    shutil.copytree(src.parent / "images" / "test", tmp_path / "images" / "test")
    with index.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "split"])
        w.writeheader()
        w.writerows([{"path": r["path"], "split": s} for r, s in zip(rows, ["val", "test"])])
    with pytest.raises(SystemExit, match=r"splits val, test and no 'train' split.*--calib-split NAME"):
        image_calibration_batches(str(folder / "src"), str(index), TEXTS, SAMPLES, SEQ)
    with pytest.raises(SystemExit, match=r"--calib-split train: .* has no split 'train'; its splits are val, test"):
        image_calibration_batches(str(folder / "src"), str(index), TEXTS, SAMPLES, SEQ, split="train")
    one = tmp_path / "images" / "test" / Path(rows[0]["path"]).relative_to("images/test")
    with pytest.raises(SystemExit, match=r"has no split 'val'; it has no splits"):
        image_calibration_batches(str(folder / "src"), str(one), TEXTS, SAMPLES, SEQ, split="val")
    assert len(image_calibration_batches(str(folder / "src"), str(index), TEXTS, SAMPLES, SEQ, split="val")) == 1


@pytest.mark.parametrize("command", ["prune", "quantize"])
def test_calib_split_without_calib_images_is_a_usage_error(folder, command, capsys):
    out = str(folder / f"out_{command}")
    args = [command, str(folder / "src"), "--calib-split", "train"]
    args += (["--out", out, "--importance", "activation", "--calib-text", str(folder / "t.txt")]
             if command == "prune" else [out, "--bits", "4", "--method", "gptq", "--calib", str(folder / "t.txt")])
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "--calib-split picks the split of --calib-images" in capsys.readouterr().err
    assert not (folder / f"out_{command}").exists()
