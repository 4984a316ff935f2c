"""Building word2vec's compiled CPU code (``csrc/``) into a cached library, without torch.

One library holds the per-pair SGD kernel (``csrc/sequential_sgd.cpp``, word2vec's sequential engine, with
its negatives drawn inside it) and two pieces of the data pipeline, the skip-gram pair generator
(``csrc/skipgram_pairs.cpp``) and the word table that encodes the corpus (``csrc/word_ids.cpp``), loaded by
:mod:`lm_tying.native`. Plain C++ with a C interface (no torch headers), so the system's C++ compiler
builds it in a second or two: no ninja, no build step to plan for. The library is cached in :func:`cache_dir`
under a name made of the CPU flags and a hash of the sources and the flags (:func:`extension_name`): a changed
source builds anew, and checkouts of the same sources share one build. The compiler writes to a temporary file
that is renamed into place, so a library under its final name is always complete, and a build killed part-way
leaves nothing a later run would load. Builds are serialised with an OS lock that dies with its process. This
module imports neither torch nor Lightning, so that a first ``lm-tying fit`` starts the build
(:func:`build_in_background`) before it imports them. ``python -m lm_tying.models.word2vec`` builds it ahead of
time and prints how long that took.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")


def sources() -> list[Path]:
    """The library's files: its ``.cpp`` files (compiled) and the headers they include."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def _flags() -> tuple[str, list[str]]:
    """Compiler flags for this CPU and a suffix naming them (one cached build per flag set).

    AVX2 + FMA where the CPU has them (AVX-512 machines included: on those, 512-bit code measured slower for these
    128-float rows); ``-fopenmp-simd`` honours the kernel's ``omp simd`` loops without OpenMP's runtime (the
    threads are ``std::thread``)."""
    flags = ["-O3", "-std=c++17", "-fopenmp-simd", "-pthread", "-shared", "-fPIC"]
    if _has_avx2_and_fma():
        return "avx2", flags + ["-mavx2", "-mfma"]
    return "generic", flags


def _has_avx2_and_fma() -> bool:
    """Whether this CPU runs AVX2 and FMA instructions, from Linux's ``/proc/cpuinfo`` (without torch: a first run
    starts the build before torch is imported); ``ATEN_CPU_CAPABILITY=default``, torch's switch to its code for
    older CPUs, builds for them too. Elsewhere (macOS) torch decides."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "default":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        import torch

        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return "avx2" in flags and "fma" in flags


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


def library_path() -> Path:
    """Where the build of these sources for this CPU is, or goes."""
    return cache_dir() / f"{extension_name()}.so"


def _say(message: str) -> None:
    """Tell the user, from the first process of a run only (rank 0 by the launchers' variables, as Lightning's
    ``rank_zero_info`` decides; this module does not import Lightning, so the CLI can start a build first)."""
    if all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")):
        print(message, file=sys.stderr, flush=True)


_builder: threading.Thread | None = None


def build_in_background() -> None:
    """Start building the library in a thread of this process if no build is cached, so that a first run compiles
    while it does other work: the CLI calls this before importing Lightning when the command names word2vec, and
    the skip-gram DataModule before it reads the corpus. :func:`built` waits for it; errors are left to
    :func:`built`, which tries again and raises them."""
    global _builder
    path = library_path()
    if _builder is None and not path.exists():
        _builder = threading.Thread(target=_build_if_missing, args=(path, False), daemon=True, name="lm_tying-build")
        _builder.start()


def is_built() -> bool:
    """Whether the library is built and no build of this process is under way (nothing to wait for)."""
    return (_builder is None or not _builder.is_alive()) and library_path().exists()


def built() -> Path:
    """The library's path, once built (waiting for a build started in the background, building if none is cached);
    raises what stops the build (no compiler, a compiler error, a read-only cache)."""
    if _builder is not None:
        _builder.join()
    path = library_path()
    _build_if_missing(path, True)
    return path


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
    # One translation unit including every .cpp: the standard headers they share are parsed once, not once a file
    # (a first run may wait for this build).
    unity = Path(partial).with_suffix(".cpp")
    unity.write_text("".join(f'#include "{f}"\n' for f in sources() if f.suffix == ".cpp"))
    try:
        done = subprocess.run([cxx, *_flags()[1], str(unity), "-o", partial], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    finally:
        Path(partial).unlink(missing_ok=True)
        unity.unlink(missing_ok=True)
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
