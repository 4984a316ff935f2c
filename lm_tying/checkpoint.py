"""Everything about this project's checkpoint files: what they hold, how they are written, how they are read.

- **Keys**: what an lm-tying checkpoint adds to Lightning's (:data:`MODEL_KEY`, :data:`VOCAB_KEY`, :data:`RUN_KEY`).
- **Writing** (:func:`atomic_torch_save`, :class:`AtomicCheckpointIO`): Lightning's ``TorchCheckpointIO`` stages the
  bytes in memory, but the final write goes through an fsspec transaction whose durability we cannot see from here.
  For local paths the classic sequence is done here, so that a ``SIGKILL`` at *any* instant leaves either the
  previous complete ``last.ckpt`` or the new complete one, never a truncated file:

  1. serialise to ``.<name>.tmp-<pid>-<random>`` in the *same directory* (same filesystem: the rename is atomic),
  2. ``flush`` + ``fsync`` the temporary file (the bytes are on disk before the name points at them),
  3. ``os.replace`` it over the target (atomic on POSIX),
  4. ``fsync`` the directory (the rename itself survives a power loss).

  Remote URLs (``s3://`` ...) fall back to Lightning's implementation.
- **Reading** (:func:`verify_checkpoint`, :func:`load_checkpoint_header`, :func:`load_model`): a checkpoint is a zip
  archive whose members carry CRC-32s, which ``torch.load`` never checks, so every load verifies them first (a
  checkpoint damaged on disk or in a copy would otherwise load with wrong weights and no word). :func:`load_model`
  rebuilds the model that wrote a checkpoint from its class path, so this module never imports the models (they
  import it, for the keys and the errors).
"""

from __future__ import annotations

import importlib
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lm_tying.atomic import atomic_path, remove_stale_temporaries

log = logging.getLogger(__name__)

#: Name of the model class that wrote the checkpoint (``Word2Vec``, ``LSTMLanguageModel``).
MODEL_KEY = "lm_tying_model"
#: The vocabulary naming the embedding rows (``Vocabulary.state_dict()``): export never needs the corpus.
VOCAB_KEY = "vocabulary"
#: The run: name, TensorBoard version, settings compared on resume, corpus fingerprint (``RunMetadata``).
RUN_KEY = "lm_tying_run"

#: Model classes by the name in :data:`MODEL_KEY`, for checkpoints without LightningCLI's ``_class_path``.
KNOWN_MODELS = {
    "Word2Vec": "lm_tying.models.word2vec.Word2Vec",
    "LSTMLanguageModel": "lm_tying.models.lstm_lm.LSTMLanguageModel",
}


class CheckpointError(ValueError):
    """A file that is not a usable lm-tying checkpoint."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose bytes are not the ones that were written."""


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to this model or to this data."""


# ------------------------------------------------------------------------------------------------ writing
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
    """``torch.save`` that never leaves a partially written ``path`` behind (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)  # leftovers of writers killed mid-write: never valid checkpoints
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (temporary file + fsync + ``os.replace``) and
    whose loads are verified (:func:`verify_checkpoint`).

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


# ------------------------------------------------------------------------------------------------ reading
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


def load_checkpoint_header(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint as a dict (CPU), verified, with a clear error when it is not a checkpoint at all."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {str(path)!r} {what}")
    verify_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unpicklable content ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{str(path)!r} is not a readable PyTorch checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{str(path)!r} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint


def checkpoint_model_class_path(checkpoint: dict[str, Any], path: str | os.PathLike) -> str:
    """The import path of the model class that wrote ``checkpoint`` (an lm-tying checkpoint, or a clear error)."""
    kind = checkpoint.get(MODEL_KEY)
    if not kind:
        raise CheckpointError(
            f"{str(path)!r} is not an lm-tying checkpoint (no {MODEL_KEY!r} entry): "
            "pass a checkpoint written by `lm-tying fit` (checkpoints/<run>/last.ckpt or best.ckpt)"
        )
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")  # written by LightningCLI
    if class_path:
        return str(class_path)
    if kind in KNOWN_MODELS:
        return KNOWN_MODELS[kind]
    raise CheckpointError(f"{str(path)!r} was written by an unknown model {kind!r}; known: {', '.join(KNOWN_MODELS)}")


def load_model(ckpt_path: str | os.PathLike) -> LightningModule:
    """The model that wrote ``ckpt_path`` (a ``WordEmbeddingModule``), on CPU in eval mode, with its vocabulary
    (no data needed)."""
    header = load_checkpoint_header(ckpt_path)
    class_path = checkpoint_model_class_path(header, ckpt_path)
    if VOCAB_KEY not in header:
        raise CheckpointError(f"{str(ckpt_path)!r} holds no vocabulary: it was saved before the model saw any data")
    del header
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{str(ckpt_path)!r} needs the model class {class_path}, which cannot be imported: {e}")
    # What every lm-tying model has (WordEmbeddingModule), checked without importing the models from here.
    if not (isinstance(cls, type) and issubclass(cls, LightningModule) and callable(getattr(cls, "word_vectors", None))):
        raise CheckpointError(f"{class_path} is not an lm-tying model (a WordEmbeddingModule)")
    model = cls.load_from_checkpoint(ckpt_path, map_location="cpu")
    model.eval()
    return model
