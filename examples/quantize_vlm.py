"""Quantize a MedGemma-style vision-language model (Gemma 3 layout) in three lines, keep the vision tower in
float, check what quantization changed on real chest X-rays, save and reload.

    python examples/quantize_vlm.py --model /path/to/medgemma-4b-it     # a Gemma 3 / MedGemma folder
    python examples/quantize_vlm.py                                      # no VLM weights at hand: see below
    python examples/quantize_vlm.py --smoke                              # seconds, tiny random model

The images are real pediatric chest X-rays (Kermany et al., test split) from ``$MEDQUANT_DATA_DIR`` (or
``--data-dir``). No VLM weights ship with medquant and nothing is downloaded: without ``--model`` the same recipe
runs on a small random-weight model with the Gemma 3 layout (``medquant.testing``), so the numbers then measure
how much 4-bit weights change the model's outputs, not diagnostic accuracy.
"""
from __future__ import annotations

import argparse
import copy
import tempfile

import torch

import medquant as mq
from medquant.data import default_data_dir, load_image_folder


def chest_xrays(data_dir, n: int, size: int) -> torch.Tensor:
    """n real test X-rays as SigLIP pixel values (3 x size x size, scaled to [-1, 1])."""
    images, _ = load_image_folder(data_dir / "kermany_pediatric_cxr_224", split="test", limit=n, gray=True)
    x = torch.stack([torch.from_numpy(im).float().div(255) for im in images]).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x.expand(-1, 3, -1, -1) - 0.5) / 0.5


def model_and_batches(args, data_dir):
    """The model and a list of input dicts (one per pair of images)."""
    if args.model:  # a real Gemma 3 / MedGemma folder: its processor builds the prompt around the image
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
        proc = AutoProcessor.from_pretrained(args.model)
        images, _ = load_image_folder(data_dir / "kermany_pediatric_cxr_224", split="test", limit=args.images)
        msgs = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "Describe the findings of this chest X-ray."}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
        return model, [proc(text=[prompt], images=[Image.fromarray(im)], return_tensors="pt") for im in images]
    from medquant.testing import ZOO_BY_NAME

    entry = ZOO_BY_NAME["gemma3_vlm"]
    model = entry.build()
    pixels = chest_xrays(data_dir, args.images, model.config.vision_config.image_size)
    batches = []
    for i in range(0, len(pixels) - 1, 2):  # the zoo's token layout (batch of 2) around two real X-rays
        inputs = entry.inputs(model)
        inputs["pixel_values"] = pixels[i:i + 2]
        batches.append(inputs)
    return model, batches


@torch.no_grad()
def next_token_logits(model, batches) -> list[torch.Tensor]:
    return [model(**b).logits.float() for b in batches]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Gemma 3 / MedGemma Hugging Face folder (default: random-weight Gemma 3 layout)")
    p.add_argument("--data-dir", help="folder with kermany_pediatric_cxr_224/ (default: $MEDQUANT_DATA_DIR)")
    p.add_argument("--images", type=int, default=32, help="number of test X-rays")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--out", help="where to save the quantized model (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny run for CI: random Gemma 3 layout, 2 images")
    args = p.parse_args()
    if args.smoke:
        args.model, args.images = None, 2
    data_dir = default_data_dir(args.data_dir)
    model, batches = model_and_batches(args, data_dir)
    reference = next_token_logits(model, batches)
    float_bytes = mq.model_size(model).total_bytes
    vision_before = copy.deepcopy({k: v for k, v in model.state_dict().items() if "vision" in k})

    # --- the three lines: language model to 4 bits (groups of 128), vision tower and lm_head kept in float ---
    mq.quantize_(model, {"@language": mq.QuantConfig(bits=args.bits, group_size=args.group_size), "@vision": None},
                 skip=["@head"])
    out = args.out or tempfile.mkdtemp(prefix="medquant_vlm_")
    mq.save(model, out); model = mq.load(out)

    # --- what changed: size, the untouched vision tower, and the outputs on real X-rays ---
    size = mq.model_size(model)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in vision_before.items()), "the vision tower must stay float"
    quantized = next_token_logits(model, batches)
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(reference, quantized)])
    kl = torch.cat([torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                               reduction="none").sum(-1).flatten()
                    for a, b in zip(reference, quantized)])
    print(f"model: {args.model or 'random-weight Gemma 3 layout (medquant.testing)'}; {2 * len(batches)} real "
          f"chest X-rays from {data_dir}")
    print(f"size: {float_bytes / 2**20:.2f} MiB float -> {size.total_bytes / 2**20:.2f} MiB "
          f"({float_bytes / size.total_bytes:.2f}x smaller; the vision tower and lm_head stay float)")
    print(f"next-token agreement with the float model: {agree.float().mean():.3f} over {agree.numel()} positions; "
          f"mean KL(float || int{args.bits}) = {kl.mean():.4f} nats")
    print(f"saved to {out}; reloaded with mq.load (per-layer bits: mq.layer_table(model), `medquant info {out}`)")
    if args.model:  # a real model can answer: show the quantized model's report for the first X-ray
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(args.model)
        with torch.no_grad():
            ids = model.generate(**batches[0], max_new_tokens=60, do_sample=False)
        print("int4 answer:", proc.decode(ids[0, batches[0]["input_ids"].shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()
