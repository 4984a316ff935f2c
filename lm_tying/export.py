"""Trained vectors out of the project, in the formats the ecosystem reads.

- ``*.txt``: word2vec text format; ``*.bin``: word2vec binary format. Both load with
  ``gensim.models.KeyedVectors.load_word2vec_format(path, binary=path.endswith(".bin"))``.
- a directory: ``vectors.tsv`` (one row of tab-separated floats per word) + ``metadata.tsv`` (one word per
  line, no header: the single-column form), the pair https://projector.tensorflow.org loads with "Load".

The matrix is the model's own ``input_embeddings()`` (word2vec: the input embedding; the LM: the tied
matrix), its row names the vocabulary stored in the checkpoint, rows in vocabulary order (most frequent first).
Loading the checkpoint is :mod:`lm_tying.checkpoint`'s job; this module only writes vectors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from lm_tying.atomic import atomic_path


class ExportError(ValueError):
    """An export that cannot be done as asked (bad output path ...)."""


def _check_destination(out: Path) -> None:
    """Fail before the model load if ``out`` cannot be created: missing parents are fine (created), a parent that
    is a file or a directory we may not write into is not."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"cannot write {str(out)!r}: {str(ancestor)!r} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {str(out)!r}: no permission to write into {str(ancestor)!r}")


def output_kind(output: str | os.PathLike) -> str:
    """``"text"``, ``"binary"`` or ``"projector"`` (a directory: an existing one, or a name without suffix)."""
    out = Path(output)
    if out.is_dir() or str(output).endswith(os.sep) or out.suffix == "":
        return "projector"
    if out.suffix == ".txt":
        return "text"
    if out.suffix == ".bin":
        return "binary"
    raise ExportError(
        f"--output {str(output)!r}: give a .txt file (word2vec text), a .bin file (binary) or a directory"
    )


def write_projector_tsv(
    words: list[str], vectors: np.ndarray, directory: str | os.PathLike, vectors_name: str = "vectors.tsv"
) -> list[Path]:
    """``vectors_name`` (tab-separated floats, a row a word) + ``metadata.tsv`` (one word a line, no header:
    the projector treats a first line without a tab as data) in ``directory`` (created if needed)."""
    if vectors.ndim != 2 or len(vectors) != len(words):
        raise ValueError(f"{vectors.shape} vectors for {len(words)} words")
    for w in words:
        if "\t" in w or "\n" in w:
            raise ValueError(f"word {w!r} cannot be a projector label (tab or newline)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vectors_path, metadata_path = directory / vectors_name, directory / "metadata.tsv"
    with atomic_path(vectors_path) as tmp:
        np.savetxt(tmp, np.asarray(vectors, dtype=np.float32), fmt="%.6g", delimiter="\t")
    with atomic_path(metadata_path) as tmp:
        tmp.write_text("".join(f"{w}\n" for w in words), encoding="utf-8")
    return [vectors_path, metadata_path]


def export(ckpt_path: str | os.PathLike, output: str | os.PathLike, limit: Optional[int] = None) -> list[Path]:
    """Write the checkpoint's word vectors to ``output`` (format from the name, see the module docstring);
    ``limit`` keeps the most frequent words only. Returns the files written."""
    kind = output_kind(output)
    out = Path(output)
    # Check the destination before the (possibly long) model load.
    if kind == "projector" and out.exists() and not out.is_dir():
        raise ExportError(f"--output {str(out)!r} exists and is not a directory")
    _check_destination(out / "vectors.tsv" if kind == "projector" else out)
    if limit is not None and limit < 1:
        raise ExportError(f"--limit {limit}: it must be at least 1")

    from lm_tying.checkpoint import load_model  # torch and Lightning: only once the arguments are known good

    model = load_model(ckpt_path)
    wv = model.word_vectors()
    words = list(wv.index_to_key)
    vectors = np.asarray(wv.vectors, dtype=np.float32)
    if limit is not None:
        words, vectors = words[:limit], vectors[:limit]
    bad_rows = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad_rows):
        raise ExportError(
            f"{str(ckpt_path)!r} holds non-finite vectors ({len(bad_rows):,} of {len(words):,} rows, the first for "
            f"{words[bad_rows[0]]!r}): it was written by a run that diverged; export an earlier checkpoint"
        )
    try:
        if kind == "projector":
            return write_projector_tsv(words, vectors, out)
        return _write_word2vec(words, vectors, out, binary=kind == "binary")
    except OSError as e:
        raise ExportError(f"cannot write {str(out)!r}: {e.strerror or e}") from None


def _write_word2vec(words: list[str], vectors: np.ndarray, out: Path, binary: bool) -> list[Path]:
    """word2vec text/binary format via ``WordVectors.save_word2vec_format``, atomically (temporary + rename)."""
    from lm_tying.vectors import WordVectors

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        WordVectors(words, vectors).save_word2vec_format(tmp, binary=binary)
    return [out]
