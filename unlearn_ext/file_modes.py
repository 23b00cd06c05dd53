"""Files the library writes get the permissions of any other file of the process.

safetensors creates its files with mode 0600 whatever the umask, so a model or checkpoint
written by one user could not be read by a colleague or a serving process that shares the
directory. ``follow_umask`` gives files ``0666 & ~umask`` and directories ``0777 & ~umask``,
what ``open``/``mkdir`` would have made.
"""
from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Set the mode of ``path`` (and, for a directory, of everything under it)."""
    mask = current_umask()
    path = Path(path)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)
