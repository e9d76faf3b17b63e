"""``medquant quantize --calib-images`` and ``medquant prune --calib-images``: a VLM calibrated on real chest X-rays,
each paired with a report paragraph through the folder's own processor, so the vision tower is calibrated (and
scored, for pruning) too (a tiny LLaVA with a CLIP image processor,
MiniLM's real tokenizer plus an ``<image>`` token, and a chat template).

Reference: the batches built in the test with transformers' processor API directly (the images read with PIL, the
paragraph cut to ``--seq-len`` tokens, one user turn holding the image and the text), then
:func:`medquant.calibrate.gptq_quantize_` on the model ``from_pretrained`` loads: the folder the command writes
reloads to that model's tensors bit for bit; the block-by-block runs (in memory and ``--stream``) write the same
tensors as the whole-model run. Pruning with activation importance over every stack equals
``StructuredPruner(scope="all")`` on the same batches (the reloaded folder's logits); text alone is refused naming
``--calib-images``. Bad combinations exit with code 2 in one line before any work."""
from __future__ import annotations

import json

import pytest
import torch

import medquant as mq
from medquant.cli import main
from tests.cli.tiny_folder import kermany_index, report_text_file, tiny_llava_folder

SAMPLES, SEQ = 2, 16



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_images")
    tiny_llava_folder(root / "src")
    report_text_file(root)
    return root


def _args(folder, out, *extra, method="gptq"):
    return ["quantize", str(folder / "src"), str(folder / out), "--bits", "4", "--group-size", "32", "--method",
            method, "--calib", str(folder / "t.txt"), "--calib-images", str(kermany_index()), "--calib-samples",
            str(SAMPLES), "--seq-len", str(SEQ), "--json", *extra]


def _reference_batches(folder):
    """The command's batches built independently: PIL reads the first train images of the index (the default --calib-split), the processor's own
    chat template and call make the inputs."""
    import csv

    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder / "src")
    rows = [r for r in csv.DictReader(kermany_index().open()) if r["split"] == "train"][:SAMPLES]
    lines = [p.strip() for p in (folder / "t.txt").read_text().split("\n") if p.strip()]
    batches = []
    for row, line in zip(rows, lines):
        image = np.asarray(Image.open(kermany_index().parent / row["path"]).convert("RGB"))
        words = processor.tokenizer.decode(processor.tokenizer(line, add_special_tokens=False)["input_ids"][:SEQ])
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words}]}]
        text = processor.apply_chat_template(turn, add_generation_prompt=False, tokenize=False)
        batches.append(dict(processor(text=[text], images=[image], return_tensors="pt")))
    return batches


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_images_calibrate_the_vision_tower_as_gptq_on_processor_batches(folder, capsys):
    from transformers import LlavaForConditionalGeneration

    from medquant.calibrate import gptq_quantize_

    assert main(_args(folder, "whole")) == 0
    summary = json.loads(capsys.readouterr().out)
    batches = _reference_batches(folder)
    assert all("pixel_values" in b for b in batches)
    ref = LlavaForConditionalGeneration.from_pretrained(folder / "src").eval()
    records = gptq_quantize_(ref, mq.QuantConfig(4, group_size=32), batches, progress=False)
    vision = [n for n in records if "vision_tower" in n]
    assert vision and all(records[n]["method"] == "gptq" for n in vision)  # the tower ran on the images
    assert summary["layers_quantized"] == len(records)
    got = LlavaForConditionalGeneration.from_pretrained(folder / "whole").eval()
    a, b = got.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    with torch.no_grad():
        assert torch.equal(got(**batches[0]).logits, ref(**batches[0]).logits)


def test_awq_with_images_scales_the_vision_tower_too(folder, capsys):
    """AWQ scales the language model by default (``scope=None``); with images the command asks for every stack
    (``scope="all"``): the folder equals ``awq_quantize_(scope="all")`` on the processor's batches, whose groups
    include the vision tower's."""
    from transformers import LlavaForConditionalGeneration

    from medquant.calibrate import awq_quantize_

    assert main(_args(folder, "awq", method="awq")) == 0
    capsys.readouterr()
    ref = LlavaForConditionalGeneration.from_pretrained(folder / "src").eval()
    groups = awq_quantize_(ref, mq.QuantConfig(4, group_size=32), _reference_batches(folder), skip=None,
                           scope="all", progress=False)
    assert any("vision_tower" in g.prev for g in groups) and any("language_model" in g.prev for g in groups)
    got = LlavaForConditionalGeneration.from_pretrained(folder / "awq").eval()
    a, b = got.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_block_by_block_and_stream_with_images_write_the_whole_model_tensors(folder, capsys):
    if not (folder / "whole").is_dir():
        assert main(_args(folder, "whole")) == 0
    ref = _tensors(folder / "whole")
    for out, extra in (("bbb", ["--block-by-block"]), ("streamed", ["--block-by-block", "--stream"])):
        assert main(_args(folder, out, *extra)) == 0
        capsys.readouterr()
        got = _tensors(folder / out)
        assert sorted(got) == sorted(ref)
        assert [k for k in ref if not torch.equal(got[k], ref[k])] == [], out


