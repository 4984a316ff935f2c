"""``WordVectors``: trained embeddings with their words, evaluated and saved the way gensim does it.

A small, dependency-light stand-in for gensim's ``KeyedVectors`` so both models (and exported files)
share one evaluation: cosine nearest neighbours, Google analogies by 3CosAdd restricted to the
vocabulary (with gensim's per-section output and coverage), word-pair similarity correlations, and the
word2vec text/binary formats that ``gensim.models.KeyedVectors.load_word2vec_format`` reads.

Evaluation words are matched case-insensitively by default (gensim's ``case_insensitive=True``):
text8 is lowercase while the evaluation files are not. The analogy search is batched (one matmul
for many questions) instead of gensim's one query at a time, with the same answers; on CPUs with bf16
instructions a faster bf16 product preselects candidates that float32 then ranks (the same answers).
"""

from __future__ import annotations

import http.client
import importlib.util
import logging
import os
import urllib.error
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from lm_tying.atomic import atomic_path
from lm_tying.data.corpus import fetch, file_sha256

__all__ = ["WordVectors", "default_eval_file", "eval_cache_dir", "EVAL_FILES", "EVAL_SOURCES"]

log = logging.getLogger(__name__)

# names of the standard evaluation files that gensim ships in gensim/test/test_data
EVAL_FILES = {"analogies": "questions-words.txt", "wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}


def _fast_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent ones count as False
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def _top_rows(query: torch.Tensor, u: torch.Tensor, u_bf16: torch.Tensor | None, exclude: torch.Tensor, count: int,
              candidates: int = 32) -> torch.Tensor:
    """For each query row, the ``count`` rows of ``u`` (unit rows) with the largest float32 dot products, best
    first, excluding that query's ``exclude`` rows.

    With ``u_bf16`` (``u`` in bf16) a bf16 product, faster on CPUs with bf16 instructions, picks
    ``candidates`` rows, which are then scored in float32. A bf16 score is within ``|q| * 2**-7`` of the float32
    one (inputs rounded to 8 significant bits: ``2 * 2**-9`` relative to ``sum |q_i u_i| <= |q|``; the
    output's rounding another ``2**-9``; float32 sums accumulate), so a row left out scores at most the last
    candidate's bf16 score plus that margin (twice it, to be safe): where the ``count``-th float32 score of the
    candidates is above that, the answer is exact; the few queries where it is not are scored in float32 over
    all rows."""
    rows = torch.arange(len(query)).unsqueeze(1)
    if u_bf16 is None or len(u) < candidates + exclude.shape[1]:
        scores = query @ u.t()
        scores[rows, exclude] = -float("inf")
        return scores.topk(count, dim=1).indices
    rough = query.bfloat16() @ u_bf16.t()  # kept in bf16: its top-k is faster than a float copy's
    rough[rows, exclude] = -float("inf")
    picked = rough.topk(candidates, dim=1)
    exact = torch.einsum("nd,nkd->nk", query, u[picked.indices])
    best = exact.topk(count, dim=1)
    top = picked.indices.gather(1, best.indices)
    unsure = ~(best.values[:, -1] > picked.values[:, -1].float() + query.norm(dim=1) * 2**-6)
    if unsure.any():
        top[unsure] = _top_rows(query[unsure], u, None, exclude[unsure], count)
    return top


# Where they are downloaded from when gensim is not installed: gensim 4.4.0's copies (what `pip install gensim`
# brings), pinned by content, so a download is used only when it is byte for byte the file gensim evaluates with.
EVAL_SOURCES = {
    name: (f"https://raw.githubusercontent.com/piskvorky/gensim/4.4.0/gensim/test/test_data/{name}", sha256)
    for name, sha256 in (
        ("questions-words.txt", "8c29b3332afc46f3fb8be04cb5297bf96f39aa7131272dff57869b4485b22a36"),
        ("wordsim353.tsv", "f92a022fc2537793a15bc3a8c162ebcd74990e033a228bb6388cb71e4c0b1e1d"),
        ("simlex999.txt", "d5e0501971478a511430ee880bd0121e94ac701ba86d90544d83e6d2ba3db05d"),
    )
}


def eval_cache_dir() -> Path:
    """Where downloaded evaluation files are kept: ``$LM_TYING_EVAL_CACHE``, else ``$XDG_CACHE_HOME/lm_tying/eval``
    (``~/.cache/lm_tying/eval``)."""
    if os.environ.get("LM_TYING_EVAL_CACHE"):
        return Path(os.environ["LM_TYING_EVAL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lm_tying" / "eval"


def default_eval_file(name: str, download: bool = True, timeout: float = 10.0) -> str:
    """Path of one of the standard evaluation files gensim ships (``questions-words.txt``, ``wordsim353.tsv``,
    ``simlex999.txt``): gensim's own copy when gensim is installed (found where its ``test.utils.datapath`` looks,
    without importing it), else the copy downloaded into :func:`eval_cache_dir` (checked against its sha256 at
    every use), else, with ``download``, fetched there now from :data:`EVAL_SOURCES`. A clear
    ``FileNotFoundError`` when none can be had.

    Not needing gensim is worth 0.6-0.9 s a run: torchmetrics, which Lightning imports, imports ``scipy.signal``
    whenever scipy is installed, and gensim installs it."""
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "test", "test_data", name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"gensim's evaluation file {path} is missing from the installation")
        return path
    if name not in EVAL_SOURCES:
        raise FileNotFoundError(f"{name!r} is not one of the standard evaluation files ({', '.join(EVAL_SOURCES)})")
    url, sha256 = EVAL_SOURCES[name]
    path = eval_cache_dir() / name
    if path.exists() and file_sha256(path) == sha256:
        return str(path)
    fixes = "pass your own file, or `pip install gensim` (its copy is then used)"
    if not download:
        raise FileNotFoundError(f"evaluation file {name!r} is neither in {path.parent} nor given by gensim: {fixes}")
    with atomic_path(path) as partial:  # path replaced only by a whole, verified copy
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _, got = fetch(url, partial, name, timeout)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # e.g. IncompleteRead
            raise FileNotFoundError(
                f"evaluation file {name!r} could not be downloaded from {url} into {path.parent}: "
                f"{getattr(e, 'reason', e)}. Check your network and $LM_TYING_EVAL_CACHE, {fixes}"
            ) from None
        if got != sha256:
            raise FileNotFoundError(
                f"the {name!r} downloaded from {url} has sha256 {got}, expected {sha256} (gensim 4.4.0's file): "
                f"it was changed or corrupted on the way. Run again to retry, or {fixes}"
            )
    return str(path)


def _resolve(path: str | os.PathLike | None, default_name: str) -> str:
    if path is None:
        return default_eval_file(default_name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"evaluation file {os.fspath(path)!r} does not exist")
    return os.fspath(path)


class WordVectors:
    """Words (in id order) and a ``V x D`` float32 matrix, with gensim ``KeyedVectors`` semantics."""

    def __init__(self, words: Sequence[str], vectors: np.ndarray | torch.Tensor) -> None:
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().to("cpu", torch.float32).numpy()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be a V x D matrix, got shape {vectors.shape}")
        if len(words) != len(vectors):
            raise ValueError(f"{len(words)} words but {len(vectors)} vectors")
        self.index_to_key: list[str] = list(words)
        self.key_to_index: dict[str, int] = {}
        for i, w in enumerate(self.index_to_key):
            if w in self.key_to_index:
                raise ValueError(f"duplicate word {w!r} at rows {self.key_to_index[w]} and {i}")
            self.key_to_index[w] = i
        self.vectors = vectors
        self._norms: np.ndarray | None = None

    # --------------------------------------------------------------------------- basics
    def __len__(self) -> int:
        return len(self.index_to_key)

    def __contains__(self, word: str) -> bool:
        return word in self.key_to_index

    def __getitem__(self, word: str) -> np.ndarray:
        return self.vectors[self.get_index(word)]

    def __repr__(self) -> str:
        return f"WordVectors({len(self):,} words, dim {self.vector_size})"

    @property
    def vector_size(self) -> int:
        return self.vectors.shape[1]

    def get_index(self, word: str) -> int:
        try:
            return self.key_to_index[word]
        except KeyError:
            raise KeyError(f"word {word!r} is not in the vocabulary ({len(self):,} words)") from None

    def get_vector(self, word: str, norm: bool = False) -> np.ndarray:
        i = self.get_index(word)
        return self.unit_vectors()[i] if norm else self.vectors[i]

    def unit_vectors(self) -> np.ndarray:
        """Rows scaled to unit length (zero rows stay zero); cached."""
        if self._norms is None:
            norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            self._norms = self.vectors / np.maximum(norms, 1e-12)
        return self._norms

    def similarity(self, w1: str, w2: str) -> float:
        """Cosine similarity of two words."""
        u = self.unit_vectors()
        return float(u[self.get_index(w1)] @ u[self.get_index(w2)])

    # --------------------------------------------------------------------------- neighbours
    def most_similar(
        self,
        positive: str | Iterable[str] | None = None,
        negative: str | Iterable[str] | None = None,
        topn: int = 10,
        restrict_vocab: int | None = None,
    ) -> list[tuple[str, float]]:
        """Words closest by cosine to the mean of the unit vectors of ``positive`` minus ``negative``.

        As gensim: the query words themselves are excluded, ``restrict_vocab`` limits the candidates
        to the first (most frequent) words. ``most_similar("king")`` works as well.
        """
        positive = [positive] if isinstance(positive, str) else list(positive or [])
        negative = [negative] if isinstance(negative, str) else list(negative or [])
        if not positive and not negative:
            raise ValueError("most_similar needs at least one positive or negative word")
        if topn < 1:
            raise ValueError(f"topn must be >= 1, got {topn}")
        unknown = [w for w in positive + negative if w not in self.key_to_index]
        if unknown:
            raise KeyError(f"not in the vocabulary ({len(self):,} words): {', '.join(map(repr, unknown))}")
        u = self.unit_vectors()
        ids = [self.key_to_index[w] for w in positive + negative]
        weights = np.array([1.0] * len(positive) + [-1.0] * len(negative), dtype=np.float32)
        query = (weights[:, None] * u[ids]).mean(0)
        query /= max(float(np.linalg.norm(query)), 1e-12)
        limit = len(self) if restrict_vocab is None else min(restrict_vocab, len(self))
        scores = u[:limit] @ query
        for i in ids:
            if i < limit:
                scores[i] = -np.inf
        k = min(topn, limit - sum(i < limit for i in set(ids)))
        if k <= 0:
            return []
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(self.index_to_key[i], float(scores[i])) for i in best]

    # --------------------------------------------------------------------------- evaluation
    def _case_map(self, restrict_vocab: int, case_insensitive: bool) -> dict[str, int]:
        """Evaluation key -> row, restricted to the first ``restrict_vocab`` words. Case-insensitive:
        the most frequent (first) spelling wins, as gensim's ``reversed(...)`` dict does."""
        keys = self.index_to_key[:restrict_vocab]
        if not case_insensitive:
            return {w: i for i, w in enumerate(keys)}
        mapping: dict[str, int] = {}
        for i, w in enumerate(keys):
            mapping.setdefault(w.upper(), i)
        return mapping

    def evaluate_word_analogies(
        self,
        path: str | os.PathLike | None = None,
        restrict_vocab: int = 300_000,
        case_insensitive: bool = True,
        dummy4unknown: bool = False,
        batch_size: int = 256,
    ) -> tuple[float, list[dict]]:
        """Google analogy accuracy ("a is to b as c is to ?") by 3CosAdd, as gensim computes it.

        ``path`` is a ``questions-words.txt``-format file (``: section`` headers, then ``a b c d``
        lines); None uses the standard one (:func:`default_eval_file`). Questions with a word outside the
        first ``restrict_vocab`` words are skipped (counted as wrong with ``dummy4unknown``). Returns
        ``(accuracy, sections)`` where every section is ``{"section", "correct", "incorrect"}`` with lists
        of the question tuples, the last being "Total accuracy", plus ``"coverage"`` and ``"oov_ratio"``
        entries on the total (fraction of questions answered / percentage skipped).
        """
        path = _resolve(path, EVAL_FILES["analogies"])
        ok = self._case_map(restrict_vocab, case_insensitive)
        limit = min(restrict_vocab, len(self))
        sections: list[dict] = []
        section: dict | None = None
        questions: list[tuple[dict, tuple[str, str, str, str]]] = []
        total_lines, oov = 0, 0
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f):
                if line.startswith(": "):
                    if section is not None:
                        sections.append(section)
                    section = {"section": line.lstrip(": ").strip(), "correct": [], "incorrect": []}
                    continue
                if not line.strip():
                    continue
                if section is None:
                    raise ValueError(f"missing section header before line #{line_no} in {path}")
                words = line.split()
                if len(words) != 4:
                    log.info("skipping invalid line #%d in %s", line_no, path)
                    continue
                quad = tuple(w.upper() for w in words) if case_insensitive else tuple(words)
                total_lines += 1
                if any(w not in ok for w in quad):
                    oov += 1
                    if dummy4unknown:
                        section["incorrect"].append(quad)
                    continue
                questions.append((section, quad))  # type: ignore[arg-type]
        if section is not None:
            sections.append(section)
        if total_lines == 0:
            raise ValueError(f"no analogy questions found in {path}")

        predicted = self._answer_analogies([q for _, q in questions], ok, limit, case_insensitive, batch_size)
        for (sec, quad), guess in zip(questions, predicted):
            sec["correct" if guess == quad[3] else "incorrect"].append(quad)

        correct = [q for s in sections for q in s["correct"]]
        incorrect = [q for s in sections for q in s["incorrect"]]
        answered = len(questions)
        total = {
            "section": "Total accuracy",
            "correct": correct,
            "incorrect": incorrect,
            "coverage": answered / total_lines,
            "oov_ratio": 100.0 * oov / total_lines,
        }
        sections.append(total)
        n = len(correct) + len(incorrect)
        accuracy = len(correct) / n if n else 0.0
        log.info(
            "analogies: %.2f%% of %d questions (%.1f%% of %d skipped as out of vocabulary)",
            100 * accuracy, n, total["oov_ratio"], total_lines,
        )
        return accuracy, sections

    def _answer_analogies(
        self,
        quads: list[tuple[str, ...]],
        ok: dict[str, int],
        limit: int,
        case_insensitive: bool,
        batch_size: int,
    ) -> list[str | None]:
        """3CosAdd answers: the word nearest to ``unit(b) - unit(a) + unit(c)`` among the first
        ``limit`` words, excluding a, b and c (first of gensim's top 5 not spelled like an input)."""
        if not quads:
            return []
        u = torch.from_numpy(self.unit_vectors()[:limit])
        u_bf16 = u.bfloat16() if _fast_bf16_matmul() and u.dtype == torch.float32 else None
        idx = torch.tensor([[ok[w] for w in q[:3]] for q in quads], dtype=torch.long)  # a, b, c
        keys = [w.upper() for w in self.index_to_key[:limit]] if case_insensitive else self.index_to_key[:limit]
        out: list[str | None] = []
        for start in range(0, len(quads), batch_size):
            a, b, c = idx[start : start + batch_size].unbind(1)
            query = u[b] - u[a] + u[c]  # the mean's scale does not change the ranking
            top = _top_rows(query, u, u_bf16, torch.stack([a, b, c], 1), min(5, limit)).tolist()
            for q, cand in zip(quads[start : start + batch_size], top):
                ignore = set(q[:3])
                guess = None
                for i in cand:
                    guess = keys[i]
                    if guess not in ignore:
                        break
                out.append(guess)
        return out

    def evaluate_word_pairs(
        self,
        path: str | os.PathLike | None = None,
        delimiter: str = "\t",
        restrict_vocab: int = 300_000,
        case_insensitive: bool = True,
        dummy4unknown: bool = False,
    ) -> tuple[float, float, float]:
        """Correlation of cosine similarity with human judgements: ``(pearson, spearman, oov_ratio)``.

        ``path``: lines ``word1<delimiter>word2<delimiter>score``, ``#`` comments (WordSim-353,
        SimLex-999 as gensim ships them); None uses the standard ``wordsim353.tsv`` (:func:`default_eval_file`).
        Pairs with a word outside the vocabulary are skipped (scored 0 with ``dummy4unknown``); ``oov_ratio`` is
        their percentage. Correlations computed with torchmetrics (Spearman with average ranks for ties).
        """
        from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

        path = _resolve(path, EVAL_FILES["wordsim353"])
        ok = self._case_map(restrict_vocab, case_insensitive)
        u = self.unit_vectors()
        gold: list[float] = []
        model: list[float] = []
        oov = 0
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f):
                if not line.strip() or line.startswith("#"):
                    continue
                try:
                    a, b, score = line.rstrip("\r\n").split(delimiter)
                    gold_score = float(score)
                except ValueError:
                    log.info("skipping invalid line #%d in %s", line_no, path)
                    continue
                if case_insensitive:
                    a, b = a.upper(), b.upper()
                if a not in ok or b not in ok:
                    oov += 1
                    if dummy4unknown:
                        gold.append(gold_score)
                        model.append(0.0)
                    continue
                gold.append(gold_score)
                model.append(float(u[ok[a]] @ u[ok[b]]))
        if len(gold) < 2:
            raise ValueError(f"fewer than 2 usable word pairs in {path} (format, or all out of vocabulary)")
        g = torch.tensor(gold, dtype=torch.float64)
        m = torch.tensor(model, dtype=torch.float64)
        pearson = float(pearson_corrcoef(m, g))
        spearman = float(spearman_corrcoef(m, g))
        oov_ratio = 100.0 * oov / (len(gold) if dummy4unknown else len(gold) + oov)
        return pearson, spearman, oov_ratio

    # --------------------------------------------------------------------------- word2vec format
    def save_word2vec_format(self, path: str | os.PathLike, binary: bool = False) -> None:
        """Write the word2vec C format (``V D`` header; then ``word v1 ... vD`` lines, or in binary the
        word, a space and D little-endian float32 values), which gensim's ``load_word2vec_format`` reads."""
        bad = next((w for w in self.index_to_key if not w or any(ch.isspace() for ch in w)), None)
        if bad is not None:
            raise ValueError(f"word {bad!r} cannot be written in word2vec format (empty or contains whitespace)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        V, D = self.vectors.shape
        with open(path, "wb") as f:
            f.write(f"{V} {D}\n".encode())
            if binary:
                data = self.vectors.astype("<f4", copy=False)
                for w, row in zip(self.index_to_key, data):
                    f.write(w.encode("utf-8") + b" " + row.tobytes() + b"\n")
            else:
                for w, row in zip(self.index_to_key, self.vectors):
                    # %.9g round-trips float32 exactly
                    f.write((w + " " + " ".join("%.9g" % x for x in row.tolist()) + "\n").encode("utf-8"))

    @classmethod
    def load_word2vec_format(cls, path: str | os.PathLike, binary: bool = False) -> WordVectors:
        """Read the word2vec C text or binary format (as written by word2vec C, gensim or this class)."""
        with open(path, "rb") as f:
            header = f.readline().split()
            if len(header) != 2:
                raise ValueError(f"{os.fspath(path)}: expected a 'vocab_size dim' header line")
            V, D = int(header[0]), int(header[1])
            words: list[str] = []
            if binary:
                data = f.read()
                vectors = np.empty((V, D), dtype=np.float32)
                pos, width = 0, 4 * D
                for i in range(V):
                    space = data.find(b" ", pos)
                    if space < 0 or space + 1 + width > len(data):
                        raise ValueError(f"{os.fspath(path)}: truncated at word {i} of {V}")
                    words.append(data[pos:space].lstrip(b"\n").decode("utf-8"))
                    vectors[i] = np.frombuffer(data, dtype="<f4", count=D, offset=space + 1)
                    pos = space + 1 + width
            else:
                values: list[str] = []
                for i in range(V):
                    parts = f.readline().decode("utf-8").rstrip().split(" ")
                    if len(parts) != D + 1:
                        raise ValueError(
                            f"{os.fspath(path)}: line {i + 2} has {len(parts) - 1} values, expected {D}"
                        )
                    words.append(parts[0])
                    values.extend(parts[1:])
                vectors = np.array(values, dtype=np.float32).reshape(V, D)
        return cls(words, vectors)
