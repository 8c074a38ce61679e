"""Writing directories so that readers never see half of one (core: the model cache, mixtures;
``steer.training`` re-uses it for adapters, exports and checkpoints)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TMP_PREFIX = ".tmp-"


def atomic_directory_write(final: str | Path, write) -> Path:
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
