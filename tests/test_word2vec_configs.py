"""The shipped word2vec configs, run through the CLI on every path a user can take (tiny corpus, size overrides
only): one CPU process, the GPU's batched engine on CPU, bf16 where the hardware has it, 2-process CPU DDP, and
SIGTERM part-way through the config's own schedule then ``--ckpt_path last``, bit-identical to the straight run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml

from cli_support import (
    REPO,
    assert_same_state,
    callbacks_arg,
    load_ckpt,
    run_cli,
    shipped_config_args,
    write_corpus,
)

CONFIGS = ("word2vec.yaml", "word2vec_cs20.yaml")
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
ONE_THREAD = ["--model.init_args.threads", "1"]  # bit-reproducible: the kernel's threads are lock-free


def losses(record: Path, rank: int = 0) -> list[float]:
    return json.loads((record / f"losses{rank}.json").read_text())


def assert_trains(values: list[float]) -> None:
    """Finite, and the last steps' mean loss clearly below the first steps'."""
    assert len(values) >= 10 and all(torch.isfinite(torch.tensor(values))), values
    k = max(3, len(values) // 5)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    assert last < 0.95 * first, (first, last)


def engine_line(proc) -> str:
    return next(line for line in proc.stderr.splitlines() if "update engine" in line)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Per config: one uninterrupted single-process run (one thread), its losses and its last.ckpt."""
    runs = {}
    for name in CONFIGS:
        root = tmp_path_factory.mktemp(Path(name).stem)
        corpus = write_corpus(root, num_words=8000)
        record = ("RecordLosses", {"out_dir": str(root / "record")})
        proc = run_cli([*shipped_config_args(name, corpus), *ONE_THREAD, *callbacks_arg(record)], cwd=root, timeout=240)
        runs[name] = (root, corpus, proc)
    return runs


@pytest.mark.parametrize("name", CONFIGS)
def test_one_cpu_process_trains_with_the_engine_auto_picks(straight, name):
    root, _, proc = straight[name]
    assert_trains(losses(root / "record"))
    expected = "'sequential'" if name == "word2vec.yaml" else "'batched'"  # the tutorial's NCE + bias: batched
    assert expected in engine_line(proc)


def test_validation_runs_the_number_of_batches_the_config_names(straight):
    """LightningCLI reads ``limit_val_batches`` as a float (the Trainer's ``Union[float, int]``), so a config's 1
    would reach Lightning as 1.0, every batch; the count must arrive as a count. (word2vec_cs20.yaml's shortened
    run does not validate.)"""
    root, _, _ = straight["word2vec.yaml"]
    limit = yaml.safe_load((REPO / "configs" / "word2vec.yaml").read_text())["trainer"]["limit_val_batches"]
    counts = json.loads((root / "record" / "val_batches0.json").read_text())
    assert isinstance(limit, int) and counts and all(count == limit for count in counts), (limit, counts)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("path", ["gpu-engine-on-cpu", "bf16"])
def test_the_gpu_path_trains(tmp_path, name, path):
    """What ``auto`` runs on a GPU: the batched engine with its adapted update size (and bf16-mixed there),
    on this machine's CUDA device when it has one, else on CPU."""
    args = ["--model.init_args.update", "batched"]
    if path == "bf16":
        if torch.cuda.is_available():
            args = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]  # auto picks batched itself
        elif not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            pytest.skip("this CPU has no bf16 arithmetic (no AVX-512 BF16 / AMX) and there is no GPU")
        args += ["--trainer.precision", "bf16-mixed"]
    corpus = write_corpus(tmp_path, num_words=8000)
    record = ("RecordLosses", {"out_dir": str(tmp_path / "record")})
    proc = run_cli([*shipped_config_args(name, corpus), *args, *callbacks_arg(record)], cwd=tmp_path, timeout=240)
    assert "'batched'" in engine_line(proc)
    if name == "word2vec.yaml":
        assert "updates of 4,096 pairs" in engine_line(proc)  # lr per pair: small updates, not the whole batch
    assert_trains(losses(tmp_path / "record"))


@pytest.mark.parametrize("name", CONFIGS)
def test_two_process_ddp_trains_with_identical_ranks(tmp_path, name):
    corpus = write_corpus(tmp_path, num_words=8000)
    callbacks = callbacks_arg(
        ("RecordLosses", {"out_dir": str(tmp_path / "record")}),
        ("RecordBatches", {"out_dir": str(tmp_path / "batches")}),
    )
    proc = run_cli([*shipped_config_args(name, corpus), *DDP, *callbacks], cwd=tmp_path, timeout=300)
    assert "2 processes sum their changes after each batch" in engine_line(proc)
    for rank in (0, 1):
        assert_trains(losses(tmp_path / "record", rank))
    ranks = [torch.load(tmp_path / "batches" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_same_state(ranks[0]["params"], ranks[1]["params"])
    assert not torch.equal(ranks[0]["batches"][0]["a"], ranks[1]["batches"][0]["a"])  # each rank its own shard


@pytest.mark.parametrize("name", CONFIGS)
def test_sigterm_then_resume_last_is_bit_identical(straight, tmp_path, name):
    """Stopped part-way through the config's own schedule (word2vec.yaml: linear decay over its epochs,
    stopped inside the first epoch), then ``--ckpt_path last``: the same tables as the straight run."""
    reference = load_ckpt(straight[name][0] / f"checkpoints/{Path(name).stem}/last.ckpt")
    corpus = write_corpus(tmp_path, num_words=8000)
    args = [*shipped_config_args(name, corpus), *ONE_THREAD]
    at = {"word2vec.yaml": 7, "word2vec_cs20.yaml": 30}[name]  # cs20: after the third batch of 10 updates
    stop = ("SignalAtStep", {"step": at, "signum": int(signal.SIGTERM)})
    proc = run_cli([*args, *callbacks_arg(stop)], cwd=tmp_path, check=False, timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    last = tmp_path / f"checkpoints/{Path(name).stem}/last.ckpt"
    assert load_ckpt(last)["global_step"] == at
    run_cli([*args, "--ckpt_path", "last"], cwd=tmp_path, timeout=240)
    resumed = load_ckpt(last)
    assert resumed["global_step"] == reference["global_step"] > at
    assert_same_state(reference["state_dict"], resumed["state_dict"])
    lr = [s["param_groups"][0]["lr"] for s in (reference["optimizer_states"][0], resumed["optimizer_states"][0])]
    assert lr[0] == lr[1]
