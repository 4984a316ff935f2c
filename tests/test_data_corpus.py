"""Getting the corpus: download against a loopback HTTP server, verification, and the errors users see."""

from __future__ import annotations

import hashlib
import json
import zipfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from conftest import LocalServer, compiled_library, write_corpus
from lm_tying.data import CorpusError, Text8DataModule, Vocabulary
from lm_tying.data.corpus import download, iter_text8_chunks
from lm_tying import native
from lm_tying.data.vocab import FirstSeenIds, encode_corpus


@pytest.fixture
def text8_zip(tmp_path) -> bytes:
    path = write_corpus(tmp_path / "served" / "served.zip", "the cat sat on the mat the end", as_zip=True)
    return path.read_bytes()


def test_download_verifies_size_caches_and_reads(tmp_path, text8_zip):
    with LocalServer({"/text8.zip": text8_zip}) as server:
        dest = tmp_path / "data" / "text8.zip"
        download(server.url + "/text8.zip", dest, expected_size=len(text8_zip))
        assert dest.read_bytes() == text8_zip
        download(server.url + "/text8.zip", dest, expected_size=len(text8_zip))
        assert server.requests == ["/text8.zip"], "a verified cached file must be reused"
        assert sorted(p.name for p in dest.parent.iterdir()) == ["text8.zip", "text8.zip.source.json"], (
            "no temporary file may be left behind, only the file and the record of its URL"
        )
        dm = Text8DataModule(data_dir=str(tmp_path / "data2"), url=server.url + "/text8.zip", vocab_size=4)
        assert dm.vocab.words == ["UNK", "the", "cat", "sat"]


def test_download_of_wrong_size_fails_and_leaves_nothing(tmp_path, text8_zip):
    with LocalServer({"/text8.zip": text8_zip}) as server:
        dest = tmp_path / "text8.zip"
        with pytest.raises(CorpusError, match="expected"):
            download(server.url + "/text8.zip", dest, expected_size=len(text8_zip) + 1)
        assert not dest.exists() and list(tmp_path.glob("text8*")) == []


def test_interrupted_download_fails_and_leaves_nothing(tmp_path, text8_zip):
    with LocalServer({"/truncated": text8_zip}) as server:
        dest = tmp_path / "text8.zip"
        with pytest.raises(CorpusError, match="(cut short|failed)"):
            download(server.url + "/truncated", dest, expected_size=None, timeout=5)
        assert list(tmp_path.glob("text8*")) == []


def test_http_error_names_url_and_fix(tmp_path):
    with LocalServer({}) as server:
        with pytest.raises(CorpusError, match=r"HTTP 404.*--data.path"):
            download(server.url + "/missing.zip", tmp_path / "text8.zip", expected_size=10)


def test_truncated_cached_file_is_reported(tmp_path):
    dest = tmp_path / "text8.zip"
    dest.write_bytes(b"PK" * 10)
    with pytest.raises(CorpusError, match="truncated"):
        download("http://127.0.0.1:9/none", dest, expected_size=1000)


def test_download_is_tied_to_its_url(tmp_path, text8_zip):
    """A file downloaded from one URL is never served for another: the run refuses, naming both."""
    with LocalServer({"/a/text8.zip": text8_zip, "/b/text8.zip": b"other bytes"}) as server:
        Text8DataModule(data_dir=str(tmp_path), url=server.url + "/a/text8.zip", vocab_size=4).prepare_data()
        other = Text8DataModule(data_dir=str(tmp_path), url=server.url + "/b/text8.zip", vocab_size=4)
        with pytest.raises(CorpusError, match=r"text8.zip was downloaded from .*/a/text8.zip, not from .*/b/") as e:
            other.prepare_data()
        assert "\n" not in str(e.value) and "--data.data_dir" in str(e.value)
        assert server.requests == ["/a/text8.zip"]
        assert (tmp_path / "text8.zip").read_bytes() == text8_zip, "the existing download must be left alone"


