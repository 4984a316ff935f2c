"""Lightning DDP through the CLI, 2 processes on CPU (gloo), for both models: the ranks see disjoint shares of the
epoch that together make the whole of it, the weights stay identical across ranks, the step count is the epoch's
length per rank, only rank 0 writes files, and a DDP run stopped after k steps and resumed ends with the weights
of the uninterrupted DDP run."""

from __future__ import annotations

import collections
from types import SimpleNamespace

import pytest
import torch

from cli_support import (
    MODELS,
    assert_same_state,
    callbacks_arg,
    load_ckpt,
    run_cli,
    tensor_digest,
    tiny_config,
    write_config,
    write_corpus,
)

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
WORLD = 2
K = 5  # the resumed run starts from step K


def ddp_fit(root, cfg, *callbacks, extra=()):
    return run_cli(["fit", "--config", str(cfg), *DDP, *callbacks_arg(*callbacks), *extra], cwd=root, timeout=240)


def recorded(record_dir):
    return [torch.load(record_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process_epoch(model, corpus, data_dir, world_size):
    """The epoch's batches as one process sees it (for the LM: with all ranks' streams, world_size x batch_size)."""
    from lm_tying.data import Text8DataModule

    init = dict(tiny_config(model, corpus)["data"]["init_args"], data_dir=str(data_dir))
    if model == "lm":
        init["batch_size"] *= world_size
    elif init.get("pair_shuffle", "auto") == "auto":
        init["pair_shuffle"] = "numpy"  # what auto takes under DDP
    dm = Text8DataModule(**init)
    dm.setup("fit")
    return [tuple(t.clone() for t in batch) for batch in dm.train_dataloader()]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Per model: one uninterrupted DDP epoch (A), and a DDP run (B) resumed from A's last.ckpt of step K.

    (A's step-K checkpoint is the very file a run stopped at step K leaves; test_resume.py covers the stop itself.
    Taking it from A spares two DDP start-ups per model.)"""
    runs = {}
    for model in MODELS:
        root = tmp_path_factory.mktemp(f"ddp-{model}")
        corpus = write_corpus(root, num_words=4000)
        cfg = write_config(root, model, corpus, name="run", max_steps=-1, max_epochs=1, val_check_interval=8)
        (root / "a").mkdir()
        (root / "b").mkdir()
        step_k = str(root / "b" / f"step{K}.ckpt")
        ddp_fit(
            root / "a",
            cfg,
            ("RecordBatches", {"out_dir": str(root / "a" / "record")}),
            ("CopyFileAtStep", {"step": K, "src": "checkpoints/run/last.ckpt", "dest": step_k}),
            extra=["--checkpoint.every_n_train_steps", str(K)],
        )
        record_b = ("RecordBatches", {"out_dir": str(root / "b" / "record")})
        ddp_fit(root / "b", cfg, record_b, extra=["--ckpt_path", step_k])
        runs[model] = SimpleNamespace(root=root, corpus=corpus, cfg=cfg)
    return runs


@pytest.mark.parametrize("model", MODELS)
def test_ranks_see_disjoint_shares_of_the_whole_epoch(ddp_runs, model):
    run = ddp_runs[model]
    ranks = recorded(run.root / "a" / "record")
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == WORLD for r in ranks)
    full = single_process_epoch(model, run.corpus, run.root / "a" / "data", WORLD)
    if model == "lm":
        # The LM's streams are the rows of one grid: rank r holds rows [r*B, (r+1)*B) of every batch.
        assert all(len(r["batches"]) == len(full) for r in ranks)
        for i, (inputs, targets) in enumerate(full):
            got = torch.cat([r["batches"][i]["a"] for r in ranks]), torch.cat([r["batches"][i]["b"] for r in ranks])
            assert torch.equal(got[0], inputs) and torch.equal(got[1], targets), f"batch {i}"
    else:
        seen = [collections.Counter(tensor_digest(b["a"], b["b"]) for b in r["batches"]) for r in ranks]
        whole = collections.Counter(tensor_digest(*batch) for batch in full)
        per_rank = -(-len(full) // WORLD)
        assert all(len(r["batches"]) == per_rank for r in ranks)
        padding = WORLD * per_rank - len(full)  # an odd number of batches: one rank repeats one to stay in step
        assert sum((seen[0] & seen[1]).values()) <= padding
        assert set(seen[0] | seen[1]) == set(whole)


@pytest.mark.parametrize("model", MODELS)
def test_weights_identical_across_ranks_and_steps_as_expected(ddp_runs, model):
    run = ddp_runs[model]
    ranks = recorded(run.root / "a" / "record")
    assert_same_state(ranks[0]["params"], ranks[1]["params"])
    steps = len(ranks[0]["batches"])
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == steps
    last = load_ckpt(run.root / "a" / "checkpoints/run/last.ckpt")
    assert last["global_step"] == steps
    assert_same_state(last["state_dict"], ranks[0]["params"])
    # Per-rank random states travel in the checkpoint (ranks draw differently, e.g. dropout masks).
    rng = last["callbacks"]["RandomStateCheckpoint"]["ranks"]
    assert len(rng) == WORLD and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # reseeded by rank
    # Rank 0 alone writes logs and the projector: one TensorBoard run, one entry per snapshot.
    logs = run.root / "a" / "logs" / "run"
    assert [p.name for p in logs.iterdir()] == ["version_0"]
    pbtxt = (logs / "version_0" / "projector_config.pbtxt").read_text()
    names = [line.split('"')[1] for line in pbtxt.splitlines() if "tensor_name" in line]
    assert len(names) == len(set(names)) >= 1


@pytest.mark.parametrize("model", MODELS)
def test_resume_under_ddp_matches_the_uninterrupted_run(ddp_runs, model):
    run = ddp_runs[model]
    a = load_ckpt(run.root / "a" / "checkpoints/run/last.ckpt")
    b = load_ckpt(run.root / "b" / "checkpoints/run/last.ckpt")
    assert b["global_step"] == a["global_step"]
    assert_same_state(a["state_dict"], b["state_dict"])
    assert load_ckpt(run.root / "b" / f"step{K}.ckpt")["global_step"] == K
    ra, rb = recorded(run.root / "a" / "record"), recorded(run.root / "b" / "record")
    for rank in range(WORLD):
        # After the resume each rank gets the rest of its share, in order: A's batches from step K+1 on.
        after = [x for x in ra[rank]["batches"] if x["step"] > K]
        assert [x["step"] for x in rb[rank]["batches"]] == [x["step"] for x in after]
        for x, y in zip(after, rb[rank]["batches"]):
            assert torch.equal(x["a"], y["a"]) and torch.equal(x["b"], y["b"])
        assert_same_state(ra[rank]["params"], rb[rank]["params"])


def test_projector_writes_only_on_global_rank_zero(tmp_path):
    from lm_tying.callbacks import EmbeddingProjector

    trainer = SimpleNamespace(is_global_zero=False, global_step=3, loggers=[])
    assert EmbeddingProjector().write(trainer, pl_module=None) is None
    assert list(tmp_path.iterdir()) == []


def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_step_and_saves(tmp_path):
    """A SIGTERM that reaches rank 1 only: the ranks agree on it after the step, save last.ckpt together and all
    exit with 128 + 15 (Lightning's own handler, with a broadcast inside the signal handler, hangs here)."""
    corpus = write_corpus(tmp_path, num_words=4000)
    cfg = write_config(tmp_path, "lm", corpus, name="run", max_steps=100)
    proc = run_cli(
        ["fit", "--config", str(cfg), *DDP, *callbacks_arg(("SignalAtStep", {"step": 3, "signum": 15, "rank": 1}))],
        cwd=tmp_path,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert load_ckpt(tmp_path / "checkpoints/run/last.ckpt")["global_step"] == 3
