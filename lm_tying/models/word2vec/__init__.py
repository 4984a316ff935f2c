"""word2vec: the model (``model.py``), the ways its updates are applied (``engines.py``) and the compiled
per-pair CPU kernel (``csrc/``) with its loader (``native.py``; ``python -m lm_tying.models.word2vec``
builds the kernel ahead of time)."""

from lm_tying.models.word2vec.model import Word2Vec

__all__ = ["Word2Vec"]
