"""The compiled library's loader (builds once per source version, loads a cached build directly), the kernel's threads
and its own negative draws."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compiled_library
from lm_tying import kernel_build, native
from lm_tying.nce import UnigramSampler


@pytest.fixture
def messages(monkeypatch):
    """What the loader tells the user (its rank-zero info lines)."""
    said: list[str] = []
    monkeypatch.setattr(kernel_build, "_say", said.append)
    return said


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_TYING_KERNEL_CACHE", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def test_the_name_follows_the_sources_not_where_they_lie(tmp_path, monkeypatch):
    """Another checkout of the same sources shares the build; an edited source or header gets a build of its own."""
    name = kernel_build.extension_name()
    assert name.startswith(f"lm_tying_word2vec_{kernel_build._flags()[0]}_")
    elsewhere = tmp_path / "checkout" / "csrc"
    shutil.copytree(kernel_build.CSRC, elsewhere)
    monkeypatch.setattr(kernel_build, "CSRC", elsewhere)
    assert [p.name for p in kernel_build.sources()] == ["pool.h", "random.h", "sequential_sgd.cpp", "skipgram_pairs.cpp",
                                                         "word_ids.cpp"]
    assert kernel_build.extension_name() == name
    for source in kernel_build.sources():
        original = source.read_bytes()
        source.write_bytes(original + b"\n// edited\n")
        assert kernel_build.extension_name() != name, source.name
        source.write_bytes(original)


def test_the_build_needs_no_torch_and_targets_the_cpu_torch_finds():
    """A first run starts the build before torch is imported: finding the build's name imports no torch, and the
    CPU flags read without torch agree with torch's own detection (and its switch to code for older CPUs)."""
    done = run_python("""
        import sys
        from lm_tying import kernel_build
        kernel_build.library_path()
        assert "torch" not in sys.modules, "kernel_build imported torch"
        print(kernel_build._flags()[0])
    """)
    assert done.returncode == 0, done.stderr
    avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert done.stdout.split() == ["avx2" if avx2 else "generic"]
    older = run_python("from lm_tying import kernel_build; print(kernel_build._flags())", env={"ATEN_CPU_CAPABILITY": "default"})
    assert "generic" in older.stdout and "-mavx2" not in older.stdout, older.stderr


def test_without_a_build_it_builds_once_says_so_and_loads_the_cache_afterwards(empty_cache, messages, monkeypatch):
    compiled_library()
    kernel = native.library.__wrapped__()
    assert kernel is not None and kernel.path == empty_cache / f"{kernel_build.extension_name()}.so"
    assert "building the compiled code" in messages[0] and "compiled code built in" in messages[1]
    assert sorted(p.suffix for p in empty_cache.iterdir()) == [".lock", ".so"]  # no partial file left
    messages.clear()
    monkeypatch.setattr(kernel_build, "_build", lambda library: pytest.fail("built again although a build is cached"))
    assert native.library.__wrapped__() is not None and messages == []


