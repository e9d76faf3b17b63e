"""Command-line values the benchmarks share."""
from __future__ import annotations


def shapes(text: str | None, default: list[tuple[int, int]], flag: str = "--shapes") -> list[tuple[int, int]]:
    """Layer shapes from a comma list of ``NxK`` (output x input features), e.g. ``2048x2048,5632x2048``; ``default``
    when ``text`` is empty or None. A value that is not such a list exits with a message naming it."""
    if not text:
        return default
    try:
        out = [(int(a), int(b)) for a, b in (s.lower().split("x") for s in text.split(","))]
    except ValueError:
        out = []
    if not out or min(min(s) for s in out) < 1:
        raise SystemExit(f"{flag} {text!r}: expected a comma list of NxK with N, K >= 1, e.g. 2048x2048,5632x2048")
    return out
