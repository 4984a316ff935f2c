"""What a finished fit left behind, and the commands that use it, printed at its end."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lm_tying.callbacks.checkpoints import BestCheckpoint, LastCheckpoint
from lm_tying.callbacks.projector import PROJECTOR_CONFIG


class FitSummary(Callback):
    """At the end of a fit that finished (not one stopped by an error or a signal), lists the run's ``last.ckpt`` and
    ``best.ckpt`` (with its score), the TensorBoard command and the projector run, and the commands that export the
    vectors (and, for a language model, generate text) from the best checkpoint.

    Printed at ``teardown``, after every callback's ``on_fit_end`` (the projector writes its last snapshot there).
    """

    def __init__(self, run_name: str, prog: str = "lm-tying") -> None:
        """
        Args:
            run_name: The run's name (names the exported file).
            prog: The command the printed commands start with.
        """
        self.run_name = run_name
        self.prog = prog
        self._finished = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finished = False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finished = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self._finished:
            return
        self._finished = False
        rank_zero_info(self.summary(trainer, pl_module))

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        lines = [f"Run {self.run_name!r} finished at step {trainer.global_step}."]
        last_callback = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        best_callback = next((c for c in trainer.callbacks if isinstance(c, BestCheckpoint)), None)
        last = _existing(last_callback.last_model_path if last_callback else "")
        best = _existing(best_callback.best_model_path if best_callback else "")
        if last:
            lines.append(f"  last checkpoint: {last}   (continue: the same command with --ckpt_path last)")
        if best:
            score = best_callback.best_model_score
            lines.append(f"  best checkpoint: {best}" + (f"   ({best_callback.monitor} {float(score):.4g})" if score is not None else ""))
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is not None:
            run_dir = Path(logger.log_dir)
            lines.append(f"  TensorBoard:     tensorboard --logdir {Path(logger.root_dir)}   (this run: {run_dir.name})")
            if (run_dir / PROJECTOR_CONFIG).is_file():
                lines.append(f"  projector:       {run_dir / PROJECTOR_CONFIG}   (TensorBoard's Projector tab)")
        ckpt = best or last
        if ckpt:
            lines.append(f"  export vectors:  {self.prog} export --ckpt_path {ckpt} --output {self.run_name}_vectors.txt")
            if callable(getattr(pl_module, "generate", None)):
                lines.append(f'  generate text:   {self.prog} generate --ckpt_path {ckpt} --prompt "the"')
        return "\n".join(lines)


def _existing(path: str) -> Optional[str]:
    """``path`` if that file exists, shown relative to the working directory when it is inside it."""
    if not path or not Path(path).is_file():
        return None
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
