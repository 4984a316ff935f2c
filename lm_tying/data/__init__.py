"""text8: download, vocabulary, encoded cache, and the batches both models train on."""

from lm_tying.data.corpus import TEXT8_URL, CorpusError
from lm_tying.data.datamodule import Text8DataModule
from lm_tying.data.streams import LanguageModelStream, ResumableLoader, SkipGramStream
from lm_tying.data.vocab import UNK, Vocabulary

__all__ = [
    "TEXT8_URL",
    "UNK",
    "CorpusError",
    "LanguageModelStream",
    "ResumableLoader",
    "SkipGramStream",
    "Text8DataModule",
    "Vocabulary",
]
