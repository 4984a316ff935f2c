"""TensorBoard's embedding projector for either model: the most frequent words' vectors, labelled."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lm_tying.atomic import atomic_path
from lm_tying.export import write_projector_tsv


PROJECTOR_CONFIG = "projector_config.pbtxt"

def most_frequent_ids(counts: np.ndarray, n: int, include_unk: bool = False) -> np.ndarray:
    """Ids of the ``n`` most frequent words (stable for ties), by count rather than by assuming id order."""
    counts = np.asarray(counts)
    order = np.argsort(-counts, kind="stable")
    if not include_unk:
        order = order[order != 0]  # UNK (id 0) stands for every rare word: its vector is not a word's
    return order[:n]


def write_projector_files(
    log_dir: str | os.PathLike,
    vectors: np.ndarray,
    words: list[str],
    tensor_name: str,
    subdir: str,
) -> Path:
    """Write ``tensors.tsv`` + ``metadata.tsv`` under ``log_dir/subdir`` and register them in the run's
    ``projector_config.pbtxt`` (what TensorBoard's projector plugin reads; paths relative to the config,
    which the plugin requires to stay inside the run directory). Existing entries are kept, an entry with
    the same ``tensor_name`` is replaced, so resumed runs add to the same config.
    """
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    log_dir = Path(log_dir)
    target = log_dir / subdir
    write_projector_tsv(words, vectors, target, vectors_name="tensors.tsv")

    config = ProjectorConfig()
    config_path = log_dir / PROJECTOR_CONFIG
    if config_path.exists():
        text_format.Parse(config_path.read_text(encoding="utf-8"), config)
    kept = [e for e in config.embeddings if e.tensor_name != tensor_name]
    del config.embeddings[:]
    config.embeddings.extend(kept)
    entry = config.embeddings.add()
    entry.tensor_name = tensor_name
    entry.tensor_path = f"{subdir}/tensors.tsv"
    entry.metadata_path = f"{subdir}/metadata.tsv"
    entry.tensor_shape.extend(list(vectors.shape))
    with atomic_path(config_path) as tmp:  # TensorBoard may read it while we write: only whole files
        tmp.write_text(text_format.MessageToString(config), encoding="utf-8")
    return target


class EmbeddingProjector(Callback):
    """Puts the ``num_visualize`` most frequent words' embeddings, labelled with the words, in TensorBoard's
    Projector tab (as the classic word2vec tutorial plots them), for either model.

    Written into the TensorBoard run directory every ``every_n_validations`` validations during fit and once at
    the end of fit, by global rank 0 only, one snapshot per global step (``<tag>:<step>`` in the tab's menu).
    """

    def __init__(
        self,
        num_visualize: int = 3000,
        every_n_validations: Optional[int] = 5,
        tag: str = "word_embeddings",
        include_unk: bool = False,
    ) -> None:
        """
        Args:
            num_visualize: How many of the most frequent words to show (3,000 as in the classic tutorial).
            every_n_validations: Also write a snapshot every this many validation runs during fit
                (``None`` or 0: only at the end of fit).
            tag: Name of the embedding in the Projector tab (the step is appended).
            include_unk: Also show ``UNK``, the vector shared by all out-of-vocabulary words.
        """
        if num_visualize < 1:
            raise ValueError(f"num_visualize={num_visualize}: it must be at least 1")
        self.num_visualize = num_visualize
        self.every_n_validations = every_n_validations or 0
        self.tag = tag
        self.include_unk = include_unk
        self._validations = 0
        self._last_written_step: Optional[int] = None
        self._warned = False

    def _log_dir(self, trainer: pl.Trainer) -> Optional[str]:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.log_dir
        if not self._warned:
            rank_zero_warn("EmbeddingProjector: no TensorBoardLogger among the trainer's loggers; nothing written.")
            self._warned = True
        return None

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[Path]:
        """Write one snapshot at the current global step (rank 0; other ranks return ``None``)."""
        if not trainer.is_global_zero:
            return None
        step = trainer.global_step
        if self._last_written_step == step:
            return None
        vocab = getattr(pl_module, "vocab", None)
        if vocab is None:
            rank_zero_warn("EmbeddingProjector: the model has no vocabulary; nothing written.")
            return None
        log_dir = self._log_dir(trainer)
        if log_dir is None:
            return None
        ids = most_frequent_ids(vocab.counts, self.num_visualize, self.include_unk)
        with torch.no_grad():
            matrix = pl_module.input_embeddings()
            index = torch.as_tensor(ids, dtype=torch.long, device=matrix.device)
            vectors = matrix.detach().index_select(0, index).float().cpu().numpy()
        words = [vocab.words[i] for i in ids]
        target = write_projector_files(
            log_dir, vectors, words, tensor_name=f"{self.tag}:{step:06d}", subdir=f"{self.tag}/{step:06d}"
        )
        self._last_written_step = step
        return target

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._validations += 1
        if self.every_n_validations and self._validations % self.every_n_validations == 0:
            self.write(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))
