"""word2vec's compiled CPU code (``csrc/``), loaded and called through ctypes.

One library holds the per-pair SGD kernel (``csrc/sequential_sgd.cpp``, word2vec's sequential engine, with
its negatives drawn inside it) and two pieces of the data pipeline, the skip-gram pair generator
(``csrc/skipgram_pairs.cpp``) and the word table that encodes the corpus (``csrc/word_ids.cpp``);
:mod:`lm_tying.kernel_build` builds it on first use and caches it. Where it cannot be built (no compiler),
:func:`library` returns None with a warning, and its users fall back to torch, numpy and Python.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lm_tying import kernel_build


def cores_per_process(processes_per_machine: int = 1) -> int:
    """This process's share of the cores it may run on, with ``processes_per_machine`` processes sharing them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(processes_per_machine, 1))


@dataclass(frozen=True)
class AliasDraws:
    """Negatives the kernel draws itself: ``groups`` draws of ``num_sampled`` from the alias tables ``accept``
    (float64 ``[V]``) and ``alias`` (int64 ``[V]``) of :class:`lm_tying.nce.UnigramSampler`, from the stream of
    ``seed`` (draw ``g * num_sampled + k`` is group ``g``'s ``k``-th negative; see :meth:`Library.alias_draws`)."""

    accept: Tensor
    alias: Tensor
    groups: int
    num_sampled: int
    seed: int


