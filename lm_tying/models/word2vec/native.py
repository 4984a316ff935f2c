"""The compiled per-pair SGD kernel (``csrc/sequential_sgd.cpp``), built on first use.

PyTorch's extension builder compiles the kernel once (it needs a C++ compiler and ninja) into
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), in a folder named after the CPU flags and
a hash of the source, torch's version and Python's ABI (:func:`extension_name`): a changed ``.cpp`` builds
anew, and checkouts of the same source in other places share one build. Once a build has completed (it
leaves a ``built`` marker), later runs import the library directly: no ninja run, no message, a few ms;
torch's builder would rebuild whenever the source's path differs from the one it last built. ``python -m
lm_tying.models.word2vec`` builds it ahead of time (e.g. in an image or a CI setup step) and prints how long
that took.

Loads and builds are serialised with an OS lock that dies with its process, so a build killed part-way never
blocks the next run: torch's own lock file, left behind by a killed build, is recognised as stale and
removed (with a message naming it). Where the kernel cannot be built, :func:`sequential_sgd` returns
None with a warning.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

SOURCE = Path(__file__).with_name("csrc") / "sequential_sgd.cpp"
BUILT = "built"  # the marker a completed build leaves in its folder


def _flags() -> tuple[str, list[str]]:
    """Compiler flags for this CPU and a suffix naming them (one cached build per flag set)."""
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    flags = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for's threads (torch's pool) and the simd loops
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return capability.lower(), flags


def extension_name() -> str:
    """``lm_tying_sequential_sgd_<cpu>_<hash>``: the hash covers the source, the flags, torch and Python's ABI,
    so that a cached library is only ever loaded by the code and runtime it was built for."""
    suffix, flags = _flags()
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join([*flags, torch.__version__, sys.implementation.cache_tag]).encode())
    return f"lm_tying_sequential_sgd_{suffix}_{digest.hexdigest()[:12]}"


def _ninja_on_path() -> None:
    """pip's ninja sits in the environment's scripts folder, not on PATH when the venv is not activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_directory(name: str) -> Path:
    """Where torch builds and caches the extension ``name``."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def _import_built(name: str, build_dir: Path) -> ModuleType:
    """Import the library a completed build left in ``build_dir`` (what torch's loader does after ninja)."""
    library = next(build_dir.glob(f"{name}*.so"))
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def sequential_sgd() -> ModuleType | None:
    """The module of ``csrc/sequential_sgd.cpp`` (function ``sequential_sgd``), or None if it cannot be built."""
    name = extension_name()
    build_dir = None
    try:
        build_dir = build_directory(name)
        with _build_lock(build_dir):
            if (build_dir / BUILT).exists():
                return _import_built(name, build_dir)
            return _build(name, build_dir)
    except Exception as err:  # no compiler, no ninja, a read-only cache, ...
        where = f"; delete {build_dir} if a damaged build is left there" if build_dir is not None else ""
        warnings.warn(
            f"cannot build the compiled word2vec kernel ({type(err).__name__}: {err}); install a C++ compiler "
            f"and ninja to use it{where}.",
            stacklevel=2,
        )
        return None


def _build(name: str, build_dir: Path) -> ModuleType:
    """Compile with torch's builder (the caller holds the lock), then leave the marker that says it completed."""
    from torch.utils.cpp_extension import load

    suffix, flags = _flags()
    _ninja_on_path()
    rank_zero_info(
        f"Word2Vec: building the compiled per-pair kernel into {build_dir} (once per kernel source, torch version "
        "and machine; 1-2 min on a 2-core CPU)"
    )
    start = time.perf_counter()
    module = load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                  build_directory=str(build_dir))  # fmt: skip
    (build_dir / BUILT).write_text(f"{SOURCE}\n")  # the library is complete: later runs import it directly
    rank_zero_info(f"Word2Vec: kernel built in {time.perf_counter() - start:.0f} s")
    return module


class _build_lock:
    """An exclusive ``flock`` on ``build_dir/lm_tying.lock`` while loading or building.

    The OS releases it when its holder dies, so whoever holds it knows that no build is running: a torch
    ``lock`` file then present was left by a killed build, and would make torch wait forever.
    """

    def __init__(self, build_dir: Path) -> None:
        self.build_dir = build_dir

    def __enter__(self) -> None:
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.build_dir / "lm_tying.lock", "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            rank_zero_info(f"Word2Vec: waiting for another process building the kernel in {self.build_dir}")
            fcntl.flock(self.file, fcntl.LOCK_EX)
        stale = self.build_dir / "lock"
        if stale.exists():
            warnings.warn(
                f"removing {stale}: a stale build lock left by a kernel build that was killed part-way "
                "(no build is running)",
                stacklevel=3,
            )
            stale.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
