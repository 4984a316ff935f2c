"""Every use of a private Lightning member, in one place.

Lightning has no public API for these few things; each function below names what it needs and why.
``tests/test_lightning_private.py`` checks that every member used here still exists with the expected type and
signature, so a Lightning upgrade that moves one fails the suite loudly instead of breaking a run quietly
(pyproject.toml pins the Lightning minor release CI tests). The other private names the project touches are the
``LightningCLI`` hooks :class:`lm_tying._lightning_cli.LmTyingCLI` overrides (``_parse_ckpt_path``,
``_add_subcommands``, ``_get``), checked by the same test.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


def request_stop_after_step(trainer: pl.Trainer) -> None:
    """Have Lightning raise ``SIGTERMException`` at the end of the current training step, as if its own SIGTERM
    handler had run (``_SignalConnector.received_sigterm``, read by the training epoch loop after each batch), so
    that every callback's ``on_exception`` runs and ``last.ckpt`` is saved at a step boundary."""
    trainer._signal_connector.received_sigterm = True


def is_logging_step(trainer: pl.Trainer) -> bool:
    """True on the training steps where Lightning writes step metrics to the loggers (``log_every_n_steps``),
    as Lightning itself decides (``_LoggerConnector.should_update_logs``: also the last batch, and never while
    ``log_every_n_steps`` is 0)."""
    return bool(trainer._logger_connector.should_update_logs)


def batches_processed_in_epoch(trainer: pl.Trainer) -> int:
    """How many training batches of the current epoch Lightning has finished (also right after a restore from a
    mid-epoch checkpoint, when the loop has reloaded its progress but trained nothing yet)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def save_last_checkpoint(callback: ModelCheckpoint, trainer: pl.Trainer) -> None:
    """Write ``callback``'s ``last.ckpt`` now, with the metrics Lightning would record with it, keeping the
    callback's bookkeeping (``last_model_path``, the step last saved) as its own ``save_last`` does."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def should_skip_saving(callback: ModelCheckpoint, trainer: pl.Trainer) -> bool:
    """``ModelCheckpoint``'s own test for "no save now": fast_dev_run, not fitting, sanity checking, or this step
    already saved."""
    return bool(callback._should_skip_saving_checkpoint(trainer))


def last_step_saved(callback: ModelCheckpoint) -> int:
    """The global step of ``callback``'s most recent save (0 before the first)."""
    return int(callback._last_global_step_saved)


def count_optimizer_steps(trainer: pl.Trainer, steps: int) -> None:
    """Count ``steps`` optimizer steps taken outside Lightning's optimizer wrapper (``step_per_update``).

    With manual optimization Lightning's ``global_step`` is the number of completed steps of its wrapped optimizers,
    kept in the training loop's progress (which checkpoints save and resume restores); ``max_steps``, checkpoint
    intervals and logging read it. Lightning writes ``self.log``'s metrics (validation's) at its count of batches that
    stepped, advanced alike so that they land on the same step axis as the updates.
    """
    loop = trainer.fit_loop.epoch_loop
    progress = loop.manual_optimization.optim_step_progress
    progress.total.increment_by(steps)
    progress.current.increment_by(steps)
    loop._batches_that_stepped += steps
