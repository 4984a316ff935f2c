"""Batches for training: skip-gram pairs and language-model windows, resumable and sharded by rank.

Both streams are ``IterableDataset`` objects that yield whole batches, so a ``DataLoader`` with
``batch_size=None`` only moves them. Each knows its length, can start at any batch of any epoch
(``set_position``), and serves only its rank's share under DDP (disjoint, together the whole).
``ResumableLoader`` connects them to Lightning: it follows the trainer's epoch and reports the
position inside it to the checkpoint, so a resumed run sees exactly the batches it had left.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from lm_tying import native


def keep_probabilities(counts: np.ndarray, threshold: float) -> np.ndarray:
    """word2vec's subsampling: keep a word of frequency ``f`` with probability ``(sqrt(f/t) + 1) * t/f``.

    This is the formula of word2vec C and gensim (Mikolov et al. 2013 wrote ``1 - sqrt(t/f)`` for the
    discard probability; the code adds the ``t/f`` term). Words rarer than ``t`` are always kept.
    """
    frequency = counts / max(int(counts.sum()), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = (np.sqrt(frequency / threshold) + 1) * threshold / frequency
    return np.minimum(np.nan_to_num(keep, nan=1.0, posinf=1.0), 1.0)


def skipgram_pairs(tokens: np.ndarray, windows: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """All ``(center, context)`` pairs with ``0 < |offset| <= window`` of the center, vectorised.

    ``windows`` is one window per position (word2vec C's reduced window) or one for all. Pairs come
    grouped by offset; callers shuffle them.
    """
    n = len(tokens)
    windows = np.broadcast_to(np.asarray(windows), (n,))
    max_window = int(windows.max()) if n else 0
    centers, contexts = [], []
    for offset in range(1, max_window + 1):
        if offset >= n:
            break
        # Position i pairs with i + offset when either end's window reaches it.
        left = np.flatnonzero(windows[:-offset] >= offset)  # i -> i + offset, window of i
        right = np.flatnonzero(windows[offset:] >= offset)  # i + offset -> i, window of i + offset
        centers += [tokens[left], tokens[right + offset]]
        contexts += [tokens[left + offset], tokens[right]]
    if not centers:
        empty = np.zeros(0, dtype=tokens.dtype)
        return empty, empty
    return np.concatenate(centers), np.concatenate(contexts)


class SkipGramStream(IterableDataset):
    """Shuffled skip-gram batches of ``(center, context)``, regenerated every epoch.

    The corpus is cut into chunks of ``chunk_tokens``; in each epoch every chunk is subsampled,
    given random windows and turned into pairs with its own random generator (seeded by seed, epoch
    and chunk), its pairs shuffled, and the chunks visited in a shuffled order. Any batch can so be
    rebuilt from its chunk alone, which is what makes mid-epoch resume and DDP sharding cheap. Shuffling
    within smaller chunks (2^18 tokens) cost SimLex-999 ~0.014 (benchmarks/README.md).

    ``pair_shuffle``: ``native`` generates and shuffles a chunk's pairs in word2vec's compiled code (a bucketed
    shuffle that stays in the CPU's caches, ~5x faster); ``numpy`` in numpy; ``auto`` (default) the
    compiled code where it builds, in one process; numpy's under DDP, where runs with the compiled order scored
    lower analogies and SimLex-999 (README, "DDP quality"; why is not found yet). The two give
    different (equally random) orders, so a run resumes with the one it started with (``ResumableLoader``
    checks).

    An epoch has a fixed number of pairs (that of epoch 0), so Lightning sees the same length every
    epoch; other epochs draw slightly more or fewer pairs and are cut, or wrapped, to that number.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        window: int,
        dynamic_window: bool = True,
        keep_prob: np.ndarray | None = None,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        chunk_tokens: int = 1 << 20,
        pair_shuffle: Literal["auto", "native", "numpy"] = "auto",
    ):
        if window < 1:
            raise ValueError(f"window={window}: it must be at least 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: it must be at least 1")
        self.tokens = tokens
        self.batch_size = batch_size
        self.window = window
        self.dynamic_window = dynamic_window
        self.keep_prob = keep_prob
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.chunk_tokens = chunk_tokens
        # (the library is looked up when used, not kept: a stream stays picklable for spawned loader workers)
        self.pair_shuffle = "native" if shuffle and _native_pairs(pair_shuffle, world_size) is not None else "numpy"
        self.num_chunks = max(1, math.ceil(len(tokens) / chunk_tokens))
        self.epoch, self.start = 0, 0
        self._sizes_of: tuple[int | None, np.ndarray] = (None, np.zeros(0, dtype=np.int64))
        self.pairs_per_epoch = int(self._chunk_sizes(0).sum())
        if self.pairs_per_epoch == 0:
            raise ValueError(
                f"{len(tokens)} tokens give no skip-gram pair; the split is too small for window={window}"
            )
        self.num_batches = math.ceil(self.pairs_per_epoch / batch_size)
        self.batches_per_rank = math.ceil(self.num_batches / world_size)

    def __len__(self) -> int:
        return self.batches_per_rank

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        order = self._chunk_order(epoch)
        sizes = self._chunk_sizes(epoch)[order]
        ends = np.cumsum(sizes)
        cache: dict[int, np.ndarray] = {}
        for i in self._worker_batches():
            g = (self.rank * self.batches_per_rank + i) % self.num_batches
            lo, hi = g * self.batch_size, min((g + 1) * self.batch_size, self.pairs_per_epoch)
            pairs = self._pairs_between(epoch, order, ends, lo, hi, cache)
            yield torch.from_numpy(pairs >> 32), torch.from_numpy(pairs & 0xFFFFFFFF)

    def _worker_batches(self) -> range:
        """This worker's batches (of this rank), after the ``start`` already handed out.

        Each DataLoader worker owns a contiguous block of batches, hence its own chunks, so workers
        generate pairs in parallel; the DataLoader interleaves them round-robin. The order of an
        epoch therefore depends on ``num_workers``, and a resume must use the same number.
        """
        info = torch.utils.data.get_worker_info()
        workers, me = (info.num_workers, info.id) if info is not None else (1, 0)
        blocks = _split(self.batches_per_rank, workers)
        done = _round_robin_taken(self.start, [len(b) for b in blocks])
        return blocks[me][done[me] :]

    def _pairs_between(self, epoch, order, ends, lo, hi, cache):
        """Pairs (packed, see ``_chunk_pairs``) at epoch offsets ``[lo, hi)``, wrapping around when this epoch
        drew fewer pairs."""
        total = int(ends[-1])
        pieces = []
        while lo < hi:
            at = lo % total
            k = int(np.searchsorted(ends, at, side="right"))
            chunk_start = int(ends[k - 1]) if k else 0
            if order[k] not in cache:
                cache.clear()  # chunks are visited in order: one is enough
                cache[order[k]] = self._chunk_pairs(epoch, int(order[k]))
            take = min(hi - lo, int(ends[k]) - at)
            a = at - chunk_start
            pieces.append(cache[order[k]][a : a + take])
            lo += take
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _rngs(self, epoch: int) -> list[np.random.Generator]:
        """One generator per chunk plus one for the chunk order, all fixed by (seed, epoch)."""
        seeds = np.random.SeedSequence([self.seed, epoch]).spawn(self.num_chunks + 1)
        return [np.random.default_rng(s) for s in seeds]

    def _chunk_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_chunks)
        return self._rngs(epoch)[-1].permutation(self.num_chunks)

    def _subsample_and_windows(self, rng: np.random.Generator, chunk: int):
        tokens = self.tokens[chunk * self.chunk_tokens : (chunk + 1) * self.chunk_tokens]
        if self.keep_prob is not None:
            tokens = tokens[rng.random(len(tokens)) < self.keep_prob[tokens]]
        if self.dynamic_window:
            windows = rng.integers(1, self.window + 1, size=len(tokens), dtype=np.int32)
        else:
            windows = np.full(len(tokens), self.window, dtype=np.int32)
        return tokens, windows

    def _chunk_sizes(self, epoch: int) -> np.ndarray:
        """Number of pairs of every chunk in ``epoch``, from the random draws alone (the last epoch's kept: epoch 0's
        are counted when the stream is made and again when it starts)."""
        if self._sizes_of[0] != epoch:
            rngs = self._rngs(epoch)
            sizes = np.zeros(self.num_chunks, dtype=np.int64)
            for chunk in range(self.num_chunks):
                sizes[chunk] = _pair_count(self._subsample_and_windows(rngs[chunk], chunk)[1])
            self._sizes_of = (epoch, sizes)
        return self._sizes_of[1]

    def _chunk_pairs(self, epoch: int, chunk: int) -> np.ndarray:
        """The chunk's pairs, each packed into one int64 (``center << 32 | context``): shuffling one array in
        place moves half the memory a permutation and two gathers do (the data's main cost per epoch)."""
        rng = self._rngs(epoch)[chunk]
        tokens, windows = self._subsample_and_windows(rng, chunk)
        if self.pair_shuffle == "native":
            library = _native_pairs("native")
            # the training waits for these pairs: all of this rank's cores, unless a loader worker makes them
            threads = 1 if torch.utils.data.get_worker_info() is not None else native.cores_per_process(self.world_size)
            return library.skipgram_pairs(tokens, windows, int(rng.integers(2**63)), _pair_count(windows), threads)
        centers, contexts = skipgram_pairs(tokens.astype(np.int64), windows)
        pairs = (centers << 32) | contexts
        if self.shuffle:
            rng.shuffle(pairs)
        return pairs


