"""Every random generator training draws from travels in checkpoints, so a resume continues exactly."""

from __future__ import annotations

import random
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


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
