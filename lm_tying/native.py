"""word2vec's compiled CPU code (``csrc/``), built on first use and called through ctypes.

One library holds the per-pair SGD kernel (``csrc/sequential_sgd.cpp``, word2vec's sequential engine, with
its negatives drawn inside it) and the skip-gram pair generator of the data pipeline (``csrc/skipgram_pairs.cpp``).
Plain C++ with a C interface (no torch headers), so the system's C++ compiler builds it in a second or two:
no ninja, no build step to plan for. The library is cached in :func:`cache_dir` under a name made of the CPU
flags and a hash of the sources and the flags (:func:`extension_name`): a changed source builds anew, and
checkouts of the same sources share one build. The compiler writes to a temporary file that is renamed into
place, so a library under its final name is always complete, and a build killed part-way leaves nothing a
later run would load. Builds are serialised with an OS lock that dies with its process. ``python -m
lm_tying.models.word2vec`` builds it ahead of time and prints how long that took. Where it cannot be built
(no compiler), :func:`library` returns None with a warning, and its users fall back to torch and numpy.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

CSRC = Path(__file__).with_name("csrc")


def sources() -> list[Path]:
    """The library's files: its ``.cpp`` files (compiled) and the headers they include."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def _flags() -> tuple[str, list[str]]:
    """Compiler flags for this CPU and a suffix naming them (one cached build per flag set).

    AVX2 + FMA where torch finds them (AVX-512 machines included: on those, 512-bit code measured slower
    for these 128-float rows); ``-fopenmp-simd`` honours the kernel's ``omp simd`` loops without OpenMP's
    runtime (the threads are ``std::thread``)."""
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    flags = ["-O3", "-std=c++17", "-fopenmp-simd", "-pthread", "-shared", "-fPIC"]
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return capability.lower(), flags


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else ``c++``."""
    return os.environ.get("CXX", "c++")


def extension_name() -> str:
    """``lm_tying_word2vec_<cpu>_<hash>``: the hash covers the sources (names and contents), the compiler and its
    flags, so that a cached library is only ever loaded by the code it was built from."""
    suffix, flags = _flags()
    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join([compiler(), *flags]).encode())
    return f"lm_tying_word2vec_{suffix}_{digest.hexdigest()[:12]}"


def cache_dir() -> Path:
    """Where built kernels are kept: ``$LM_TYING_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/lm_tying/kernels``
    (``~/.cache/lm_tying/kernels``)."""
    if os.environ.get("LM_TYING_KERNEL_CACHE"):
        return Path(os.environ["LM_TYING_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lm_tying" / "kernels"


def cores_per_process(processes_per_machine: int = 1) -> int:
    """This process's share of the cores it may run on, with ``processes_per_machine`` processes sharing them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(processes_per_machine, 1))


def _say(message: str) -> None:
    """Tell the user, from the first process of a run only (rank 0 by the launchers' variables, as Lightning's
    ``rank_zero_info`` decides; this module does not import Lightning, so the CLI can start a build first)."""
    if all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")):
        print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class AliasDraws:
    """Negatives the kernel draws itself: ``groups`` draws of ``num_sampled`` from the alias tables ``accept``
    (float64 ``[V]``) and ``alias`` (int64 ``[V]``) of :class:`lm_tying.nce.UnigramSampler`, from the stream of
    ``seed`` (draw ``g * num_sampled + k`` is group ``g``'s ``k``-th negative; see :meth:`Library.alias_draws`)."""

    accept: Tensor
    alias: Tensor
    groups: int
    num_sampled: int
    seed: int


