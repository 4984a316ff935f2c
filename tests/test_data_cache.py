"""The encoded-corpus cache is trusted only after its manifest checks out; the corpus fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np
import pytest

from conftest import write_corpus
from lm_tying.data import CorpusError, Text8DataModule, Vocabulary


def _cache_of(data_module: Text8DataModule):
    return data_module.cache_dir(data_module.source_file())


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_one_word(path):
    """Swap the letters of one word for others of the same length: same size, other vocabulary."""
    lines = path.read_text().splitlines(keepends=True)
    word, count = lines[3].split("\t")
    lines[3] = f"{word[::-1] if word != word[::-1] else 'q' * len(word)}\t{count}"
    path.write_text("".join(lines))


def _flip_a_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "named", "why"),
    [
        (lambda cache: _truncate(cache / "tokens.npy"), "tokens.npy", "truncated"),
        (lambda cache: _truncate(cache / "vocab.tsv"), "vocab.tsv", "truncated"),
        (lambda cache: _edit_one_word(cache / "vocab.tsv"), "vocab.tsv", "sha256"),
        (lambda cache: _flip_a_byte(cache / "tokens.npy"), "tokens.npy", "sha256"),
        (lambda cache: (cache / "tokens.npy").unlink(), "tokens.npy", "missing"),
        (lambda cache: (cache / "manifest.json").unlink(), "manifest.json", "missing"),
        (lambda cache: (cache / "manifest.json").write_text('{"format": 2, "fi'), "manifest.json", "unreadable"),
    ],
    ids=["short-tokens", "short-vocab", "edited-word", "flipped-byte", "no-tokens", "no-manifest", "bad-manifest"],
)
def test_damaged_cache_is_rebuilt_with_a_notice(tmp_path, make_corpus, damage, named, why):
    corpus = make_corpus(num_words=3000)
    settings = dict(path=str(corpus), data_dir=str(tmp_path / "data"), vocab_size=50)
    first = Text8DataModule(**settings)
    tokens, vocab = np.array(first.tokens), first.vocab
    cache = _cache_of(first)
    damage(cache)

    with pytest.warns(UserWarning, match=rf"{named}.*{why}.*; rebuilding the cache from .*corpus.txt") as notices:
        again = Text8DataModule(**settings)
        assert (again.tokens == tokens).all() and again.vocab == vocab
        assert again.vocab.counts.tolist() == vocab.counts.tolist()
    assert len(notices) == 1 and "\n" not in str(notices[0].message)
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json", "tokens.npy", "vocab.tsv"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt and verified: the next run loads it without a word
        assert (Text8DataModule(**settings).tokens == tokens).all()


def test_interrupted_build_leaves_no_manifest_and_is_rebuilt(tmp_path, make_corpus, monkeypatch):
    corpus = make_corpus(num_words=2000)
    settings = dict(path=str(corpus), data_dir=str(tmp_path / "data"), vocab_size=30)
    with monkeypatch.context() as patch:
        patch.setattr(Vocabulary, "save", lambda self, path: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            Text8DataModule(**settings).prepare_data()
    cache = _cache_of(Text8DataModule(**settings))
    assert (cache / "tokens.npy").exists() and not (cache / "manifest.json").exists()
    with pytest.warns(UserWarning, match="manifest.json is missing.*rebuilding"):
        assert len(Text8DataModule(**settings).vocab) == 30


def test_manifest_records_sizes_hashes_fingerprint_and_format(tmp_path, make_corpus):
    dm = Text8DataModule(path=str(make_corpus(num_words=1000)), data_dir=str(tmp_path), vocab_size=20)
    dm.prepare_data()
    cache = _cache_of(dm)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["format"] == 2 and manifest["corpus_fingerprint"] == dm.corpus_fingerprint
    for name in ("tokens.npy", "vocab.tsv"):
        data = (cache / name).read_bytes()
        assert manifest["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_damaged_vocabulary_file_is_named(tmp_path):
    path = tmp_path / "vocab.tsv"
    Vocabulary(["UNK", "the", "of"], [5, 3, 2]).save(path)
    for text in ("UNK\t5\nthe\t3\nof", "UNK\t5\nthe\tx\n", "the\t3\nUNK\t5\n"):
        path.write_text(text)
        with pytest.raises(CorpusError, match=r"vocab.tsv is not a vocabulary file .*Delete it") as err:
            Vocabulary.load(path)
        assert "\n" not in str(err.value)


def test_corpus_fingerprint_follows_the_words_not_the_file(tmp_path, monkeypatch):
    text = "the cat sat on the mat and the dog sat on the log"
    plain = write_corpus(tmp_path / "plain.txt", text)
    zipped = write_corpus(tmp_path / "zipped.zip", text, as_zip=True)
    other = write_corpus(tmp_path / "other.txt", text.replace("dog", "cow"))

    def fingerprint(path, **settings):
        return Text8DataModule(path=str(path), data_dir=str(tmp_path / "data"), **settings).corpus_fingerprint

    expected = f"sha256:{hashlib.sha256(text.encode()).hexdigest()}:{len(text)}"
    assert fingerprint(plain, vocab_size=5) == fingerprint(zipped, vocab_size=5) == expected
    assert fingerprint(plain, vocab_size=None, min_count=2) == expected, "vocabulary settings are not the corpus"
    assert fingerprint(other, vocab_size=5) != expected

    import lm_tying.data.datamodule as datamodule

    with monkeypatch.context() as patch:  # a cached run takes the fingerprint from the manifest
        patch.setattr(datamodule, "iter_text8_chunks", lambda path: pytest.fail("read the corpus again"))
        assert fingerprint(zipped, vocab_size=5) == expected
    longer = text + " again"
    write_corpus(zipped, longer, as_zip=True)
    os.utime(zipped, ns=(1, 1))  # a new size and mtime: rebuilt, new fingerprint
    assert fingerprint(zipped, vocab_size=5) == f"sha256:{hashlib.sha256(longer.encode()).hexdigest()}:{len(longer)}"
