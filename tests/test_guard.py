"""Nothing lost, nothing silently wrong (issue 11, the run and checkpoint side): a fit never starts over a run that
has a ``last.ckpt``, two processes never train one run, a diverged run stops before it saves non-finite weights, a
resume with other settings is refused unless accepted, a corrupt checkpoint is named, ``last.ckpt`` is also written
on a clock, and config mistakes end in one line. Mostly in-process runs of the CLI on a tiny corpus (fast)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_support import load_ckpt, write_config, write_corpus

pytestmark = pytest.mark.filterwarnings("ignore")


def cli(args: list[str], cwd: Path) -> tuple[int, str]:
    """``lm-tying ARGS`` in this process, in ``cwd``: (exit status, what it printed on stderr)."""
    from lm_tying.cli import main

    stderr = io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(stderr):
            main(args)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        os.chdir(previous)
    return code, stderr.getvalue()


def error_line(stderr: str) -> str:
    """The one error line (the CLI adds only the hint about LM_TYING_DEBUG after it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("lm-tying")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "usage:" not in stderr
    return lines[0]


def fit(root: Path, model: str, *extra: str, name: str = "run") -> tuple[int, str]:
    return cli(["fit", "--config", str(root / f"{name}.yaml"), *extra], root)


@pytest.fixture
def run_dir(tmp_path):
    """A working directory with a corpus and one tiny config per model (``word2vec.yaml``, ``lm.yaml``)."""
    corpus = write_corpus(tmp_path)
    for model in ("word2vec", "lm"):
        write_config(tmp_path, model, corpus, max_steps=4)
    return tmp_path


# ------------------------------------------------------------------------------------------- overwrite + lock
def test_fit_refuses_to_start_over_a_run_that_has_last_ckpt(run_dir):
    assert fit(run_dir, "lm", name="lm")[0] == 0
    last = run_dir / "checkpoints/lm/last.ckpt"
    before = last.read_bytes()

    code, stderr = fit(run_dir, "lm", "--trainer.max_steps", "2", name="lm")
    assert code == 2
    line = error_line(stderr)
    assert "run 'lm'" in line and "--ckpt_path last" in line and "--run_name" in line and "--overwrite true" in line
    assert last.read_bytes() == before  # the earlier run's work is untouched

    assert fit(run_dir, "lm", "--trainer.max_steps", "2", "--overwrite", "true", name="lm")[0] == 0
    assert load_ckpt(last)["global_step"] == 2


def test_a_second_process_on_the_same_run_refuses_and_a_dead_holder_does_not_block(run_dir):
    from lm_tying.atomic import RunLock

    with RunLock(run_dir / "checkpoints/word2vec"):  # another fit of this run, alive
        code, stderr = fit(run_dir, "word2vec", name="word2vec")
    assert code != 0
    line = error_line(stderr)
    assert "is in use by pid" in line and "--run_name" in line
    assert not (run_dir / "checkpoints/word2vec/last.ckpt").exists()

    # A holder killed with SIGKILL leaves its lock file behind, but not its lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lm_tying.atomic import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
         str(run_dir / "checkpoints/word2vec")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (run_dir / "checkpoints/.word2vec.lock").exists()
    assert fit(run_dir, "word2vec", name="word2vec")[0] == 0


# ------------------------------------------------------------------------------------------- finite guard
@pytest.mark.parametrize("model, lr, lever", [("word2vec", "1e6", "--model.init_args.lr"), ("lm", "1e38", "gradient_clip_val")])
def test_a_diverging_run_stops_naming_the_step_and_never_saves_nonfinite_weights(run_dir, model, lr, lever):
    # A checkpoint every step, the loss read back only every 50 (as a GPU run would): the save is what is guarded.
    code, stderr = fit(
        run_dir, model, "--model.init_args.lr", lr, "--checkpoint.every_n_train_steps", "1",
        "--trainer.log_every_n_steps", "50", "--trainer.max_steps", "12", name=model,
    )  # fmt: skip
    assert code == 1
    line = error_line(stderr)
    assert "training diverged" in line and lever in line and "--ckpt_path last" in line
    step = int(line.split(" at step ")[1].split(";")[0].split(" ")[0])
    last = load_ckpt(run_dir / f"checkpoints/{model}/last.ckpt")
    assert last["global_step"] < step
    for name, value in last["state_dict"].items():
        assert torch.isfinite(value).all(), name


def test_the_guard_reads_the_loss_only_at_logging_steps_but_names_the_first_bad_one():
    """Per step the guard only folds the loss into an on-device flag; it reads it every log_every_n_steps batches."""
    from types import SimpleNamespace

    from lm_tying.callbacks import FiniteGuard, TrainingDivergedError

    guard = FiniteGuard()
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=4, world_size=1, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    module = SimpleNamespace(automatic_optimization=False)
    losses = [1.0, float("nan"), 2.0, float("inf")]
    for step, loss in enumerate(losses[:3], start=1):
        trainer.global_step = step
        guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(loss)}, None, step - 1)  # no check yet
    trainer.global_step = 4
    with pytest.raises(TrainingDivergedError, match="non-finite at step 2;"):
        guard.on_train_batch_end(trainer, module, {"loss": torch.tensor(losses[3])}, None, 3)


