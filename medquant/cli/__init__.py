"""The ``medquant`` console command: the library's verbs (``demo``, ``score``, ``prune``, ``pipeline``,
``quantize``, ``info``, ``eval``, ``verify``, ``upgrade``, ``export``, ``compile-decoder``, ``generate``).

Each subcommand lives in its own module with a ``register(subparsers)`` function that adds its parser and sets
``func``; add the module name to ``SUBCOMMANDS``. The commands that load Hugging Face model folders
(``REMOTE_CODE_COMMANDS``) take ``--trust-remote-code``: a folder that ships its own model or tokenizer code is
refused in one line without it (:func:`medquant.cli.args.refuse_remote_code`), and the loaders the command calls
read it (:func:`medquant.cli.args.trusts_remote_code`). The experiments are not subcommands: they are benchmarks,
run from the repository root as ``python -m benchmarks.<name>`` (``complexity_adaptive``, ``fairquant``,
``fairquant_allocate``, ``fairquant_baq``, ``qlora_radiology``, ``qlora_reports``...)."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ["demo", "complexity", "prune", "pipeline", "checkpoint", "quantize", "info", "evaluate", "export",
               "decode"]
#: the commands that load Hugging Face model folders: each takes ``--trust-remote-code`` (a folder that ships its own
#: model / tokenizer code is refused without it)
REMOTE_CODE_COMMANDS = ("prune", "pipeline", "quantize", "info", "eval", "export", "compile-decoder", "generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medquant",
        description="Compress medical vision and vision-language models: quantize, allocate bits fairly, "
                    "prune, distil, fine-tune with QLoRA, and measure what it costs.",
        epilog="Benchmarks and experiments run from a source checkout: python -m benchmarks.<name> --help.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"medquant {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    from .args import add_trust_remote_code_flag

    for name in REMOTE_CODE_COMMANDS:
        add_trust_remote_code_flag(sub.choices[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "check", None):  # checks across arguments, still before any work (exit code 2)
        args.check(args)
    from .args import remote_code_decision

    try:
        # the loaders a command calls read its --trust-remote-code (an explicit trust_remote_code= wins)
        with remote_code_decision(getattr(args, "trust_remote_code", False)):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        raise
    except SystemExit as e:  # a command's own message (raise SystemExit("...")): one line, exit code 2
        if not isinstance(e.code, str) or args.debug:
            raise
        print(f"medquant {args.command}: error: {' '.join(e.code.split())}", file=sys.stderr)
        return 2
    except Exception as e:  # one line, exit code 2; --debug for the traceback
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"medquant {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
