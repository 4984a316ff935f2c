"""ValidateLastEpoch: validation every few epochs to save time, and always after the last one."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lm_tying.callbacks import ValidateLastEpoch


class CountValidations(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.validated_after: list[int] = []

    def training_step(self, batch, batch_idx):
        return (self.weight - batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self) -> None:
        self.validated_after.append(self.current_epoch + 1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "every, max_epochs, expected",
    [(2, 5, [2, 4, 5]), (5, 3, [3]), (2, 4, [2, 4]), (1, 3, [1, 2, 3])],
)
def test_validates_every_n_epochs_and_after_the_last(tmp_path, every, max_epochs, expected):
    data = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    model = CountValidations()
    trainer = L.Trainer(
        max_epochs=max_epochs, check_val_every_n_epoch=every, callbacks=[ValidateLastEpoch()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, data, data)
    assert model.validated_after == expected
