"""SIGTERM and Ctrl-C stop fit cleanly at a step boundary, on every rank at the same step."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lm_tying import _lightning


class GracefulInterrupt(Callback):
    """SIGTERM and the first Ctrl-C (SIGINT) stop fit cleanly, on every rank at the same step: the current step
    finishes, ``on_exception`` runs (:class:`LastCheckpoint` saves ``last.ckpt``) and the CLI exits with
    128 + the signal number. A second Ctrl-C interrupts at once.

    Why not Lightning's own SIGTERM handler: it runs a ``dist.broadcast`` *inside* the signal handler and lets each
    rank raise as soon as its own flag is set, so under DDP the ranks' collectives get out of step and the run hangs
    (seen here with 2 CPU processes). Here the handler only records the signal; at the end of each training batch
    the ranks agree on it with one ``all_reduce(MAX)`` and then all set Lightning's flag together, so all of them
    raise ``SIGTERMException`` at the end of the same step and save together. (A bare ``KeyboardInterrupt`` could
    also land between ``backward`` and the end of an in-place optimizer update, not a state worth saving.)
    """

    #: The signal that stopped the last fit in this process (for the exit status), or None.
    received: Optional[int] = None

    def __init__(self) -> None:
        self._pending: Optional[int] = None
        self._originals: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGINT and self._pending == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        if self._pending is None:
            what = "Ctrl-C" if signum == signal.SIGINT else f"signal {signum}"
            rank_zero_info(f"\n{what}: finishing the current step, saving last.ckpt and stopping (Ctrl-C again aborts)")
        self._pending = signum

    def _install(self) -> None:
        # Called again after Lightning (re-)registers its SIGTERM handler, right before the training loop.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            current = signal.getsignal(signum)
            if current == self._handler:
                continue
            self._originals.setdefault(signum, current)
            signal.signal(signum, self._handler)

    def _uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, original in self._originals.items():
            if signal.getsignal(signum) == self._handler:
                signal.signal(signum, original if original is not None else signal.SIG_DFL)
        self._originals = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        GracefulInterrupt.received = None
        self._pending = None
        self._install()

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending = self._pending or 0
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([pending], dtype=torch.int64, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            pending = int(flag.item())
        if pending:
            GracefulInterrupt.received = pending
            # Lightning raises SIGTERMException after this step (training_epoch_loop.on_advance_end) when it is set.
            _lightning.request_stop_after_step(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and GracefulInterrupt.received is None:
            GracefulInterrupt.received = int(signal.SIGTERM)
        self._uninstall()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()
