"""WordVectors: neighbours, analogy and similarity evaluation, word2vec formats -- by hand and against gensim."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import LocalServer
from lm_tying.data.corpus import file_sha256
from lm_tying.vectors import EVAL_SOURCES, WordVectors, _top_rows, default_eval_file

gensim = pytest.importorskip("gensim")
from gensim.models import KeyedVectors  # noqa: E402


def toy() -> WordVectors:
    # 2-D vectors chosen so that cosines are easy to compute by hand
    words = ["king", "queen", "man", "woman", "apple", "pear", "car"]
    vecs = np.array(
        [
            [1.0, 1.0],  # king
            [1.0, 3.0],  # queen
            [1.0, 0.0],  # man
            [1.0, 2.0],  # woman
            [-1.0, 0.1],  # apple
            [-1.0, 0.2],  # pear
            [0.0, -1.0],  # car
        ],
        dtype=np.float32,
    )
    return WordVectors(words, vecs)


def cos(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_basics_and_most_similar_by_hand():
    wv = toy()
    assert len(wv) == 7 and "king" in wv and "prince" not in wv and wv.vector_size == 2
    np.testing.assert_array_equal(wv["woman"], [1.0, 2.0])
    got = wv.most_similar("apple", topn=2)
    assert [w for w, _ in got] == ["pear", "car"]
    assert got[0][1] == pytest.approx(cos([-1, 0.1], [-1, 0.2]), abs=1e-6)
    assert got[1][1] == pytest.approx(cos([-1, 0.1], [0, -1]), abs=1e-6)
    # the query words never come back; positive/negative combine unit vectors
    top = wv.most_similar(positive=["king", "woman"], negative=["man"], topn=1)[0]
    assert top[0] == "queen"
    u = wv.unit_vectors()
    q = (u[0] + u[3] - u[2]) / 3
    assert top[1] == pytest.approx(cos(q, [1.0, 3.0]), abs=1e-6)
    assert wv.similarity("king", "man") == pytest.approx(cos([1, 1], [1, 0]), abs=1e-6)
    assert [w for w, _ in wv.most_similar("king", topn=10)] == ["woman", "queen", "man", "pear", "apple", "car"]


def test_most_similar_errors():
    wv = toy()
    with pytest.raises(KeyError, match="prince"):
        wv.most_similar("prince")
    with pytest.raises(KeyError, match="prince"):
        wv["prince"]
    with pytest.raises(ValueError, match="at least one"):
        wv.most_similar()
    with pytest.raises(ValueError, match="2 words but 1 vectors"):
        WordVectors(["a", "b"], np.zeros((1, 3)))


def test_analogies_by_hand(tmp_path):
    wv = toy()
    path = tmp_path / "q.txt"
    path.write_text(
        ": royalty\n"
        "MAN KING WOMAN QUEEN\n"  # b - a + c = (1,3) -> queen: correct (upper case in the file)
        "man woman king queen\n"  # woman - man + king = (1,3): nearest excluding inputs -> queen: correct
        ": fruit\n"
        "apple pear man car\n"  # pear - apple + man: ~(1, 0.1) -> nearest excluding inputs: king? wrong
        "apple banana man car\n"  # banana unknown: skipped
    )
    acc, sections = wv.evaluate_word_analogies(path)
    assert [s["section"] for s in sections] == ["royalty", "fruit", "Total accuracy"]
    assert len(sections[0]["correct"]) == 2 and not sections[0]["incorrect"]
    assert sections[1]["incorrect"] == [("APPLE", "PEAR", "MAN", "CAR")]
    assert acc == pytest.approx(2 / 3)
    total = sections[-1]
    assert total["coverage"] == pytest.approx(3 / 4) and total["oov_ratio"] == pytest.approx(25.0)
    acc4, sections4 = wv.evaluate_word_analogies(path, dummy4unknown=True)
    assert acc4 == pytest.approx(2 / 4)
    # restricting the vocabulary to the 4 most frequent words leaves only the royalty questions
    acc_r, sections_r = wv.evaluate_word_analogies(path, restrict_vocab=4)
    assert acc_r == 1.0 and sections_r[-1]["coverage"] == pytest.approx(2 / 4)


def test_word_pairs_by_hand(tmp_path):
    wv = toy()
    path = tmp_path / "pairs.tsv"
    # model cosines: king-queen .894, king-man .707, apple-car -.0995, man-car 0
    path.write_text("# comment\nking\tqueen\t9\nKING\tMAN\t7\napple\tcar\t1\nman\tcar\t3\nfoo\tbar\t5\nnot a line\n")
    pearson, spearman, oov = wv.evaluate_word_pairs(path)
    # torchmetrics adds a tiny epsilon to the denominator: equal to 1e-5
    assert spearman == pytest.approx(1.0, abs=1e-5)  # same order as the human scores
    model = [cos([1, 1], [1, 3]), cos([1, 1], [1, 0]), cos([-1, 0.1], [0, -1]), 0.0]
    assert pearson == pytest.approx(float(np.corrcoef(model, [9, 7, 1, 3])[0, 1]), abs=1e-5)
    assert oov == pytest.approx(100 * 1 / 5)
    path.write_text("king\tqueen\t1\nking\tman\t2\napple\tcar\t3\n")  # reversed order
    assert wv.evaluate_word_pairs(path)[1] == pytest.approx(-1.0, abs=1e-5)
    path.write_text("king\tqueen\t1\nking\tman\t1\napple\tcar\t3\n")  # a tie: average ranks
    # gold ranks (1.5, 1.5, 3) vs model ranks (3, 2, 1): spearman = pearson of the ranks
    want = float(np.corrcoef([1.5, 1.5, 3], [3, 2, 1])[0, 1])
    assert wv.evaluate_word_pairs(path)[1] == pytest.approx(want, abs=1e-5)


def test_missing_and_invalid_files(tmp_path):
    wv = toy()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wv.evaluate_word_analogies(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wv.evaluate_word_pairs(tmp_path / "nope.tsv")
    bad = tmp_path / "bad.txt"
    bad.write_text("man king woman queen\n")
    with pytest.raises(ValueError, match="section header"):
        wv.evaluate_word_analogies(bad)
    bad.write_text("foo\tbar\t1\n")
    with pytest.raises(ValueError, match="fewer than 2"):
        wv.evaluate_word_pairs(bad)


def random_vectors(seed: int = 0, n: int = 300, dim: int = 16):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(n)]
    return words, rng.standard_normal((n, dim)).astype(np.float32)


def test_same_results_as_gensim(tmp_path):
    words, vecs = random_vectors()
    ours = WordVectors(words, vecs)
    kv = KeyedVectors(vecs.shape[1])
    kv.add_vectors(words, vecs)
    rng = np.random.default_rng(1)
    lines = []
    for s in range(3):
        lines.append(f": section{s}")
        for _ in range(60):
            quad = rng.choice(len(words) + 20, size=4, replace=False)  # some out of vocabulary
            lines.append(" ".join(f"W{i}" for i in quad))  # upper case: case-insensitive matching
    # include questions whose answer is right by construction: d := the 3CosAdd answer
    for _ in range(30):
        a, b, c = rng.choice(len(words), size=3, replace=False)
        d = ours.most_similar(positive=[f"w{b}", f"w{c}"], negative=[f"w{a}"], topn=1)[0][0]
        lines.append(f"w{a} w{b} w{c} {d}")
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(lines) + "\n")
    acc, sections = ours.evaluate_word_analogies(qfile)
    g_acc, g_sections = kv.evaluate_word_analogies(str(qfile))
    assert acc == pytest.approx(g_acc) and acc > 0.1
    assert [(s["section"], len(s["correct"]), len(s["incorrect"])) for s in sections] == [
        (s["section"], len(s["correct"]), len(s["incorrect"])) for s in g_sections
    ]
    pfile = tmp_path / "p.tsv"
    pfile.write_text("".join(f"w{a}\tW{b}\t{rng.random() * 10:.2f}\n" for a, b in rng.integers(0, 310, size=(80, 2))))
    pearson, spearman, oov = ours.evaluate_word_pairs(pfile)
    g_pearson, g_spearman, g_oov = kv.evaluate_word_pairs(str(pfile))
    assert pearson == pytest.approx(g_pearson[0], abs=1e-5)
    assert spearman == pytest.approx(g_spearman[0], abs=1e-5)
    assert oov == pytest.approx(g_oov)
    ours_ms = ours.most_similar(positive=["w1", "w2"], negative=["w3"], topn=5)
    g_ms = kv.most_similar(positive=["w1", "w2"], negative=["w3"], topn=5)
    assert [w for w, _ in ours_ms] == [w for w, _ in g_ms]
    np.testing.assert_allclose([s for _, s in ours_ms], [s for _, s in g_ms], atol=1e-5)


def test_analogies_match_gensim_question_by_question_across_batches_and_spellings(tmp_path):
    """Each question gets gensim's verdict, whatever the batch size; where the nearest word is another
    spelling of an input ("W3" for "w3", case-insensitive), gensim's next candidate is taken, as gensim does."""
    words, vecs = random_vectors(n=200)
    rng = np.random.default_rng(2)
    twins = [f"W{i}" for i in range(40)]  # rarer (later) spellings of w0..w39, nearly the same vectors
    twin_vecs = vecs[:40] + 0.01 * rng.standard_normal((40, vecs.shape[1])).astype(np.float32)
    words, vecs = words + twins, np.concatenate([vecs, twin_vecs])
    kv = KeyedVectors(vecs.shape[1])
    kv.add_vectors(words, vecs)
    lines, twin_first = [": twins"], 0
    for a, b, c in rng.integers(0, 40, size=(120, 3)):
        if len({a, b, c}) == 3:  # d: the nearest word to b - a + c that is not an input (gensim's answer or not)
            top = [w for w, _ in kv.most_similar([f"w{b}", f"w{c}"], [f"w{a}"], topn=5)]
            twin_first += top[0] in (f"W{a}", f"W{b}", f"W{c}")
            d = rng.choice([f"w{rng.integers(200)}", next(w for w in top if w.lower() not in (f"w{a}", f"w{b}", f"w{c}"))])
            lines.append(f"w{a} w{b} w{c} {d}")
    assert twin_first > 10  # the nearest word is often another spelling of an input
    lines.append(": others")
    lines += [" ".join(f"w{i}" for i in rng.choice(200, size=4, replace=False)) for _ in range(100)]
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(lines) + "\n")
    g_acc, g_sections = kv.evaluate_word_analogies(str(qfile))
    for batch_size in (1024, 7):
        acc, sections = WordVectors(words, vecs).evaluate_word_analogies(qfile, batch_size=batch_size)
        assert acc == pytest.approx(g_acc)
        for ours, theirs in zip(sections, g_sections, strict=True):
            assert ours["section"] == theirs["section"]
            assert ours["correct"] == theirs["correct"] and ours["incorrect"] == theirs["incorrect"]
    assert 0.2 < g_acc < 0.8  # both verdicts occur


