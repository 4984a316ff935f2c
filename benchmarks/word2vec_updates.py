"""Benchmark: ``configs/word2vec_cs20.yaml``'s 128-pair updates through ``lm-tying fit`` against a plain PyTorch
loop over the same updates (the same batched engine, the same batches, no Lightning), in one process.

    python benchmarks/word2vec_updates.py --corpus ../shared/data/text8-head.zip
    python benchmarks/word2vec_updates.py --corpus ../shared/data/text8-head.zip --updates 20000 --repeats 3

The CLI runs the config as shipped (100 updates per loader batch, ``step_per_update``) with validation
and periodic checkpoints off (the loop does neither; ``last.ckpt`` is still written at the end, after the
timed span), and ``--classic`` adds the config with one update per batch (``data.batch_size 128``).
Both are timed alike: from the first loader batch in hand to the last update applied. Each repeat runs
the loop then the CLI back to back; printed: updates per second of wall-clock time and per second of this
process's CPU time (the steadier figure when other processes share the cores), the ratios CLI/loop, and
the load average before each run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from lm_tying.cli import LmTyingCLI  # noqa: E402
from lm_tying.data import Text8DataModule  # noqa: E402
from lm_tying.models.word2vec import Word2Vec  # noqa: E402
from lm_tying.models.word2vec.engines import BatchedEngine  # noqa: E402

CONFIG = ROOT / "configs" / "word2vec_cs20.yaml"


class Clock:
    """Wall-clock and process CPU seconds of one span."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, updates: int) -> tuple[float, float]:
        """Updates per wall-clock second and per CPU second since ``start``."""
        return updates / (time.perf_counter() - self.wall), updates / (time.process_time() - self.cpu)


class UpdatesTime(L.Callback):
    """From the first training batch to the end of the batch that reaches ``max_steps``: the span the plain loop
    times (placed before the checkpoint callbacks, so the final ``last.ckpt`` write is outside)."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.rates = (float("nan"), float("nan"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == trainer.max_steps:
            self.rates = self.clock.rates(trainer.global_step)


def plain_loop(corpus: str, updates: int, data_dir: str) -> tuple[float, float]:
    """Updates per wall and CPU second of a bare loop: the loader's batches, cut into 128-pair updates, each
    applied by the engine."""
    cfg = yaml.safe_load(CONFIG.read_text())
    L.seed_everything(0, verbose=False)
    dm = Text8DataModule(**dict(cfg["data"]["init_args"], path=corpus, data_dir=data_dir))
    dm.prepare_data()
    dm.setup("fit")
    model = Word2Vec(vocab_size=dm.num_words, **dict(cfg["model"]["init_args"], evaluate=False))
    engine = BatchedEngine(model, cfg["model"]["init_args"]["update_pairs"])
    lr, size = cfg["model"]["init_args"]["lr"], engine.update_pairs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the CLI's threads: null picks for 128-pair updates
    torch.set_flush_denormal(True)
    done, clock = 0, Clock()
    try:
        while done < updates:
            for center, context in dm.train_dataloader():
                if done == 0:
                    clock.start()  # from the first batch in hand, as the CLI's clock
                for c, x in zip(center.split(size), context.split(size)):
                    engine.update(c, x, lr)
                    done += 1
                    if done == updates:
                        break
                if done == updates:
                    break
        return clock.rates(updates)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def cli(corpus: str, updates: int, data_dir: str, workdir: str, extra: list[str]) -> tuple[float, float]:
    """Updates per wall and CPU second of ``lm-tying fit`` from its first training batch to its last update."""
    timer = UpdatesTime()
    args = ["--config", str(CONFIG), "--data.path", corpus, "--data.data_dir", data_dir,
            "--trainer.max_steps", str(updates), "--trainer.limit_val_batches", "0",
            "--checkpoint.every_n_train_steps", "0", "--checkpoint.dir", workdir, "--log_dir", workdir,
            "--model.init_args.evaluate", "false", "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip
    cli = LmTyingCLI(args=args, run=False)
    cli.trainer.callbacks.insert(0, timer)  # its batch end runs before LastCheckpoint's
    cli.trainer.fit(cli.model, cli.datamodule)
    return timer.rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--updates", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--classic", action="store_true", help="also the CLI with one 128-pair update per batch")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "lm_tying_bench"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    corpus = str(Path(args.corpus).resolve())
    runs = {"plain loop": lambda w: plain_loop(corpus, args.updates, args.data_dir),
            "lm-tying fit": lambda w: cli(corpus, args.updates, args.data_dir, w, [])}  # fmt: skip
    if args.classic:
        one = ["--data.batch_size", "128", "--model.init_args.step_per_update", "false"]
        runs["lm-tying fit, 1 update/batch"] = lambda w: cli(corpus, args.updates, args.data_dir, w, one)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            load = os.getloadavg()[0]
            with tempfile.TemporaryDirectory() as workdir:
                rates[name].append(run(workdir))
            wall, cpu = rates[name][-1]
            print(f"repeat {repeat} {name:30s} {wall:7.0f} updates/s, {cpu:7.0f} per CPU second (load {load:.1f})",
                  flush=True)  # fmt: skip
    wall_loop, cpu_loop = np.median(rates["plain loop"], axis=0)
    print(f"\nmedian over {args.repeats} repeat(s) of {args.updates} updates of 128 pairs:")
    for name, values in rates.items():
        wall, cpu = np.median(values, axis=0)
        print(f"{name:30s} {wall:7.0f} updates/s (x{wall / wall_loop:.2f} of the plain loop), "
              f"{cpu:7.0f} per CPU second (x{cpu / cpu_loop:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
