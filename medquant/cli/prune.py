"""``medquant prune``: structurally prune a Hugging Face model folder (heads, FFN neurons, whole blocks) and save it.

Example::

    medquant prune path/to/model --out pruned/ --heads 0.3 --ffn 0.3 --importance activation
    medquant prune path/to/smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --out pruned/ --layer-select

Calibration text (for ``activation`` / ``taylor`` importance, ``--layer-select`` and ``--drop-blocks``):
``--calib-text FILE`` (one sample per line) or, by default, the IU X-ray train reports from ``$MEDQUANT_DATA_DIR``;
with ``--calib-images PATH`` each text goes with an image through the folder's processor
(:func:`image_calibration_batches`), so a VLM's vision tower is scored on its own inputs (``--scope vision`` /
``all``; text alone never runs it).
Pruning runs in float32; the result is saved in the dtypes the folder stored (a bfloat16 folder stays bfloat16: the
kept weights are exactly the stored ones) with :func:`medquant.prune.save_pruned` (reload with
:func:`medquant.prune.load_pruned`), plus a parameter table (bytes as stored, before and after); ``--layer-select`` also writes ``block_influence.png`` and per-layer ratios.
"""
from __future__ import annotations

import json
import weakref
from pathlib import Path

from .args import (
    existing_folder,
    existing_path,
    fraction,
    hf_config_file,
    non_negative_int,
    output_is_input_message,
    positive_int,
    refuse_remote_code,
    trusts_remote_code,
    unit_interval,
    utf8_text,
)

#: ``--spread`` when not given (:func:`medquant.prune.allocate_ratios`' default)
DEFAULT_SPREAD = 0.5
CALIB_SPLIT_HELP = ("the split of --calib-images to calibrate on (an index CSV's split column, an .npz's splits; "
                    "default: train when the images have splits, so calibration stays off the evaluation images; "
                    "'all': every image)")


def _refuse_medquant_folder(path: str, gguf_file: str | None, command: str) -> None:
    """Refuse, in one line, a folder ``from_pretrained`` would load wrongly or that holds no float model: a
    ``medquant.save`` checkpoint (``medquant.json``: written by ``medquant pipeline`` / ``prune``; its quantized
    or pruned tensors do not match the architecture's, so transformers would random-initialise the missing
    weights), a folder quantized by medquant (``medquant quantize`` output: pruning, training and quantizing
    start from a float model) or by another library (any other ``quantization_config`` in its ``config.json``:
    bitsandbytes, GPTQ, AWQ, FP8, compressed-tensors; its files hold that method's codes, named in the message)."""
    from ..io import HF_CONFIG_NAME, META_NAME

    if gguf_file:
        return
    folder = Path(path)
    meta_file, cfg_file = folder / META_NAME, folder / HF_CONFIG_NAME
    if meta_file.is_file():
        try:
            n_quant = len(json.loads(meta_file.read_text(encoding="utf-8")).get("modules") or {})
        except (OSError, ValueError, AttributeError):
            n_quant = 0
        state = f"quantized ({n_quant} layers) " if n_quant else ""
        raise SystemExit(f"{path} is a {state}medquant checkpoint ({META_NAME}, written by medquant pipeline / "
                         f"prune / medquant.save), not a Hugging Face folder: `medquant {command}` would load it "
                         "with from_pretrained, which does not read its pruned or quantized tensors; give the float "
                         "source folder, or load it in Python with medquant.pipeline.load_compressed")
    try:
        qc = json.loads(cfg_file.read_text(encoding="utf-8")).get("quantization_config") if cfg_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        qc = None
    if qc is None:
        return
    why = ("quantizes a float model (quantizing quantized weights again compounds their rounding error)"
           if command == "quantize" else "needs a float model (pruning and training work on float weights)")
    if isinstance(qc, dict) and qc.get("quant_method") == "medquant":
        raise SystemExit(f"{path} is already quantized by medquant (its config.json has a medquant "
                         f"quantization_config): `medquant {command}` {why}; give the float source folder it was "
                         "quantized from")
    # another library's (bitsandbytes, GPTQ, AWQ, FP8, compressed-tensors): its files hold that method's codes and
    # scales (bitsandbytes' int8 codes even under the float weight's name and shape), not float weights
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    raise SystemExit(f"{path} is already quantized ({method or 'an unknown method'}: its config.json has a "
                     f"quantization_config), so its weight files hold that method's codes and scales, not float "
                     f"weights: `medquant {command}` {why}; give the float folder it was made from")