def test_default_files_from_gensim():
    words, vecs = random_vectors(n=50)
    wv = WordVectors(["the", "of", "and", "king", "queen", "man", "woman", "love", "sex", "tiger", "cat"] + words[11:], vecs)
    pearson, spearman, oov = wv.evaluate_word_pairs()  # gensim's wordsim353.tsv
    assert math.isfinite(spearman) and 95 < oov < 100
    acc, sections = wv.evaluate_word_analogies()  # gensim's questions-words.txt
    assert sections[-1]["section"] == "Total accuracy" and len(sections) == 15


def test_default_files_are_gensims_found_without_importing_gensim():
    from gensim.test.utils import datapath

    for name in ("questions-words.txt", "wordsim353.tsv", "simlex999.txt"):
        assert default_eval_file(name) == datapath(name)
    imported = subprocess.run(
        [sys.executable, "-c", "import sys; from lm_tying.vectors import default_eval_file; "
         "default_eval_file('simlex999.txt'); print('gensim' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert imported.stdout.strip() == "False"


def test_the_pinned_downloads_are_gensims_files():
    from gensim.test.utils import datapath

    if gensim.__version__ != "4.4.0":
        pytest.skip(f"the downloads are pinned to gensim 4.4.0's files; gensim {gensim.__version__} is installed")
    for name, (url, sha256) in EVAL_SOURCES.items():
        assert "/gensim/4.4.0/" in url and url.endswith(f"/test_data/{name}")
        assert file_sha256(datapath(name)) == sha256, name


@pytest.fixture
def without_gensim(monkeypatch, tmp_path):
    """gensim hidden from the lookup, downloads cached in an empty directory (returned)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else find_spec(name, *a))
    monkeypatch.setenv("LM_TYING_EVAL_CACHE", str(tmp_path / "eval"))
    return tmp_path / "eval"


def test_without_gensim_the_files_are_downloaded_once_verified_and_cached(without_gensim, monkeypatch):
    name, body = "wordsim353.tsv", b"# pairs\nlove\tsex\t6.77\ntiger\tcat\t7.35\n"
    with pytest.raises(FileNotFoundError, match=f"neither in {without_gensim} nor given by gensim: pass your own"):
        default_eval_file(name, download=False)  # what an evaluation asks: never the network
    with LocalServer({"/wordsim353.tsv": body, "/other": body[:-4]}) as server:
        monkeypatch.setitem(EVAL_SOURCES, name, (server.url + "/wordsim353.tsv", hashlib.sha256(body).hexdigest()))
        path = without_gensim / name
        assert default_eval_file(name) == str(path) and path.read_bytes() == body
        assert default_eval_file(name, download=False) == str(path)
        assert server.requests == ["/wordsim353.tsv"], "a verified cached copy is used as it is"
        path.write_bytes(body[:-3] + b"0\n")  # changed since: not trusted, fetched again
        assert default_eval_file(name) == str(path) and path.read_bytes() == body
        assert len(server.requests) == 2
        path.unlink()
        monkeypatch.setitem(EVAL_SOURCES, name, (server.url + "/other", hashlib.sha256(body).hexdigest()))
        with pytest.raises(FileNotFoundError, match="has sha256 .*, expected .*gensim 4.4.0's file.*Run again"):  # cut
            default_eval_file(name)
        monkeypatch.setitem(EVAL_SOURCES, name, (server.url + "/missing", hashlib.sha256(body).hexdigest()))
        with pytest.raises(FileNotFoundError, match="downloaded from .*/missing into .*: Not Found. Check your"):
            default_eval_file(name)
    assert list(without_gensim.iterdir()) == [], "nothing but whole, verified files is left in the cache"
    (without_gensim.parent / "a-file").write_text("")
    monkeypatch.setenv("LM_TYING_EVAL_CACHE", str(without_gensim.parent / "a-file" / "eval"))
    with pytest.raises(FileNotFoundError, match="could not be downloaded .* into .*a-file/eval: .*LM_TYING_EVAL_CACHE"):
        default_eval_file(name)  # a cache that cannot be made is the same clear error, not a traceback


@pytest.mark.parametrize("binary", [False, True])
def test_word2vec_format_round_trip_and_gensim(tmp_path, binary):
    words, vecs = random_vectors(n=40, dim=7)
    words[3] = "café"  # utf-8
    ours = WordVectors(words, vecs)
    path = tmp_path / ("v.bin" if binary else "v.txt")
    ours.save_word2vec_format(path, binary=binary)
    back = WordVectors.load_word2vec_format(path, binary=binary)
    assert back.index_to_key == words
    np.testing.assert_array_equal(back.vectors, vecs)  # exact: %.9g round-trips float32
    kv = KeyedVectors.load_word2vec_format(str(path), binary=binary)
    assert kv.index_to_key == words
    np.testing.assert_array_equal(kv.vectors, vecs)
    # and files written by gensim load here
    gpath = tmp_path / ("g.bin" if binary else "g.txt")
    kv.save_word2vec_format(str(gpath), binary=binary)
    again = WordVectors.load_word2vec_format(gpath, binary=binary)
    assert again.index_to_key == words
    np.testing.assert_allclose(again.vectors, vecs, rtol=1e-6)


def test_word2vec_format_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="whitespace"):
        WordVectors(["a b", "c"], np.zeros((2, 2))).save_word2vec_format(tmp_path / "x.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("2 3\na 1 2 3\nb 1 2\n")
    with pytest.raises(ValueError, match="expected 3"):
        WordVectors.load_word2vec_format(bad)


def test_bf16_preselection_gives_the_float32_answers_even_where_bf16_cannot_tell_rows_apart():
    """The analogy search's bf16 product only preselects: the answers are float32's. Here 200 of the rows are
    one direction plus noise below bf16's resolution, so bf16's 32 candidates miss some of float32's top 5
    (checked) and those queries must be recomputed in float32; the other rows are ordinary."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(1, 64, generator=g), dim=1)
    near = base + 1e-4 * torch.randn(200, 64, generator=g)
    u = torch.nn.functional.normalize(torch.cat([near, torch.randn(800, 64, generator=g)]), dim=1)
    query = torch.cat([base + 0.01 * torch.randn(20, 64, generator=g), torch.randn(40, 64, generator=g)])
    exclude = torch.randint(0, 1000, (60, 3), generator=g)
    exact = _top_rows(query, u, None, exclude, 5)
    rough = (query.bfloat16() @ u.bfloat16().t()).float()
    rough[torch.arange(60).unsqueeze(1), exclude] = -float("inf")
    candidates = rough.topk(32, dim=1).indices
    missed = [not set(exact[i].tolist()) <= set(candidates[i].tolist()) for i in range(60)]
    assert any(missed[:20]) and not any(missed[20:])
    assert torch.equal(_top_rows(query, u, u.bfloat16(), exclude, 5), exact)