def _pair_count(windows: np.ndarray) -> int:
    """How many pairs positions with these windows give: ``sum_i min(w_i, i) + min(w_i, n - 1 - i)``, i.e. twice
    the windows less what the sequence's ends cut off, which only the first and last ``max(w)`` positions lose
    (one pass over the windows instead of four over the positions: it runs twice per chunk and epoch)."""
    n = len(windows)
    if n == 0:
        return 0
    reach = min(n, int(windows.max()))
    distance = np.arange(reach)  # from the end, for the first and (reversed) the last `reach` positions
    cut = np.maximum(windows[:reach] - distance, 0).sum() + np.maximum(windows[n - reach :] - distance[::-1], 0).sum()
    return 2 * int(windows.sum(dtype=np.int64)) - int(cut)


def _native_pairs(pair_shuffle: str, world_size: int = 1):
    """word2vec's compiled library for ``pair_shuffle`` (None: numpy; ``auto`` under DDP is numpy's, see
    :class:`SkipGramStream`); ``native`` without a compiler raises."""
    if pair_shuffle not in ("auto", "native", "numpy"):
        raise ValueError(f"pair_shuffle={pair_shuffle!r}: expected 'auto', 'native' or 'numpy'")
    if pair_shuffle == "numpy" or (pair_shuffle == "auto" and world_size > 1):
        return None
    library = native.library()
    if library is None and pair_shuffle == "native":
        raise RuntimeError("pair_shuffle='native': the compiled code could not be built (see the warning above)")
    return library