def _load(path: str, gguf_file: str | None, *, keep_dtype: bool = False, command: str = "prune",
          trust_remote_code: bool | None = None):
    """The model of a Hugging Face folder (or of a GGUF file in it) in eval mode, and its tokenizer (``None`` when
    there is none; ``pad_token`` = ``eos_token`` when unset). The model is cast to float32 (pruning importance and
    training accumulate statistics and gradients in it) unless ``keep_dtype``: then the stored dtypes are kept, as
    ``from_pretrained`` loads them (``medquant quantize``, like :func:`medquant.quantize_` on such a model).
    A medquant checkpoint or a folder quantized by medquant is refused (``SystemExit`` naming ``command``), and so is
    a folder without ``config.json`` (without ``gguf_file``) and, unless ``trust_remote_code`` (``None``: the
    command's ``--trust-remote-code``), a folder whose loading runs its own code (before any of it runs); after
    loading, a folder that lacks some of the model's tensors (``from_pretrained``'s ``missing_keys``, which it only
    warns about while drawing them at random)."""
    import os

    trust = trusts_remote_code(trust_remote_code)
    _refuse_medquant_folder(path, gguf_file, command)
    if not gguf_file:
        hf_config_file(path, trust)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    # never None: transformers would ask on the terminal; the folder was checked above
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust, **kw)
    model, info = model_class(cfg).from_pretrained(path, trust_remote_code=trust, output_loading_info=True, **kw)
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers only warns: the command would compress weights drawn at random
        raise SystemExit(f"{path} lacks {len(missing)} tensor(s) of {type(model).__name__} ("
                         f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): from_pretrained initialised "
                         f"them at random, and `medquant {command}` would compress those random weights; give a "
                         "folder that holds every weight of its architecture")
    model = model.eval()
    if not keep_dtype:
        model = model.float()
    return model, folder_tokenizer(path, trust_remote_code=trust, **kw)


