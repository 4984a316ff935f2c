"""Shared fixtures: small text8-format corpora written to a temporary folder (no network, no ../shared)."""

from __future__ import annotations

import http.server
import os
import random
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest
import torch

# torch.compile's on-disk cache does not tell apart code compiled under another ATEN_CPU_CAPABILITY (as when the suite
# is run with ATEN_CPU_CAPABILITY=avx2 to check an AVX2-only CPU's path): reusing it gave garbage gradients and aborts.
# One cache per capability keeps such runs apart; the command's processes inherit it.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    str(Path(tempfile.gettempdir()) / f"lm_tying_tests_inductor_{torch.backends.cpu.get_cpu_capability().lower()}"),
)


def compiled_library():
    """word2vec's compiled library (``lm_tying.native``), or the test skipped where no C++ compiler can build it."""
    from lm_tying import native

    if (library := native.library()) is None:
        pytest.skip("no C++ compiler here: the compiled library cannot be built")
    return library


def write_corpus(path: Path, text: str, as_zip: bool = False, member: str = "text8") -> Path:
    """Write ``text`` as a text8 file, or as a zip holding it under ``member``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_zip:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(member, text)
    else:
        path.write_text(text)
    return path


def zipf_text(num_words: int, vocab: int = 200, seed: int = 0) -> str:
    """A corpus whose word frequencies fall off like natural text (Zipf), made of letters only."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(vocab)]
    words = list(dict.fromkeys(words))
    weights = [1 / (rank + 1) for rank in range(len(words))]
    return " ".join(rng.choices(words, weights=weights, k=num_words))


@pytest.fixture
def make_corpus(tmp_path):
    """``make_corpus(text=None, num_words=5000, as_zip=False)`` -> path of a small text8-format corpus."""

    def make(text: str | None = None, num_words: int = 5000, as_zip: bool = False, name: str = "corpus") -> Path:
        text = zipf_text(num_words) if text is None else text
        return write_corpus(tmp_path / (name + (".zip" if as_zip else ".txt")), text, as_zip)

    return make


class LocalServer:
    """Serves ``routes`` (path -> bytes) on 127.0.0.1; ``/truncated`` promises more bytes than it sends."""

    def __init__(self, routes: dict[str, bytes]):
        self.routes = routes
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                promised = len(body) * 2 if self.path == "/truncated" else len(body)
                self.send_header("Content-Length", str(promised))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
