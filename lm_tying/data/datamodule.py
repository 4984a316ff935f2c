"""``Text8DataModule``: one corpus, one vocabulary, batches for either model.

The corpus is read once: the first run downloads (or reads ``path``), builds the vocabulary and
writes the encoded corpus to ``data_dir`` as a ``.npy`` file that later runs memory-map in
milliseconds. The cache is keyed by the source file and the vocabulary settings, so changing
either builds a new one, and a manifest written last (sizes and sha256 of its files) is checked on
every load, so a truncated or edited cache is rebuilt instead of trusted. ``mode`` decides what the
loaders serve: skip-gram pairs for word2vec or contiguous streams for the language model.
"""

from __future__ import annotations

import hashlib
import json
import time
import weakref
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tqdm.auto import tqdm

from lm_tying import _lightning, native
from lm_tying.atomic import atomic_path
from lm_tying.data.corpus import (
    TEXT8_URL,
    TEXT8_ZIP_SHA256,
    TEXT8_ZIP_SIZE,
    CorpusError,
    download,
    file_sha256,
    iter_text8_chunks,
    read_json,
    write_json,
)
from lm_tying.data.streams import LanguageModelStream, ResumableLoader, SkipGramStream, keep_probabilities
from lm_tying.data.vocab import FirstSeenIds, Vocabulary, encode_corpus

CACHE_FORMAT = 2  # 2: manifest.json, verified on load
CACHE_FILES = ("tokens.npy", "vocab.tsv")
MANIFEST = "manifest.json"


