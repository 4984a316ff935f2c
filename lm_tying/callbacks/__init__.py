"""Cross-cutting training behaviour as Lightning callbacks, one a file (the models stay free of Trainer logic).

- :class:`EmbeddingProjector` (``projector.py``): the most frequent words' vectors + their words for TensorBoard's
  Projector tab.
- :class:`LastCheckpoint`, :class:`BestCheckpoint` (``checkpoints.py``): ``<dir>/last.ckpt`` always current (every N
  steps and every M minutes, at the end of fit, on SIGTERM/Ctrl-C); ``<dir>/best.ckpt`` by a monitored metric.
- :class:`FiniteGuard` (``finite_guard.py``): stops fit at a non-finite loss; no checkpoint holds non-finite weights.
- :class:`RandomStateCheckpoint` (``random_state.py``): global and model-owned random generators travel in
  checkpoints (exact resume).
- :class:`GracefulInterrupt` (``interrupt.py``): the first Ctrl-C stops like SIGTERM (finish the step, save, exit);
  the second aborts.
- :class:`ValidateLastEpoch` (``validate_last_epoch.py``): with ``check_val_every_n_epoch`` > 1, the last epoch still
  validates (the run's final metrics).
- :class:`RunMetadata` (``run_metadata.py``): the run name, TensorBoard version, settings and corpus fingerprint in
  each checkpoint, so a resume logs into the same run and can be checked against the settings it continues with.
- :class:`DataHyperparameters` (``data_hyperparameters.py``): the data's hyperparameters as ``data/*`` in the logger.
- :class:`FitSummary` (``fit_summary.py``): where a finished fit's checkpoints and logs are, and the commands to use
  them.
- :class:`CompactModelSummary` (``model_summary.py``): the model summary without empty columns and rows.
"""

from lm_tying.callbacks.checkpoints import BestCheckpoint, LastCheckpoint
from lm_tying.callbacks.data_hyperparameters import DataHyperparameters
from lm_tying.callbacks.finite_guard import FiniteGuard, TrainingDivergedError
from lm_tying.callbacks.fit_summary import FitSummary
from lm_tying.callbacks.interrupt import GracefulInterrupt
from lm_tying.callbacks.model_summary import CompactModelSummary
from lm_tying.callbacks.projector import EmbeddingProjector
from lm_tying.callbacks.random_state import RandomStateCheckpoint
from lm_tying.callbacks.run_metadata import RunMetadata
from lm_tying.callbacks.validate_last_epoch import ValidateLastEpoch

__all__ = [
    "BestCheckpoint",
    "CompactModelSummary",
    "DataHyperparameters",
    "EmbeddingProjector",
    "FiniteGuard",
    "FitSummary",
    "GracefulInterrupt",
    "LastCheckpoint",
    "RandomStateCheckpoint",
    "RunMetadata",
    "TrainingDivergedError",
    "ValidateLastEpoch",
]
