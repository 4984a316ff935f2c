"""word2vec: the model (``model.py``) and the ways its updates are applied (``engines.py``); its compiled CPU
code is ``lm_tying/csrc/``, built by ``lm_tying/kernel_build.py`` and loaded by ``lm_tying/native.py`` (``python -m
lm_tying.models.word2vec`` builds it ahead of time)."""

from lm_tying.models.word2vec.model import Word2Vec

__all__ = ["Word2Vec"]
