"""File helpers shared by the checkpoint and video writers."""
from __future__ import annotations

import os


def give_default_mode(path: str | os.PathLike) -> None:
    """mkstemp creates 0600 files; give a finished temp file the mode open() would have (0666 & ~umask)."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
