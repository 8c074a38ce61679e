"""Small file I/O helpers shared by every layer: files and directories that readers never see half
written, and JSON Lines reading whose errors name ``file:line``.

Writes go to a temporary sibling (named ``.tmp-<name>-...``) that is renamed over the target with
``os.replace`` on success and removed on any failure, so the target is either the old complete file
(or absent) or the new complete one. There is no ``fsync``: this guards against a killed process or
an exception half-way through a write, not against power loss. Files end up mode 0644 and
directories 0755 (``mkstemp``/``mkdtemp`` would leave them private), as results and caches are
meant to be shared.

Users: the model cache, mixtures, reward models, calibration statistics and eval reports in the
core; ``steer.training`` for adapters, exports, checkpoints, run outputs and its data files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from steer.errors import InvalidInput

TMP_PREFIX = ".tmp-"


# -- atomic writes --------------------------------------------------------------------------------


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (by any means: ``torch.save``, safetensors,
    ``savefig``); when the block ends without an exception it replaces ``path``, otherwise it is removed.

    The temporary name keeps ``path``'s suffix, so writers that pick a format by suffix still work.
    The parent directory must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`); returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`); returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_directory_write(final: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_dir)`` and move the result to ``final`` in one rename (replacing it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an adapter/model dir is meant to be shared
        if final.exists():
            old = final.with_name(f"{TMP_PREFIX}{final.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# -- JSON Lines -----------------------------------------------------------------------------------


class LineError(InvalidInput):
    """A line of a text file that is not UTF-8 or not JSON. ``field`` is ``"<file>:<line>"``; ``path``,
    ``lineno`` and ``cause`` (the ``UnicodeDecodeError`` / ``json.JSONDecodeError``) let a caller word
    its own message."""

    def __init__(self, path: Path, lineno: int, reason: str, cause: ValueError):
        super().__init__(f"{path}:{lineno}", reason)
        self.path, self.lineno, self.cause = path, lineno, cause


def utf8_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line (ending included); bytes that are not UTF-8 raise
    :class:`LineError`. ``OSError`` (say, a missing file) comes from the first ``next``.

    Lines are split on ``\\n`` bytes only (it never occurs inside a multi-byte UTF-8 character, and
    unlike ``str.splitlines`` this keeps U+2028 or U+0085 inside a JSON string on its line), so a bad
    byte is reported on its own line rather than as a decoder traceback for the whole file."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[: e.start].decode("utf-8", "replace")) + 1
                raise LineError(path, lineno, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                              f"{column}); save the file as UTF-8", e) from None
            yield lineno, text


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """``(line number, parsed value)`` for each non-blank line of a JSONL file; encoding and syntax
    errors raise :class:`LineError` (``InvalidInput("<file>:<line>", ...)``)."""
    path = Path(path)
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LineError(path, lineno, f"not valid JSON ({e.msg} at column {e.colno})", e) from None
        yield lineno, obj
