"""Data pipeline figures: encoding, cache reload, skip-gram pairs/s, peak preprocessing memory.

    python benchmarks/data.py --corpus ../shared/data/text8-head.zip

Each figure is printed next to its target and to a baseline measured in the same run: the classic
TensorFlow tutorial's pipeline (``str.split`` + ``Counter`` + a dict lookup per word, and its
``generate_batch`` loop that builds pairs one at a time in Python).
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import torch

from lm_tying.data import Text8DataModule
from lm_tying.data.corpus import iter_text8_chunks
from lm_tying.data.streams import SkipGramStream, keep_probabilities
from lm_tying.data.vocab import encode_corpus


def tutorial_encode(path: Path, vocab_size: int) -> list[int]:
    """The TensorFlow tutorial's build_dataset: whole text in memory, Counter, one lookup per word."""
    with zipfile.ZipFile(path) as archive:
        words = archive.read("text8").decode().split()
    common = [("UNK", -1)] + collections.Counter(words).most_common(vocab_size - 1)
    index = {w: i for i, (w, _) in enumerate(common)}
    return [index.get(w, 0) for w in words]


def tutorial_pairs(data: list[int], num_pairs: int, skip_window: int) -> int:
    """The tutorial's generate_batch loop (deque over a span, one pair at a time), for ``num_pairs``."""
    span = 2 * skip_window + 1
    buffer = collections.deque(data[:span], maxlen=span)
    index, made = span, 0
    centers, contexts = [], []
    while made < num_pairs:
        targets = [i for i in range(span) if i != skip_window]
        random.shuffle(targets)
        for t in targets:
            centers.append(buffer[skip_window])
            contexts.append(buffer[t])
            made += 1
        buffer.append(data[index])
        index = (index + 1) % len(data)
    return made


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="../shared/data/text8-head.zip", help="text8-format file (zip or plain)")
    parser.add_argument("--vocab_size", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--subsample", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = Path(args.corpus)
    rows = []

    # 1. Encoding from scratch, through the DataModule (download/cache logic included).
    data_dir = Path(tempfile.mkdtemp(prefix="lm-tying-bench-"))
    try:
        dm = Text8DataModule(path=str(corpus), data_dir=str(data_dir), vocab_size=args.vocab_size)
        _, encode_s = timed(dm.prepare_data)
        tokens, vocab = dm.tokens, dm.vocab
        baseline, baseline_s = timed(tutorial_encode, corpus, args.vocab_size)
        assert baseline == tokens.tolist(), "the tutorial's encoding and ours must agree id for id"
        rows.append(("encode corpus from scratch (s)", encode_s, baseline_s, "< 2 s", encode_s < 2))

        reload = Text8DataModule(path=str(corpus), data_dir=str(data_dir), vocab_size=args.vocab_size)
        _, reload_s = timed(reload.prepare_data)
        rows.append(("reload cached corpus (s)", reload_s, baseline_s, "< 0.2 s", reload_s < 0.2))
    finally:
        shutil.rmtree(data_dir)

    # 2. Peak memory of preprocessing (Python and numpy allocations, traced).
    tracemalloc.start()
    encode_corpus(iter_text8_chunks(corpus), args.vocab_size, None, size_hint=len(tokens) * 6)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    vocab_bytes = sum(len(w) + 49 for w in vocab.words) + 8 * len(vocab)  # str objects + counts
    budget = 4 * tokens.nbytes + vocab_bytes
    rows.append(("peak preprocessing memory (MB)", peak / 1e6, None, f"< {budget / 1e6:.1f} MB", peak < budget))

    # 3. Skip-gram pairs per second on one core (dynamic window, subsampling, shuffling, tensors out).
    train = np.asarray(tokens[: int(len(tokens) * 0.9)])
    keep = keep_probabilities(vocab.counts, args.subsample)
    stream = SkipGramStream(train, args.batch_size, args.window, keep_prob=keep, seed=0)
    stream.set_position(1)
    start = time.perf_counter()
    pairs = sum(len(centers) for centers, _ in stream)
    pairs_per_s = pairs / (time.perf_counter() - start)
    sample = 200_000
    _, tutorial_s = timed(tutorial_pairs, tokens[:1_000_000].tolist(), sample, 1)
    rows.append(("skip-gram pairs/s, one core (M)", pairs_per_s / 1e6, sample / tutorial_s / 1e6, ">= 10 M", pairs_per_s >= 1e7))

    print(f"\ncorpus {corpus}: {len(tokens):,} words, vocabulary {len(vocab):,}, encoded {tokens.nbytes / 1e6:.1f} MB")
    print(f"{'figure':34} {'lm-tying':>10} {'tutorial':>10} {'ratio':>8}  target")
    for name, ours, base, target, met in rows:
        base_s = f"{base:10.3f}" if base is not None else f"{'-':>10}"
        ratio = ""
        if base is not None:
            ratio = f"{ours / base:7.1f}x" if "pairs" in name else f"{base / ours:7.1f}x"
        print(f"{name:34} {ours:10.3f} {base_s} {ratio:>8}  {target} {'ok' if met else 'MISSED'}")
    print("(ratio: how many times faster than the tutorial's pipeline)")


if __name__ == "__main__":
    main()
