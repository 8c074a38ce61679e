"""The directory a training command writes to: checked before any work, created only after the inputs pass.

A run that fails on its output path should fail at once, not after minutes of loading a model,
and a run refused for any reason must not leave an empty directory behind. So every command calls
:func:`check_output_dir` first (it creates nothing) and makes the directory itself only when its
data, options and model have been accepted, just before the first file is written.

The check: the path is a directory or does not exist yet, and the nearest directory that does
exist (the path itself, or the parent it would be created in) is writable by this process. It
uses ``os.access``, which also says no on a read-only file system (and yes for root, who may write
anyway).
"""

from __future__ import annotations

import os
from pathlib import Path

from steer.errors import InvalidInput


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


def check_output_dir(path: str | os.PathLike, field: str = "output", *, renamed_into_place: bool = False) -> Path:
    """``path`` as a Path if a run can write its files there; else InvalidInput naming ``field``. Creates nothing.

    ``renamed_into_place``: the directory is written as a temporary sibling and renamed to ``path``
    (an atomic export), so its parent must be writable, not the directory itself."""
    path = Path(path)
    flag = "--" + field.replace("_", "-")
    try:
        if path.is_symlink() and not path.exists():
            raise InvalidInput(field, f"{path} is a symbolic link to nothing "
                                      f"({os.readlink(path)}); remove it or choose another {flag}")
        if path.exists() and not path.is_dir():
            raise InvalidInput(field, f"{path} exists and is not a directory; choose a directory for {flag}")
        existing = path.absolute().parent if renamed_into_place else path.absolute()
        while not existing.exists():  # the directory that `mkdir -p` would create it in
            existing = existing.parent
    except OSError as e:  # e.g. a parent we may not even look into
        raise InvalidInput(field, f"{path} cannot be used: {e.strerror or e}; choose another {flag}") from None
    if not existing.is_dir():
        raise InvalidInput(field,
                           f"{path} cannot be created: {existing} is a file, not a directory; choose another {flag}")
    if not _writable(existing):
        what = "is not writable" if existing == path.absolute() else f"cannot be created: {existing} is not writable"
        raise InvalidInput(field, f"{path} {what} (read-only, or owned by another "
                                  f"user); fix its permissions or choose another {flag}")
    return path
