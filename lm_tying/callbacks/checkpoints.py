"""The run's two checkpoints: ``last.ckpt`` (always current, to continue from) and ``best.ckpt`` (lowest monitor)."""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lm_tying import _lightning


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``, always current: every ``every_n_train_steps`` steps, at the end of fit (also when
    the last step is not a multiple of the interval; Lightning's ``ModelCheckpoint`` skips that case), and when fit
    stops on SIGTERM or Ctrl-C (see :class:`GracefulInterrupt`). Lightning raises ``SIGTERMException`` only between
    steps, so the saved state is a consistent one to resume from. Nothing else is kept (``save_top_k=0``).
    """

    def __init__(
        self, dirpath: Optional[str] = None, every_n_train_steps: int = 1000, every_n_minutes: Optional[float] = 5.0
    ) -> None:
        """
        Args:
            dirpath: Directory of ``last.ckpt`` (the CLI uses ``checkpoints/<run name>``).
            every_n_train_steps: Save every this many optimizer steps (0: only at the end and on interrupts).
            every_n_minutes: Also save when this many minutes of training passed since the last save (Lightning's
                ``train_time_interval``, which ``ModelCheckpoint`` will not combine with a step interval), so a
                killed run loses at most that much work whatever its speed; ``None`` or 0: no time-based saves.
        """
        super().__init__(
            dirpath=dirpath,
            monitor=None,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )
        self.every_n_train_steps = every_n_train_steps
        self.every_n_minutes = every_n_minutes or 0.0
        self._last_save_time = time.monotonic()
        self._step_seen = 0

    def _save_last_now(self, trainer: pl.Trainer) -> None:
        _lightning.save_last_checkpoint(self, trainer)
        self._last_save_time = time.monotonic()

    def _time_due(self, trainer: pl.Trainer) -> bool:
        if not self.every_n_minutes:
            return False
        due = time.monotonic() - self._last_save_time >= 60.0 * self.every_n_minutes
        # Under DDP every rank must save at the same step (a save is collective): any rank's clock decides for all.
        return bool(trainer.strategy.reduce_boolean_decision(due, all=False))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_save_time = time.monotonic()
        self._step_seen = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Replaces ModelCheckpoint's version (no monitor to wait for; same for manual optimization, where the
        # parent warns about "pre-optimization state": last.ckpt is meant to hold the state after the step).
        if _lightning.should_skip_saving(self, trainer):
            return
        every, step = self.every_n_train_steps, trainer.global_step
        # "crossed a multiple" rather than "is a multiple": a step may advance global_step by more than one
        # (word2vec's step_per_update counts each update it carries)
        due = every >= 1 and self._step_seen // every < step // every
        self._step_seen = step
        # The step that reaches max_steps is saved *here*, mid-epoch: by on_train_end Lightning has already marked
        # the epoch as finished, and a checkpoint taken then would resume at the start of the next epoch.
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if self._time_due(trainer) or due or final:
            self._save_last_now(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Any other end (max_epochs, early stopping, max_time): the state at the end is the one to continue from.
        if trainer.fast_dev_run or _lightning.last_step_saved(self) == trainer.global_step:
            return
        self._save_last_now(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Only the signal path: a bare KeyboardInterrupt or an error may come in the middle of an optimizer step.
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if _lightning.last_step_saved(self) != trainer.global_step:
            self._save_last_now(trainer)
        rank_zero_info(f"Stopped by a signal at step {trainer.global_step}; last checkpoint: {self.last_model_path}")


class BestCheckpoint(ModelCheckpoint):
    """``<dirpath>/best.ckpt``: the state with the lowest ``monitor`` (default ``val/loss``) seen at a validation.

    Checked at validation ends only, so a run stopped before its first validation has no ``best.ckpt`` (and no
    warning about a missing metric at the end of a truncated epoch).
    """

    def __init__(self, dirpath: Optional[str] = None, monitor: str = "val/loss", mode: str = "min") -> None:
        super().__init__(
            dirpath=dirpath,
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_last=False,
            enable_version_counter=False,
            auto_insert_metric_name=False,
            save_on_train_epoch_end=False,
        )
