"""The last epoch always validates, whatever ``check_val_every_n_epoch`` says (the run's final metrics)."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class ValidateLastEpoch(Callback):
    """Validates after the last of ``max_epochs`` whatever ``check_val_every_n_epoch`` says, so that a run that
    evaluates every few epochs to save time still ends with its final metrics (and ``best.ckpt`` considers it);
    Lightning alone skips the last epoch unless the interval divides ``max_epochs``."""

    def __init__(self) -> None:
        self._every_n_epochs: Optional[int] = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._every_n_epochs is None:
            self._every_n_epochs = trainer.check_val_every_n_epoch
        last = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
        trainer.check_val_every_n_epoch = 1 if last and self._every_n_epochs else self._every_n_epochs
