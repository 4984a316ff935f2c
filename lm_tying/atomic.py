"""Writing files so that a reader, or a run killed mid-write, only ever sees a complete file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARKER = ".tmp-"


def temporary_name(path: Path) -> Path:
    """The hidden file beside ``path`` that a writer fills before renaming it (same filesystem: atomic)."""
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` only if the block completes, else it is removed."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
