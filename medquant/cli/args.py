"""Argument types that refuse bad values while parsing, before any work: argparse reports them in one line and
exits with code 2."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

#: ``--trust-remote-code`` of the command being run (:func:`remote_code_decision`), read by the loaders it calls
_TRUST_REMOTE_CODE: ContextVar[bool] = ContextVar("medquant_cli_trust_remote_code", default=False)


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {v}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def sequence_length(text: str) -> int:
    """A calibration sequence length: an integer >= 2 (a sequence of one token has no next token to predict)."""
    return _int_at_least(text, 2, "an integer >= 2 (tokens per calibration sequence)")


def text_length(text: str) -> int:
    """Tokens per text for a perplexity: an integer >= 2 (a text cut to one token has no next token to predict)."""
    return _int_at_least(text, 2, "an integer >= 2 (tokens per text: one token has no next token to predict)")


def metric_weights(text: str) -> list[float]:
    """``--weights`` of ``medquant score``: five comma-separated finite numbers >= 0, not all zero, one per
    complexity metric (:data:`medquant.complexity.METRIC_NAMES` order)."""
    names = "entropy, edge_density, intensity_std, fractal_dimension, lbp_entropy"
    expected = f"5 comma-separated numbers >= 0, not all zero ({names})"
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if len(values) != 5:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {len(values)} values: {text!r}")
    bad = [p for p, v in zip(parts, values) if not math.isfinite(v) or v < 0]
    if bad:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {', '.join(bad)} in {text!r}")
    if not any(values):
        raise argparse.ArgumentTypeError(f"expected {expected}, got all zero: {text!r}")
    return values


def fraction(text: str) -> float:
    """A fraction in [0, 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {v}")
    return v


def unit_interval(text: str) -> float:
    """A number in [0, 1] (``nan`` refused), e.g. ``--spread``."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (``inf`` and ``nan`` refused), e.g. a learning rate."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def bit_width(text: str) -> int:
    """A quantization bit-width 1..8."""
    v = positive_int(text)
    if v > 8:
        raise argparse.ArgumentTypeError(f"expected a bit-width 1..8, got {v}")
    return v


def seed_value(text: str) -> int:
    """A ``--seed``: an integer torch can seed a generator with, ``-2**63 <= seed < 2**64`` (``argparse`` type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -2**63 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [-2**63, 2**64) (what torch seeds with), got {text}")
    return value


def compute_device(text: str) -> str:
    """A torch device that exists on this machine and holds data (``cpu``, ``cuda``, ``cuda:1``, ``mps``...):
    a string torch cannot parse, ``meta``, or a device this machine lacks (``cuda`` without a GPU, ``cuda:3`` with
    two) is refused. Returned as torch spells it (``cuda:0``)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError("meta holds no data: expected a compute device such as cpu, cuda or cuda:1")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError):
        seen = f" ({torch.cuda.device_count()} CUDA device(s) visible)" if device.type == "cuda" else ""
        raise argparse.ArgumentTypeError(f"{text}: no such device on this machine{seen}") from None
    return str(device)


def existing_folder(text: str) -> str:
    """A folder that exists (named as missing otherwise, not as a malformed hub repository id)."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a folder")
    return text


def new_or_empty_folder(text: str) -> str:
    """A folder to write into: one that does not exist yet, or an empty one (never files overwritten)."""
    p = Path(text)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise argparse.ArgumentTypeError(f"{text} exists and is not an empty folder: give a new or empty folder")
    return text


def output_is_input_message(out: str, model: str, flag: str) -> str | None:
    """The error for an output folder that is the model folder itself (the same folder however it is spelt: a
    relative path, ``..`` components, a symbolic link), ``None`` otherwise. Saving there would replace the source
    model, which the command reads from, with its compressed copy."""
    if os.path.realpath(out) != os.path.realpath(model):
        return None
    return (f"{flag}: {out} is the model folder {model}; saving there would replace the source model with its "
            "compressed copy: give another folder")


def output_folder_message(out: str, flag: str) -> str | None:
    """The error for an output path that cannot become the output folder, ``None`` otherwise: a path that exists and
    is not a folder, or a path beneath a file (:func:`medquant.io.atomic.output_folder_problem`), after ``flag``. The
    save would refuse either only after all the work (``medquant quantize`` / ``pipeline`` check it with their
    arguments, ``demo`` its ``--save`` before training)."""
    from ..io.atomic import output_folder_problem

    problem = output_folder_problem(out, "the model")
    return None if problem is None else f"{flag}: {problem}"


def config_object(config: Path) -> dict:
    """The JSON object of the ``config.json`` file ``config``; a file that cannot be read, is not UTF-8 JSON, or is
    not an object is a one-line ``SystemExit`` naming it and what is expected (a transformers config)."""
    import json

    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SystemExit(f"{config}: not a valid JSON file ({e}); expected a transformers config (a JSON object)"
                         ) from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"{config}: expected a JSON object (a transformers config), got a JSON "
                         f"{type(cfg).__name__}")
    return cfg


