"""``step_per_update``: every update a loader batch carries is a training step of its own: ``global_step`` and
``max_steps`` count updates, each update gets the schedule's lr for its step, and a run that ``max_steps``
stops in the middle of a batch resumes to the same tables and "Average loss at step N" table as a run
that never stopped."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lm_tying.callbacks import LastCheckpoint, RandomStateCheckpoint
from lm_tying.data import Text8DataModule
from lm_tying.models.word2vec import Word2Vec

PAIRS, BATCH = 32, 256  # 8 updates a loader batch
TUTORIAL = dict(embedding_dim=16, loss="nce", unique=True, num_sampled=8, lr=1.0, reduction="mean",
                init="tutorial", evaluate=False, threads=1, update_pairs=PAIRS, step_per_update=True)  # fmt: skip


def fit(
    root, corpus, max_steps, callbacks=(), ckpt_path=None, trainer_kw=None, **model_kw
) -> tuple[Word2Vec, L.Trainer]:
    L.seed_everything(0, verbose=False)
    dm = Text8DataModule(path=str(corpus), data_dir=str(root / "data"), vocab_size=None, min_count=1,
                         batch_size=BATCH, window=2, num_workers=0)  # fmt: skip
    model = Word2Vec(vocab_size=dm.num_words, **{**TUTORIAL, "average_loss_every": 0, **model_kw})
    trainer_args = dict(max_steps=max_steps, max_epochs=-1, callbacks=list(callbacks), logger=False,
                        enable_checkpointing=any(isinstance(c, LastCheckpoint) for c in callbacks),
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, log_every_n_steps=5, default_root_dir=str(root))  # fmt: skip
    trainer = L.Trainer(**{**trainer_args, **(trainer_kw or {})})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model, trainer


class RecordSteps(L.Callback):
    """The lr each update is applied with, and ``global_step`` after each batch."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.steps_after_batch: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        engine, lrs = pl_module.engine, self.lrs
        update = engine.update

        def recorded_update(center, context, lr, generator=None):  # every update, the last of a batch included
            lrs.append(lr)
            return update(center, context, lr, generator)

        engine.update = recorded_update

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps_after_batch.append(trainer.global_step)


def test_every_update_is_a_step_with_the_schedules_lr(tmp_path, make_corpus):
    record = RecordSteps()
    logger = CSVLogger(str(tmp_path / "csv"), name="w2v")
    validate_every_2_batches = dict(logger=logger, limit_val_batches=1, val_check_interval=2, log_every_n_steps=10)
    _, trainer = fit(tmp_path, make_corpus(num_words=3000), 37, [record], trainer_kw=validate_every_2_batches,
                     lr=0.1, lr_decay="linear", min_lr_ratio=0.3)  # fmt: skip
    assert record.steps_after_batch == [8, 16, 24, 32, 37]  # max_steps cuts the fifth batch after 5 updates
    assert trainer.global_step == 37
    expected = [0.1 * max(1 - step / 37, 0.3) for step in range(37)]  # word2vec's linear decay, step by step
    assert record.lrs == pytest.approx(expected, rel=1e-12)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 37
    # training and validation figures share one step axis, the updates (validation at Lightning's "step - 1")
    logger.save()
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [16, 24, 32]  # batches crossing 10, 20, 30
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [15, 31]


def test_a_run_stopped_inside_a_batch_resumes_exactly(tmp_path, make_corpus, capsys):
    """20 steps (two batches and half of the third) + resume to 40 == 40 steps straight: the tables, the step
    count and the "Average loss" table, whose windows of 12 steps close inside batches and across the stop."""
    corpus = make_corpus(num_words=3000)
    straight, _ = fit(tmp_path / "straight", corpus, 40, average_loss_every=12)
    table_straight = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Average loss")]

    root = tmp_path / "stopped"

    def callbacks():
        return [RandomStateCheckpoint(), LastCheckpoint(str(root / "ckpt"), every_n_train_steps=0, every_n_minutes=0)]

    fit(root, corpus, 20, callbacks(), average_loss_every=12)
    saved = torch.load(root / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 20 and len(saved["word2vec_train_state"]["pending"]) == 4
    resumed, trainer = fit(root, corpus, 40, callbacks(), ckpt_path=str(root / "ckpt" / "last.ckpt"),
                           average_loss_every=12)  # fmt: skip
    table_resumed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Average loss")]

    assert trainer.global_step == 40
    assert table_straight == table_resumed and len(table_straight) == 3
    for name in ("embedding", "output_weight", "output_bias"):
        torch.testing.assert_close(getattr(resumed, name), getattr(straight, name), rtol=0, atol=0)
