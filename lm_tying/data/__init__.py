"""text8: download, vocabulary, encoded cache, and the batches both models train on.

The names below are imported on first use: the loaders' worker processes import ``lm_tying.data.streams``, which
needs torch and numpy, not the Lightning that ``Text8DataModule`` brings (a second and a half in every fork server).
"""

import importlib

_MODULES = {
    "TEXT8_URL": "corpus",
    "CorpusError": "corpus",
    "Text8DataModule": "datamodule",
    "LanguageModelStream": "streams",
    "ResumableLoader": "streams",
    "SkipGramStream": "streams",
    "UNK": "vocab",
    "Vocabulary": "vocab",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES))
