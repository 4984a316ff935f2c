"""What the DataModule serves: skip-gram pairs, LM windows, DDP shards, and mid-epoch resume."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lm_tying.data import LanguageModelStream, ResumableLoader, SkipGramStream, Text8DataModule
from lm_tying.data.streams import _pair_count, keep_probabilities, skipgram_pairs
from lm_tying import native

REPO = Path(__file__).resolve().parents[1]


def _key(batch) -> tuple:
    return tuple(torch.stack(batch).flatten().tolist())


def _all_pairs(stream) -> list[tuple[int, int]]:
    return [(int(c), int(x)) for centers, contexts in stream for c, x in zip(centers, contexts)]


def test_fixed_window_gives_exactly_the_neighbours():
    tokens = np.arange(50, dtype=np.int32)  # distinct ids: a pair names its positions
    stream = SkipGramStream(tokens, batch_size=7, window=2, dynamic_window=False, chunk_tokens=1000)
    pairs = _all_pairs(stream)
    expected = {(i, j) for i in range(50) for j in range(50) if 0 < abs(i - j) <= 2}
    assert len(pairs) == len(expected) and set(pairs) == expected


def test_tutorial_skip_window_one():
    centers, contexts = skipgram_pairs(np.array([10, 11, 12], dtype=np.int32), 1)
    assert sorted(zip(centers.tolist(), contexts.tolist())) == [(10, 11), (11, 10), (11, 12), (12, 11)]


def test_dynamic_window_pairs_stay_within_window_and_use_all_sizes():
    tokens = np.arange(20_000, dtype=np.int32)
    stream = SkipGramStream(tokens, batch_size=4096, window=5, dynamic_window=True, chunk_tokens=3000)
    pairs = np.array(_all_pairs(stream))
    distance = np.abs(pairs[:, 0] - pairs[:, 1])
    assert distance.min() == 1 and distance.max() == 5
    # reduced windows: P(window >= d) = (6 - d) / 5, so pairs at distance d fall off linearly
    counts = np.bincount(distance, minlength=6)[1:]
    assert np.allclose(counts / counts[0], [1, 0.8, 0.6, 0.4, 0.2], atol=0.03)
    assert len(pairs) == stream.pairs_per_epoch


def test_subsampling_keep_probability_follows_the_formula():
    counts = np.array([0, 5000, 1000, 100, 10])
    t = 1e-3
    f = counts / counts.sum()
    assert np.allclose(keep_probabilities(counts, t)[1:], np.minimum((np.sqrt(f[1:] / t) + 1) * t / f[1:], 1))
    assert keep_probabilities(counts, t)[0] == 1.0  # a word never seen is kept, not divided by zero

    rng = np.random.default_rng(0)
    tokens = rng.choice(len(counts), size=200_000, p=np.array([0, 0.5, 0.3, 0.15, 0.05])).astype(np.int32)
    keep = keep_probabilities(np.bincount(tokens, minlength=5), 0.05)
    stream = SkipGramStream(tokens, batch_size=1 << 16, window=1, dynamic_window=False, keep_prob=keep)
    kept, _ = stream._subsample_and_windows(np.random.default_rng(1), 0)
    observed = np.bincount(kept, minlength=5)[1:] / np.bincount(tokens, minlength=5)[1:]
    assert np.allclose(observed, keep[1:], atol=0.01)
    assert keep[1] < 0.8 and keep[4] == 1.0


def test_epochs_are_deterministic_reshuffled_and_equally_long():
    tokens = np.random.default_rng(0).integers(0, 100, 30_000).astype(np.int32)
    keep = keep_probabilities(np.bincount(tokens), 0.005)

    def epoch(e, seed=3):
        stream = SkipGramStream(tokens, 256, 4, keep_prob=keep, seed=seed, chunk_tokens=7000)
        stream.set_position(e)
        return [torch.stack(b) for b in stream]

    first, again, second = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len(first) == len(second)
    assert sum(len(b[0]) for b in first) == sum(len(b[0]) for b in second)
    assert not torch.equal(first[0], second[0])
    assert not torch.equal(epoch(0, seed=4)[0], first[0])


def test_lm_targets_are_inputs_shifted_and_continue_across_batches():
    tokens = np.arange(1000, dtype=np.int32)
    stream = LanguageModelStream(tokens, batch_size=4, bptt=7)
    batches = list(stream)
    assert len(batches) == len(stream) == -(-(250 - 1) // 7)
    for (x, y), (x_next, _) in zip(batches, batches[1:]):
        assert x.shape == (4, 7) and torch.equal(y, x + 1)
        assert torch.equal(x_next[:, 0], y[:, -1])  # each row continues where it stopped
    x, y = batches[-1]
    assert torch.equal(y[:, -1], torch.tensor([249, 499, 749, 999]))
    assert x.dtype == torch.int64


def test_lm_shards_are_disjoint_rows_covering_the_whole():
    tokens = np.arange(1200, dtype=np.int32)
    whole = LanguageModelStream(tokens, batch_size=6, bptt=10).rows()
    ranks = [LanguageModelStream(tokens, batch_size=3, bptt=10, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    assert np.array_equal(np.concatenate([r.rows() for r in ranks]), whole)


@pytest.mark.parametrize("pair_shuffle", ["numpy", "native"])
@pytest.mark.parametrize("num_batches_divisible", [True, False])
def test_skipgram_shards_are_disjoint_and_together_the_whole(num_batches_divisible, pair_shuffle):
    needs_compiled_pairs(pair_shuffle)
    tokens = np.arange(3000, dtype=np.int32)
    batch = 100 if num_batches_divisible else 97
    whole = SkipGramStream(tokens, batch, 3, seed=1, chunk_tokens=1000, pair_shuffle=pair_shuffle)
    shards = [SkipGramStream(tokens, batch, 3, seed=1, rank=r, world_size=2, chunk_tokens=1000,
                             pair_shuffle=pair_shuffle) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == -(-len(whole) // 2)
    batches = [[tuple(map(tuple, torch.stack(b).T.tolist())) for b in s] for s in shards]
    all_whole = [tuple(map(tuple, torch.stack(b).T.tolist())) for b in whole]
    seen = Counter(batches[0] + batches[1])
    assert set(seen) == set(all_whole)  # together the whole epoch
    padding = len(shards[0]) * 2 - len(whole)
    assert sum(seen.values()) - len(seen) == padding  # only the padding repeats (as DistributedSampler)
    assert set(batches[0]).isdisjoint(batches[1][: len(batches[1]) - padding])


def needs_compiled_pairs(pair_shuffle: str) -> None:
    if pair_shuffle == "native" and native.library() is None:
        pytest.skip("no C++ compiler here: the compiled pair shuffle cannot be built")


@pytest.mark.parametrize("pair_shuffle", ["native", "numpy"])
@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_loader_state_round_trip_gives_the_remaining_batches(num_workers, pair_shuffle):
    needs_compiled_pairs(pair_shuffle)
    tokens = np.random.default_rng(0).integers(0, 50, 5000).astype(np.int32)

    def loader(workers=num_workers):
        stream = SkipGramStream(tokens, 64, 2, seed=5, chunk_tokens=1500, pair_shuffle=pair_shuffle)
        return ResumableLoader(stream, num_workers=workers)

    if num_workers > 1:  # workers own blocks of batches, interleaved: the epoch holds the same batches
        assert sorted(map(_key, loader(0))) == sorted(map(_key, loader()))

    straight = loader()
    straight.set_epoch(2)
    expected = [torch.stack(b) for b in straight]
    interrupted = loader()
    interrupted.set_epoch(2)
    it = iter(interrupted)
    head = [torch.stack(next(it)) for _ in range(9)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches_done": 9, "num_workers": num_workers, "pair_shuffle": pair_shuffle}
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    tail = [torch.stack(b) for b in resumed]
    assert len(head) + len(tail) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, expected))
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(expected), "the resume position applies to its own epoch only"


def test_resuming_inside_an_epoch_with_the_other_pair_shuffle_is_refused():
    needs_compiled_pairs("native")
    state = {"epoch": 1, "batches_done": 4, "num_workers": 0, "pair_shuffle": "native"}
    numpy_order = ResumableLoader(SkipGramStream(np.arange(500, dtype=np.int32), 16, 2, pair_shuffle="numpy"))
    with pytest.raises(ValueError, match="shuffled by native.*--data.pair_shuffle native on a machine with a C"):
        numpy_order.load_state_dict(state)
    numpy_order.load_state_dict(state | {"batches_done": 0})  # at an epoch's start the order is free to change
    native_order = ResumableLoader(SkipGramStream(np.arange(500, dtype=np.int32), 16, 2, pair_shuffle="native"))
    with pytest.raises(ValueError, match="--data.pair_shuffle numpy"):
        native_order.load_state_dict({"epoch": 1, "batches_done": 4, "num_workers": 0})  # written before the option


def test_auto_takes_the_compiled_pairs_in_one_process_and_numpys_under_ddp():
    needs_compiled_pairs("native")
    tokens = np.arange(3000, dtype=np.int32) % 97
    assert SkipGramStream(tokens, 64, 2, pair_shuffle="auto").pair_shuffle == "native"
    assert SkipGramStream(tokens, 64, 2, rank=1, world_size=2, pair_shuffle="auto").pair_shuffle == "numpy"
    assert SkipGramStream(tokens, 64, 2, rank=1, world_size=2, pair_shuffle="native").pair_shuffle == "native"


def test_a_stream_with_compiled_pairs_pickles_for_spawned_workers():
    needs_compiled_pairs("native")
    stream = SkipGramStream(np.arange(3000, dtype=np.int32) % 97, 64, 2, seed=3, pair_shuffle="native")
    copy = pickle.loads(pickle.dumps(stream))
    assert copy.pair_shuffle == "native" and list(map(_key, copy)) == list(map(_key, stream))


def test_compiled_pairs_are_the_numpy_pairs_in_a_random_order_fixed_by_the_seed():
    needs_compiled_pairs("native")
    library = native.library()
    rng = np.random.default_rng(0)
    tokens = rng.permutation(20000).astype(np.int32)  # one word per position: a pair's center tells its position
    windows = rng.integers(1, 6, 20000).astype(np.int32)
    centers, contexts = skipgram_pairs(tokens.astype(np.int64), windows)
    expected = np.sort((centers << 32) | contexts)
    shuffled = library.skipgram_pairs(tokens, windows, 7, len(expected))  # ~120k pairs: 8 buckets
    assert np.array_equal(np.sort(shuffled), expected)
    assert np.array_equal(shuffled, library.skipgram_pairs(tokens, windows, 7, len(expected)))
    assert not np.array_equal(shuffled, library.skipgram_pairs(tokens, windows, 8, len(expected)))
    with pytest.raises(ValueError, match="pairs expected"):
        library.skipgram_pairs(tokens, windows, 7, len(expected) - 1)
    # as random as one shuffle of the whole: the pairs of the first 500 positions spread evenly over the output
    # (not left in their buckets' region), and neighbours are unrelated (not left in window order within one)
    early = np.flatnonzero(np.isin(shuffled >> 32, tokens[:500]))
    counts = np.bincount(early * 10 // len(shuffled), minlength=10)
    expected_counts = np.full(10, counts.sum() / 10)
    assert ((counts - expected_counts) ** 2 / expected_counts).sum() < 30, counts  # chi2, 9 degrees of freedom
    rank = np.argsort(np.argsort(shuffled, kind="stable"), kind="stable")  # each pair's place in sorted order
    assert abs(np.corrcoef(rank[:-1], rank[1:])[0, 1]) < 0.02  # window order: close to 1


def test_the_pair_count_is_each_positions_window_cut_at_the_ends():
    """``_pair_count`` (the compiled generator's expected count, and the epoch's size) against its definition, on
    sequences shorter than, as long as and longer than the windows."""
    rng = np.random.default_rng(3)
    for n in [0, 1, 2, 3, 5, 6, 11, 100, 10_000]:
        for high in (1, 5, 20):
            windows = rng.integers(1, high + 1, n).astype(np.int32)
            position = np.arange(n)
            expected = np.minimum(windows, position).sum() + np.minimum(windows, n - 1 - position).sum()
            assert _pair_count(windows) == expected == len(skipgram_pairs(np.arange(n, dtype=np.int32), windows)[0])


def test_compiled_pairs_come_in_the_same_order_on_any_number_of_threads():
    """Threads share out the positions and then the buckets, each taking its own draws of the seed's stream: a chunk
    (here 4 segments of positions and 128 buckets) gets the one-thread order, so runs and resumes do not
    depend on the machine's cores."""
    needs_compiled_pairs("native")
    library = native.library()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 5000, 300_000).astype(np.int32)
    windows = rng.integers(1, 6, 300_000).astype(np.int32)
    count = _pair_count(windows)
    one = library.skipgram_pairs(tokens, windows, 11, count, threads=1)
    for threads in (2, 3, 16):
        assert np.array_equal(library.skipgram_pairs(tokens, windows, 11, count, threads=threads), one), threads