def test_reused_download_is_checked_against_its_record(tmp_path, text8_zip, monkeypatch):
    with LocalServer({"/text8.zip": text8_zip}) as server:
        url, dest = server.url + "/text8.zip", tmp_path / "text8.zip"
        download(url, dest)
        import lm_tying.data.corpus as corpus

        with monkeypatch.context() as patch:  # an unchanged file (same size and mtime) is not hashed again
            patch.setattr(corpus, "file_sha256", lambda path: pytest.fail("rehashed an unchanged download"))
            download(url, dest)
        dest.write_bytes(bytes(reversed(text8_zip)))  # same size, other bytes, new mtime
        with pytest.raises(CorpusError, match=r"text8.zip has sha256 \w+, expected \w+: it was changed"):
            download(url, dest)
        dest.write_bytes(text8_zip[:50])
        with pytest.raises(CorpusError, match=r"text8.zip has 50 bytes, expected .*truncated"):
            download(url, dest)
        dest.write_bytes(text8_zip)  # the right bytes again: reused, though its mtime changed
        download(url, dest)
        assert server.requests == ["/text8.zip"]


def test_known_sha256_is_verified_on_download(tmp_path, text8_zip):
    with LocalServer({"/text8.zip": text8_zip}) as server:
        dest = tmp_path / "data" / "text8.zip"
        with pytest.raises(CorpusError, match="has sha256 .*, expected 0+: it is not text8.zip"):
            download(server.url + "/text8.zip", dest, expected_size=len(text8_zip), expected_sha256="0" * 64)
        assert list(dest.parent.iterdir()) == [], "a file failing its hash must leave nothing behind"
        sha256 = hashlib.sha256(text8_zip).hexdigest()
        download(server.url + "/text8.zip", dest, expected_size=len(text8_zip), expected_sha256=sha256)
        record = json.loads((dest.parent / "text8.zip.source.json").read_text())
        assert record["url"] == server.url + "/text8.zip" and record["sha256"] == sha256
        assert record["size"] == len(text8_zip)


def test_download_without_record_is_adopted_only_when_verifiable(tmp_path, text8_zip):
    """A file from before URLs were recorded: kept when the known size and hash vouch for it, else refused."""
    dest = tmp_path / "text8.zip"
    dest.write_bytes(text8_zip)
    url = "http://127.0.0.1:9/text8.zip"  # nothing listens: reusing the file must not need the network
    with pytest.raises(CorpusError, match="no readable record of the URL it was downloaded from: delete it"):
        download(url, dest)
    with pytest.raises(CorpusError, match="has sha256 .*, expected 0+"):
        download(url, dest, expected_size=len(text8_zip), expected_sha256="0" * 64)
    download(url, dest, expected_size=len(text8_zip), expected_sha256=hashlib.sha256(text8_zip).hexdigest())
    assert json.loads((tmp_path / "text8.zip.source.json").read_text())["url"] == url
    download(url, dest)  # recorded now: reused as any download from this URL
    (tmp_path / "text8.zip.source.json").write_text('{"url": "' + url + '", "size": "many"}')
    with pytest.raises(CorpusError, match="no readable record"):
        download(url, dest)


def test_corrupt_zip_served_then_read_is_reported(tmp_path):
    with LocalServer({"/text8.zip": b"this is not a zip file at all"}) as server:
        dm = Text8DataModule(data_dir=str(tmp_path), url=server.url + "/text8.zip")
        with pytest.raises(CorpusError, match="not a valid zip"):
            dm.prepare_data()


def test_crc_error_is_reported(tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("text8", "the cat sat on the mat")
    raw = bytearray(path.read_bytes())
    at = raw.index(b"the cat")
    raw[at] = ord("x")
    path.write_bytes(bytes(raw))
    with pytest.raises(CorpusError, match="corrupt zip"):
        list(iter_text8_chunks(path))


def test_zip_without_text8_member(tmp_path):
    path = write_corpus(tmp_path / "other.zip", "the cat", as_zip=True, member="words.txt")
    with pytest.raises(CorpusError, match="no member named 'text8'"):
        list(iter_text8_chunks(path))


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "empty"), ("the Cat sat", "'C' at byte 4"), ("the cat\nsat", r"'\\n' at byte 7"), ("the, cat", "','")],
)
def test_bad_text_is_reported_with_position(tmp_path, text, message):
    path = write_corpus(tmp_path / "bad.txt", text)
    with pytest.raises(CorpusError, match=message):
        list(iter_text8_chunks(path))


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        Text8DataModule(path=str(tmp_path / "nope.txt"), data_dir=str(tmp_path)).prepare_data()


