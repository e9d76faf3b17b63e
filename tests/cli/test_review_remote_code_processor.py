"""``--calib-images`` on a folder whose model transformers provides (LLaVA) but whose processor is the folder's own
code (``processor_config.json`` ``auto_map``: ``AutoProcessor`` -> ``processing_tinymed.TinyMedProcessor``):
without ``--trust-remote-code`` the command stops in one line naming the flag and the code file, before that code
runs and before anything is written; with it, the batches are those of the processor transformers loads with
``trust_remote_code=True`` (the independent reference: its own ``apply_chat_template(tokenize=True)``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medquant.cli import main
from tests.cli.tiny_folder import report_text_file, tiny_llava_folder

#: the folder's processor code; it leaves the file ``marker`` when it runs
PROCESSING = '''
from pathlib import Path

from transformers import LlavaProcessor

Path({marker!r}).write_text("the folder's processor code ran")


class TinyMedProcessor(LlavaProcessor):
    pass
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("processor_code")
    src = tiny_llava_folder(root / "src")
    cfg = json.loads((src / "processor_config.json").read_text())
    cfg.update(processor_class="TinyMedProcessor", auto_map={"AutoProcessor": "processing_tinymed.TinyMedProcessor"})
    (src / "processor_config.json").write_text(json.dumps(cfg))
    (src / "processing_tinymed.py").write_text(PROCESSING.format(marker=str(root / "RAN")))
    report_text_file(root)
    np.savez(root / "images.npz", images=np.random.default_rng(0).integers(0, 256, (2, 30, 40), dtype=np.uint8))
    return root


def _argv(folder: Path, command: str, out: Path) -> list[str]:
    if command == "quantize":
        return ["quantize", str(folder / "src"), str(out), "--method", "gptq", "--calib", str(folder / "t.txt"),
                "--calib-images", str(folder / "images.npz"), "--calib-samples", "2", "--seq-len", "8"]
    return ["prune", str(folder / "src"), "--out", str(out), "--importance", "activation", "--scope", "all",
            "--calib-text", str(folder / "t.txt"), "--calib-images", str(folder / "images.npz"), "--calib-samples",
            "2", "--max-length", "8"]


@pytest.mark.parametrize("command", ["quantize", "prune"])
def test_a_processor_of_the_folders_own_code_is_refused_naming_the_flag(folder, command, capsys, tmp_path):
    out = tmp_path / "out"
    assert main(_argv(folder, command, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "--trust-remote-code" in err and "processing_tinymed.py" in err and str(folder / "src") in err
    assert not (folder / "RAN").exists()  # the folder's code never ran
    assert not out.exists()


def test_with_the_flag_the_batches_are_those_of_the_trusted_processor(folder, tmp_path):
    from transformers import AutoProcessor

    from medquant.cli.prune import image_calibration_batches

    src = tmp_path / "src"
    shutil.copytree(folder / "src", src)
    (src / "processing_tinymed.py").write_text(PROCESSING.format(marker=str(tmp_path / "RAN")))
    text = "the lungs are clear"
    batches = image_calibration_batches(str(src), str(folder / "images.npz"), [text], 2, 8, trust_remote_code=True)
    assert (tmp_path / "RAN").exists()
    processor = AutoProcessor.from_pretrained(src, trust_remote_code=True)
    assert type(processor).__name__ == "TinyMedProcessor"
    images = np.load(folder / "images.npz")["images"]
    assert len(batches) == 2
    for batch, image in zip(batches, images):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        ref = processor.apply_chat_template(turn, images=[np.stack([image] * 3, axis=-1)], tokenize=True,
                                            return_dict=True, return_tensors="pt")
        assert set(batch) == {k for k, v in ref.items() if isinstance(v, torch.Tensor)}
        assert all(torch.equal(v, ref[k]) for k, v in batch.items())