class Library:
    """The loaded library, with tensor-checking fronts to its functions."""

    def __init__(self, library_path: Path) -> None:
        self.path = library_path
        lib = ctypes.CDLL(str(library_path))  # a CDLL call releases the GIL
        i64, u64, ptr, f32 = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_float
        lib.sequential_sgd.argtypes = [ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, i64, u64, i64, i64, f32, f32,
                                       ctypes.c_int, ctypes.c_int, ptr]  # fmt: skip
        lib.sequential_sgd.restype = None
        lib.alias_draws.argtypes = [ptr, ptr, i64, u64, i64, i64, ptr]
        lib.alias_draws.restype = None
        lib.skipgram_pairs.argtypes = [ptr, ptr, i64, u64, ptr, i64, ctypes.c_int]
        lib.skipgram_pairs.restype = i64
        self._lib = lib

    def sequential_sgd(
        self,
        embedding: Tensor,
        output_weight: Tensor,
        center: Tensor,
        context: Tensor,
        negatives: Tensor | AliasDraws,
        lr: float,
        neg_weight: float,
        remove_accidental_hits: bool,
        threads: int | None = None,
    ) -> Tensor:
        """Per-pair SGD of ``(center, context)`` pairs with negatives shared by consecutive groups of pairs (given,
        ``[groups, K]``, or drawn by the kernel), on the tables in place; returns the pairs' summed loss (float64
        scalar). ``threads``: torch's intra-op thread count when None."""
        E, W = embedding.data, output_weight.data
        if E.device.type != "cpu" or W.device.type != "cpu":
            raise ValueError("the per-pair kernel runs on CPU tables")
        if E.dtype != torch.float32 or W.dtype != torch.float32:
            raise ValueError("the per-pair kernel's tables must be float32")
        if not (E.is_contiguous() and W.is_contiguous()) or E.shape != W.shape or E.dim() != 2:
            raise ValueError("the per-pair kernel's tables must be contiguous [V, D] tables of the same shape")
        drawn = isinstance(negatives, AliasDraws)
        if any(t.dtype != torch.int64 for t in (center, context)) or (not drawn and (
                negatives.dtype != torch.int64 or negatives.dim() != 2)):  # fmt: skip
            raise ValueError("center and context must be int64 [B], negatives int64 [groups, K]")
        center, context = center.contiguous(), context.contiguous()
        B, (V, D) = center.numel(), E.shape
        n, K = (negatives.groups, negatives.num_sampled) if drawn else negatives.shape
        if context.numel() != B:
            raise ValueError(f"center ({B}) and context ({context.numel()}) differ in length")
        group_loss = torch.zeros(n, dtype=torch.float64)
        if B == 0:
            return group_loss.sum()
        if n < 1 or (n - 1) * -(-B // n) >= B:
            raise ValueError(f"negatives has {n} groups: a batch of {B} pairs fills between 1 and {B}")
        for ids in (center, context) if drawn else (center, context, negatives):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
                raise ValueError(f"word id out of range: the tables have {V} rows")
        if drawn:  # (given negatives, accept, alias) pointers, and the draws' seed
            accept, alias = self._alias_tables(negatives.accept, negatives.alias, V)
            pointers, seed = (None, accept.data_ptr(), alias.data_ptr()), negatives.seed
        else:
            negatives = negatives.contiguous()
            pointers, seed = (negatives.data_ptr(), None, None), 0
        self._lib.sequential_sgd(
            E.data_ptr(), W.data_ptr(), D, center.data_ptr(), context.data_ptr(), B, *pointers, V, seed, n, K, lr,
            neg_weight, int(remove_accidental_hits), threads or torch.get_num_threads(), group_loss.data_ptr(),
        )  # fmt: skip
        return group_loss.sum()

    def alias_draws(self, accept: Tensor, alias: Tensor, seed: int, count: int, first: int = 0) -> Tensor:
        """Draws ``first ... first + count - 1`` of the stream of ``seed`` from the alias tables, as the kernel
        draws its negatives."""
        accept, alias = self._alias_tables(accept, alias, accept.numel())
        out = torch.empty(count, dtype=torch.int64)
        self._lib.alias_draws(accept.data_ptr(), alias.data_ptr(), accept.numel(), seed, first, count, out.data_ptr())
        return out

    def skipgram_pairs(
        self, tokens: np.ndarray, windows: np.ndarray, seed: int, count: int, threads: int = 1
    ) -> np.ndarray:
        """The ``count`` skip-gram pairs of ``tokens`` (each position with the ``windows[i]`` positions on either
        side), packed as ``center << 32 | context`` into int64, in a uniformly random order fixed by ``seed`` (the
        same on any number of ``threads``)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        windows = np.ascontiguousarray(windows, dtype=np.int32)
        if tokens.shape != windows.shape or tokens.ndim != 1:
            raise ValueError("tokens and windows must be 1-d arrays of the same length")
        out = np.empty(count, dtype=np.int64)
        written = self._lib.skipgram_pairs(tokens.ctypes.data, windows.ctypes.data, len(tokens), seed,
                                           out.ctypes.data, count, threads)  # fmt: skip
        if written != count:
            raise ValueError(f"{count} pairs expected, but the tokens and windows give another number")
        return out

    @staticmethod
    def _alias_tables(accept: Tensor, alias: Tensor, V: int) -> tuple[Tensor, Tensor]:
        if accept.shape != (V,) or alias.shape != (V,) or accept.dtype != torch.float64 or alias.dtype != torch.int64:
            raise ValueError(f"the alias tables must be float64 and int64 [{V}], one entry per table row")
        if accept.device.type != "cpu" or alias.device.type != "cpu":
            raise ValueError("the alias tables must be on the CPU")
        return accept.contiguous(), alias.contiguous()


_builder: threading.Thread | None = None


def build_in_background() -> None:
    """Start building the library in a thread of this process if no build is cached, so that a first run compiles
    while it does other work: the CLI calls this before importing Lightning when the command names word2vec, and
    the skip-gram DataModule before it reads the corpus. :func:`library` waits for it; errors are left to
    :func:`library`, which tries again and warns with them."""
    global _builder
    path = cache_dir() / f"{extension_name()}.so"
    if _builder is None and not path.exists():
        _builder = threading.Thread(target=_build_if_missing, args=(path, False), daemon=True, name="lm_tying-build")
        _builder.start()


@functools.cache
def library() -> Library | None:
    """The library of ``csrc/``, built if no build is cached; None if it cannot be built."""
    if _builder is not None:
        _builder.join()
    path = cache_dir() / f"{extension_name()}.so"
    try:
        _build_if_missing(path, True)
        return Library(path)
    except Exception as err:  # no compiler, a read-only cache, ...
        warnings.warn(
            f"cannot build word2vec's compiled code ({type(err).__name__}: {err}); install a C++ compiler "
            f"(or set CXX) to use it, or delete {path} if a damaged build is left there.",
            stacklevel=2,
        )
        return None


def _build_if_missing(path: Path, raise_errors: bool) -> None:
    try:
        if not path.exists():
            with _build_lock(path.with_suffix(".lock")):
                if not path.exists():  # another process may have built it while we waited
                    _build(path)
    except Exception:
        if raise_errors:
            raise


def _build(library: Path) -> None:
    """Compile into a temporary file next to ``library``, then rename it into place (the caller holds the lock)."""
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise FileNotFoundError(f"no C++ compiler {cxx!r} on PATH")
    _say(f"Word2Vec: building the compiled code into {library} (once per source version)")
    start = time.perf_counter()
    fd, partial = tempfile.mkstemp(dir=library.parent, prefix=library.stem, suffix=".partial")
    os.close(fd)
    try:
        compiled = [str(f) for f in sources() if f.suffix == ".cpp"]
        done = subprocess.run([cxx, *_flags()[1], *compiled, "-o", partial], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    finally:
        Path(partial).unlink(missing_ok=True)
    _say(f"Word2Vec: compiled code built in {time.perf_counter() - start:.1f} s")


class _build_lock:
    """An exclusive ``flock`` on ``path`` while building; the OS releases it when its holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"Word2Vec: waiting for another process building the compiled code ({self.path})")
            fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
