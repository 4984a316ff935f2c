"""Stop a diverged run before it saves: no checkpoint ever holds non-finite weights."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class TrainingDivergedError(Exception):
    """Training produced a non-finite loss or weights (or a checkpoint holds non-finite weights)."""


def nonfinite_entries(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or an infinity."""
    return [
        name
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


class FiniteGuard(Callback):
    """Stops fit at the first non-finite training loss, and lets no checkpoint hold non-finite weights.

    Each training step folds "was this loss finite?" into a flag that stays on the loss's device (a few tiny kernels,
    no host-device synchronisation); the flag is read every ``trainer.log_every_n_steps`` batches and before every
    checkpoint is written, which also checks every weight. Either failure raises :class:`TrainingDivergedError`,
    naming the step and what to change, before the checkpoint reaches the disk, so ``last.ckpt``/``best.ckpt``
    keep the last finite state. A checkpoint that already holds non-finite weights is refused on load. Relies only on
    ``training_step`` returning the loss and on the module's parameters, so it serves both models.
    """

    def __init__(self) -> None:
        self._first_bad_step: Optional[torch.Tensor] = None  # step of the first non-finite loss; -1 while none
        self._batches = 0

    def _levers(self, pl_module: pl.LightningModule) -> str:
        if getattr(pl_module, "divergence_levers", None):  # a model's own advice (word2vec: its update size too)
            return pl_module.divergence_levers
        lr = "lower the learning rate (--model.init_args.lr)"
        if pl_module.automatic_optimization:
            return f"{lr} or clip gradients (--trainer.gradient_clip_val, e.g. 0.25)"
        return lr

    def _diverged_at(self, trainer: pl.Trainer) -> Optional[int]:
        first = self._first_bad_step
        if first is None:
            first = torch.full((), -1, dtype=torch.long, device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            first = trainer.strategy.reduce(first.clone(), reduce_op="max")  # any rank's divergence stops all
        step = int(first.item())
        return step if step >= 0 else None

    def _check_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._diverged_at(trainer)
        if step is not None:
            raise TrainingDivergedError(
                f"training diverged: the loss became non-finite at step {step}; no checkpoint after it was written. "
                f"To continue, {self._levers(pl_module)} and resume from the last checkpoint (--ckpt_path last)"
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            if self._first_bad_step is None or self._first_bad_step.device != loss.device:
                self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            # loss * 0 is 0 when the loss is finite, NaN when not (cheaper than isfinite, a composite of several ops).
            bad = loss.detach().mul(0).ne(0)
            if bad.dim():
                bad = bad.any()
            first = bad.logical_and_(self._first_bad_step.lt(0))
            self._first_bad_step.masked_fill_(first, trainer.global_step)  # a scalar fill: no host-device copy
        self._batches += 1
        if self._batches % max(trainer.log_every_n_steps, 1) == 0:
            self._check_loss(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._check_loss(trainer, pl_module)
        bad = nonfinite_entries(checkpoint.get("state_dict", {}))
        if bad:
            raise TrainingDivergedError(
                f"training diverged: at step {trainer.global_step} the weights {', '.join(bad)} hold non-finite "
                f"values; no checkpoint was written. To continue, {self._levers(pl_module)} and resume from the last "
                "checkpoint (--ckpt_path last)"
            )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        bad = nonfinite_entries(checkpoint.get("state_dict", {}))
        if bad:
            raise TrainingDivergedError(
                f"the checkpoint holds non-finite weights ({', '.join(bad)}; written by a run that diverged): resume "
                "from an earlier checkpoint or start anew"
            )
