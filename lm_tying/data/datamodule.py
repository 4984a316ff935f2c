"""``Text8DataModule``: one corpus, one vocabulary, batches for either model.

The corpus is read once: the first run downloads (or reads ``path``), builds the vocabulary and
writes the encoded corpus to ``data_dir`` as a ``.npy`` file that later runs memory-map in
milliseconds. The cache is keyed by the source file and the vocabulary settings, so changing
either builds a new one. ``mode`` decides what the loaders serve: skip-gram pairs for word2vec or
contiguous streams for the language model.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from lm_tying.atomic import atomic_path
from lm_tying.data.corpus import TEXT8_URL, TEXT8_ZIP_SIZE, CorpusError, download, iter_text8_chunks
from lm_tying.data.streams import LanguageModelStream, ResumableLoader, SkipGramStream, keep_probabilities
from lm_tying.data.vocab import Vocabulary, encode_corpus

CACHE_FORMAT = 1


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
    ):
        """
        Args:
            path: A local text8-format file (plain text, or a zip holding member ``text8``) to use
                instead of downloading text8.
            data_dir: Where the download and the caches (vocabulary, encoded corpus) live.
            url: Where to download ``text8.zip`` from when no ``path`` is given.
            vocab_size: Number of words kept, including ``UNK`` (id 0) for all others; an error if the
                corpus has fewer distinct words. With ``min_count`` it is only a cap (gensim's
                ``max_final_vocab``); ``None`` keeps every word with at least ``min_count`` occurrences.
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
        self._vocab: Vocabulary | None = None
        self._tokens: np.ndarray | None = None

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
        return download(self.url, self.data_dir / "text8.zip", TEXT8_ZIP_SIZE if self.url == TEXT8_URL else None)

    def cache_dir(self, source: Path) -> Path:
        """``data_dir/cache/<name>-<key>``: the key changes with the file and the vocabulary settings."""
        stat = source.stat()
        identity = {
            "file": str(source.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "vocab_size": self.vocab_size,
            "min_count": self.min_count,
            "format": CACHE_FORMAT,
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return self.data_dir / "cache" / f"{source.stem}-{key}"

    def _load(self) -> None:
        source = self.source_file()
        cache = self.cache_dir(source)
        tokens_file, vocab_file = cache / "tokens.npy", cache / "vocab.tsv"
        if not (tokens_file.exists() and vocab_file.exists()):
            self._build_cache(source, cache)
        self._vocab = Vocabulary.load(vocab_file)
        self._tokens = np.load(tokens_file, mmap_mode="r")

    def _build_cache(self, source: Path, cache: Path) -> None:
        started = time.perf_counter()
        size = _uncompressed_size(source)
        tokens, vocab = encode_corpus(
            _with_progress(iter_text8_chunks(source), size, f"encoding {source.name}"),
            self.vocab_size,
            self.min_count,
            size_hint=size,
        )
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache / "tokens.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, tokens)  # vocabulary last: its presence marks a complete cache
        vocab.save(cache / "vocab.tsv")
        unk = vocab.counts[0] / max(len(tokens), 1)
        rank_zero_info(
            f"text8: {len(tokens):,} words, vocabulary {len(vocab):,} (UNK {unk:.1%} of tokens), "
            f"cached in {cache} ({time.perf_counter() - started:.1f}s)"
        )

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
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

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
        )

    def _loader(self, stage: Literal["train", "val", "test"]) -> ResumableLoader:
        stream = self._stream(stage)
        training = stage == "train" and self.trainer is not None
        workers = self.num_workers if self.mode == "skipgram" else min(self.num_workers, 1)
        return ResumableLoader(
            stream,
            position=self._trainer_position if training else None,
            num_workers=workers,
            pin_memory=self.trainer is not None and self.trainer.strategy.root_device.type == "cuda",
        )

    def train_dataloader(self) -> ResumableLoader:
        return self._loader("train")

    def val_dataloader(self) -> ResumableLoader:
        return self._loader("val")

    def test_dataloader(self) -> ResumableLoader:
        return self._loader("test")

    def predict_dataloader(self) -> ResumableLoader:
        """``predict`` scores the test split: token log-probabilities (LM) or pair probabilities (word2vec)."""
        return self._loader("test")


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