def model_class(cfg):
    """The transformers class that builds a folder's model: the one its config names (``architectures[0]``), else
    ``AutoModelForCausalLM`` for a ``...ForCausalLM`` name and ``AutoModel`` otherwise. A class that is the folder's
    own code (loaded with ``trust_remote_code``: the config's ``auto_map`` names it) is built through the Auto class
    that ``auto_map`` lists it under (CheXagent / MiniCPM-V: ``AutoModel``, ``AutoModelForCausalLM``...), which then
    picks it from the folder; call its ``from_pretrained`` / ``from_config`` with ``trust_remote_code=True``."""
    import transformers

    arch = (cfg.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = _auto_map_class(cfg, arch)
    if cls is None:
        cls = transformers.AutoModelForCausalLM if "ForCausalLM" in str(arch) else transformers.AutoModel
    return cls


def _auto_map_class(cfg, arch: str | None):
    """The transformers Auto class under which the config's ``auto_map`` lists the folder's own class ``arch``
    (else its ``AutoModelForCausalLM`` / ``AutoModel`` entry for a ``...ForCausalLM`` name / another name), ``None``
    when the config has no such entry (or this transformers lacks that Auto class)."""
    import transformers

    auto_map = getattr(cfg, "auto_map", None)
    if not isinstance(auto_map, dict):
        return None
    models = {k: v for k, v in auto_map.items()
              if k.startswith("AutoModel") and hasattr(getattr(transformers, k, None), "from_config")}
    for key, ref in models.items():
        if arch and isinstance(ref, str) and ref.rsplit(".", 1)[-1] == arch:
            return getattr(transformers, key)
    for key in (("AutoModelForCausalLM", "AutoModel") if "ForCausalLM" in str(arch) else ("AutoModel",)):
        if key in models:
            return getattr(transformers, key)
    return None


def folder_tokenizer(path: str, *, trust_remote_code: bool | None = None, **kw):
    """The folder's tokenizer (``kw``: e.g. ``gguf_file``), ``None`` when there is none; ``pad_token`` =
    ``eos_token`` when unset (for padded calibration batches; :func:`save_preprocessing` saves the folder's).
    ``trust_remote_code`` (``None``: the command's ``--trust-remote-code``) lets transformers run the folder's own
    code (a custom tokenizer, or the config it reads to find the tokenizer)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trusts_remote_code(trust_remote_code), **kw)
    except (OSError, ValueError):
        tok = None
    if tok is None:
        return None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    # the calibration batches change it (pad_token, the backend's padding): save_preprocessing saves the folder's
    _SOURCES[tok] = (path, trusts_remote_code(trust_remote_code), kw)
    return tok


# tokenizer -> how folder_tokenizer loaded it (folder, trust_remote_code, keyword arguments)
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def folder_processor(path: str, *, trust_remote_code: bool | None = None):
    """The folder's processor (``AutoProcessor``: a VLM's image processor with its tokenizer and chat template, an
    image model's image processor), which the command saves into its output beside the model so that
    ``AutoProcessor.from_pretrained(OUT)`` works as on the source; ``None`` for a folder without a processor file
    (``processor_config.json`` / ``preprocessor_config.json`` / ``video_preprocessor_config.json``: a text model,
    whose tokenizer is saved) or whose processor cannot be loaded (a ``UserWarning`` says so; the tokenizer is
    saved). ``trust_remote_code`` as :func:`folder_tokenizer`."""
    import warnings

    folder = Path(path)
    if not folder.is_dir() or not any((folder / f).is_file() for f in _PROCESSOR_FILES):
        return None
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trusts_remote_code(trust_remote_code))
    except Exception as e:  # noqa: BLE001 - any loader failure: the output keeps the tokenizer files, said once
        first = (str(e).splitlines() or [""])[0]
        warnings.warn(f"{path}: its processor could not be loaded ({type(e).__name__}: {first}); the output "
                      "folder gets the tokenizer files only: copy the processor files over to use it with "
                      "AutoProcessor", UserWarning, stacklevel=2)
        return None


def save_preprocessing(folder: Path, tok, processor) -> None:
    """Save the tokenizer ``tok`` and the ``processor`` (:func:`folder_processor`; either may be ``None``) into
    ``folder``: the processor's own files (its tokenizer included, as the source folder has it), and ``tok`` when
    the processor holds no tokenizer. A tokenizer :func:`folder_tokenizer` loaded is saved as its folder holds it (a
    fresh load): the ``pad_token`` it set and the padding the calibration batches turned on stay out."""
    if tok is not None and getattr(processor, "tokenizer", None) is None:
        source = _SOURCES.get(tok)
        if source is not None:
            from transformers import AutoTokenizer

            path, trust, kw = source
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust, **kw)
        tok.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)


def _processor_code(folder: str) -> str:
    """The Python files named by the ``auto_map`` entries of the folder's processor classes (``AutoProcessor``,
    ``AutoImageProcessor``, ``AutoFeatureExtractor``, ``AutoVideoProcessor``; at the top of the JSON files
    ``AutoProcessor`` reads, or in one of their sections), with the file naming them (``processing_x.py named by
    the auto_map of its processor_config.json``; ``x.py (from owner/repo)`` for code another repository holds);
    ``""`` when none are named. Only JSON is read."""
    keys = ("AutoProcessor", "AutoImageProcessor", "AutoFeatureExtractor", "AutoVideoProcessor")
    found = []
    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                 "tokenizer_config.json", "config.json"):
        try:
            data = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        if not isinstance(data, dict):
            continue
        maps = [data.get("auto_map"), *(v.get("auto_map") for v in data.values() if isinstance(v, dict))]
        refs = [r for m in maps if isinstance(m, dict) for k in keys
                for r in (m.get(k) if isinstance(m.get(k), list) else [m.get(k)]) if isinstance(r, str)]
        files = []
        for ref in refs:
            repo, _, module = ref.rpartition("--")
            file = f"{module.rsplit('.', 1)[0]}.py" + (f" (from {repo})" if repo else "")
            if file not in files:
                files.append(file)
        if files:
            found.append(f"{', '.join(files)} named by the auto_map of its {name}")
    return "; ".join(found)


def _places_the_image_itself(processor, tok, image_token, batch, words: str, image) -> bool:
    """Whether a processor without a chat template puts an image's tokens before the text itself (BLIP-2,
    InstructBLIP: ``num_query_tokens`` image tokens prepended to each text given with an image): the text alone,
    with the image, already gives image tokens, and fewer than ``batch`` (the text after an image token, which such
    a processor keeps as one token too many). A processor that expands the image token of the text (LLaVA) gives
    none for the text alone, or fails on it; one that reads both forms alike (PaliGemma) gives as many."""
    token_id = tok.convert_tokens_to_ids(str(image_token))
    if not isinstance(token_id, int) or token_id == getattr(tok, "unk_token_id", None):
        return False
    try:
        alone = processor(text=[words], images=[image], return_tensors="pt")
    except (ValueError, TypeError, RuntimeError):
        return False
    count = int((alone["input_ids"] == token_id).sum())
    return 0 < count < int((batch["input_ids"] == token_id).sum())


def calibration_split(images_path: str, requested: str | None) -> str | None:
    """The split of ``images_path`` that ``--calib-images`` calibrates on (``--calib-split``), so that calibration
    stays off the images a model is evaluated on.

    ``requested`` ``None`` (the default): ``"train"`` when the source has splits (:func:`medquant.data.image_splits`:
    an index CSV's ``split`` column, an ``.npz``'s splits) and one of them is ``train``; every image of a source
    without splits. ``"all"``: every image. Another name: that split, which the source must have.

    Args:
        images_path: ``--calib-images``.
        requested: ``--calib-split``.

    Returns:
        The split to load (``None``: every image).

    Raises:
        SystemExit: a source with splits but no ``train`` split and no ``--calib-split``; a requested split the
            source does not have (naming its splits, or saying it has none); a source that cannot be read.
    """
    from ..data import image_splits

    try:
        splits = image_splits(images_path)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--calib-images: {images_path}: {e}") from None
    if requested == "all":
        return None
    if requested is not None:
        if requested not in splits:
            have = f"its splits are {', '.join(splits)}" if splits else "it has no splits (every image is read)"
            raise SystemExit(f"--calib-split {requested}: {images_path} has no split {requested!r}; {have} "
                             "(--calib-split all reads every image)")
        return requested
    if not splits:
        return None
    if "train" in splits:
        return "train"
    raise SystemExit(f"--calib-images: {images_path} holds the splits {', '.join(splits)} and no 'train' split: name "
                     "the one to calibrate on with --calib-split NAME, away from the images the model is evaluated "
                     "on (--calib-split all reads every image)")


def image_calibration_batches(folder: str, images_path: str, texts: list[str], samples: int, seq_len: int,
                              trust_remote_code: bool | None = None, split: str | None = None) -> list[dict]:
    """Calibration batches for a vision-language model: one image with one text each, through the folder's own
    processor (``AutoProcessor``), so the batches run the vision tower as the model's users' inputs do
    (``--calib-images`` of ``medquant quantize`` and ``medquant prune``).

    Image ``i`` of ``images_path`` (a folder, an index CSV, an ``.npz`` or one image file:
    :func:`medquant.data.load_images`; grayscale arrays are given as three equal channels; pixels are brought to
    uint8 as the processor reads them: 16-bit ones ``round(255 x / 65535)``, a DICOM file's (float64 ``x`` in
    [0, 1], its window applied) ``round(255 x)``) goes with text ``i`` of
    ``texts`` (reused in order when there are fewer), cut to its first ``seq_len`` tokens (the image's tokens come
    on top). The text is placed as one user turn holding the image and the text in the processor's chat template
    (``apply_chat_template``), else after the processor's ``image_token`` and a line break - or alone when the
    processor puts the image's tokens before the text itself (BLIP-2, InstructBLIP: the image token of the text
    would be one too many);
    ``min(samples, number of images)`` batches of one sample each (the processor's output, as ``model(**batch)``
    takes it). Images are read from the split :func:`calibration_split` picks (the ``train`` split of a source
    with splits, unless ``split`` names another or ``"all"``), in their order there.

    Args:
        folder: the model folder (its processor files: ``processor_config.json`` / ``preprocessor_config.json``).
        images_path: ``--calib-images``.
        texts: the calibration texts (paragraphs / lines), at least one.
        samples: at most this many batches.
        seq_len: tokens of text per sample (at least 1).
        trust_remote_code: let a processor of the folder's own code run (``None``: the command's flag).
        split: ``--calib-split`` (:func:`calibration_split`).

    Returns:
        The batches (dicts of tensors).

    Raises:
        SystemExit: a folder that ships its own code (for its model, tokenizer or processor) without
            ``trust_remote_code`` (naming ``--trust-remote-code`` and the code files); naming ``--calib-images``: a
            folder without a processor that takes images, or whose processor takes no text (an image model's),
            images that cannot be read, an image without a fixed white level (not uint8 / uint16 / DICOM), a processor with
            neither a chat template nor an image token, or one that fails on a sample (the message names the
            image); no text to pair with the images.
    """
    import numpy as np
    import torch

    from ..data import load_images

    trust = trusts_remote_code(trust_remote_code)
    refuse_remote_code(folder, trust)  # read before the model: a folder's own code is refused first all the same
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust)
    except (OSError, ValueError, KeyError, TypeError) as e:
        code = _processor_code(folder) if not trust and "custom code" in str(e) else None
        if code:  # transformers needs the processor's own code (the model's is checked above)
            raise SystemExit(f"--calib-images: {folder} ships its own Python code for its processor ({code}), "
                             "which transformers does not provide: loading it would run that code; pass "
                             "--trust-remote-code if you trust the folder and its code") from None
        raise SystemExit(f"--calib-images needs the model folder's processor (AutoProcessor: images and text into "
                         f"the model's inputs); {folder}: {str(e).splitlines()[0]}") from None
    if getattr(processor, "image_processor", None) is None and getattr(processor, "tokenizer", None) is None \
            and hasattr(processor, "preprocess"):  # an image processor itself: an image model's folder
        raise SystemExit(f"--calib-images pairs each image with a text through a vision-language model's processor; "
                         f"the processor of {folder} ({type(processor).__name__}) takes no text (an image model): "
                         "calibrate it in Python on its image processor's pixel_values batches")
    if getattr(processor, "image_processor", None) is None:
        raise SystemExit(f"--calib-images: the processor of {folder} ({type(processor).__name__}) takes no images; "
                         "calibrate this model with text alone")
    tok = processor.tokenizer
    template = getattr(processor, "chat_template", None)
    image_token = getattr(processor, "image_token", None)
    if not template and not image_token:
        raise SystemExit(f"--calib-images: the processor of {folder} has neither a chat template nor an image "
                         "token, so the place of the image in the text is unknown")
    if not texts:
        raise SystemExit("--calib-images: no calibration text to pair with the images")
    chosen = calibration_split(images_path, split)
    try:
        images, names = load_images(images_path, split=chosen, limit=samples)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--calib-images: {images_path}: {e}") from None
    from_files = not str(images_path).lower().endswith(".npz")  # float64 from an image file: a DICOM file's
    batches = []
    self_placing = None  # without a template: whether the processor puts the image's tokens before the text itself
    for i, (image, name) in enumerate(zip(images, names)):
        image = _eight_bit(np.asarray(image), name, from_files)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        ids = tok(texts[i % len(texts)], add_special_tokens=False)["input_ids"][:seq_len]
        words = tok.decode(ids)
        if template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        else:
            prompt = f"{image_token}\n{words}"
        # as processor.apply_chat_template(tokenize=True): a prompt that starts with the BOS gets no second one
        bos = getattr(tok, "bos_token", None)
        special = {"add_special_tokens": False} if bos is not None and prompt.startswith(bos) else {}
        try:
            batch = processor(text=[prompt], images=[image], return_tensors="pt", **special)
            if not template and self_placing is None:
                self_placing = _places_the_image_itself(processor, tok, image_token, batch, words, image)
            if self_placing:
                batch = processor(text=[words], images=[image], return_tensors="pt")
        except (ValueError, TypeError, RuntimeError) as e:
            raise SystemExit(f"--calib-images: the processor of {folder} failed on image {name}: "
                             f"{str(e).splitlines()[0]}") from None
        batches.append({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    if not batches:
        raise SystemExit(f"--calib-images: {images_path} holds no image")
    return batches


def _eight_bit(image, name, from_files: bool):
    """An image's pixels as uint8, the integers 0..255 a processor's ``do_rescale`` reads: uint8 as they are,
    uint16 (16-bit PNG / TIFF) by the white level 65535, ``round(255 x / 65535)``, a DICOM file (read as float64
    ``x`` in [0, 1], its window applied) as ``round(255 x)``; anything else (32-bit integer or floating-point
    TIFFs, arrays of an ``.npz`` that are not uint8 / uint16) has no fixed white level and is refused."""
    import numpy as np

    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return np.round(image.astype(np.float64) * (255 / 65535)).astype(np.uint8)
    if from_files and image.dtype == np.float64 and np.isfinite(image).all() and image.min() >= 0 \
            and image.max() <= 1:  # only DICOM files are read as float64 (in [0, 1])
        return np.round(image * 255).astype(np.uint8)
    raise SystemExit(f"--calib-images: image {name} holds {image.dtype} values, which have no fixed white level; "
                     "accepted: 8-bit (uint8) and 16-bit (uint16, scaled by 255 / 65535) PNG / JPEG / TIFF files and "
                     ".npz arrays, and DICOM files (their window applied): convert it to one of them (CT numbers "
                     "windowed first)")


def _reads_data(args) -> bool:
    """Whether the command reads calibration data: ``activation`` / ``taylor`` importance, or block influence
    (``--layer-select``, ``--drop-blocks``); ``magnitude`` importance alone reads none."""
    return args.importance != "magnitude" or bool(args.layer_select or args.drop_blocks)


def _calibration_texts(args) -> list[str] | None:
    """The calibration texts (read before the model is loaded: a file that is not UTF-8 is named with its option),
    ``None`` when nothing reads data (``magnitude`` importance without ``--layer-select`` / ``--drop-blocks``)."""
    if not _reads_data(args):
        return None
    if args.calib_text:
        texts = [t.strip() for t in utf8_text(args.calib_text, "--calib-text").splitlines() if t.strip()]
    else:
        from ..data.reports import load_iu_reports

        texts = [r.text for r in load_iu_reports(args.reports, split="train", require=("findings",))]
    texts = texts[: args.calib_samples]
    if not texts:
        raise SystemExit("no calibration text found")
    return texts


def _calibration(args, tok, texts: list[str] | None) -> list[dict] | None:
    if texts is None:
        return None
    if tok is None:
        raise SystemExit("calibration needs the model folder's tokenizer; none could be loaded")
    bs = 4
    return [dict(tok(texts[i:i + bs], return_tensors="pt", padding=True, truncation=True, max_length=args.max_length))
            for i in range(0, len(texts), bs)]


def run(args) -> int:
    from ..pipeline import restore_dtypes, save_with_files, stored_dtypes
    from ..prune import (
        StructuredPruner,
        allocate_ratios,
        block_influence,
        influence_table,
        least_influential,
        parameter_report,
        plot_influence,
    )

    out = Path(args.out)
    texts = _calibration_texts(args)
    images = None  # before the model: a folder without a processor is named before any loading
    if args.calib_images and texts is not None:
        # a folder refused whatever the data is named as such (a medquant checkpoint has no processor files)
        _refuse_medquant_folder(args.model, args.gguf_file, "prune")
        if not args.gguf_file:
            hf_config_file(args.model, args.trust_remote_code)
        images = image_calibration_batches(args.model, args.calib_images, texts, args.calib_samples,
                                           args.max_length, trust_remote_code=args.trust_remote_code,
                                           split=args.calib_split)
    model, tok = _load(args.model, args.gguf_file, keep_dtype=True, command="prune",
                       trust_remote_code=args.trust_remote_code)
    before = parameter_report(model)  # as stored
    stored = stored_dtypes(model)
    model = model.float()  # importance and block influence accumulate in float32
    calib = images if images is not None else _calibration(args, tok, texts)
    heads, ffn, drop = args.heads, args.ffn, []
    spread = DEFAULT_SPREAD if args.spread is None else args.spread
    extras: dict = {}
    scores = None
    if args.layer_select or args.drop_blocks:
        scores = block_influence(model, calib, scope=args.scope)
        if args.layer_select:
            heads = allocate_ratios(scores, args.heads, spread=spread)
            ffn = allocate_ratios(scores, args.ffn, spread=spread)
        if args.drop_blocks:
            drop = least_influential(scores, args.drop_blocks)
        print(influence_table(scores, ffn if isinstance(ffn, dict) else None))
        extras["block_influence"] = scores
    pruner = StructuredPruner(heads, ffn, importance=args.importance, gqa=args.gqa, scope=args.scope,
                              drop_blocks=drop)
    try:
        plan = pruner.prune(model, calib=calib)
    except ValueError as e:
        if not args.layer_select:
            raise
        raise SystemExit(f"{e} -- with --layer-select this is the ratio allocated to that block from the mean you "
                         f"gave (--heads {args.heads}, --ffn {args.ffn}, --spread {spread}: the least "
                         "influential blocks get up to (1 + spread) x the mean): lower --spread or the mean") from e
    restore_dtypes(model, stored)  # pruning only selects: the kept weights are exactly the stored ones
    after = parameter_report(model)

    processor = None if args.gguf_file else folder_processor(args.model, trust_remote_code=args.trust_remote_code)

    def write_files(folder: Path) -> None:  # into the checkpoint as part of its save (before its manifest)
        save_preprocessing(folder, tok, processor)
        if scores is not None:
            plot_influence(scores, folder / "block_influence.png")
        (folder / "prune_report.json").write_text(json.dumps({"before": before, "after": after,
                                                              "plan": plan.to_dict()}, indent=1))

    # every output is written only now that pruning succeeded, and inside the save (listed in its manifest)
    save_with_files(model, out, plan=plan, extras=extras, write_files=write_files)
    rows = [("params", "params"), ("non-embedding params", "non_embedding_params"), ("bytes", "bytes")]
    print("| | before | after | change |\n|---|---|---|---|")
    for label, key in rows:
        print(f"| {label} | {before[key]:,} | {after[key]:,} | {100 * (after[key] / before[key] - 1):+.1f}% |")
    print(f"saved to {out} (reload: medquant.prune.load_pruned({str(out)!r}); HF config exact: "
          f"{plan.hf_config_exact})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("prune", help="remove attention heads / FFN neurons / blocks from a HF model folder",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=existing_folder,
                   help="Hugging Face model folder (config.json + weights, or a GGUF file with --gguf-file)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside the model folder")
    p.add_argument("--heads", type=fraction, default=0.3, help="fraction of attention heads to remove (default 0.3)")
    p.add_argument("--ffn", type=fraction, default=0.3, help="fraction of FFN neurons to remove (default 0.3)")
    p.add_argument("--importance", choices=["magnitude", "taylor", "activation"], default="activation")
    p.add_argument("--gqa", choices=["query", "group"], default="query",
                   help="grouped-query attention: remove query heads inside every group, or whole groups")
    p.add_argument("--scope", choices=["language", "vision", "all"], default=None,
                   help="which blocks (default: the language model, or the tower of a vision encoder)")
    p.add_argument("--layer-select", action="store_true",
                   help="per-layer ratios from block influence (mean = --heads / --ffn)")
    p.add_argument("--spread", type=unit_interval, default=None,
                   help=f"with --layer-select: per-layer ratio spread in [0, 1], the least influential block gets up "
                        f"to (1 + spread) x the mean (default {DEFAULT_SPREAD})")
    p.add_argument("--drop-blocks", type=non_negative_int, default=0,
                   help="also drop this many least influential blocks")
    p.add_argument("--calib-text", default=None, help="text file, one calibration sample per line")
    p.add_argument("--reports", default=None, help="NLMCXR_reports.tgz (default: $MEDQUANT_DATA_DIR)")
    p.add_argument("--calib-images", type=existing_path, default=None, metavar="PATH",
                   help="images (a folder, an index CSV, an .npz or one file) each paired with a calibration text "
                        "through the folder's processor: a VLM's vision tower is then scored on its own inputs")
    p.add_argument("--calib-split", default=None, metavar="NAME", help=CALIB_SPLIT_HELP)
    p.add_argument("--calib-samples", type=positive_int, default=32)
    p.add_argument("--max-length", type=positive_int, default=128)
    p.set_defaults(func=run, check=lambda args: _check(args, p))


def _check(args, parser) -> None:
    """Before any work: the output folder must not be the model folder (saving there would replace the model the
    command reads with its pruned copy), and ``--spread`` needs ``--layer-select``."""
    same = output_is_input_message(args.out, args.model, "--out")
    if same:
        parser.error(same)
    if args.calib_split is not None and not args.calib_images:
        parser.error("--calib-split picks the split of --calib-images: give --calib-images too")
    if args.calib_images and not _reads_data(args):
        parser.error("--calib-images is read by --importance activation / taylor, --layer-select and --drop-blocks; "
                     "--importance magnitude alone reads no data")
    if args.spread is not None and not args.layer_select:  # it would do nothing: every block gets --heads / --ffn
        parser.error("--spread spreads the ratios of --layer-select over the blocks; without --layer-select every "
                     "block gets --heads / --ffn: add --layer-select or drop --spread")
