"""Helpers of the command-line tests whose arguments are refused before any work: the exit code and standard error
of a command, and loaders that fail the test if the command reaches them."""
from __future__ import annotations

from medquant.cli import main


def exit_code_and_error(argv, capsys) -> tuple[int, str]:
    """``main(argv)``'s exit code (argparse's own errors raise ``SystemExit``) and what it wrote to stderr."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def refuse_loading(monkeypatch, *where) -> None:
    """Make each ``(module, name)`` of ``where`` (a command's model loaders) fail the test when called."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    for module, name in where:
        monkeypatch.setattr(module, name, refuse)
