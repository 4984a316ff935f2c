"""Benchmark: ``configs/word2vec.yaml`` through ``lm-tying fit`` in one process against 2-process CPU DDP (gloo).

    python benchmarks/word2vec_ddp.py --corpus ../shared/data/text8-head.zip
    python benchmarks/word2vec_ddp.py --corpus ../shared/data/text8-head.zip --seeds 0 1 2

For each seed, runs the unchanged config as a user would (a subprocess of the CLI), first in one process,
then with ``--trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu``, back to back, and
evaluates the final ``last.ckpt`` of each on gensim's analogy, WordSim-353 and SimLex-999 files. Printed:
the whole command's wall time (start-up, kernel load, evaluation after each epoch included), the quality,
the machine load before each run, and the means over seeds. For the DDP runs it also times, in two gloo
processes on this machine, one all-reduce of the summed changes (both tables: 2 x vocabulary x dimension
floats, as after every batch) and multiplies it by the run's number of batches: the share of the DDP run's
wall time spent merging.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.word2vec import evaluate  # noqa: E402
from lm_tying.checkpoint import load_model  # noqa: E402

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def run(corpus: str, seed: int, ddp: bool, workdir: Path, extra: list[str]) -> dict:
    name = f"{'ddp' if ddp else 'one'}-{seed}"
    args = [sys.executable, "-m", "lm_tying.cli", "fit", "--config", str(ROOT / "configs" / "word2vec.yaml"),
            "--data.path", corpus, "--data.data_dir", str(workdir / "data"), "--seed_everything", str(seed),
            "--run_name", name, "--trainer.enable_progress_bar", "false"] + (DDP + extra if ddp else [])  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    engine = next((line for line in proc.stderr.splitlines() if "update engine" in line), "")
    ckpt = workdir / "checkpoints" / name / "last.ckpt"
    model = load_model(ckpt)
    steps = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    tables = sum(t.numel() for t in model.trained_tables())
    return dict(name="DDP x2" if ddp else "1 process", seed=seed, wall=wall, load=load, engine=engine,
                steps=steps, tables=tables, **evaluate(model.word_vectors()))  # fmt: skip


def _time_allreduce(rank: int, numel: int, repeats: int, port: int, result: "mp.Queue") -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    changes = torch.randn(numel)
    dist.all_reduce(changes)  # warm-up: connections and buffers
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(changes)
    if rank == 0:
        result.put((time.perf_counter() - start) / repeats)
    dist.destroy_process_group()


def allreduce_seconds(numel: int, repeats: int = 10) -> float:
    """Wall time of one 2-process gloo all-reduce of ``numel`` float32 values (what DDP merges per batch)."""
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_time_allreduce, args=(rank, numel, repeats, port, result)) for rank in range(2)]
    for proc in procs:
        proc.start()
    seconds = result.get()
    for proc in procs:
        proc.join()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--ddp-only", action="store_true", help="skip the one-process runs")
    p.add_argument("--ddp-args", default="", help='more CLI arguments for the DDP runs, e.g. "--model.init_args.ddp_merge mean"')
    args = p.parse_args()
    corpus = str(Path(args.corpus).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for ddp in (True,) if args.ddp_only else (False, True):
                r = run(corpus, seed, ddp, Path(tmp), args.ddp_args.split())
                rows.append(r)
                print(f"{r['name']:10s} seed {seed}: {r['wall']:6.1f} s (load {r['load']:.1f})  analogy "
                      f"{100 * r['analogy']:.2f} %  WS-353 {r['wordsim353']:.3f}  SimLex {r['simlex999']:.3f}"
                      f"\n           {r['engine'].strip()}", flush=True)  # fmt: skip
        ddp_rows = [r for r in rows if r["name"] == "DDP x2"]
        if ddp_rows:
            each = allreduce_seconds(ddp_rows[0]["tables"])
            for r in ddp_rows:
                merging = each * r["steps"]
                print(f"DDP seed {r['seed']}: {r['steps']} batches x one all-reduce of {4 * r['tables'] / 1e6:.0f} MB "
                      f"({1e3 * each:.0f} ms each, load {os.getloadavg()[0]:.1f}) = {merging:.1f} s of its "
                      f"{r['wall']:.1f} s ({100 * merging / r['wall']:.0f} %)")  # fmt: skip
    print(f"\nmeans over seeds {args.seeds}:")
    for name in ("1 process", "DDP x2"):
        sel = [r for r in rows if r["name"] == name]
        if not sel:
            continue
        print(f"{name:10s} {np.mean([r['wall'] for r in sel]):6.1f} s  analogy {100 * np.mean([r['analogy'] for r in sel]):.2f} %  "
              f"WS-353 {np.mean([r['wordsim353'] for r in sel]):.3f}  SimLex {np.mean([r['simlex999'] for r in sel]):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
