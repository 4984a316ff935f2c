"""The run's identity in every checkpoint: name, TensorBoard version, settings, corpus fingerprint."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from lm_tying.checkpoint import RUN_KEY, CheckpointMismatchError


class RunMetadata(Callback):
    """Records in every checkpoint (``checkpoint[RUN_KEY]``) the run name and the TensorBoard version, so that
    ``lm-tying fit --ckpt_path ...`` continues logging into the same TensorBoard run; the run's ``settings`` that are
    not in the model's or the data's hyperparameters (the CLI passes the trainer's run length, seed ...); and the data
    module's ``corpus_fingerprint``, so that a resume on another corpus is refused."""

    def __init__(self, run_name: str, settings: Optional[dict[str, Any]] = None) -> None:
        self.run_name = run_name
        self.settings = dict(settings or {})

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        version = None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                version = logger.version
                break
        fingerprint = _corpus_fingerprint(trainer)
        checkpoint[RUN_KEY] = {
            "run_name": self.run_name,
            "log_version": version,
            "settings": self.settings,
            "corpus_fingerprint": fingerprint,
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # evaluating a trained model on other text is fine; continuing its training is not
        saved = (checkpoint.get(RUN_KEY) or {}).get("corpus_fingerprint")
        current = _corpus_fingerprint(trainer)
        if saved is not None and current is not None and saved != current:
            raise CheckpointMismatchError(
                f"the checkpoint was trained on another corpus (fingerprint {saved}, this data's is {current}): "
                "resume with the corpus the run was trained on (--data.path), or start a new run"
            )


def _corpus_fingerprint(trainer: pl.Trainer) -> Optional[str]:
    """The data module's ``corpus_fingerprint`` (None when it has none)."""
    return getattr(getattr(trainer, "datamodule", None), "corpus_fingerprint", None)