class LanguageModelStream(IterableDataset):
    """``(inputs, targets)`` windows of ``bptt`` tokens over ``batch_size`` contiguous streams.

    The token sequence is cut into ``batch_size * world_size`` equal rows (PyTorch's
    word_language_model layout, batch-first); this rank takes ``batch_size`` of them. Batch ``i``
    holds columns ``[i * bptt, (i + 1) * bptt)`` and its targets are the next tokens, so row ``r`` of
    batch ``i + 1`` continues row ``r`` of batch ``i``: a model can carry its hidden state.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, bptt: int, rank: int = 0, world_size: int = 1):
        if bptt < 1 or batch_size < 1:
            raise ValueError(f"batch_size={batch_size} and bptt={bptt} must be at least 1")
        self.tokens = tokens
        self.batch_size = batch_size
        self.bptt = bptt
        self.rank = rank
        self.world_size = world_size
        self.row_length = len(tokens) // (batch_size * world_size)
        if self.row_length < 2:
            raise ValueError(
                f"{len(tokens):,} tokens cannot fill {batch_size * world_size} streams of at least 2 "
                f"tokens; lower batch_size (or eval_batch_size) or use a larger split"
            )
        self.num_batches = math.ceil((self.row_length - 1) / bptt)
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.num_batches

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def rows(self) -> np.ndarray:
        """This rank's ``batch_size`` rows of the token sequence."""
        streams = self.batch_size * self.world_size
        grid = self.tokens[: streams * self.row_length].reshape(streams, self.row_length)
        return grid[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if torch.utils.data.get_worker_info() is not None and torch.utils.data.get_worker_info().num_workers > 1:
            raise RuntimeError("language-model batches must come in order: use num_workers <= 1")
        rows = self.rows()
        for i in range(self.start, self.num_batches):
            begin = i * self.bptt
            length = min(self.bptt, self.row_length - 1 - begin)
            window = torch.from_numpy(rows[:, begin : begin + length + 1].astype(np.int64))
            yield window[:, :-1], window[:, 1:]


def _split(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` contiguous blocks of ``ceil(n / parts)`` (the last ones shorter)."""
    size = math.ceil(n / parts)
    return [range(min(p * size, n), min((p + 1) * size, n)) for p in range(parts)]


def _round_robin_taken(handed_out: int, lengths: list[int]) -> list[int]:
    """How many items each source gave when ``handed_out`` were taken round-robin, skipping empty ones."""
    taken = [0] * len(lengths)
    while handed_out > 0:
        active = [i for i, n in enumerate(lengths) if taken[i] < n]
        if not active:
            break
        for i in active[:handed_out]:
            taken[i] += 1
        handed_out -= min(handed_out, len(active))
    return taken


Position = Callable[[], tuple[int, int]]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the loaders: SIGTERM and Ctrl-C are the main process's to handle.

    A scheduler (``kill -TERM -- -PGID``, SLURM) and a terminal's Ctrl-C signal every process of the group. A worker
    killed by them makes torch's SIGCHLD handler raise in the main process, in the middle of the step it finishes or
    of the ``last.ckpt`` it then saves. Ignoring them, the worker serves batches until the main process, having saved,
    shuts it down. (The main process blocks these signals while it starts workers, so none lands before this runs;
    a blocked signal stays pending for the main process.)"""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


#: Every loader alive, closed at interpreter exit: registered after torch's and multiprocessing's exit handlers,
#: this runs before them (atexit is last in, first out), while torch can still stop the workers of an unfinished
#: iteration; otherwise multiprocessing would wait forever on a worker that ignores its SIGTERM.
_LOADERS: weakref.WeakSet[ResumableLoader] = weakref.WeakSet()


@atexit.register
def _close_loaders() -> None:
    for loader in list(_LOADERS):
        loader.close()


def _stop_workers(batches: Iterator) -> None:
    """Stop the worker processes of a loader iteration now, whatever state they are in.

    torch's own shutdown runs when the iteration is garbage-collected, but does nothing once the interpreter exits:
    it then relies on terminating the workers with SIGTERM, which they ignore (:func:`ignore_stop_signals`), and
    multiprocessing would wait for them forever. A worker that outlives torch's shutdown (its SIGTERM ignored, e.g.
    a stalled exit on a loaded machine) is killed. (torch private members: a torch upgrade that renames them fails
    ``tests/test_data_streams.py``'s worker tests.)"""
    if isinstance(batches, _MultiProcessingDataLoaderIter):
        batches._shutdown_workers()
        for worker in batches._workers:
            if worker.is_alive():
                worker.kill()
                worker.join()


def worker_context() -> Any:
    """How the loaders start their worker processes: from multiprocessing's fork server where there is one.

    Forked from the training process, a worker inherits a copy of every lock its other threads (gloo's, the loaders'
    queue feeders, TensorBoard's writer) hold at that instant, and can wait on one forever: on CPython 3.8-3.11 without
    the fix of gh-112275 (3.11.7 has the bug), the interpreter's own lock, held by a thread that exits at that instant,
    hangs the new process inside ``os.fork`` (seen here: a DDP run waiting on its worker, 1 run in ~50). The fork
    server is a process of its own with one thread, started once; it has imported torch and this module, so a worker
    costs a fork and the stream's pickle, not an interpreter's start. (Python 3.14 made it the default for the same
    reason.) None (fork) where there is no fork server (Windows, where torch spawns)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "torch", __name__])  # no effect once the server runs
    return context


@contextmanager
def _stop_signals_blocked(active: bool) -> Iterator[None]:
    """Hold SIGTERM/SIGINT back (not lost: delivered on leaving) while worker processes start, so that each worker
    starts with them blocked until :func:`ignore_stop_signals` ignores them. The fork server, started on the first
    worker's start, inherits the blocked signals and passes them on to every worker it forks."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class ResumableLoader(DataLoader):
    """A DataLoader over a batch stream that follows the epoch and can start mid-epoch.

    Lightning saves ``state_dict()`` in every checkpoint and calls ``load_state_dict()`` before it
    resumes. ``position`` tells which epoch runs and how many of its batches were trained on; the
    DataModule reads both from the trainer (Lightning pre-fetches a batch, so counting the batches
    handed out would be off by one). Without a trainer, call ``set_epoch`` in your own loop.
    """

    def __init__(self, stream: SkipGramStream | LanguageModelStream, position: Position | None = None, **kwargs):
        kwargs.setdefault("worker_init_fn", ignore_stop_signals)
        if kwargs.get("num_workers", 0) > 0:
            kwargs.setdefault("multiprocessing_context", worker_context())
        super().__init__(stream, batch_size=None, **kwargs)
        self._position = position
        self._epoch = 0
        self._resume: tuple[int, int] | None = None
        self._handed_out = 0
        self._open: weakref.WeakSet[Iterator] = weakref.WeakSet()  # iterations not finished or closed
        _LOADERS.add(self)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator:
        batches = self._batches()
        self._open.add(batches)
        return batches

    def close(self) -> None:
        """Stop the worker processes of every iteration still open (one left unfinished, e.g. at ``max_steps``)."""
        for batches in list(self._open):
            batches.close()

    def _batches(self) -> Iterator:
        epoch = self._position()[0] if self._position else self._epoch
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start = self._resume[1]
        self._resume = None
        self.dataset.set_position(epoch, start)
        self._epoch, self._handed_out = epoch, start
        with _stop_signals_blocked(self.num_workers > 0):
            batches = super().__iter__()  # starts the worker processes
        try:
            for batch in batches:
                self._handed_out += 1
                yield batch
        finally:
            _stop_workers(batches)

    def state_dict(self) -> dict[str, Any]:
        epoch, done = self._position() if self._position else (self._epoch, self._handed_out)
        state: dict[str, Any] = {"epoch": epoch, "batches_done": done, "num_workers": self.num_workers}
        if isinstance(self.dataset, SkipGramStream):
            state["pair_shuffle"] = self.dataset.pair_shuffle
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.dataset, SkipGramStream):
            saved_workers = state.get("num_workers", self.num_workers)
            if max(saved_workers, 1) != max(self.num_workers, 1):
                raise ValueError(
                    f"this checkpoint was written with data num_workers={saved_workers}, which fixes the order of "
                    f"the skip-gram batches; resume with --data.num_workers {saved_workers} to continue the same run"
                )
            saved_shuffle = state.get("pair_shuffle", "numpy")  # checkpoints from before the compiled shuffle
            if saved_shuffle != self.dataset.pair_shuffle and state["batches_done"] > 0:
                raise ValueError(
                    f"this checkpoint stopped inside an epoch whose pairs were shuffled by {saved_shuffle}, but this "
                    f"run shuffles them by {self.dataset.pair_shuffle} (another order: pairs would be repeated and "
                    f"missed); resume with --data.pair_shuffle {saved_shuffle}"
                    + (" on a machine with a C++ compiler" if saved_shuffle == "native" else "")
                )
        self._resume = (state["epoch"], state["batches_done"])
