"""The two models: word2vec (skip-gram with sampled NCE) and the weight-tied LSTM language model."""

from lm_tying.models.base import CheckpointMismatchError, WordEmbeddingModule

__all__ = ["CheckpointMismatchError", "WordEmbeddingModule"]
