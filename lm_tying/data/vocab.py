"""The vocabulary: words sorted by frequency, with their counts, built once from the corpus.

Ids are in descending order of count (ties in order of first appearance, as ``Counter.most_common``),
with ``UNK`` at id 0 for every word left out, as in the classic TensorFlow word2vec tutorial. The
log-uniform sampler relies on this order: a small id means a frequent word.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from lm_tying.atomic import atomic_path
from lm_tying.data.corpus import CorpusError

UNK = "UNK"


class Vocabulary:
    """Words in id order with their corpus counts; ``UNK`` (id 0) counts every out-of-vocabulary token."""

    unk_id = 0

    def __init__(self, words: list[str], counts: Iterable[int]):
        self.words = list(words)
        self.counts = np.asarray(counts, dtype=np.int64)
        if len(self.words) != len(self.counts):
            raise ValueError(f"{len(self.words)} words but {len(self.counts)} counts")
        if not self.words or self.words[0] != UNK:
            raise ValueError(f"the first word of a vocabulary must be {UNK!r}")
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def __repr__(self) -> str:
        return f"Vocabulary({len(self):,} words, {int(self.counts.sum()):,} tokens)"

    def encode(self, words: Iterable[str]) -> np.ndarray:
        """Ids of ``words``; words outside the vocabulary map to ``UNK``."""
        get = self.index.get
        return np.fromiter((get(w, 0) for w in words), dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]

    def state_dict(self) -> dict:
        """Plain lists, so a checkpoint can name every embedding row without the corpus."""
        return {"words": list(self.words), "counts": self.counts.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> Vocabulary:
        return cls(state["words"], state["counts"])

    def save(self, path: str | os.PathLike) -> None:
        """Write ``word<TAB>count`` lines, atomically."""
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{w}\t{c}\n" for w, c in zip(self.words, self.counts.tolist()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a file written by ``save``; a damaged one is a ``CorpusError`` naming it."""
        with open(path, encoding="utf-8") as f:
            fields = f.read().split()  # word, count, word, count, ...: words hold no whitespace
        try:
            if len(fields) % 2:
                raise ValueError(f"{len(fields)} fields, not word-count pairs")
            return cls(fields[0::2], np.array(fields[1::2], dtype=np.int64))
        except ValueError as e:
            raise CorpusError(
                f"{path} is not a vocabulary file written by lm-tying ({e}): it is truncated or was edited. "
                f"Delete it to rebuild it from the corpus."
            ) from None


class WordIdTable(Protocol):
    """Gives each chunk's words ids, a new word the next id; ``words()``: the distinct words in id order."""

    def __call__(self, chunk: bytes) -> np.ndarray: ...

    def words(self) -> list[bytes]: ...


class FirstSeenIds:
    """Words to ids in order of first appearance: ``bytes.split`` and a dict giving a new word the next id.
    Called on each chunk of the corpus; :meth:`words` gives the distinct words in id order. The compiled
    :class:`lm_tying.native.WordIds` does the same faster; this one needs no compiler."""

    def __init__(self) -> None:
        self._first_seen: defaultdict[bytes, int] = defaultdict(itertools.count().__next__)

    def __call__(self, chunk: bytes) -> np.ndarray:
        words = chunk.split()
        return np.fromiter(map(self._first_seen.__getitem__, words), dtype=np.int32, count=len(words))

    def words(self) -> list[bytes]:
        return list(self._first_seen)


def encode_corpus(
    chunks: Iterable[bytes],
    vocab_size: int | None,
    min_count: int | None,
    size_hint: int = 0,
    word_ids: WordIdTable | None = None,
) -> tuple[np.ndarray, Vocabulary]:
    """One pass over the corpus: ids in order of first appearance, then renumbered by frequency.

    Returns the encoded corpus (int32) and the vocabulary. Memory stays near the size of the
    encoded array: chunks are processed one at a time into one buffer sized from ``size_hint``
    (the corpus size in bytes; text8 averages 5.9 bytes a word) and renumbered in place. ``word_ids``
    gives the first ids (a :class:`FirstSeenIds` by default, or the compiled one: the same ids).
    """
    if vocab_size is None and min_count is None:
        raise ValueError("set vocab_size, min_count, or both")
    if vocab_size is not None and vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size}: it must be at least 2 (UNK and one word)")
    word_ids = word_ids or FirstSeenIds()
    tokens = np.empty(max(size_hint // 5, 1 << 16), dtype=np.int32)
    n = 0
    for chunk in chunks:
        ids = word_ids(chunk)
        if n + len(ids) > tokens.size:
            tokens = np.resize(tokens, max(2 * tokens.size, n + len(ids)))
        tokens[n : n + len(ids)] = ids
        n += len(ids)
    tokens = tokens[:n]
    if tokens.size == 0:
        raise CorpusError("the corpus holds no words")
    words_by_id = word_ids.words()
    distinct = len(words_by_id)

    counts = np.zeros(distinct, dtype=np.int64)
    for block in _blocks(tokens):  # in blocks: bincount would copy the whole array to int64
        counts += np.bincount(block, minlength=distinct)
    by_frequency = np.argsort(-counts, kind="stable")  # stable: ties keep order of first appearance
    keep = len(by_frequency)
    if min_count is not None:
        keep = int(np.count_nonzero(counts >= min_count))
    if vocab_size is not None:
        if min_count is None and vocab_size - 1 > distinct:  # with min_count it is only a cap
            raise CorpusError(
                f"vocab_size={vocab_size:,} is larger than the corpus allows: it has only "
                f"{distinct:,} distinct words (plus UNK). Set vocab_size to at most "
                f"{distinct + 1:,}, or use min_count instead."
            )
        keep = min(keep, vocab_size - 1)
    if keep == 0:
        raise CorpusError(f"min_count={min_count} leaves no word in the vocabulary; lower it")

    new_id = np.zeros(distinct, dtype=np.int32)  # everything not kept -> UNK (0)
    new_id[by_frequency[:keep]] = np.arange(1, keep + 1, dtype=np.int32)
    for block in _blocks(tokens):
        block[...] = new_id[block]

    kept = by_frequency[:keep]
    words = [UNK] + [words_by_id[i].decode("ascii") for i in kept]
    unk_count = int(tokens.size - counts[kept].sum())
    vocab = Vocabulary(words, np.concatenate([[unk_count], counts[kept]]))
    return tokens, vocab


def _blocks(array: np.ndarray, size: int = 1 << 20):
    """Views of ``array`` in blocks, so whole-array temporaries stay small."""
    for start in range(0, len(array), size):
        yield array[start : start + size]
