"""Every private Lightning member the project relies on still exists, with the type and signature it is used with.

All of them are used through ``lm_tying/_lightning.py`` (plus the two ``LightningCLI`` hooks the CLI overrides). A
Lightning release that renames or reshapes one fails here, by name, instead of breaking a run quietly."""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel

from lm_tying import _lightning


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A trainer after 3 steps of a mid-epoch fit, and its ModelCheckpoint, to read the members from."""
    root = tmp_path_factory.mktemp("private")
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
    trainer = pl.Trainer(
        max_steps=3, limit_train_batches=10, limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[checkpoint], default_root_dir=root, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(BoringModel())
    return trainer, checkpoint


def test_signal_connector_flag(fitted):
    trainer, _ = fitted
    assert trainer._signal_connector.received_sigterm is False
    _lightning.request_stop_after_step(trainer)
    assert trainer._signal_connector.received_sigterm is True
    trainer._signal_connector.received_sigterm = False


def test_logger_connector_should_update_logs(fitted):
    from lightning.pytorch.trainer.connectors.logger_connector import _LoggerConnector

    assert isinstance(inspect.getattr_static(_LoggerConnector, "should_update_logs"), property)
    assert isinstance(_lightning.is_logging_step(fitted[0]), bool)


def test_epoch_loop_batch_progress(fitted):
    assert _lightning.batches_processed_in_epoch(fitted[0]) == 3


def test_optimizer_step_progress_drives_global_step(fitted):
    trainer, _ = fitted
    loop, module = trainer.fit_loop.epoch_loop, trainer.lightning_module
    assert isinstance(loop._batches_that_stepped, int)
    batches = loop._batches_that_stepped
    module.automatic_optimization = False  # word2vec optimizes manually: global_step reads that loop's count
    try:
        start = trainer.global_step
        _lightning.count_optimizer_steps(trainer, 5)
        assert trainer.global_step == start + 5
        assert loop._batches_that_stepped == batches + 5
    finally:
        module.automatic_optimization = True
        loop._batches_that_stepped = batches


def test_model_checkpoint_internals(fitted, tmp_path):
    trainer, checkpoint = fitted
    assert parameters(ModelCheckpoint._save_last_checkpoint) == ["self", "trainer", "monitor_candidates"]
    assert parameters(ModelCheckpoint._monitor_candidates) == ["self", "trainer"]
    assert parameters(ModelCheckpoint._should_skip_saving_checkpoint) == ["self", "trainer"]
    assert _lightning.last_step_saved(checkpoint) == 3
    assert _lightning.should_skip_saving(checkpoint, trainer) is True  # not fitting any more
    checkpoint.dirpath = str(tmp_path)
    _lightning.save_last_checkpoint(checkpoint, trainer)
    assert checkpoint.last_model_path == str(tmp_path / "last.ckpt") and (tmp_path / "last.ckpt").is_file()


def test_cli_hooks_the_project_overrides():
    """``LmTyingCLI`` overrides ``_parse_ckpt_path`` (resolve last/best before Lightning reads the checkpoint) and
    ``_add_subcommands`` (list export/generate through jsonargparse's ``_subcommands_action``), and reads the
    instantiated trainer config with ``_get``."""
    from lightning.pytorch.cli import LightningArgumentParser

    assert parameters(LightningCLI._parse_ckpt_path) == ["self"]
    assert parameters(LightningCLI._get) == ["self", "config", "key", "default"]
    assert parameters(LightningCLI._add_subcommands) == ["self", "parser", "kwargs"]
    parser = LightningArgumentParser()
    action = parser.add_subcommands()
    assert parser._subcommands_action is action and callable(action.add_subcommand)