class Text8DataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str | None = None,
        data_dir: str = "data",
        url: str = TEXT8_URL,
        vocab_size: int | None = 50_000,
        min_count: int | None = None,
        split: tuple[float, float, float] = (0.9, 0.05, 0.05),
        mode: Literal["skipgram", "lm"] = "skipgram",
        batch_size: int = 128,
        window: int = 5,
        dynamic_window: bool = True,
        subsample: float | None = None,
        drop_unk: bool = False,
        bptt: int = 35,
        eval_batch_size: int = 10,
        num_workers: int = 1,
        seed: int = 0,
        pair_shuffle: Literal["auto", "native", "numpy"] = "auto",
    ):
        """
        Args:
            path: A local text8-format file (plain text, or a zip holding member ``text8``) to use
                instead of downloading text8.
            data_dir: Where the download and the caches (vocabulary, encoded corpus) live.
            url: Where to download ``text8.zip`` from when no ``path`` is given.
            vocab_size: Number of words kept, including ``UNK`` (id 0) for all others; an error if the
                corpus has fewer distinct words. With ``min_count`` it is only a cap: the ``vocab_size - 1``
                most frequent words (ties by first appearance; gensim's ``max_final_vocab`` instead raises
                ``min_count`` until the vocabulary fits, which keeps fewer); ``None`` keeps every word with at
                least ``min_count`` occurrences.
            min_count: Keep only words seen at least this often.
            split: Fractions of the corpus for train, validation and test, cut contiguously in that order.
            mode: ``skipgram`` serves (center, context) pairs; ``lm`` serves (inputs, targets) windows.
            batch_size: Skip-gram pairs per batch, or the number of parallel streams for the LM.
            window: Skip-gram window: contexts up to this many words either side of the center.
            dynamic_window: Draw each center's window uniformly from 1..window (word2vec C);
                ``False`` uses exactly ``window`` (the TensorFlow tutorial's ``skip_window``).
            subsample: Threshold ``t`` of frequent-word subsampling (e.g. 1e-3 as gensim, 1e-5 in the
                paper); ``None`` keeps every word. Applies to training pairs only.
            drop_unk: Skip-gram: remove out-of-vocabulary tokens before windowing, as word2vec C and
                gensim do (windows then span over them), instead of training on pairs with ``UNK``.
            bptt: LM: tokens per window (truncated backpropagation through time).
            eval_batch_size: LM: number of parallel streams for validation and test.
            num_workers: Background processes preparing batches (0: in the training process).
            seed: Seed of the skip-gram pair shuffling, windows and subsampling.
            pair_shuffle: Skip-gram: who makes and shuffles the training pairs: ``native``, word2vec's compiled
                code (~5x faster); ``numpy``; ``auto``, the compiled code where a C++ compiler builds it, in one
                process, and numpy's under DDP (where the compiled order measured worse; README, "DDP quality").
                Each gives its own order: a run resumes with the one it started with.
        """
        super().__init__()
        # Not merged into the logger's hparams: the model's vocab_size is the size actually built, which
        # differs from this cap whenever min_count or a small corpus trims the vocabulary, and Lightning
        # refuses to log two values for one key. The CLI logs these as data/* instead.
        self.save_hyperparameters(logger=False)
        if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1) > 1e-6:
            raise ValueError(f"split={tuple(split)}: give three non-negative fractions summing to 1")
        if split[0] == 0:
            raise ValueError("split gives no training data: its first fraction must be above 0")
        self.path = path
        self.data_dir = Path(data_dir)
        self.url = url
        self.vocab_size = vocab_size
        self.min_count = min_count
        self.split = tuple(split)
        self.mode = mode
        self.batch_size = batch_size
        self.window = window
        self.dynamic_window = dynamic_window
        self.subsample = subsample
        self.drop_unk = drop_unk
        self.bptt = bptt
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pair_shuffle = pair_shuffle
        self._vocab: Vocabulary | None = None
        self._tokens: np.ndarray | None = None
        self._corpus_fingerprint: str | None = None
        self._loaders: weakref.WeakSet[ResumableLoader] = weakref.WeakSet()

    # ----------------------------------------------------------------- corpus and vocabulary
    def prepare_data(self) -> None:
        """Download and encode once (Lightning calls this on one process per node)."""
        self._load()

    @property
    def vocab(self) -> Vocabulary:
        if self._vocab is None:
            self._load()
        return self._vocab

    @property
    def num_words(self) -> int:
        """Size of the vocabulary actually built; the CLI passes it to the model as ``vocab_size``."""
        return len(self.vocab)

    @property
    def word_counts(self) -> np.ndarray:
        """Occurrences of each id among the tokens training sees: the vocabulary's counts, with UNK at 0
        when ``drop_unk`` removes it (a unigram noise distribution should not draw a word that never occurs)."""
        counts = np.array(self.vocab.counts, dtype=np.int64)
        if self.drop_unk and self.mode == "skipgram":
            counts[self.vocab.unk_id] = 0
        return counts

    @property
    def corpus_fingerprint(self) -> str:
        """``sha256:<hex>:<bytes>`` of the corpus text (uncompressed), so the same words give the same
        fingerprint whatever the file's name, place or compression. Computed while the cache is built and
        kept in its manifest: a cached run does not read the corpus again."""
        if self._corpus_fingerprint is None:
            self._load()
        return self._corpus_fingerprint

    @property
    def tokens(self) -> np.ndarray:
        """The whole encoded corpus (memory-mapped, int32)."""
        if self._tokens is None:
            self._load()
        return self._tokens

    def source_file(self) -> Path:
        if self.path is not None:
            if not Path(self.path).is_file():
                raise CorpusError(
                    f"corpus file {self.path} does not exist. Pass a text8-format file (plain or zipped) "
                    f"with --data.path, or leave it unset to download text8."
                )
            return Path(self.path)
        canonical = self.url == TEXT8_URL
        return download(
            self.url,
            self.data_dir / "text8.zip",
            expected_size=TEXT8_ZIP_SIZE if canonical else None,
            expected_sha256=TEXT8_ZIP_SHA256 if canonical else None,
        )

    def cache_dir(self, source: Path) -> Path:
        """``data_dir/cache/<name>-<key>``: the key changes with the file and the vocabulary settings."""
        identity = {**_source_identity(source), "vocab_size": self.vocab_size, "min_count": self.min_count}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return self.data_dir / "cache" / f"{source.stem}-{key}"

    def _load(self) -> None:
        if self._tokens is not None:
            return
        if self.mode == "skipgram" and self.pair_shuffle != "numpy":
            from lm_tying import kernel_build

            kernel_build.build_in_background()  # the pairs' compiled code: a first run builds it while the corpus is read
        source = self.source_file()
        cache = self.cache_dir(source)
        manifest = read_json(cache / MANIFEST)
        problem = _cache_problem(cache, manifest, _source_identity(source))
        if problem is not None:
            if cache.exists():  # a first build needs no notice
                rank_zero_warn(f"{problem}; rebuilding the cache from {source}")
            manifest = self._build_cache(source, cache)
        self._vocab = Vocabulary.load(cache / "vocab.tsv")
        self._tokens = np.load(cache / "tokens.npy", mmap_mode="r")
        self._corpus_fingerprint = manifest["corpus_fingerprint"]

    def _build_cache(self, source: Path, cache: Path) -> dict:
        """Encode ``source`` into ``cache``; the manifest is written last, so only a complete cache has one."""
        started = time.perf_counter()
        identity = _source_identity(source)
        size = _uncompressed_size(source)
        text = _TextDigest()
        # The compiled word table if the library is built (a first run's build is usually done by now), else
        # Python's dict: the same ids either way, without waiting for a build.
        library = native.library_if_built()
        with library.word_ids() if library is not None else nullcontext(FirstSeenIds()) as word_ids:
            tokens, vocab = encode_corpus(
                text.update_from(_with_progress(iter_text8_chunks(source), size, f"encoding {source.name}")),
                self.vocab_size,
                self.min_count,
                size_hint=size,
                word_ids=word_ids,
            )
        cache.mkdir(parents=True, exist_ok=True)
        (cache / MANIFEST).unlink(missing_ok=True)  # a rebuild killed midway must not look complete
        with atomic_path(cache / "tokens.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, tokens)
        vocab.save(cache / "vocab.tsv")
        manifest = {
            "format": CACHE_FORMAT,
            "corpus_fingerprint": text.fingerprint(),
            "source": identity,
            "files": {
                name: {"size": (cache / name).stat().st_size, "sha256": file_sha256(cache / name)}
                for name in CACHE_FILES
            },
        }
        write_json(cache / MANIFEST, manifest)
        unk = vocab.counts[0] / max(len(tokens), 1)
        rank_zero_info(
            f"text8: {len(tokens):,} words, vocabulary {len(vocab):,} (UNK {unk:.1%} of tokens), "
            f"cached in {cache} ({time.perf_counter() - started:.1f}s)"
        )
        return manifest

    def split_tokens(self, stage: Literal["train", "val", "test"]) -> np.ndarray:
        """The contiguous part of the corpus for ``stage`` (90/5/5 by default)."""
        n = len(self.tokens)
        train_end = int(n * self.split[0])
        val_end = train_end + int(n * self.split[1])
        bounds = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, n)}
        start, end = bounds[stage]
        if end - start < 2:
            raise CorpusError(
                f"the {stage} split holds {end - start} tokens of the corpus's {n:,}: the corpus is too "
                f"small for split={self.split}. Use a larger corpus or other fractions."
            )
        return self.tokens[start:end]

    # ----------------------------------------------------------------- loaders
    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _trainer_position(self) -> tuple[int, int]:
        """The epoch and the batches trained on in it, as Lightning counts them."""
        trainer = self.trainer
        return trainer.current_epoch, _lightning.batches_processed_in_epoch(trainer)

    def _stream(self, stage: Literal["train", "val", "test"]):
        rank, world_size = self._rank()
        tokens = self.split_tokens(stage)
        if self.mode == "lm":
            batch_size = self.batch_size if stage == "train" else self.eval_batch_size
            return LanguageModelStream(tokens, batch_size, self.bptt, rank, world_size)
        training = stage == "train"
        keep = keep_probabilities(self.vocab.counts, self.subsample) if self.subsample and training else None
        if self.drop_unk:
            keep = np.ones(len(self.vocab)) if keep is None else keep
            keep[self.vocab.unk_id] = 0.0  # a probability of 0: never kept
        return SkipGramStream(
            tokens,
            self.batch_size,
            self.window,
            dynamic_window=self.dynamic_window,
            keep_prob=keep,
            seed=self.seed,
            shuffle=training,
            rank=rank,
            world_size=world_size,
            pair_shuffle=self.pair_shuffle,
        )

    def _loader(self, stage: Literal["train", "val", "test"]) -> ResumableLoader:
        stream = self._stream(stage)
        training = stage == "train" and self.trainer is not None
        workers = self.num_workers if self.mode == "skipgram" else min(self.num_workers, 1)
        loader = ResumableLoader(
            stream,
            position=self._trainer_position if training else None,
            num_workers=workers,
            pin_memory=self.trainer is not None and self.trainer.strategy.root_device.type == "cuda",
        )
        self._loaders.add(loader)
        return loader

    def teardown(self, stage: str) -> None:
        """Stop the worker processes of loaders left mid-epoch (a run ending at ``max_steps``, a limited validation)."""
        for loader in list(self._loaders):
            loader.close()

    def train_dataloader(self) -> ResumableLoader:
        return self._loader("train")

    def val_dataloader(self) -> ResumableLoader:
        return self._loader("val")

    def test_dataloader(self) -> ResumableLoader:
        return self._loader("test")

    def predict_dataloader(self) -> ResumableLoader:
        """``predict`` scores the test split: token log-probabilities (LM) or pair probabilities (word2vec)."""
        return self._loader("test")


