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

Loading verifies the file first (:func:`verify_checkpoint`): a checkpoint is a zip archive whose members carry
CRC-32s, which ``torch.load`` never checks, so a checkpoint damaged on disk or in a copy would otherwise load
with wrong weights and no word.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lm_tying.atomic import atomic_path, remove_stale_temporaries

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
    remove_stale_temporaries(path)  # leftovers of writers killed mid-write: never valid checkpoints
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    _fsync_dir(path.parent)


class CorruptCheckpointError(ValueError):
    """A checkpoint whose bytes are not the ones that were written."""


def verify_checkpoint(path: _PATH) -> None:
    """Check every member of a (zip-format) checkpoint against its stored CRC-32; raise naming the file if one fails.

    Files that are not zip archives are left to ``torch.load`` (which rejects them, or reads a legacy format)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        bad = f"unreadable archive: {e}"
    if bad is not None:
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} is corrupt (member {bad} fails its CRC check): its bytes changed after it was "
            "written; use another checkpoint (e.g. best.ckpt or a copy) or start the run anew"
        )


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

    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if _is_local_file_protocol(path) and Path(path).is_file():
            verify_checkpoint(path)
        return super().load_checkpoint(path, *args, **kwargs)