def test_a_failed_build_leaves_nothing_and_warns_with_the_compilers_words(empty_cache, tmp_path, monkeypatch):
    failing = tmp_path / "failing-c++"
    failing.write_text("#!/bin/sh\necho 'fatal error: no such header' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    for _ in (1, 2):  # nothing cached: the next run tries again
        with pytest.warns(UserWarning, match="cannot build word2vec.s compiled code.*no such header"):
            assert native.library.__wrapped__() is None
        assert not list(empty_cache.glob("*.so")) and not list(empty_cache.glob("*.partial"))


def test_no_compiler_warns_and_names_what_to_install(empty_cache, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler 'no-such-compiler-here'.*install a C\\+\\+ compiler"):
        assert native.library.__wrapped__() is None


def run_python(code: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (``env`` added to the environment); a deadlock fails by timeout instead of
    hanging the suite."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})})  # fmt: skip


def test_the_kernels_threads_serve_calls_of_any_width_and_a_forked_child():
    """The threads kept between calls: calls on 1-4 threads in any order finish (a worker that missed its call
    would leave the caller waiting) with the 1-thread result up to the order of the pairs (lock-free threads),
    calls from two Python threads at once take turns, and a forked child, which has none of its parent's threads,
    gets threads of its own. (At a small rate: on these 500 rows, all of them copied per thread, the copies' lag
    moves a high rate's result further, see the next test.)"""
    compiled_library()
    done = run_python("""
        import os, torch
        from lm_tying import native
        kernel = native.library()
        def train(threads):
            g = torch.Generator().manual_seed(0)
            E, W = torch.randn(500, 16, generator=g) * 0.1, torch.zeros(500, 16)
            center, context = torch.randint(0, 500, (2, 20000), generator=g)
            negatives = torch.randint(0, 500, (5000, 3), generator=g)
            loss = kernel.sequential_sgd(E, W, center, context, negatives, 0.005, 1.0, False, threads=threads)
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


def test_each_threads_copy_of_the_frequent_words_rows_adds_all_its_steps_to_the_table():
    """With more than one thread, each thread updates its own copy of W's first rows (up to 128 KB: all 500 rows of
    a [500, 16] table, 2,048 of a [40,000, 16] one) and adds its changes to W now and then. At a rate so small that
    no step changes the next ones' scores much, the tables after a call are the sum of the pairs' steps
    whatever the threads and the order: a copy whose changes were lost, or added twice, would leave W a good share
    away from the one-thread result. (E is updated lock-free: on 500 rows, with more threads than cores, a thread
    preempted inside a row's update loses the others' steps on it, ~1 % of E's change under load.)"""
    compiled_library()
    kernel = native.library()

    def output_table(threads: int, V: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        E, W = torch.randn(V, 16, generator=g) * 0.1, torch.randn(V, 16, generator=g) * 0.1
        center, context = torch.randint(0, V, (2, 300_000), generator=g)
        negatives = torch.randint(0, V, (75_000, 3), generator=g)
        if threads:
            kernel.sequential_sgd(E, W, center, context, negatives, 1e-4, 1.0, False, threads=threads)
        return W

    for V in (500, 40_000):
        before, one = output_table(0, V), output_table(1, V)
        for threads in (2, 3, 4):
            off = float((output_table(threads, V) - one).norm() / (one - before).norm())
            assert off < 0.02, (V, threads, off)


def test_the_kernel_checks_its_inputs():
    compiled_library()
    kernel = native.library()
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
    with pytest.raises(ValueError, match="alias tables must be float64 and int64"):
        kernel.sequential_sgd(E, W, ids, ids, native.AliasDraws(torch.ones(9).double(), torch.zeros(9).long(), 2, 3, 0),
                              0.1, 1.0, False)  # fmt: skip


def splitmix64(seed: int, i: int) -> int:
    """The i-th output of SplitMix64's stream of ``seed`` (``csrc/random.h``), in Python integers."""
    mask = (1 << 64) - 1
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_the_kernels_own_draws_follow_the_sampler_and_depend_on_the_seed_alone():
    """The alias draws in C++ are nce.UnigramSampler's rule (in float64) on SplitMix64's stream: checked draw by
    draw against Python, by frequency against p, and the kernel fed its own draws explicitly trains the same."""
    compiled_library()
    library = native.library()
    sampler = UnigramSampler(40, counts=torch.arange(40.0) ** 2, power=0.75)  # word 0 never drawn
    accept, alias = sampler.alias_accept, sampler.alias
    drawn = library.alias_draws(accept, alias, seed=2**63 + 5, count=200, first=1000)
    for i, word in enumerate(drawn.tolist()):
        u = (splitmix64(2**63 + 5, 1000 + i) >> 11) * 2.0**-53 * 40
        k = min(int(u), 39)
        assert word == (k if u - k < accept[k].item() else alias[k].item())
    many = library.alias_draws(accept, alias, seed=1, count=400_000).numpy()
    observed, expected = np.bincount(many, minlength=40)[1:], sampler.probs_table.numpy()[1:] * len(many)
    assert observed.sum() == len(many)  # zero probability: never drawn
    assert ((observed - expected) ** 2 / expected).sum() < 39 + 5 * (2 * 39) ** 0.5  # chi2, 38 dof, 5 sigma

    g = torch.Generator().manual_seed(0)
    E, W = torch.randn(40, 8, generator=g) * 0.3, torch.randn(40, 8, generator=g) * 0.3
    center, context = torch.randint(1, 40, (2, 301), generator=g)
    groups, K = 76, 5  # 4 pairs a group, the last one short
    results = []
    for negatives in (native.AliasDraws(accept, alias, groups, K, seed=9),
                      library.alias_draws(accept, alias, seed=9, count=groups * K).view(groups, K)):  # fmt: skip
        E1, W1 = E.clone(), W.clone()
        loss = library.sequential_sgd(E1, W1, center, context, negatives, 0.2, 0.8, True, threads=1)
        results.append((E1, W1, loss))
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))
    E2, W2 = E.clone(), W.clone()
    library.sequential_sgd(E2, W2, center, context, native.AliasDraws(accept, alias, groups, K, seed=10), 0.2, 0.8,
                           True, threads=1)  # fmt: skip
    assert not torch.equal(W2, results[0][1])


def test_a_build_started_in_the_background_is_waited_for_and_not_repeated(empty_cache, messages, monkeypatch):
    compiled_library()
    monkeypatch.setattr(kernel_build, "_builder", None)
    kernel_build.build_in_background()
    assert kernel_build._builder is not None
    assert native.library.__wrapped__() is not None  # waits for the thread, then loads its build
    assert not kernel_build._builder.is_alive() and sum("building" in m for m in messages) == 1, messages
    monkeypatch.setattr(kernel_build, "_builder", None)
    kernel_build.build_in_background()
    assert kernel_build._builder is None, "a cached build starts nothing"


def test_the_cli_starts_the_build_only_for_word2vec_commands():
    from lm_tying.cli import _names_word2vec

    repo = Path(__file__).resolve().parents[1]
    assert _names_word2vec(["fit", "--config", str(repo / "configs" / "word2vec.yaml")])
    assert _names_word2vec(["test", f"--config={repo / 'configs' / 'word2vec_cs20.yaml'}"])
    assert _names_word2vec(["fit", "--model", "lm_tying.models.word2vec.Word2Vec", "--data.path", "x"])
    for name in ("lstm_lm.yaml", "lstm_lm_from_word2vec.yaml"):
        assert not _names_word2vec(["fit", "--config", str(repo / "configs" / name)])
    assert not _names_word2vec(["export", "--ckpt_path", "checkpoints/word2vec/last.ckpt", "--output", "v.bin"])
    assert not _names_word2vec(["fit", "--config", str(repo / "configs" / "word2vec.yaml"), "--help"])
