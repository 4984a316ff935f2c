"""``lm-tying export``: the checkpoint's embedding (word2vec: input embedding; LM: the tied matrix) with its
vocabulary, as word2vec text/binary (read back with gensim) or projector TSVs; clear errors otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from cli_support import MODELS, load_ckpt, run_cli, write_config, write_corpus

# Where each model keeps the matrix users want, read straight from the checkpoint (independent of export's code).
EMBEDDING_KEY = {"word2vec": "embedding", "lm": "embedding.weight"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    corpus = write_corpus(root)
    for model in MODELS:
        run_cli(["fit", "--config", str(write_config(root, model, corpus, max_steps=4))], cwd=root)
    return root


def expected(root, model):
    ckpt = load_ckpt(root / "checkpoints" / model / "last.ckpt")
    matrix = ckpt["state_dict"][EMBEDDING_KEY[model]].float().numpy()
    if model == "lm":  # the tie: the decoder's weight is the same matrix
        assert np.array_equal(ckpt["state_dict"]["decoder.weight"].float().numpy(), matrix)
    return ckpt["vocabulary"]["words"], matrix


def check_gensim(path, words, matrix, binary):
    kv = KeyedVectors.load_word2vec_format(str(path), binary=binary)
    assert kv.index_to_key == words
    np.testing.assert_array_equal(kv.vectors, matrix)  # float32 exactly (binary) / %.9g round-trips (text)
    # Rows are attached to the right words.
    for i in (1, 2, len(words) - 1):
        np.testing.assert_array_equal(kv[words[i]], matrix[i])


@pytest.mark.parametrize(
    "model, output, in_subprocess",
    [
        ("word2vec", "w2v.txt", True),
        ("word2vec", "w2v.bin", False),
        ("word2vec", "w2v_projector", False),
        ("lm", "lm.bin", True),
        ("lm", "lm.txt", False),
        ("lm", "sub/dir/lm_projector", True),
    ],
)
def test_export_formats(trained, model, output, in_subprocess):
    root = trained
    ckpt = root / "checkpoints" / model / "last.ckpt"
    out = root / output
    if in_subprocess:  # the user's command
        proc = run_cli(["export", "--ckpt_path", str(ckpt), "--output", str(out)], cwd=root)
        assert "wrote" in proc.stdout
    else:
        from lm_tying.export import export

        export(ckpt, out)
    words, matrix = expected(root, model)
    if out.suffix in (".txt", ".bin"):
        check_gensim(out, words, matrix, binary=out.suffix == ".bin")
    else:
        vectors = np.loadtxt(out / "vectors.tsv", delimiter="\t", dtype=np.float32)
        metadata = (out / "metadata.tsv").read_text().splitlines()
        assert metadata == words  # one word per line, no header (single-column metadata)
        np.testing.assert_allclose(vectors, matrix, rtol=1e-5, atol=1e-6)
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_export_limit(trained, tmp_path):
    from lm_tying.export import export

    export(trained / "checkpoints/word2vec/last.ckpt", tmp_path / "top.txt", limit=10)
    words, matrix = expected(trained, "word2vec")
    check_gensim(tmp_path / "top.txt", words[:10], matrix[:10], binary=False)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "case, ckpt, output, message",
    [
        ("missing checkpoint", "nope.ckpt", "out.txt", "does not exist"),
        ("unknown checkpoint kind", "foreign.ckpt", "out.txt", "not an lm-tying checkpoint"),
        ("not a checkpoint", "corpus.txt", "out.txt", "not a readable PyTorch checkpoint"),
        ("parent is a file", "checkpoints/word2vec/last.ckpt", "corpus.txt/out.txt", "is a file, not a directory"),
        ("unknown format", "checkpoints/word2vec/last.ckpt", "out.csv", "give a .txt file"),
        ("directory output is a file", "checkpoints/word2vec/last.ckpt", "plainfile", "exists and is not a directory"),
        ("cannot create", "checkpoints/word2vec/last.ckpt", "/proc/lm_tying_test/out.txt", "cannot write"),
    ],
)
def test_export_errors(trained, case, ckpt, output, message, capsys, monkeypatch):
    root = trained
    torch.save({"state_dict": {"w": torch.zeros(2)}}, root / "foreign.ckpt")
    (root / "plainfile").write_text("x")
    from lm_tying.cli import main

    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", ckpt, "--output", output])
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None), case
    assert message in err and "Traceback" not in err, err


def test_export_error_in_a_subprocess(trained):
    proc = run_cli(["export", "--ckpt_path", "foreign.ckpt", "--output", "x.txt"], cwd=trained, check=False)
    assert proc.returncode != 0
    assert "not an lm-tying checkpoint" in proc.stderr and "Traceback" not in proc.stderr