def test_export_and_resume_refuse_a_checkpoint_with_nonfinite_weights(run_dir):
    assert fit(run_dir, "word2vec", name="word2vec")[0] == 0
    path = run_dir / "checkpoints/word2vec/last.ckpt"
    checkpoint = load_ckpt(path)
    checkpoint["state_dict"]["embedding"][3, :2] = float("nan")  # as a diverged run of an older version saved it
    torch.save(checkpoint, path)

    code, stderr = cli(["export", "--ckpt_path", str(path), "--output", "vectors.txt"], run_dir)
    assert code == 1 and "non-finite vectors (1 of 100 rows" in error_line(stderr)
    assert not (run_dir / "vectors.txt").exists()
    code, stderr = fit(run_dir, "word2vec", "--ckpt_path", "last", name="word2vec")
    assert code == 1 and "holds non-finite weights (embedding" in error_line(stderr)


# ------------------------------------------------------------------------------------------- resume settings
def test_resume_with_other_settings_is_refused_listing_them_unless_accepted(run_dir):
    assert fit(run_dir, "word2vec", name="word2vec")[0] == 0
    lr = load_ckpt(run_dir / "checkpoints/word2vec/last.ckpt")["hyper_parameters"]["lr"]
    changed = ["--data.init_args.batch_size", "64", "--data.init_args.window", "3", "--model.init_args.lr", "0.5",
               "--trainer.max_steps", "6", "--seed_everything", "1"]  # fmt: skip
    code, stderr = fit(run_dir, "word2vec", "--ckpt_path", "last", *changed, name="word2vec")
    assert code == 2
    line = error_line(stderr)
    for difference in ("data.batch_size 256 -> 64", "data.window 2 -> 3", f"model.lr {lr!r} -> 0.5",
                       "trainer.max_steps 4 -> 6", "seed_everything 0 -> 1", "--accept_changes true"):  # fmt: skip
        assert difference in line, line
    assert load_ckpt(run_dir / "checkpoints/word2vec/last.ckpt")["global_step"] == 4

    # Accepted: the run continues with the settings asked for (before, the checkpoint's lr silently won).
    assert fit(run_dir, "word2vec", "--ckpt_path", "last", *changed, "--accept_changes", "true", name="word2vec")[0] == 0
    last = load_ckpt(run_dir / "checkpoints/word2vec/last.ckpt")
    assert last["global_step"] == 6 and last["hyper_parameters"]["lr"] == 0.5
    assert last["datamodule_hyper_parameters"]["batch_size"] == 64


def test_resume_that_cannot_continue_the_run_is_refused_even_when_accepted(run_dir):
    assert fit(run_dir, "lm", name="lm")[0] == 0
    code, stderr = fit(run_dir, "lm", "--ckpt_path", "last", "--model.init_args.hidden_dim", "32", name="lm")
    assert code == 2 and "model.hidden_dim 16 -> 32" in error_line(stderr)
    code, stderr = fit(
        run_dir, "lm", "--ckpt_path", "last", "--model.init_args.hidden_dim", "32", "--accept_changes", "true", name="lm"
    )
    assert code == 1 and "weights do not fit this model" in error_line(stderr)


def test_resume_on_another_corpus_is_refused_by_its_fingerprint(run_dir, monkeypatch):
    from lm_tying.data import Text8DataModule

    monkeypatch.setattr(Text8DataModule, "corpus_fingerprint", property(lambda self: "corpus-a"), raising=False)
    assert fit(run_dir, "lm", name="lm")[0] == 0
    assert load_ckpt(run_dir / "checkpoints/lm/last.ckpt")["lm_tying_run"]["corpus_fingerprint"] == "corpus-a"
    monkeypatch.setattr(Text8DataModule, "corpus_fingerprint", property(lambda self: "corpus-b"), raising=False)
    code, stderr = fit(run_dir, "lm", "--ckpt_path", "last", name="lm")
    assert code == 1 and "trained on another corpus (fingerprint corpus-a, this data's is corpus-b)" in error_line(stderr)


# ------------------------------------------------------------------------------------------- integrity
def test_a_corrupt_checkpoint_is_named_in_one_line(run_dir):
    from lm_tying.checkpoint import AtomicCheckpointIO, CorruptCheckpointError

    assert fit(run_dir, "lm", name="lm")[0] == 0
    path = run_dir / "checkpoints/lm/last.ckpt"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)  # 4 KiB zeroed inside the weights: torch.load does not notice
    path.write_bytes(bytes(data))

    for args in (["fit", "--config", "lm.yaml", "--ckpt_path", "last"], ["export", "--ckpt_path", str(path), "--output", "v.txt"]):
        code, stderr = cli(args, run_dir)
        assert code == 1 and "last.ckpt' is corrupt (member" in error_line(stderr)
    with pytest.raises(CorruptCheckpointError):
        AtomicCheckpointIO().load_checkpoint(path)


