"""SIGTERM and Ctrl-C sent to the whole process group (issue 14), as ``kill -TERM -- -PGID`` from a scheduler and a
terminal's Ctrl-C do: with data-loader workers, and under DDP, the run finishes its step, saves ``last.ckpt`` and
exits 143 / 130; resumed with ``--ckpt_path last`` it ends bit for bit where the uninterrupted run ends.

The cases between them cover both models, both signals, 1 and 2 workers, one process and 2-process DDP; 0 workers
(the process group is then the main process alone) is test_resume.py's SIGTERM and Ctrl-C tests.
"""

from __future__ import annotations

import signal

import pytest

from cli_support import assert_same_state, callbacks_arg, load_ckpt, run_cli, write_config, write_corpus

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
STEP = 6  # the signal comes after this step: not a multiple of the tiny configs' 4-step interval
CASES = [
    # (model, data.num_workers, signal, DDP)
    ("word2vec", 2, signal.SIGTERM, False),
    ("lm", 1, signal.SIGINT, False),
    ("lm", 1, signal.SIGTERM, True),
]


@pytest.mark.parametrize(
    "model, workers, signum, ddp", CASES, ids=[f"{m}-{w}workers-{s.name}-{'ddp' if d else '1proc'}" for m, w, s, d in CASES]
)
def test_signal_to_the_process_group_saves_and_resumes_exactly(tmp_path, model, workers, signum, ddp):
    corpus = write_corpus(tmp_path)
    settings = ["--data.init_args.num_workers", str(workers), *(DDP if ddp else [])]
    for name in ("straight", "stopped"):
        (tmp_path / name).mkdir()
        write_config(tmp_path / name, model, corpus, name="run")
    run_cli(["fit", "--config", "run.yaml", *settings], cwd=tmp_path / "straight", timeout=300)

    root = tmp_path / "stopped"
    stop = callbacks_arg(("SignalGroupAtStep", {"step": STEP, "signum": int(signum)}))
    stopped = run_cli(["fit", "--config", "run.yaml", *settings, *stop], cwd=root, timeout=300, check=False)
    stderr = stopped.stderr
    assert stopped.returncode == 128 + signum, stderr[-4000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-4000:]
    last = root / "checkpoints/run/last.ckpt"
    assert load_ckpt(last)["global_step"] == STEP  # saved by the signal path, at the step the signal came in

    run_cli(["fit", "--config", "run.yaml", *settings, "--ckpt_path", "last"], cwd=root, timeout=300)
    want, got = load_ckpt(tmp_path / "straight/checkpoints/run/last.ckpt"), load_ckpt(last)
    assert got["global_step"] == want["global_step"] == 12
    assert_same_state(want["state_dict"], got["state_dict"])
