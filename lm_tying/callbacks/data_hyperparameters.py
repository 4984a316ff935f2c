"""The data module's hyperparameters next to the model's in the logger, without Lightning's merge."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


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