# ------------------------------------------------------------------------------------------- time-based saves
def test_last_ckpt_is_also_written_on_a_clock(tmp_path, monkeypatch):
    """40 s of (fake) training per step, a save due every minute and never by steps: saves at steps 2, 4, 6 and at
    the end, the same interval for both models (the callback only sees steps and time)."""
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lm_tying.callbacks import checkpoints

    clock = [0.0]
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: clock[0])
    saved_at = []

    class Tick(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock[0] += 40.0

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            saved_at.append(trainer.global_step)

    last = checkpoints.LastCheckpoint(str(tmp_path), every_n_train_steps=0, every_n_minutes=1.0)
    trainer = pl.Trainer(
        max_steps=7, callbacks=[Tick(), last], logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert saved_at == [2, 4, 6, 7]
    assert load_ckpt(tmp_path / "last.ckpt")["global_step"] == 7


def test_last_ckpt_is_written_when_a_step_crosses_the_interval(tmp_path):
    """A training step that counts several optimizer steps (word2vec's step_per_update) still saves at every
    interval it crosses, not only when global_step lands on a multiple of it."""
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lm_tying.callbacks import checkpoints

    class ThreeStepsABatch(BoringModel):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            for _ in range(3):
                opt.zero_grad()
                self.manual_backward(self.step(batch))
                opt.step()

    saved_at = []

    class Record(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            saved_at.append(trainer.global_step)

    last = checkpoints.LastCheckpoint(str(tmp_path), every_n_train_steps=5, every_n_minutes=0)
    trainer = pl.Trainer(
        max_steps=18, callbacks=[Record(), last], logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(ThreeStepsABatch())
    assert saved_at == [6, 12, 15, 18]


def test_the_cli_saves_last_ckpt_every_few_minutes_by_default(tmp_path, capsys):
    import yaml

    cfg = write_config(tmp_path, "lm", write_corpus(tmp_path))
    assert cli(["fit", "--config", str(cfg), "--print_config"], tmp_path)[0] == 0
    assert yaml.safe_load(capsys.readouterr().out)["checkpoint"]["every_n_minutes"] == 5.0


# ------------------------------------------------------------------------------------------- config mistakes
CONFIG_MISTAKES = [
    ("unknown key", ["--model.init_args.hiden_dim", "8"], "model.init_args.hiden_dim: no such option"),
    ("unknown option", ["--trainer.max_stepz", "3"], "unknown option(s) --trainer.max_stepz 3"),
    ("wrong type", ["--data.batch_size", "abc"], "data.init_args.batch_size: expected int, got 'abc'"),
    ("split summing to 1.1", ["--data.init_args.split", "[0.9, 0.1, 0.1]"], "data: split=(0.9, 0.1, 0.1)"),
]


@pytest.mark.parametrize("case, extra, message", CONFIG_MISTAKES, ids=[c[0] for c in CONFIG_MISTAKES])
def test_config_mistakes_end_in_one_line_naming_the_key(run_dir, case, extra, message):
    code, stderr = fit(run_dir, "lm", *extra, name="lm")
    assert code != 0
    assert message in error_line(stderr)
    assert len(stderr.strip().splitlines()) <= 3, stderr  # no usage text


def test_an_unknown_key_in_a_config_file_is_named(run_dir):
    cfg = (run_dir / "lm.yaml").read_text().replace("max_steps:", "max_stepz:")
    (run_dir / "typo.yaml").write_text(cfg)
    code, stderr = cli(["fit", "--config", "typo.yaml"], run_dir)
    assert code == 2 and "trainer.max_stepz: no such option" in error_line(stderr)


# ------------------------------------------------------------------------------------------- generate
def test_generate_validates_its_numbers_and_warns_about_unknown_words(run_dir, capsys):
    assert fit(run_dir, "lm", name="lm")[0] == 0
    ckpt = str(run_dir / "checkpoints/lm/last.ckpt")
    for bad, message in ((["--num_words", "-5"], "--num_words -5: it must be at least 1"),
                         (["--top_k", "0"], "--top_k 0"), (["--temperature", "-1"], "--temperature -1.0")):  # fmt: skip
        code, stderr = cli(["generate", "--ckpt_path", ckpt, "--prompt", "x", *bad], run_dir)
        assert code == 2 and message in error_line(stderr)
    words = load_ckpt(Path(ckpt))["vocabulary"]["words"]
    code, stderr = cli(["generate", "--ckpt_path", ckpt, "--prompt", f"{words[1]} zzzqqq", "--num_words", "3"], run_dir)
    assert code == 0
    assert "not in the model's vocabulary, read as UNK: zzzqqq" in stderr and words[1] not in stderr.split("UNK:")[1]
    assert len(capsys.readouterr().out.split()) == 5
