"""What both models share: a vocabulary that names every embedding row and travels with checkpoints.

A checkpoint of this project stores its vocabulary and the kind of model that wrote it, so export,
the projector and the language model's ``embedding_init`` never need the corpus to name a row, and
loading a checkpoint into the wrong model, or next to data with another vocabulary, fails clearly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from lm_tying.checkpoint import MODEL_KEY, VOCAB_KEY, CheckpointMismatchError
from lm_tying.data.vocab import Vocabulary

if TYPE_CHECKING:
    from lm_tying.vectors import WordVectors

__all__ = ["CheckpointMismatchError", "WordEmbeddingModule"]


class WordEmbeddingModule(L.LightningModule):
    """Base of both models. Subclasses take ``vocab_size`` first and call ``save_hyperparameters()``."""

    def __init__(self) -> None:
        super().__init__()
        self.vocab: Vocabulary | None = None

    def input_embeddings(self) -> torch.Tensor:
        """The ``V x D`` matrix users keep (word2vec: the input embedding; LM: the tied matrix)."""
        raise NotImplementedError

    def word_vectors(self) -> WordVectors:
        """The embeddings with their words, as gensim-like ``WordVectors`` (float32, CPU)."""
        from lm_tying.vectors import WordVectors

        if self.vocab is None:
            raise RuntimeError(
                "this model has no vocabulary yet: attach a Text8DataModule (trainer.fit) or load a checkpoint"
            )
        return WordVectors(self.vocab.words, self.input_embeddings().detach().float().cpu())

    # ------------------------------------------------------------------ vocabulary plumbing
    def attached_datamodule(self) -> Any:
        """The trainer's DataModule, or None (no trainer, or data passed as plain loaders)."""
        return getattr(self._trainer, "datamodule", None)

    def setup(self, stage: str) -> None:
        data_vocab = getattr(self.attached_datamodule(), "vocab", None)
        if data_vocab is None:
            return
        if len(data_vocab) != self.hparams.vocab_size:
            raise CheckpointMismatchError(
                f"{type(self).__name__} was built for vocab_size={self.hparams.vocab_size:,} but the data's "
                f"vocabulary has {len(data_vocab):,} words. Build the model with vocab_size=datamodule.num_words "
                f"(the lm-tying CLI links them), or use the data settings the model was trained with."
            )
        if self.vocab is not None and self.vocab != data_vocab:
            raise CheckpointMismatchError(_vocab_mismatch(type(self).__name__, self.vocab, data_vocab))
        self.vocab = data_vocab

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[MODEL_KEY] = type(self).__name__
        if self.vocab is not None:
            checkpoint[VOCAB_KEY] = self.vocab.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        kind = checkpoint.get(MODEL_KEY)
        if kind != type(self).__name__:
            raise CheckpointMismatchError(
                f"this checkpoint was written by {kind or 'something other than lm-tying'}, not by "
                f"{type(self).__name__}: load it with the model class that trained it"
                + (f" (lm_tying.models.{kind})" if kind else "")
                + "."
            )
        if VOCAB_KEY not in checkpoint:
            return
        saved = Vocabulary.from_state_dict(checkpoint[VOCAB_KEY])
        data_vocab = getattr(self.attached_datamodule(), "_vocab", None)
        if data_vocab is not None and data_vocab != saved:
            raise CheckpointMismatchError(_vocab_mismatch(type(self).__name__, saved, data_vocab))
        self.vocab = saved


def _vocab_mismatch(model: str, saved: Vocabulary, data: Vocabulary) -> str:
    differing = next((i for i, (a, b) in enumerate(zip(saved.words, data.words)) if a != b), None)
    where = (
        f"row {differing} is {saved.words[differing]!r} in the checkpoint but {data.words[differing]!r} in the data"
        if differing is not None
        else f"the checkpoint has {len(saved):,} words, the data {len(data):,}"
    )
    return (
        f"the {model} checkpoint's vocabulary does not match the data's ({where}). Use the corpus and "
        f"vocabulary settings (path, vocab_size, min_count) the checkpoint was trained with."
    )