def _source_identity(source: Path) -> dict:
    """What a cache was built from: a change of size or mtime means the file was written since."""
    stat = source.stat()
    return {"file": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_problem(cache: Path, manifest: dict | None, source_identity: dict) -> str | None:
    """Why the cache in ``cache`` cannot be used, in words naming the file; None when it can."""
    manifest_file = cache / MANIFEST
    if manifest is None:
        return f"{manifest_file} is missing or unreadable (a build that did not finish, or an older version)"
    if manifest.get("format") != CACHE_FORMAT:
        return f"{manifest_file} has format {manifest.get('format')}, this version reads {CACHE_FORMAT}"
    if manifest.get("source") != source_identity or not isinstance(manifest.get("corpus_fingerprint"), str):
        return f"{manifest_file} does not describe a cache of {source_identity['file']} as it is now"
    files = manifest.get("files")
    for name in CACHE_FILES:
        path = cache / name
        recorded = files.get(name) if isinstance(files, dict) else None
        if not isinstance(recorded, dict):
            return f"{manifest_file} does not record {name}"
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != recorded.get("size"):
            recorded_size = recorded.get("size")
            return f"{path} has {size:,} bytes, its manifest records {recorded_size} (truncated or replaced)"
        if file_sha256(path) != recorded.get("sha256"):
            return f"{path} does not match the sha256 its manifest records (edited or corrupted)"
    return None


class _TextDigest:
    """sha256 and length of the corpus text as it streams to the encoder: the corpus fingerprint."""

    def __init__(self):
        self.sha256 = hashlib.sha256()
        self.size = 0

    def update_from(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.sha256.update(chunk)
            self.size += len(chunk)
            yield chunk

    def fingerprint(self) -> str:
        return f"sha256:{self.sha256.hexdigest()}:{self.size}"


def _uncompressed_size(source: Path) -> int:
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            infos = {i.filename: i for i in archive.infolist()}
            if "text8" in infos:
                return infos["text8"].file_size
    return source.stat().st_size


def _with_progress(chunks, total: int, description: str):
    with tqdm(total=total, unit="B", unit_scale=True, desc=description, mininterval=1.0) as bar:
        for chunk in chunks:
            bar.update(len(chunk))
            yield chunk