class Library:
    """The loaded library, with tensor-checking fronts to its functions."""

    def __init__(self, library_path: Path) -> None:
        self.path = library_path
        lib = ctypes.CDLL(str(library_path))  # a CDLL call releases the GIL
        i64, u64, ptr, f32 = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_float
        lib.sequential_sgd.argtypes = [ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, i64, u64, i64, i64, f32, f32,
                                       ctypes.c_int, ctypes.c_int, ptr]  # fmt: skip
        lib.sequential_sgd.restype = None
        lib.alias_draws.argtypes = [ptr, ptr, i64, u64, i64, i64, ptr]
        lib.alias_draws.restype = None
        lib.skipgram_pairs.argtypes = [ptr, ptr, i64, u64, ptr, i64, ctypes.c_int]
        lib.skipgram_pairs.restype = i64
        lib.word_ids_new.argtypes, lib.word_ids_new.restype = [], ptr
        lib.word_ids_free.argtypes, lib.word_ids_free.restype = [ptr], None
        lib.word_ids_feed.argtypes, lib.word_ids_feed.restype = [ptr, ctypes.c_char_p, i64, ptr], i64
        lib.word_ids_count.argtypes, lib.word_ids_count.restype = [ptr], i64
        lib.word_ids_bytes.argtypes, lib.word_ids_bytes.restype = [ptr], i64
        lib.word_ids_words.argtypes, lib.word_ids_words.restype = [ptr, ptr, ptr], None
        self._lib = lib

    def sequential_sgd(
        self,
        embedding: Tensor,
        output_weight: Tensor,
        center: Tensor,
        context: Tensor,
        negatives: Tensor | AliasDraws,
        lr: float,
        neg_weight: float,
        remove_accidental_hits: bool,
        threads: int | None = None,
    ) -> Tensor:
        """Per-pair SGD of ``(center, context)`` pairs with negatives shared by consecutive groups of pairs (given,
        ``[groups, K]``, or drawn by the kernel), on the tables in place; returns the pairs' summed loss (float64
        scalar). ``threads``: torch's intra-op thread count when None."""
        E, W = embedding.data, output_weight.data
        if E.device.type != "cpu" or W.device.type != "cpu":
            raise ValueError("the per-pair kernel runs on CPU tables")
        if E.dtype != torch.float32 or W.dtype != torch.float32:
            raise ValueError("the per-pair kernel's tables must be float32")
        if not (E.is_contiguous() and W.is_contiguous()) or E.shape != W.shape or E.dim() != 2:
            raise ValueError("the per-pair kernel's tables must be contiguous [V, D] tables of the same shape")
        drawn = isinstance(negatives, AliasDraws)
        if any(t.dtype != torch.int64 for t in (center, context)) or (not drawn and (
                negatives.dtype != torch.int64 or negatives.dim() != 2)):  # fmt: skip
            raise ValueError("center and context must be int64 [B], negatives int64 [groups, K]")
        center, context = center.contiguous(), context.contiguous()
        B, (V, D) = center.numel(), E.shape
        n, K = (negatives.groups, negatives.num_sampled) if drawn else negatives.shape
        if context.numel() != B:
            raise ValueError(f"center ({B}) and context ({context.numel()}) differ in length")
        group_loss = torch.zeros(n, dtype=torch.float64)
        if B == 0:
            return group_loss.sum()
        if n < 1 or (n - 1) * -(-B // n) >= B:
            raise ValueError(f"negatives has {n} groups: a batch of {B} pairs fills between 1 and {B}")
        for ids in (center, context) if drawn else (center, context, negatives):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
                raise ValueError(f"word id out of range: the tables have {V} rows")
        if drawn:  # (given negatives, accept, alias) pointers, and the draws' seed
            accept, alias = self._alias_tables(negatives.accept, negatives.alias, V)
            pointers, seed = (None, accept.data_ptr(), alias.data_ptr()), negatives.seed
        else:
            negatives = negatives.contiguous()
            pointers, seed = (negatives.data_ptr(), None, None), 0
        self._lib.sequential_sgd(
            E.data_ptr(), W.data_ptr(), D, center.data_ptr(), context.data_ptr(), B, *pointers, V, seed, n, K, lr,
            neg_weight, int(remove_accidental_hits), threads or torch.get_num_threads(), group_loss.data_ptr(),
        )  # fmt: skip
        return group_loss.sum()

    def alias_draws(self, accept: Tensor, alias: Tensor, seed: int, count: int, first: int = 0) -> Tensor:
        """Draws ``first ... first + count - 1`` of the stream of ``seed`` from the alias tables, as the kernel
        draws its negatives."""
        accept, alias = self._alias_tables(accept, alias, accept.numel())
        out = torch.empty(count, dtype=torch.int64)
        self._lib.alias_draws(accept.data_ptr(), alias.data_ptr(), accept.numel(), seed, first, count, out.data_ptr())
        return out

    def skipgram_pairs(
        self, tokens: np.ndarray, windows: np.ndarray, seed: int, count: int, threads: int = 1
    ) -> np.ndarray:
        """The ``count`` skip-gram pairs of ``tokens`` (each position with the ``windows[i]`` positions on either
        side), packed as ``center << 32 | context`` into int64, in a uniformly random order fixed by ``seed`` (the
        same on any number of ``threads``)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        windows = np.ascontiguousarray(windows, dtype=np.int32)
        if tokens.shape != windows.shape or tokens.ndim != 1:
            raise ValueError("tokens and windows must be 1-d arrays of the same length")
        out = np.empty(count, dtype=np.int64)
        written = self._lib.skipgram_pairs(tokens.ctypes.data, windows.ctypes.data, len(tokens), seed,
                                           out.ctypes.data, count, threads)  # fmt: skip
        if written != count:
            raise ValueError(f"{count} pairs expected, but the tokens and windows give another number")
        return out

    def word_ids(self) -> WordIds:
        """A table giving words ids in order of first appearance (see :class:`WordIds`)."""
        return WordIds(self._lib)

    @staticmethod
    def _alias_tables(accept: Tensor, alias: Tensor, V: int) -> tuple[Tensor, Tensor]:
        if accept.shape != (V,) or alias.shape != (V,) or accept.dtype != torch.float64 or alias.dtype != torch.int64:
            raise ValueError(f"the alias tables must be float64 and int64 [{V}], one entry per table row")
        if accept.device.type != "cpu" or alias.device.type != "cpu":
            raise ValueError("the alias tables must be on the CPU")
        return accept.contiguous(), alias.contiguous()


class WordIds:
    """Words to ids in order of first appearance, in compiled code (``csrc/word_ids.cpp``): what
    :func:`lm_tying.data.vocab.encode_corpus` does with ``bytes.split`` and a dict, the same ids, ~5x faster.
    Call it on each chunk of the corpus (cut between words); :meth:`words` gives the distinct words in id order.
    A context manager: leaving it frees the table."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib, self._table = lib, lib.word_ids_new()

    def __call__(self, chunk: bytes) -> np.ndarray:
        out = np.empty(len(chunk) // 2 + 1, dtype=np.int32)  # the most words len(chunk) bytes can hold
        count = self._lib.word_ids_feed(self._open(), chunk, len(chunk), out.ctypes.data)
        if count < 0:
            raise ValueError("the corpus has more than 2^31 - 1 distinct words")
        return out[:count]

    def words(self) -> list[bytes]:
        table = self._open()
        size, count = self._lib.word_ids_bytes(table), self._lib.word_ids_count(table)
        text, starts = ctypes.create_string_buffer(size), np.empty(count + 1, dtype=np.int64)
        self._lib.word_ids_words(table, text, starts.ctypes.data)
        raw = text.raw
        return [raw[a:b] for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]

    def _open(self) -> int:
        if self._table is None:
            raise ValueError("the word table was freed (used after its with-block)")
        return self._table

    def __enter__(self) -> WordIds:
        return self

    def __exit__(self, *exc: object) -> None:
        self._lib.word_ids_free(self._table)
        self._table = None


@functools.cache
def library() -> Library | None:
    """The library of ``csrc/``, built if no build is cached (:mod:`lm_tying.kernel_build`); None if it cannot be
    built."""
    try:
        return Library(kernel_build.built())
    except Exception as err:  # no compiler, a read-only cache, ...
        warnings.warn(
            f"cannot build word2vec's compiled code ({type(err).__name__}: {err}); install a C++ compiler "
            f"(or set CXX) to use it, or delete {kernel_build.library_path()} if a damaged build is left there.",
            stacklevel=2,
        )
        return None


def library_if_built() -> Library | None:
    """The library if a build is cached and none is under way, else None: for work that gains from it but has a
    path of its own and should not wait for a build (encoding the corpus)."""
    return library() if kernel_build.is_built() else None
