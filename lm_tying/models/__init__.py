"""The two models: word2vec (skip-gram with sampled NCE) and the weight-tied LSTM language model."""

from lm_tying.models.base import CheckpointMismatchError, WordEmbeddingModule
from lm_tying.models.lstm_lm import LSTMLanguageModel
from lm_tying.models.word2vec import Word2Vec

__all__ = ["CheckpointMismatchError", "LSTMLanguageModel", "Word2Vec", "WordEmbeddingModule"]
