"""Benchmark: the compiled per-pair kernel alone (``lm_tying/csrc/sequential_sgd.cpp``), pairs/s by thread count.

    python benchmarks/word2vec_kernel.py --corpus ../shared/data/text8-head.zip --rounds 4
    python benchmarks/word2vec_kernel.py --corpus ../shared/data/text8-head.zip --num_sampled 5 6
    python benchmarks/word2vec_kernel.py --corpus ../shared/data/text8-head.zip --libraries old.so new.so

The pairs are the first ``--pairs`` of ``configs/word2vec.yaml``'s training stream (shuffled skip-gram pairs
of text8-head, subsampled, dynamic window 5); the kernel trains them in the config's 262,144-pair calls from
word2vec's initialisation with its negatives (``--num_sampled``, 6, drawn by the kernel per ``--share``, 4,
pairs from unigram^0.75, each weighted 5 / num_sampled), as training does, with no data loading in the timed
part. Settings alternate within each round, so a busy spell of the machine spreads over all of them; the median
over rounds is printed with the range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm_tying.data import Text8DataModule  # noqa: E402
from lm_tying import native  # noqa: E402
from lm_tying.nce import UnigramSampler  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--pairs", type=int, default=8_000_000)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num_sampled", type=int, nargs="+", default=[6], help="negatives per group (several: compared)")
    p.add_argument("--share", type=int, default=4, help="pairs sharing one group of negatives")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "lm_tying_bench"))
    p.add_argument("--libraries", nargs="+", type=Path, default=[],
                   help="built kernels to compare (.so files, e.g. copies of the cache's from two versions of the "
                        "code); default: this checkout's")
    args = p.parse_args()

    if args.libraries:
        libraries = {path.name: native.Library(path) for path in args.libraries}
    elif (library := native.library()) is not None:
        libraries = {"this checkout's kernel": library}
    else:
        raise SystemExit("the kernel cannot be built here (no C++ compiler)")
    dm = Text8DataModule(path=args.corpus, data_dir=args.data_dir, vocab_size=50000, min_count=5, mode="skipgram",
                         batch_size=262144, window=5, subsample=1e-3, drop_unk=True)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    batches, total = [], 0
    for center, context in dm.train_dataloader():
        batches.append((center, context))
        total += center.numel()
        if total >= args.pairs:
            break
    V, D = dm.num_words, 128
    sampler = UnigramSampler(V, counts=dm.word_counts, power=0.75)
    torch.set_num_threads(1)  # as in training: the kernel's threads are its own
    print(f"{total / 1e6:.1f}M pairs of {Path(args.corpus).name}, vocabulary {V}, dim {D}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    settings = [(name, k, t) for name in libraries for k in args.num_sampled for t in args.threads]
    rates: dict[tuple[str, int, int], list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for name, K, threads in settings:
            torch.manual_seed(0)
            E, W = (torch.rand(V, D) - 0.5) / D, torch.zeros(V, D)
            start = time.perf_counter()
            for seed, (center, context) in enumerate(batches):
                groups = -(-center.numel() // args.share)
                draws = native.AliasDraws(sampler.alias_accept, sampler.alias, groups, K, seed)
                libraries[name].sequential_sgd(E, W, center, context, draws, 0.025, 5 / K, False, threads=threads)
            rates[name, K, threads].append(total / (time.perf_counter() - start))
    for (name, K, threads), r in rates.items():
        print(f"{name}: {K} negatives per {args.share} pairs, {threads} thread(s): "
              f"median {statistics.median(r) / 1e6:.2f}M pairs/s (rounds {', '.join(f'{x / 1e6:.2f}' for x in r)})")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
