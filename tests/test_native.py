"""The kernel loader (builds once per kernel source, loads a cached build directly) and the kernel's threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lm_tying.models.word2vec import native


@pytest.fixture
def messages(monkeypatch):
    """What the loader tells the user (its rank-zero info lines)."""
    said: list[str] = []
    monkeypatch.setattr(native, "rank_zero_info", said.append)
    return said


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_TYING_KERNEL_CACHE", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def needs_compiler():
    if native.sequential_sgd() is None:
        pytest.skip("no C++ compiler here: the kernel cannot be built")


def test_the_name_follows_the_source_not_where_it_lies(tmp_path, monkeypatch):
    """Another checkout of the same source shares the build; an edited source gets a build of its own."""
    name = native.extension_name()
    assert name.startswith(f"lm_tying_sequential_sgd_{native._flags()[0]}_")
    elsewhere = tmp_path / "checkout" / "sequential_sgd.cpp"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(native.SOURCE.read_bytes())
    monkeypatch.setattr(native, "SOURCE", elsewhere)
    assert native.extension_name() == name
    elsewhere.write_bytes(native.SOURCE.read_bytes() + b"\n// edited\n")
    assert native.extension_name() != name


def test_without_a_build_it_builds_once_says_so_and_loads_the_cache_afterwards(empty_cache, messages, monkeypatch):
    needs_compiler()
    kernel = native.sequential_sgd.__wrapped__()
    assert kernel is not None and kernel.path == empty_cache / f"{native.extension_name()}.so"
    assert "building the compiled per-pair kernel" in messages[0] and "kernel built in" in messages[1]
    assert sorted(p.suffix for p in empty_cache.iterdir()) == [".lock", ".so"]  # no partial file left
    messages.clear()
    monkeypatch.setattr(native, "_build", lambda library: pytest.fail("built again although a build is cached"))
    assert native.sequential_sgd.__wrapped__() is not None and messages == []


def test_a_failed_build_leaves_nothing_and_warns_with_the_compilers_words(empty_cache, tmp_path, monkeypatch):
    failing = tmp_path / "failing-c++"
    failing.write_text("#!/bin/sh\necho 'fatal error: no such header' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    for _ in (1, 2):  # nothing cached: the next run tries again
        with pytest.warns(UserWarning, match="cannot build the compiled word2vec kernel.*no such header"):
            assert native.sequential_sgd.__wrapped__() is None
        assert not list(empty_cache.glob("*.so")) and not list(empty_cache.glob("*.partial"))


def test_no_compiler_warns_and_names_what_to_install(empty_cache, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler 'no-such-compiler-here'.*install a C\\+\\+ compiler"):
        assert native.sequential_sgd.__wrapped__() is None


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; a deadlock fails by timeout instead of hanging the suite."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": os.getcwd()})  # fmt: skip


def test_the_kernels_threads_serve_calls_of_any_width_and_a_forked_child():
    """The threads kept between calls: calls on 1-4 threads in any order finish (a worker that missed its call
    would leave the caller waiting) with the 1-thread result up to the order of the pairs (lock-free threads),
    calls from two Python threads at once take turns, and a forked child, which has none of its parent's threads,
    gets threads of its own."""
    needs_compiler()
    done = run_python("""
        import os, torch
        from lm_tying.models.word2vec import native
        kernel = native.sequential_sgd()
        def train(threads):
            g = torch.Generator().manual_seed(0)
            E, W = torch.randn(500, 16, generator=g) * 0.1, torch.zeros(500, 16)
            center, context = torch.randint(0, 500, (2, 20000), generator=g)
            negatives = torch.randint(0, 500, (5000, 3), generator=g)
            loss = kernel.sequential_sgd(E, W, center, context, negatives, 0.05, 1.0, False, threads=threads)
            return float(loss), float(W.abs().sum())
        one = train(1)
        for threads in (2, 4, 1, 3, 2, 2):
            loss, size = train(threads)
            assert abs(loss - one[0]) < 0.02 * one[0] and abs(size - one[1]) < 0.02 * one[1], (threads, loss, size, one)
        # calls from two Python threads at once (the library is called without the GIL): one waits for the other
        import threading
        results = []
        callers = [threading.Thread(target=lambda: results.append(train(2))) for _ in range(2)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        assert len(results) == 2 and all(abs(size - one[1]) < 0.02 * one[1] for _, size in results), results
        pid = os.fork()
        if pid == 0:
            os._exit(0 if train(2)[1] > 0 else 1)
        assert os.waitpid(pid, 0)[1] == 0
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_kernel_checks_its_inputs():
    needs_compiler()
    kernel = native.sequential_sgd()
    E, W = torch.zeros(10, 4), torch.zeros(10, 4)
    ids, negatives = torch.arange(6), torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="float32"):
        kernel.sequential_sgd(E.double(), W.double(), ids, ids, negatives, 0.1, 1.0, False)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.sequential_sgd(E.t(), W.t(), ids, ids, negatives, 0.1, 1.0, False)
    with pytest.raises(ValueError, match="int64"):
        kernel.sequential_sgd(E, W, ids.int(), ids, negatives, 0.1, 1.0, False)
    with pytest.raises(ValueError, match="differ in length"):
        kernel.sequential_sgd(E, W, ids, ids[:5], negatives, 0.1, 1.0, False)
    for groups in (0, 7):
        with pytest.raises(ValueError, match=f"negatives has {groups} groups: a batch of 6 pairs fills between 1 and 6"):
            kernel.sequential_sgd(E, W, ids, ids, torch.zeros(groups, 3, dtype=torch.int64), 0.1, 1.0, False)
    with pytest.raises(ValueError, match="out of range"):
        kernel.sequential_sgd(E, W, ids, ids + 5, negatives, 0.1, 1.0, False)
