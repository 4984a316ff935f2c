"""The compiled per-pair SGD kernel (``csrc/sequential_sgd.cpp``), built on first use.

PyTorch's extension builder compiles the kernel once per machine, torch version and CPU flags (it needs
a C++ compiler and ninja) into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later
runs load the cached library at once. ``python -m lm_tying.models.word2vec`` builds it ahead of
time (e.g. in an image or a CI setup step) and prints how long that took.

Builds are serialised with an OS lock that dies with its process, so a build killed part-way never
blocks the next run: torch's own lock file, left behind by a killed build, is recognised as stale and
removed (with a message naming it). Where the kernel cannot be built, :func:`sequential_sgd` returns
None with a warning.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

CSRC = Path(__file__).with_name("csrc")


def _flags() -> tuple[str, list[str]]:
    """Compiler flags for this CPU and a suffix naming them (one cached build per flag set)."""
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    flags = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for's threads (torch's pool) and the simd loops
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return capability.lower(), flags


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


@functools.cache
def sequential_sgd() -> ModuleType | None:
    """The module of ``csrc/sequential_sgd.cpp`` (function ``sequential_sgd``), or None if it cannot be built."""
    from torch.utils.cpp_extension import load

    suffix, flags = _flags()
    name = f"lm_tying_sequential_sgd_{suffix}"
    _ninja_on_path()
    try:
        build_dir = build_directory(name)
        built = any(build_dir.glob(f"{name}*.so"))
        if not built:
            rank_zero_info(
                f"Word2Vec: building the compiled per-pair kernel into {build_dir} (once per machine and torch "
                "version; 1-2 min on a 2-core CPU)"
            )
        start = time.perf_counter()
        with _build_lock(build_dir):
            module = load(name=name, sources=[str(CSRC / "sequential_sgd.cpp")], extra_cflags=flags,
                          extra_ldflags=["-fopenmp"], build_directory=str(build_dir))  # fmt: skip
        if not built:
            rank_zero_info(f"Word2Vec: kernel built in {time.perf_counter() - start:.0f} s")
        return module
    except Exception as err:  # no compiler, no ninja, a read-only cache, ...
        warnings.warn(
            f"cannot build the compiled word2vec kernel ({type(err).__name__}: {err}); install a C++ compiler "
            "and ninja to use it.",
            stacklevel=2,
        )
        return None


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
                "(no build is running); the kernel is built again",
                stacklevel=3,
            )
            stale.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()

