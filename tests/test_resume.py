"""Resume, end to end through the CLI: ``k`` steps + ``--ckpt_path`` gives the run an uninterrupted ``fit`` gives
(weights, optimizer state, step count and logged steps), for both models; SIGTERM and Ctrl-C save ``last.ckpt``
before exiting; SIGKILL, even in the middle of writing a checkpoint, leaves a ``last.ckpt`` that loads."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli_support import (
    MODELS,
    assert_same_state,
    callbacks_arg,
    load_ckpt,
    popen_cli,
    run_cli,
    write_config,
    write_corpus,
)

RESUMED = MODELS + ("word2vec_sequential",)
N = 12  # steps of the reference run; the tiny configs validate every 5 steps and checkpoint every 4


def scalars(log_dir: Path, tags: tuple[str, ...] = ("train/loss", "val/loss")) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of each tag over every event file of the TensorBoard run (a resume appends a file)."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    present = set(acc.Tags()["scalars"])
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags if t in present}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted N-step run per model, the reference of every test here."""
    runs = {}
    for model in RESUMED:
        root = tmp_path_factory.mktemp(f"straight-{model}")
        corpus = write_corpus(root)
        run_cli(["fit", "--config", str(write_config(root, model, corpus, name="run"))], cwd=root)
        runs[model] = root
    return runs


def _fresh(tmp_path: Path, model: str) -> tuple[Path, Path]:
    corpus = write_corpus(tmp_path)
    return tmp_path, write_config(tmp_path, model, corpus, name="run")


@pytest.mark.parametrize("model", RESUMED)
def test_k_steps_then_resume_equals_straight_run(straight, tmp_path, model):
    root, cfg = _fresh(tmp_path, model)
    run_cli(["fit", "--config", str(cfg), "--trainer.max_steps", "7"], cwd=root)
    last = root / "checkpoints/run/last.ckpt"
    assert load_ckpt(last)["global_step"] == 7  # saved at the final step, not only on the 4-step interval

    # Extending the run to N steps is a change of its settings (max_steps), accepted explicitly.
    run_cli(["fit", "--config", str(cfg), "--ckpt_path", str(last), "--accept_changes", "true"], cwd=root)
    a, b = load_ckpt(straight[model] / "checkpoints/run/last.ckpt"), load_ckpt(last)
    assert a["global_step"] == b["global_step"] == N
    assert_same_state(a["state_dict"], b["state_dict"])
    for sa, sb in zip(a["optimizer_states"], b["optimizer_states"]):
        for (ka, va), (kb, vb) in zip(sorted(sa["state"].items()), sorted(sb["state"].items())):
            assert ka == kb
            assert_same_state(va, vb)
    assert a["loops"]["fit_loop"]["epoch_loop.batch_progress"] == b["loops"]["fit_loop"]["epoch_loop.batch_progress"]

    # The resumed fit logs into the same TensorBoard run, continuing the step numbers with the same values.
    assert sorted(p.name for p in (root / "logs/run").iterdir()) == ["version_0"]
    got, want = scalars(root / "logs/run/version_0"), scalars(straight[model] / "logs/run/version_0")
    assert "train/loss" in want and "val/loss" in want
    assert got == want


def test_sigterm_saves_last_and_resume_last_is_exact(straight, tmp_path):
    model = "word2vec"
    root, cfg = _fresh(tmp_path, model)
    proc = run_cli(
        ["fit", "--config", str(cfg), *callbacks_arg(("SignalAtStep", {"step": 6, "signum": int(signal.SIGTERM)}))],
        cwd=root,
        check=False,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "resume with" in proc.stderr and "Traceback" not in proc.stderr
    last = root / "checkpoints/run/last.ckpt"
    assert load_ckpt(last)["global_step"] == 6  # not on the 4-step interval: written by the signal path

    run_cli(["fit", "--config", str(cfg), "--ckpt_path", "last"], cwd=root)
    a, b = load_ckpt(straight[model] / "checkpoints/run/last.ckpt"), load_ckpt(last)
    assert b["global_step"] == N
    assert_same_state(a["state_dict"], b["state_dict"])


def test_ctrl_c_finishes_the_step_and_saves_last(tmp_path):
    root, cfg = _fresh(tmp_path, "lm")
    proc = run_cli(
        ["fit", "--config", str(cfg), *callbacks_arg(("SignalAtStep", {"step": 3, "signum": int(signal.SIGINT)}))],
        cwd=root,
        check=False,
    )
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    assert "Ctrl-C: finishing the current step" in proc.stderr
    # Saved at the step Ctrl-C came in (3 is not a checkpoint step); the resume path is the SIGTERM test's.
    assert load_ckpt(root / "checkpoints/run/last.ckpt")["global_step"] == 3


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    root, cfg = _fresh(tmp_path, "lm")
    # Step 8 is a checkpoint step: its write is torn in half and the process SIGKILLed mid-write.
    proc = run_cli(
        [
            "fit",
            "--config",
            str(cfg),
            *callbacks_arg(("SignalAtStep", {"step": 8, "signum": int(signal.SIGKILL), "during_save": True})),
        ],
        cwd=root,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    run_dir = root / "checkpoints/run"
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".last.ckpt.tmp-")]
    assert leftovers, "the kill did not happen during a checkpoint write"
    assert load_ckpt(run_dir / "last.ckpt")["global_step"] == 4  # the previous complete checkpoint


def test_sigkill_at_an_arbitrary_moment_leaves_a_loadable_last(tmp_path):
    root, cfg = _fresh(tmp_path, "word2vec")
    # Checkpoint at every step so that the kill is likely to land in or near a write.
    proc = popen_cli(
        ["fit", "--config", str(cfg), "--trainer.max_steps", "100000", "--checkpoint.every_n_train_steps", "1"], root
    )
    last = root / "checkpoints/run/last.ckpt"
    try:
        deadline = time.monotonic() + 90
        while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert last.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no last.ckpt"
        time.sleep(0.7)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert load_ckpt(last)["global_step"] >= 1


def test_atomic_save_replaces_and_clears_leftovers(tmp_path):
    """The write path itself: a leftover of a dead writer is removed, a live writer's temporary file is left alone,
    the target is complete after each save."""
    import subprocess
    import sys

    import torch

    from lm_tying.atomic import temporary_name
    from lm_tying.checkpoint import AtomicCheckpointIO

    target = tmp_path / "run" / "last.ckpt"
    target.parent.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a writer that is gone
    (target.parent / f".last.ckpt.tmp-{dead.pid}-0a1b2c3d").write_bytes(b"half a checkpoint")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        live_tmp = target.parent / f".last.ckpt.tmp-{alive.pid}-0a1b2c3d"  # another process, mid-write
        live_tmp.write_bytes(b"being written")
        io = AtomicCheckpointIO()
        for step in (1, 2):
            io.save_checkpoint({"global_step": step, "w": torch.full((3,), float(step))}, target)
            assert load_ckpt(target)["global_step"] == step
        assert sorted(p.name for p in target.parent.iterdir()) == sorted([live_tmp.name, "last.ckpt"])
        alive.kill()
    assert temporary_name(target) != temporary_name(target)  # two saves of one process never share a file
