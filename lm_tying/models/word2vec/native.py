"""The compiled per-pair SGD kernel (``csrc/sequential_sgd.cpp``), built on first use and called through ctypes.

The kernel is plain C++ with a C interface (no torch headers), so the system's C++ compiler builds it in
a second or two: no ninja, no build step to plan for. The library is cached in :func:`cache_dir` under a
name made of the CPU flags and a hash of the source and the flags (:func:`extension_name`): a changed
``.cpp`` builds anew, and checkouts of the same source share one build. The compiler writes to a temporary
file that is renamed into place, so a library under its final name is always complete, and a build killed
part-way leaves nothing a later run would load. Builds are serialised with an OS lock that dies with its
process. ``python -m lm_tying.models.word2vec`` builds it ahead of time and prints how long that took.
Where the kernel cannot be built (no compiler), :func:`sequential_sgd` returns None with a warning.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "sequential_sgd.cpp"


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
    """``lm_tying_sequential_sgd_<cpu>_<hash>``: the hash covers the source, the compiler and its flags, so
    that a cached library is only ever loaded by the code it was built from."""
    suffix, flags = _flags()
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join([compiler(), *flags]).encode())
    return f"lm_tying_sequential_sgd_{suffix}_{digest.hexdigest()[:12]}"


def cache_dir() -> Path:
    """Where built kernels are kept: ``$LM_TYING_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/lm_tying/kernels``
    (``~/.cache/lm_tying/kernels``)."""
    if os.environ.get("LM_TYING_KERNEL_CACHE"):
        return Path(os.environ["LM_TYING_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lm_tying" / "kernels"


class SequentialKernel:
    """The loaded library, with a tensor-checking front to its one function."""

    def __init__(self, library_path: Path) -> None:
        self.path = library_path
        fn = ctypes.CDLL(str(library_path)).sequential_sgd  # a CDLL call releases the GIL
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, ptr, i64, ptr, ptr, i64, ptr, i64, i64, ctypes.c_float, ctypes.c_float,
                       ctypes.c_int, ctypes.c_int, ptr]  # fmt: skip
        fn.restype = None
        self._fn = fn

    def sequential_sgd(
        self,
        embedding: Tensor,
        output_weight: Tensor,
        center: Tensor,
        context: Tensor,
        negatives: Tensor,
        lr: float,
        neg_weight: float,
        remove_accidental_hits: bool,
        threads: int | None = None,
    ) -> Tensor:
        """Per-pair SGD of ``(center, context)`` pairs with the ``[groups, K]`` ``negatives`` shared by consecutive
        groups of pairs, on the tables in place; returns the pairs' summed loss (float64 scalar). ``threads``:
        torch's intra-op thread count when None."""
        E, W = embedding.data, output_weight.data
        if E.device.type != "cpu" or W.device.type != "cpu":
            raise ValueError("the per-pair kernel runs on CPU tables")
        if E.dtype != torch.float32 or W.dtype != torch.float32:
            raise ValueError("the per-pair kernel's tables must be float32")
        if not (E.is_contiguous() and W.is_contiguous()) or E.shape != W.shape or E.dim() != 2:
            raise ValueError("the per-pair kernel's tables must be contiguous [V, D] tables of the same shape")
        if any(t.dtype != torch.int64 for t in (center, context, negatives)) or negatives.dim() != 2:
            raise ValueError("center and context must be int64 [B], negatives int64 [groups, K]")
        center, context, negatives = center.contiguous(), context.contiguous(), negatives.contiguous()
        B, (n, K), (V, D) = center.numel(), negatives.shape, E.shape
        if context.numel() != B:
            raise ValueError(f"center ({B}) and context ({context.numel()}) differ in length")
        group_loss = torch.zeros(n, dtype=torch.float64)
        if B == 0:
            return group_loss.sum()
        if n < 1 or (n - 1) * -(-B // n) >= B:
            raise ValueError(f"negatives has {n} groups: a batch of {B} pairs fills between 1 and {B}")
        for ids in (center, context, negatives):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
                raise ValueError(f"word id out of range: the tables have {V} rows")
        self._fn(E.data_ptr(), W.data_ptr(), D, center.data_ptr(), context.data_ptr(), B, negatives.data_ptr(),
                 n, K, lr, neg_weight, int(remove_accidental_hits), threads or torch.get_num_threads(),
                 group_loss.data_ptr())  # fmt: skip
        return group_loss.sum()


@functools.cache
def sequential_sgd() -> SequentialKernel | None:
    """The kernel of ``csrc/sequential_sgd.cpp``, built if no build is cached; None if it cannot be built."""
    library = cache_dir() / f"{extension_name()}.so"
    try:
        if not library.exists():
            with _build_lock(library.with_suffix(".lock")):
                if not library.exists():  # another process may have built it while we waited
                    _build(library)
        return SequentialKernel(library)
    except Exception as err:  # no compiler, a read-only cache, ...
        warnings.warn(
            f"cannot build the compiled word2vec kernel ({type(err).__name__}: {err}); install a C++ compiler "
            f"(or set CXX) to use it, or delete {library} if a damaged build is left there.",
            stacklevel=2,
        )
        return None


def _build(library: Path) -> None:
    """Compile into a temporary file next to ``library``, then rename it into place (the caller holds the lock)."""
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise FileNotFoundError(f"no C++ compiler {cxx!r} on PATH")
    rank_zero_info(f"Word2Vec: building the compiled per-pair kernel into {library} (once per kernel source)")
    start = time.perf_counter()
    fd, partial = tempfile.mkstemp(dir=library.parent, prefix=library.stem, suffix=".partial")
    os.close(fd)
    try:
        done = subprocess.run([cxx, *_flags()[1], str(SOURCE), "-o", partial], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    finally:
        Path(partial).unlink(missing_ok=True)
    rank_zero_info(f"Word2Vec: kernel built in {time.perf_counter() - start:.1f} s")


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
            rank_zero_info(f"Word2Vec: waiting for another process building the kernel ({self.path})")
            fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
