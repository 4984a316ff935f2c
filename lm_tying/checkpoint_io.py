"""Crash-safe checkpoint writing.

Lightning's ``TorchCheckpointIO`` already stages the bytes in memory, but the final write goes through an fsspec
transaction whose durability we cannot see from here. For local paths this plugin does the classic sequence
ourselves, so that a ``SIGKILL`` at *any* instant leaves either the previous complete ``last.ckpt`` or the new
complete one, never a truncated file:

1. serialise to ``.<name>.tmp-<pid>`` in the *same directory* (same filesystem, so the rename is atomic),
2. ``flush`` + ``fsync`` the temporary file (the bytes are on disk before the name points at them),
3. ``os.replace`` it over the target (atomic on POSIX),
4. ``fsync`` the directory (the rename itself survives a power loss).

Remote URLs (``s3://`` ...) fall back to Lightning's implementation.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lm_tying.atomic import TMP_MARKER, atomic_path

log = logging.getLogger(__name__)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename; some filesystems (and all non-POSIX ones) cannot open a directory, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` that never leaves a partially written ``path`` behind (see module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Remove leftovers of writers killed mid-write (any pid): they are never valid checkpoints.
    for stale in path.parent.glob(f".{path.name}{TMP_MARKER}*"):
        try:
            stale.unlink()
        except OSError:
            pass
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (temporary file + fsync + ``os.replace``).

    Installed by the ``lm-tying`` CLI by default (unless the config already sets a ``CheckpointIO`` plugin).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by `{type(self).__name__}`."
            )
        log.debug("Saving checkpoint atomically: %s", path)
        atomic_torch_save(checkpoint, path)
