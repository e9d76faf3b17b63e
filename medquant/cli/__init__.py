"""The ``medquant`` console command. Each subcommand lives in its own module with a ``register(subparsers)``
function that adds its parser and sets ``func``; add the module name to ``SUBCOMMANDS``."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ["demo", "complexity", "adaptive", "fairquant", "prune", "pipeline", "qlora"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medquant",
        description="Compress medical vision and vision-language models: quantize, allocate bits fairly, "
                    "prune, distil, fine-tune with QLoRA, and measure what it costs.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"medquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
