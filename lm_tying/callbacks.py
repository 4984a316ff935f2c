"""Cross-cutting training behaviour as Lightning callbacks (the models stay free of Trainer logic).

- :class:`EmbeddingProjector`: the most frequent words' vectors + their words for TensorBoard's Projector tab.
- :class:`LastCheckpoint`: ``<dir>/last.ckpt`` always current: every N steps and every M minutes, at the end of fit,
  on SIGTERM/Ctrl-C.
- :class:`FiniteGuard`: stops fit at a non-finite loss, and no checkpoint ever holds non-finite weights.
- :class:`RandomStateCheckpoint`: global and model-owned random generators travel in checkpoints (exact resume).
- :class:`GracefulInterrupt`: the first Ctrl-C stops like SIGTERM (finish the step, save, exit); the second aborts.
- :class:`ValidateLastEpoch`: with ``check_val_every_n_epoch`` > 1, the last epoch still validates (final metrics).
- :class:`RunMetadata`: the run name, TensorBoard version, settings and corpus fingerprint in each checkpoint, so a
  resume logs into the same run and can be checked against the settings it is asked to continue with.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lm_tying.atomic import atomic_path
from lm_tying.export import write_projector_tsv
from lm_tying.models.base import CheckpointMismatchError

PROJECTOR_CONFIG = "projector_config.pbtxt"


# --------------------------------------------------------------------------------------------------- projector
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


# --------------------------------------------------------------------------------------------------- checkpoints
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
        self.every_n_minutes = every_n_minutes or 0.0
        self._last_save_time = time.monotonic()
        self._step_seen = 0

    def _save_last_now(self, trainer: pl.Trainer) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
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
        if self._should_skip_saving_checkpoint(trainer):
            return
        every, step = self._every_n_train_steps, trainer.global_step
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
        if trainer.fast_dev_run or self._last_global_step_saved == trainer.global_step:
            return
        self._save_last_now(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Only the signal path: a bare KeyboardInterrupt or an error may come in the middle of an optimizer step.
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self._last_global_step_saved != trainer.global_step:
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


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # Tensors and plain numbers only: checkpoints must load with torch.load(weights_only=True).
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def find_generators(module: torch.nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` held as an attribute of ``module`` or its submodules (e.g. a negative sampler's),
    keyed ``<submodule path>.<attribute>``."""
    found: dict[str, torch.Generator] = {}
    for prefix, sub in module.named_modules():
        for name, value in vars(sub).items():
            if isinstance(value, torch.Generator):
                found[f"{prefix}.{name}" if prefix else name] = value
    return found


class RandomStateCheckpoint(Callback):
    """Saves and restores every random generator training draws from (torch CPU and CUDA, numpy, Python, and
    ``torch.Generator`` attributes of the model), so that ``k`` steps + resume gives the same weights as one run.

    - The states are taken when the checkpoint is written (after the optimizer step of the saved batch) and applied
      just before the first training batch after the restore, i.e. at the same point of the sequence.
    - Under DDP ranks other than 0 are reseeded by rank at setup (``seed_everything`` gives all ranks the same
      generators: identical dropout masks and negatives everywhere), each rank's states are gathered into the
      checkpoint and each rank gets its own back (if the world size matches; otherwise rank 0's, with a warning).
    - Validation runs inside fit with the generators saved before and restored after, so evaluating (which may
      sample, e.g. NCE negatives) never changes what training draws: a checkpoint saved right before a validation
      resumes exactly, and the validation frequency does not change the training trajectory.
    """

    def __init__(self) -> None:
        self._module: Optional[pl.LightningModule] = None
        self._trainer: Optional[pl.Trainer] = None
        self._pending: Optional[dict[str, Any]] = None
        self._around_validation: Optional[dict[str, Any]] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer, self._module = trainer, pl_module
        if stage == "fit" and trainer.world_size > 1 and trainer.global_rank > 0:
            # seed_everything gives every rank the same global generators, so without this all ranks would draw
            # the same dropout masks and the same word2vec negatives at every step. Rank 0 keeps its sequence.
            seed = (torch.initial_seed() + 1_000_003 * trainer.global_rank) % 2**32
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)

    def _collect(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generators": {},
        }
        if self._module is not None:
            state["generators"] = {k: g.get_state() for k, g in find_generators(self._module).items()}
        return state

    def _apply(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        _set_numpy_state(state["numpy"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        cuda = state.get("cuda") or []
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        if self._module is not None:
            generators = find_generators(self._module)
            for name, value in state.get("generators", {}).items():
                if name in generators:
                    generators[name].set_state(value)
                else:
                    rank_zero_warn(f"RandomStateCheckpoint: the model has no generator {name!r} any more; skipped.")

    def state_dict(self) -> dict[str, Any]:
        local = self._collect()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            # Every rank dumps the checkpoint together (Lightning saves in lockstep), so the gather is safe.
            ranks: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(ranks, local)
            return {"ranks": ranks}
        return {"ranks": [local]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        if not ranks:
            return
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if len(ranks) != world:
            rank_zero_warn(
                f"The checkpoint holds the random state of {len(ranks)} process(es), this run has {world}: every "
                "process continues from rank 0's state, so the resumed run is not bit-identical to an "
                "uninterrupted one."
            )
            rank = 0
        self._pending = ranks[rank]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._around_validation = self._collect()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._around_validation is not None:
            self._apply(self._around_validation)
            self._around_validation = None


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
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and GracefulInterrupt.received is None:
            GracefulInterrupt.received = int(signal.SIGTERM)
        self._uninstall()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()


class RunMetadata(Callback):
    """Records in every checkpoint (``checkpoint["lm_tying_run"]``) the run name and the TensorBoard version, so that
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
        checkpoint["lm_tying_run"] = {
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
        saved = (checkpoint.get("lm_tying_run") or {}).get("corpus_fingerprint")
        current = _corpus_fingerprint(trainer)
        if saved is not None and current is not None and saved != current:
            raise CheckpointMismatchError(
                f"the checkpoint was trained on another corpus (fingerprint {saved}, this data's is {current}): "
                "resume with the corpus the run was trained on (--data.path), or start a new run"
            )


def _corpus_fingerprint(trainer: pl.Trainer) -> Optional[str]:
    """The data module's ``corpus_fingerprint`` (None when it has none)."""
    return getattr(getattr(trainer, "datamodule", None), "corpus_fingerprint", None)


class DataHyperparameters(Callback):
    """Records the data module's hyperparameters as ``data/<name>`` next to the model's (``hparams.yaml``).

    Lightning would merge both into one namespace and stop with "Error while merging hparams" when a key differs,
    and ``vocab_size`` differs by design whenever ``min_count`` or a small corpus trims the vocabulary: the data's is
    the cap asked for, the model's the size actually built (linked from ``data.num_words``). So the data module
    saves its hyperparameters with ``logger=False`` and the CLI installs this callback instead.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            return
        params = {f"data/{k}": v for k, v in datamodule.hparams_initial.items()}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)


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
