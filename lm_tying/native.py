"""Compiled CPU kernels, built from ``lm_tying/csrc`` on first use.

PyTorch's extension builder compiles a kernel once per machine (about 20 s; it needs a C++ compiler and
ninja) into ``~/.cache/torch_extensions`` and later runs load the cached library at once. Where it cannot
be built, :func:`sequential_sgd` returns None with a warning, and callers fall back to PyTorch ops.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch

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


@functools.cache
def sequential_sgd() -> ModuleType | None:
    """The module of ``csrc/sequential_sgd.cpp`` (function ``sequential_sgd``), or None if it cannot be built."""
    from torch.utils.cpp_extension import load

    suffix, flags = _flags()
    _ninja_on_path()
    try:
        return load(
            name=f"lm_tying_sequential_sgd_{suffix}",
            sources=[str(CSRC / "sequential_sgd.cpp")],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
        )
    except Exception as err:  # no compiler, no ninja, a read-only cache, ...
        warnings.warn(
            f"cannot build the compiled word2vec kernel ({type(err).__name__}: {err}); install a C++ compiler "
            "and ninja to use it. Falling back to the batched PyTorch update.",
            stacklevel=2,
        )
        return None