def test_chunks_cut_at_word_boundaries(tmp_path):
    text = " ".join(f"w{'a' * (i % 7)}b" for i in range(3000))
    path = write_corpus(tmp_path / "c.txt", text)
    chunks = list(iter_text8_chunks(path, chunk_bytes=100))
    assert len(chunks) > 10
    assert b"".join(chunks) == text.encode()
    assert all(c.endswith(b" ") for c in chunks[:-1])


@pytest.fixture(params=["python", "compiled"])
def word_table(request):
    """A fresh word table of each kind: encode_corpus's own (a dict) and the compiled one."""
    if request.param == "python":
        yield FirstSeenIds
        return
    library = compiled_library()
    with ExitStack() as tables:
        yield lambda: tables.enter_context(library.word_ids())


def test_vocabulary_by_frequency_with_unk_and_ties_in_order_of_appearance(word_table):
    text = b"b a c a b a d e d"  # a:3 b:2 d:2 c:1 e:1 ; b before d
    tokens, vocab = encode_corpus([text], vocab_size=4, min_count=None, word_ids=word_table())
    assert vocab.words == ["UNK", "a", "b", "d"]
    assert vocab.counts.tolist() == [2, 3, 2, 2]  # UNK counts c and e
    assert tokens.tolist() == [2, 1, 0, 1, 2, 1, 3, 0, 3]
    assert vocab.encode(["a", "zzz", "d"]).tolist() == [1, 0, 3]
    again, vocab2 = encode_corpus([text[:6], text[6:]], vocab_size=4, min_count=None, word_ids=word_table())
    assert vocab2 == vocab and (again == tokens).all()


def test_min_count_and_too_large_vocabulary(word_table):
    text = b"b a c a b a d e d"
    _, vocab = encode_corpus([text], vocab_size=None, min_count=2, word_ids=word_table())
    assert vocab.words == ["UNK", "a", "b", "d"]
    with pytest.raises(CorpusError, match="only 5 distinct words"):
        encode_corpus([text], vocab_size=7, min_count=None, word_ids=word_table())
    with pytest.raises(CorpusError, match="min_count"):
        encode_corpus([text], vocab_size=None, min_count=10, word_ids=word_table())
    with pytest.raises(CorpusError, match="no words"):
        encode_corpus([b" \n ", b""], vocab_size=None, min_count=1, word_ids=word_table())


def test_the_compiled_word_table_gives_pythons_ids_and_words():
    """Chunk after chunk, the compiled table gives the ids ``bytes.split`` and a dict give, and the same words in
    id order: over 100k distinct words (its slots grow several times), lengths 1-60, every kind of ASCII
    whitespace, runs of it, chunks starting and ending with it, empty chunks."""
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    words = {letters[rng.integers(0, 26, size=n)].tobytes() for n in rng.integers(1, 61, size=120_000)}
    words = sorted(words)
    spaces = [b" ", b"  ", b"\t", b"\n", b"\r\n", b"\x0b", b"\x0c", b" \t "]
    chunks = [b"", b"   "]
    for _ in range(40):
        picked = rng.integers(0, len(words), size=int(rng.integers(0, 20_000)))
        gaps = rng.integers(0, len(spaces), size=len(picked) + 1)
        chunk = spaces[gaps[0]] + b"".join(words[i] + spaces[g] for i, g in zip(picked, gaps[1:]))
        chunks.append(chunk if rng.random() < 0.5 else chunk.strip())
    python = FirstSeenIds()
    with compiled_library().word_ids() as compiled:
        for chunk in chunks:
            expected = python(chunk)
            assert compiled(chunk).tolist() == expected.tolist()
        assert len(python.words()) > 100_000
        assert compiled.words() == python.words()
    with pytest.raises(ValueError, match="freed"):
        compiled(b"a b")


