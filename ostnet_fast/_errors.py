"""One-line error messages: the CLIs say what went wrong in one line, not a library's paragraph."""
from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ('' when it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
