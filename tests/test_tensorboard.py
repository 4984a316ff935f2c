"""The embedding projector for real: train both models through the CLI, start ``tensorboard --logdir logs`` on
loopback, and ask its projector plugin (the HTTP API the Projector tab uses) for each run's embeddings: the
snapshots listed, the tensor's shape and values, and the words as labels."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

from cli_support import MODELS, load_ckpt, run_cli, write_config, write_corpus

EMBEDDING_KEY = {"word2vec": "embedding", "lm": "embedding.weight"}
NUM_VISUALIZE = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensorboard")
    corpus = write_corpus(root)
    for model in MODELS:
        cfg = write_config(root, model, corpus)
        run_cli(["fit", "--config", str(cfg), "--projector.num_visualize", str(NUM_VISUALIZE)], cwd=root)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(root / "logs"), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/data/plugin/projector"
    try:
        deadline = time.monotonic() + 90
        runs: list[str] = []
        while time.monotonic() < deadline and len(runs) < len(MODELS):
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited: {proc.stderr.read()[-2000:]}")
            try:
                runs = json.loads(urllib.request.urlopen(f"{base}/runs", timeout=5).read())
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        yield root, base, runs
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get(base: str, route: str, **params: str) -> bytes:
    return urllib.request.urlopen(f"{base}/{route}?{urllib.parse.urlencode(params)}", timeout=10).read()


@pytest.mark.parametrize("model", MODELS)
def test_projector_serves_labelled_embeddings(served, model):
    root, base, runs = served
    run = f"{model}/version_0"
    assert run in runs, runs

    info = json.loads(get(base, "info", run=run))
    names = [e["tensorName"] for e in info["embeddings"]]
    # Snapshots after the validations at steps 5 and 10 (every_n_validations=1) and at the end of fit (step 12).
    assert names == ["word_embeddings:000005", "word_embeddings:000010", "word_embeddings:000012"]
    final = info["embeddings"][-1]

    ckpt = load_ckpt(root / "checkpoints" / model / "last.ckpt")
    words = ckpt["vocabulary"]["words"]
    counts = np.asarray(ckpt["vocabulary"]["counts"])
    top = [i for i in np.argsort(-counts, kind="stable") if i != 0][:NUM_VISUALIZE]  # most frequent, UNK excluded
    dim = ckpt["hyper_parameters"]["embedding_dim"]
    assert [int(x) for x in final["tensorShape"]] == [NUM_VISUALIZE, dim]

    tensor = np.frombuffer(get(base, "tensor", run=run, name=final["tensorName"]), dtype=np.float32)
    tensor = tensor.reshape(NUM_VISUALIZE, dim)
    matrix = ckpt["state_dict"][EMBEDDING_KEY[model]].float().numpy()
    np.testing.assert_allclose(tensor, matrix[top], rtol=1e-5, atol=1e-6)

    labels = get(base, "metadata", run=run, name=final["tensorName"]).decode().splitlines()
    assert labels == [words[i] for i in top]
    assert counts[top[0]] >= counts[top[-1]]