def existing_path(text: str) -> str:
    """A file or folder that exists (``--calib-images``: a folder, an index CSV, an ``.npz`` or one image)."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def existing_file(text: str) -> str:
    """A file that exists (named as missing otherwise)."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a file")
    return text


def utf8_text(path: str, flag: str) -> str:
    """The text of the file ``path`` given to the option ``flag``, read as UTF-8 (a leading byte order mark, as
    Windows editors write, is not part of the text); another encoding is a one-line ``SystemExit`` naming the
    option, the file and the first byte that is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SystemExit(f"{flag}: {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start}): save it as UTF-8") from None


def hf_config_file(path: str, trust_remote_code: bool | None = None) -> None:
    """Refuse, in one line, a model folder without ``config.json`` (``SystemExit`` naming the folder): transformers
    would report it as a config without a ``model_type`` key. A folder whose loading would run its own Python code
    is refused too unless it is trusted (:func:`refuse_remote_code`).

    Args:
        path: the model folder.
        trust_remote_code: whether the folder's own code may run; ``None``: the running command's
            ``--trust-remote-code`` (:func:`trusts_remote_code`).

    Raises:
        SystemExit: no ``config.json``; or its code is not trusted.
    """
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"{path}: no config.json: not a Hugging Face model folder (expected config.json and the "
                         "weights, as save_pretrained writes them)")
    refuse_remote_code(path, trust_remote_code)


@contextlib.contextmanager
def remote_code_decision(trusted: bool) -> Iterator[None]:
    """Within the block, the loaders called without an explicit ``trust_remote_code`` take ``trusted`` (the running
    command's ``--trust-remote-code``: :func:`medquant.cli.main` opens one around each command).

    Args:
        trusted: whether the command was given ``--trust-remote-code``.

    Returns:
        A context manager (nothing is yielded).
    """
    token = _TRUST_REMOTE_CODE.set(bool(trusted))
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


def trusts_remote_code(given: bool | None = None) -> bool:
    """Whether a folder's own Python code may run: ``given`` when it is not ``None``, else the running command's
    ``--trust-remote-code`` (:func:`remote_code_decision`; ``False`` outside a command).

    Args:
        given: an explicit decision, or ``None``.

    Returns:
        The decision.
    """
    return _TRUST_REMOTE_CODE.get() if given is None else bool(given)


def refuse_remote_code(path: str, trust_remote_code: bool | None = None) -> None:
    """Refuse, in one line and before any of its code runs, a Hugging Face folder whose loading would run the
    Python code it ships (its ``config.json`` / ``tokenizer_config.json`` ``auto_map`` names modules for a model or
    tokenizer transformers does not provide: :func:`medquant.io.remote_code_files`), unless it is trusted.
    Running a folder's code is the user's decision: transformers would otherwise ask on the terminal (or fail
    with a multi-line error when there is none).

    Args:
        path: the folder.
        trust_remote_code: whether its code may run; ``None``: the running command's ``--trust-remote-code``.

    Raises:
        SystemExit: naming the folder and its code files, and ``--trust-remote-code``.
    """
    if trusts_remote_code(trust_remote_code):
        return
    from ..io import remote_code_refusal

    message = remote_code_refusal(path, "--trust-remote-code")
    if message is not None:
        raise SystemExit(message)


def add_trust_remote_code_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--trust-remote-code`` (off by default) to the parser of a command that loads Hugging Face folders.

    Args:
        parser: the command's parser.
    """
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code a model folder ships to load it (config.json / "
                             "tokenizer_config.json auto_map: configuration_*.py, modeling_*.py...; CheXagent, "
                             "RadFM, MiniCPM-V...): only for a folder you trust. Default: such a folder is refused "
                             "before any of its code runs")


def role_or_name(text: str) -> str:
    """A ``--skip`` pattern: a role (``@vision``, ``@projector``, ``@language``, ``@head``), ``re:<regex>`` or an
    exact module name; an unknown role is refused while parsing."""
    roles = ("@vision", "@projector", "@language", "@head")
    if text.startswith("@") and text not in roles:
        raise argparse.ArgumentTypeError(f"unknown role {text!r}; accepted: {', '.join(roles)}")
    return text
