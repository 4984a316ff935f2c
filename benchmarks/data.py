"""Data pipeline figures: encoding, cache reload, skip-gram pairs/s, peak preprocessing memory.

    python benchmarks/data.py --corpus ../shared/data/text8-head.zip

Each figure is printed next to its target and to a baseline measured in the same run: the classic
TensorFlow tutorial's pipeline (``str.split`` + ``Counter`` + a dict lookup per word, and its
``generate_batch`` loop that builds pairs one at a time in Python); for the cache reload, the same
reload without checking the cache's manifest (what the DataModule did before it had one), on the
corpus and on ``--large_copies`` copies of it end to end (8 copies of text8-head: 17M words, text8's size).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import shutil
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import torch

from lm_tying.data import Text8DataModule, Vocabulary
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


def unverified_reload(data_module: Text8DataModule) -> None:
    """The cached load as it was before the manifest: find the cache, read the vocabulary, map the tokens."""
    cache = data_module.cache_dir(data_module.source_file())
    Vocabulary.load(cache / "vocab.tsv")
    np.load(cache / "tokens.npy", mmap_mode="r")


def reload_times(corpus: Path, vocab_size: int, repeats: int = 9) -> tuple[float, float]:
    """Median seconds of a cached load, verified (as the DataModule loads) and unverified, interleaved."""
    data_dir = Path(tempfile.mkdtemp(prefix="lm-tying-bench-"))
    try:
        def data_module():
            return Text8DataModule(path=str(corpus), data_dir=str(data_dir), vocab_size=vocab_size)

        data_module().prepare_data()
        verified, unverified = [], []
        for _ in range(repeats):
            verified.append(timed(data_module().prepare_data)[1])
            unverified.append(timed(unverified_reload, data_module())[1])
        return statistics.median(verified), statistics.median(unverified)
    finally:
        shutil.rmtree(data_dir)


def repeated_corpus(corpus: Path, copies: int, dest: Path) -> int:
    """Write ``copies`` copies of ``corpus``'s text end to end as a plain text8 file; returns its words."""
    text = b"".join(iter_text8_chunks(corpus)).rstrip(b" ")
    with open(dest, "wb") as f:
        f.write(b" ".join([text] * copies))
    return (text.count(b" ") + 1) * copies


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
    parser.add_argument("--large_copies", type=int, default=8, help="copies of the corpus for the large reload (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = Path(args.corpus)
    load_before = os.getloadavg()
    rows = []

    # 1. Encoding from scratch, through the DataModule (download/cache logic included).
    data_dir = Path(tempfile.mkdtemp(prefix="lm-tying-bench-"))
    try:
        dm = Text8DataModule(path=str(corpus), data_dir=str(data_dir), vocab_size=args.vocab_size)
        _, encode_s = timed(dm.prepare_data)
        tokens, vocab = dm.tokens, dm.vocab
        baseline, baseline_s = timed(tutorial_encode, corpus, args.vocab_size)
        assert baseline == tokens.tolist(), "the tutorial's encoding and ours must agree id for id"
        rows.append(("encode corpus from scratch (s)", encode_s, baseline_s, "tutorial", "< 2 s", encode_s < 2))
    finally:
        shutil.rmtree(data_dir)

    # 2. Reloading the cache, its manifest verified (sizes and sha256 of tokens.npy and vocab.tsv) or not.
    verified_s, unverified_s = reload_times(corpus, args.vocab_size)
    rows.append(("reload cache, verified (s)", verified_s, unverified_s, "unverified", "< 0.2 s", verified_s < 0.2))
    if args.large_copies > 1:
        with tempfile.TemporaryDirectory(prefix="lm-tying-bench-") as tmp:
            large = Path(tmp) / f"{corpus.stem}-x{args.large_copies}.txt"
            large_words = repeated_corpus(corpus, args.large_copies, large)
            verified_s, unverified_s = reload_times(large, args.vocab_size)
        name = f"reload {large_words / 1e6:.0f}M words, verified (s)"
        rows.append((name, verified_s, unverified_s, "unverified", "< 0.2 s", verified_s < 0.2))

    # 3. Peak memory of preprocessing (Python and numpy allocations, traced).
    tracemalloc.start()
    encode_corpus(iter_text8_chunks(corpus), args.vocab_size, None, size_hint=len(tokens) * 6)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    vocab_bytes = sum(len(w) + 49 for w in vocab.words) + 8 * len(vocab)  # str objects + counts
    budget = 4 * tokens.nbytes + vocab_bytes
    rows.append(("peak preprocessing memory (MB)", peak / 1e6, None, "", f"< {budget / 1e6:.1f} MB", peak < budget))

    # 4. Skip-gram pairs per second (dynamic window, subsampling, shuffling, tensors out): on one core (the
    # process confined to it: the compiled pairs take the cores the process may use), then on all of them.
    train = np.asarray(tokens[: int(len(tokens) * 0.9)])
    keep = keep_probabilities(vocab.counts, args.subsample)
    stream = SkipGramStream(train, args.batch_size, args.window, keep_prob=keep, seed=0)

    def pairs_per_second() -> float:
        stream.set_position(1)
        start = time.perf_counter()
        return sum(len(centers) for centers, _ in stream) / (time.perf_counter() - start)

    cores, one_core, all_cores = os.sched_getaffinity(0), 0.0, 0.0
    for _ in range(3):  # alternating, the best of each (the first pass also warms the page cache)
        os.sched_setaffinity(0, {min(cores)})
        one_core = max(one_core, pairs_per_second())
        os.sched_setaffinity(0, cores)
        all_cores = max(all_cores, pairs_per_second())
    sample = 200_000
    _, tutorial_s = timed(tutorial_pairs, tokens[:1_000_000].tolist(), sample, 1)
    rows.append(("skip-gram pairs/s, one core (M)", one_core / 1e6, sample / tutorial_s / 1e6, "tutorial", ">= 10 M", one_core >= 1e7))
    rows.append((f"skip-gram pairs/s, {len(cores)} cores (M)", all_cores / 1e6, one_core / 1e6, "one core", "", True))

    print(f"\ncorpus {corpus}: {len(tokens):,} words, vocabulary {len(vocab):,}, encoded {tokens.nbytes / 1e6:.1f} MB")
    print(f"load average (1, 5, 15 min; {os.cpu_count()} cores): {load_before} before, {os.getloadavg()} after")
    print(f"{'figure':34} {'lm-tying':>10} {'baseline':>10} {'ratio':>8}  {'baseline is':12} target")
    for name, ours, base, base_name, target, met in rows:
        base_s = f"{base:10.3f}" if base is not None else f"{'-':>10}"
        ratio = ""
        if base is not None:
            ratio = f"{ours / base:7.2f}x" if "pairs" in name else f"{base / ours:7.2f}x"
        print(f"{name:34} {ours:10.3f} {base_s} {ratio:>8}  {base_name:12} {target} {'ok' if met else 'MISSED'}")
    print("(ratio: how many times faster than the baseline; below 1, slower)")


if __name__ == "__main__":
    main()
