"""Filesystem helpers: directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces `target` only once the block finishes.

    A crash inside the block leaves any previous `target` untouched (the scratch directory
    is removed); the swap itself is two renames on the same filesystem.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield scratch
        for path in scratch.rglob("*"):  # make the contents durable before the swap
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        retired = None
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
        os.replace(scratch, target)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