def test_resuming_with_another_number_of_workers_is_refused():
    stream = SkipGramStream(np.arange(500, dtype=np.int32), 16, 2)
    with pytest.raises(ValueError, match="num_workers 3"):
        ResumableLoader(stream, num_workers=1).load_state_dict({"epoch": 0, "batches_done": 4, "num_workers": 3})


class _Recorder(L.LightningModule):
    """Records every training batch it sees; one parameter so there is something to optimise."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        centers, _ = batch
        self.seen.append((self.current_epoch, batch_idx, centers[:4].tolist()))
        return (self.weight * centers.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )


def test_lightning_resume_mid_epoch_continues_with_the_same_batches(tmp_path, make_corpus):
    corpus = make_corpus(num_words=3000)

    def data():
        return Text8DataModule(
            path=str(corpus), data_dir=str(tmp_path / "d"), vocab_size=60, batch_size=256, num_workers=0, subsample=1e-2
        )

    straight = _Recorder()
    per_epoch = len(data().train_dataloader())
    total = per_epoch * 2 + 5
    _trainer(tmp_path / "a", total).fit(straight, datamodule=data())
    assert len(straight.seen) == total

    stop_at = per_epoch + 3  # in the middle of the second epoch
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=stop_at, save_top_k=-1)
    first = _Recorder()
    _trainer(tmp_path / "b", stop_at, [checkpoint]).fit(first, datamodule=data())
    ckpt = next((tmp_path / "ck").glob("*.ckpt"))
    second = _Recorder()
    _trainer(tmp_path / "b", total).fit(second, datamodule=data(), ckpt_path=ckpt)
    assert first.seen + second.seen == straight.seen


def test_plain_trainer_logs_model_and_data_whose_vocab_sizes_differ(tmp_path, make_corpus):
    """min_count trims the vocabulary below the data's vocab_size cap: logging both must not clash."""
    from lightning.pytorch.loggers import CSVLogger

    class Model(_Recorder):
        def __init__(self, vocab_size: int):
            super().__init__()
            self.save_hyperparameters()

    data = Text8DataModule(
        path=str(make_corpus(num_words=2000)), data_dir=str(tmp_path / "d"), vocab_size=10_000, min_count=3, num_workers=0
    )
    model = Model(vocab_size=data.num_words)
    assert data.num_words < 10_000
    trainer = L.Trainer(max_steps=2, logger=CSVLogger(tmp_path), enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2


def test_drop_unk_removes_out_of_vocabulary_tokens_before_windowing(tmp_path, make_corpus):
    corpus = make_corpus("a b zz a b yy a b a b xx a b")  # vocab: UNK, a, b
    kept = Text8DataModule(path=str(corpus), data_dir=str(tmp_path), vocab_size=3, split=(1, 0, 0), batch_size=1000,
                           window=1, dynamic_window=False, num_workers=0)  # fmt: skip
    with_unk = next(iter(kept.train_dataloader()))
    assert (with_unk[0] == 0).any()
    kept.drop_unk = True
    centers, contexts = next(iter(kept.train_dataloader()))
    assert not (centers == 0).any() and not (contexts == 0).any()
    # the windows close over the removed words: "a b a b a b a b a b" gives 2 * 9 neighbour pairs
    assert len(centers) == 18 and set(zip(centers.tolist(), contexts.tolist())) == {(1, 2), (2, 1)}


# ---------------------------------------------------------------------- worker processes of unfinished iterations
UNFINISHED_AT_EXIT = """
import numpy as np
from lm_tying.data import LanguageModelStream, ResumableLoader
if __name__ == "__main__":  # the workers start from a fork server, which imports this file
    loader = ResumableLoader(LanguageModelStream(np.arange(5000, dtype=np.int32) % 50, 4, 10), num_workers=1)
    batches = iter(loader)
    next(batches)
    cycle = {"batches": batches}
    cycle["cycle"] = cycle  # as a run's objects often are: freed only by the garbage collector, maybe never
    print("exiting", flush=True)
"""


def test_an_unfinished_iteration_does_not_keep_the_process_from_exiting(tmp_path):
    # Its worker ignores SIGTERM (SIGTERM is the main process's to handle), which is how multiprocessing stops the
    # workers left at exit: the process then waited forever for the worker (a hang seen in CI under DDP).
    script = tmp_path / "unfinished.py"
    script.write_text(UNFINISHED_AT_EXIT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr[-3000:]


def test_datamodule_teardown_stops_the_workers_of_loaders_left_mid_epoch(tmp_path, make_corpus):
    data = Text8DataModule(
        path=str(make_corpus()), data_dir=str(tmp_path / "d"), vocab_size=60, mode="lm", batch_size=2, bptt=5,
        num_workers=1,
    )  # fmt: skip
    data.setup("fit")
    train, val = iter(data.train_dataloader()), iter(data.val_dataloader())
    try:
        next(train), next(val)
        assert len(multiprocessing.active_children()) == 2
        data.teardown("fit")
        assert multiprocessing.active_children() == []
        with pytest.raises(StopIteration):
            next(train)  # closed: a later next() cannot restart it on stopped workers
    finally:
        train.close(), val.close()  # whatever failed above, no worker outlives the test


class _ParentStream(LanguageModelStream):
    """Serves the id of its process's parent and whether SIGTERM is ignored there."""

    def __iter__(self):
        yield torch.tensor([os.getppid(), signal.getsignal(signal.SIGTERM) == signal.SIG_IGN])


def test_workers_are_not_forked_from_the_training_process():
    # A fork copies the locks the process's other threads hold at that instant, held forever in the copy: on CPython
    # 3.11.7 a worker forked while a thread exited hung in os.fork (one 2-process DDP run in ~50). The fork server
    # that starts them instead has one thread; its workers still start ignoring the stop signals.
    threads = [threading.Thread(target=time.sleep, args=(0.2,)) for _ in range(4)]  # a process with threads
    for t in threads:
        t.start()
    loader = ResumableLoader(_ParentStream(np.arange(500, dtype=np.int32) % 50, 4, 10), num_workers=1)
    (parent, ignores_sigterm), = [batch.tolist() for batch in loader]
    for t in threads:
        t.join()
    assert parent != os.getpid()
    assert ignores_sigterm


def test_the_fork_server_imports_the_streams_without_lightning():
    # What the fork server preloads (lm_tying.data.streams): a second and a half more, per process, with Lightning.
    code = "import sys, lm_tying.data.streams; print(sorted(m for m in sys.modules if m.startswith('lightning')))"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


class _StallingStream(LanguageModelStream):
    """Serves one batch, then stalls: its worker never reads torch's request to stop."""

    def __iter__(self):
        yield next(super().__iter__())
        time.sleep(3600)


def test_close_stops_a_worker_that_does_not_answer_torchs_shutdown():
    loader = ResumableLoader(_StallingStream(np.arange(5000, dtype=np.int32) % 50, 4, 10), num_workers=1)
    batches = iter(loader)
    try:
        next(batches)
        loader.close()  # torch asks, waits 5 s, sends SIGTERM (ignored by the worker), then the worker is killed
        assert multiprocessing.active_children() == []
    finally:
        for child in multiprocessing.active_children():
            child.kill()  # whatever failed above, pytest must not wait an hour for it at exit