def test_the_cache_is_the_same_whoever_encodes_it(tmp_path, make_corpus, monkeypatch):
    """The DataModule encodes with the compiled table once the library is built, with Python's otherwise (a first
    run whose build is not done): the same cache, byte for byte."""
    library = compiled_library()
    corpus = make_corpus(num_words=20_000, as_zip=True)
    used = []
    monkeypatch.setattr(native, "library_if_built", lambda: used.append(library) or library)
    compiled = Text8DataModule(path=str(corpus), data_dir=str(tmp_path / "compiled"), vocab_size=100)
    compiled.prepare_data()
    monkeypatch.setattr(native, "library_if_built", lambda: used.append(None))
    python = Text8DataModule(path=str(corpus), data_dir=str(tmp_path / "python"), vocab_size=100)
    python.prepare_data()
    assert used == [library, None]
    for name in ("tokens.npy", "vocab.tsv"):
        files = [next(Path(dm.data_dir).glob(f"cache/*/{name}")).read_bytes() for dm in (compiled, python)]
        assert files[0] == files[1]


def test_vocabulary_file_round_trip(tmp_path):
    vocab = Vocabulary(["UNK", "the", "of"], [5, 3, 2])
    vocab.save(tmp_path / "v.tsv")
    loaded = Vocabulary.load(tmp_path / "v.tsv")
    assert loaded == vocab and loaded.counts.tolist() == [5, 3, 2]
    assert Vocabulary.from_state_dict(vocab.state_dict()) == vocab


def test_cache_is_reused_and_keyed_by_file_and_settings(tmp_path, make_corpus, monkeypatch):
    corpus = make_corpus(num_words=3000, as_zip=True)
    first = Text8DataModule(path=str(corpus), data_dir=str(tmp_path / "d"), vocab_size=50)
    tokens = np.array(first.tokens)

    import lm_tying.data.datamodule as datamodule

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(datamodule, "encode_corpus", fail)
    again = Text8DataModule(path=str(corpus), data_dir=str(tmp_path / "d"), vocab_size=50)
    assert isinstance(again.tokens, np.memmap) and (again.tokens == tokens).all()
    assert again.vocab == first.vocab
    with pytest.raises(AssertionError, match="cache"):
        Text8DataModule(path=str(corpus), data_dir=str(tmp_path / "d"), vocab_size=60).prepare_data()
    write_corpus(corpus, "a different corpus now", as_zip=True)
    with pytest.raises(AssertionError, match="cache"):
        Text8DataModule(path=str(corpus), data_dir=str(tmp_path / "d"), vocab_size=4).prepare_data()


def test_split_is_contiguous_90_5_5(make_corpus, tmp_path):
    dm = Text8DataModule(path=str(make_corpus(num_words=2000)), data_dir=str(tmp_path), vocab_size=50)
    parts = [dm.split_tokens(s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [1800, 100, 100]
    assert (np.concatenate(parts) == dm.tokens).all()


def test_split_too_small_and_bad_fractions(make_corpus, tmp_path):
    dm = Text8DataModule(path=str(make_corpus(num_words=20)), data_dir=str(tmp_path), vocab_size=5)
    with pytest.raises(CorpusError, match="too small"):
        dm.split_tokens("val")
    with pytest.raises(ValueError, match="summing to 1"):
        Text8DataModule(split=(0.5, 0.2, 0.2))


def test_vocab_file_is_not_needed_by_path(tmp_path: Path, make_corpus):
    """The vocabulary lives next to the encoded cache, in data_dir, never beside the user's file."""
    corpus = make_corpus(num_words=500)
    dm = Text8DataModule(path=str(corpus), data_dir=str(tmp_path / "cache_here"), vocab_size=10)
    dm.prepare_data()
    assert list((tmp_path / "cache_here").rglob("vocab.tsv"))
    assert sorted(p.name for p in corpus.parent.iterdir() if p.is_file()) == [corpus.name]