@pytest.mark.parametrize("change, message", [
    (lambda a: [x for i, x in enumerate(a) if x != "--calib" and (i == 0 or a[i - 1] != "--calib")],
     "--calib-images pairs each image with a paragraph of --calib FILE"),
    (lambda a: [*a[:a.index("--calib-images") + 1], "/no/such/images", *a[a.index("--calib-images") + 2:]],
     "--calib-images: /no/such/images does not exist"),
])
def test_bad_combinations_exit_2_in_one_line(folder, capsys, change, message):
    argv = change(_args(folder, "refused"))
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (folder / "refused").exists()


def test_a_folder_without_an_image_processor_is_named(folder, capsys, tmp_path):
    import shutil

    plain = tmp_path / "no_processor"
    shutil.copytree(folder / "src", plain)
    for f in ("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "chat_template.json"):
        (plain / f).unlink(missing_ok=True)
    argv = _args(folder, "refused")
    argv[1] = str(plain)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Loading weights" not in err  # named before the model is loaded
    assert "--calib-images" in err and "processor" in err and "\n" not in err
    assert not (folder / "refused").exists()


def test_prune_scores_the_vision_tower_on_the_images_as_the_pruner_does(folder, capsys):
    from transformers import LlavaForConditionalGeneration

    from medquant.prune import StructuredPruner, load_pruned

    def argv(out, *extra):
        return ["prune", str(folder / "src"), "--out", str(folder / out), "--heads", "0.5", "--ffn", "0.5",
                "--importance", "activation", "--scope", "all", "--calib-text", str(folder / "t.txt"),
                "--calib-samples", str(SAMPLES), "--max-length", str(SEQ), *extra]

    assert main(argv("text_only")) == 2  # text never runs the vision tower
    err = capsys.readouterr().err
    assert "never ran model.vision_tower" in err and "--calib-images" in err and not (folder / "text_only").exists()
    assert main(argv("pruned", "--calib-images", str(kermany_index()))) == 0
    capsys.readouterr()
    batches = _reference_batches(folder)
    ref = LlavaForConditionalGeneration.from_pretrained(folder / "src").eval().float()
    plan = StructuredPruner(0.5, 0.5, importance="activation", scope="all", progress=False).prune(ref, calib=batches)
    assert any("vision_tower" in b for b in plan.heads) and any("language_model" in b for b in plan.heads)
    got = load_pruned(folder / "pruned")
    with torch.no_grad():
        assert torch.equal(got(**batches[0]).logits, ref(**batches[0]).logits)


def test_a_chat_template_starting_with_bos_gives_one_bos_as_the_processor_does(tmp_path):
    """A chat template that writes the tokenizer's BOS itself (Gemma 3 / MedGemma, Llama 3.2 Vision): the batch is
    transformers' ``processor.apply_chat_template(..., tokenize=True)`` one, which then adds no second BOS."""
    import numpy as np
    from transformers import AutoProcessor

    from medquant.cli.prune import image_calibration_batches

    tiny_llava_folder(tmp_path / "src")
    processor = AutoProcessor.from_pretrained(tmp_path / "src")
    processor.tokenizer.bos_token = processor.tokenizer.cls_token  # the token this tokenizer adds first
    processor.chat_template = "{{ bos_token }}" + processor.chat_template
    processor.save_pretrained(tmp_path / "src")
    images = np.random.default_rng(0).integers(0, 256, (2, 30, 40), dtype=np.uint8)  # grayscale, odd size
    np.savez(tmp_path / "images.npz", images=images)
    text = "the lungs are clear"
    batches = image_calibration_batches(str(tmp_path / "src"), str(tmp_path / "images.npz"), [text], 2, SEQ,
                                        trust_remote_code=False)
    processor = AutoProcessor.from_pretrained(tmp_path / "src")
    assert len(batches) == 2
    for batch, image in zip(batches, images):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        ref = processor.apply_chat_template(turn, images=[np.stack([image] * 3, axis=-1)], tokenize=True,
                                            return_dict=True, return_tensors="pt")
        assert set(batch) == {k for k, v in ref.items() if isinstance(v, torch.Tensor)}
        for k, v in batch.items():
            assert torch.equal(v, ref[k]), k
