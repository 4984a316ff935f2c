"""lm-tying: word2vec on text8 and an LSTM language model whose output layer is its input embedding."""

__version__ = "0.1.0"
