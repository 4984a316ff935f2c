"""Benchmark: threads and busy machines -- a word2vec config's training steps/s with the default thread setting
(``threads: null``) against fixed thread counts, on the machine as it is and with a CPU-bound process running
beside it. ``configs/word2vec_cs20.yaml`` (the default here): 128-pair updates, where a second thread only adds
waiting; ``configs/word2vec.yaml``: the per-pair kernel's 262,144-pair calls, where the default uses the cores
and one thread while one is measured faster.

    python benchmarks/word2vec_threads.py --corpus ../shared/data/text8-head.zip
    python benchmarks/word2vec_threads.py --corpus ../shared/data/text8-head.zip --steps 3000 --repeats 3
    python benchmarks/word2vec_threads.py --corpus ../shared/data/text8-head.zip --config configs/word2vec.yaml --steps 62

Each repeat runs every setting once per condition, interleaved (quiet, then contended), so that drifts of
the machine's load hit all settings alike; printed: median steps/s per setting and condition, the ratio
to one thread, and the load average before each run (other processes share this machine: compare the
ratios of one run, not absolute figures across runs).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lm_tying.data import Text8DataModule  # noqa: E402
from lm_tying.models.word2vec import Word2Vec  # noqa: E402


class TrainTime(Callback):
    """Seconds from the first training batch to the end of training (data setup and start-up left out)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def steps_per_second(corpus: str, config: Path, threads: int | None, steps: int, data_dir: str) -> float:
    cfg = yaml.safe_load(config.read_text())
    model_args = dict(cfg["model"]["init_args"], evaluate=False, average_loss_every=0, threads=threads)
    dm = Text8DataModule(**dict(cfg["data"]["init_args"], path=corpus, data_dir=data_dir))
    dm.prepare_data()
    timer = TrainTime()
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, accelerator="cpu", devices=1, callbacks=[timer])  # fmt: skip
    L.seed_everything(0, verbose=False)
    trainer.fit(Word2Vec(vocab_size=dm.num_words, **model_args), dm)
    return steps / timer.seconds


def burn() -> None:
    """A CPU-bound process: what another user's job looks like to this one."""
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2147483648


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "word2vec_cs20.yaml")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "lm_tying_bench"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    settings = {"default (auto)": None, "1 thread": 1, "2 threads": 2}
    results: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        for condition in ("as is", "contended"):
            burner = multiprocessing.Process(target=burn, daemon=True) if condition == "contended" else None
            if burner:
                burner.start()
            try:
                for name, threads in settings.items():
                    load = os.getloadavg()[0]
                    rate = steps_per_second(args.corpus, args.config, threads, args.steps, args.data_dir)
                    results.setdefault((condition, name), []).append(rate)
                    print(f"repeat {repeat} {condition:9s} {name:15s} {rate:7.0f} steps/s (load {load:.1f})", flush=True)
            finally:
                if burner:
                    burner.terminate()
                    burner.join()
    print(f"\nmedian steps/s over {args.repeats} repeat(s), {args.steps} steps of {args.config.name}:")
    for condition in ("as is", "contended"):
        one = np.median(results[(condition, "1 thread")])
        for name in settings:
            rate = np.median(results[(condition, name)])
            print(f"{condition:9s} {name:15s} {rate:7.0f} steps/s  x{rate / one:.2f} of one thread")


if __name__ == "__main__":
    main()
