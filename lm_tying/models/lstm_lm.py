"""A weight-tied LSTM language model (Press & Wolf 2017; Inan et al. 2017), trained with truncated BPTT.

The network, in order::

    ids [B, T] -> embedding (V x E) -> dropout -> n-layer LSTM (hidden H) -> dropout
               -> projection H -> E (only when H != E) -> decoder Linear(E -> V) -> logits [B, T, V]

With ``tie_weights`` the decoder's weight *is* the embedding's weight: one ``nn.Parameter``, shared by
assignment in a single line of ``__init__`` (``self.decoder.weight = self.embedding.weight``), never a
copy kept in sync. Everything that walks parameters sees it once: ``parameters()``, the optimizer, DDP's
gradient buckets, ``torch.save`` (the storage is written once, so a checkpoint is one ``V x E`` matrix
smaller than the untied model's). Its gradient is the sum of the gradients of its two uses.

Training is truncated backpropagation through time: the data module serves ``B`` contiguous streams, cut
into windows of ``T`` tokens; the LSTM state at the end of one window is the initial state of the next,
detached so that gradients stop at the window boundary. The state is reset at the start of each training
epoch and of each evaluation, and travels in checkpoints so that a mid-epoch resume continues exactly.
Lightning 2.x has no built-in TBPTT, so the module does it.
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric

from lm_tying import _lightning
from lm_tying.models.base import WordEmbeddingModule
from lm_tying.nce import UnigramSampler, linear_cross_entropy, make_sampler, sampled_softmax_loss

Hidden = tuple[Tensor, Tensor]  # (h, c), each [num_layers, B, H]

_CKPT_KEY = "lstm_lm"  # our extra entries in a Lightning checkpoint


class LSTMLanguageModel(WordEmbeddingModule):
    """Word-level LSTM language model whose decoder shares the embedding matrix.

    Args:
        vocab_size: Number of words, UNK included (the CLI links it to the data module's vocabulary).
        embedding_dim: E, the width of the embedding, and so of the decoder's input.
        hidden_dim: H, the LSTM's hidden size. When H != E a learned linear projection H -> E sits in
            front of the decoder, so the tie works for any sizes.
        num_layers: Stacked LSTM layers.
        tie_weights: Share one matrix between the embedding and the decoder (default). ``False`` gives
            the untied model with the same layers, for comparisons.
        projection: Project H -> E before the decoder. ``None`` (default): exactly when H != E. ``False``
            with H != E makes the decoder ``Linear(H -> V)``, which cannot be tied (error at construction).
        decoder_bias: Learn a bias for the decoder (some papers fix it to zero).
        dropout_embedding: Dropout on the embedded words.
        dropout_lstm: Dropout between LSTM layers (ignored for one layer).
        dropout_output: Dropout on the LSTM's output, before projection/decoder.
        init_range: Embedding (and untied decoder) weights start uniform in ``[-init_range, init_range]``,
            as in the PyTorch word_language_model example.
        optimizer: ``sgd`` (the classic recipe, with clipping and plateau decay), ``adam`` or ``adamw``.
        lr: Learning rate (SGD on this model: 20; Adam: about 1e-3).
        momentum: SGD momentum.
        weight_decay: L2 penalty (SGD/Adam) or decoupled weight decay (AdamW).
        lr_decay_factor: Divide the learning rate by this when the validation loss did not improve
            (``ReduceLROnPlateau`` on ``val/loss``, the example's schedule is 4 with patience 0).
            1 disables the schedule.
        lr_patience: Validations without improvement tolerated before the learning rate is divided.
        embedding_init: Start the embedding (and so, tied, the decoder) from word vectors matched by word:
            a checkpoint of this project (``.ckpt`` of ``Word2Vec`` or ``LSTMLanguageModel``) or a word2vec
            text (``.txt``/``.vec``) or binary (``.bin``) vectors file. Their dimension must equal E.
        freeze_embedding: Do not train the embedding. With ``tie_weights`` the decoder is the same
            matrix, so it is frozen too (only the decoder bias, the LSTM and the projection learn).
        loss: Training loss. ``full``: cross-entropy over the whole vocabulary. ``sampled``: sampled softmax
            (Jean et al. 2015, ``tf.nn.sampled_softmax_loss``) over the true word and ``num_sampled``
            words drawn once per batch, rows of the same tied matrix; its cost no longer grows with the
            vocabulary. Validation, test and generation always use the full softmax, so perplexities
            stay comparable.
        num_sampled: Words drawn per batch (shared by every token of it) for ``loss: sampled``.
        sampler: ``log_uniform`` (Zipfian over frequency-sorted ids, TF's default; needs no counts) or
            ``unigram`` (corpus counts ** ``sampler_power``, from the data's vocabulary).
        sampler_power: Exponent of the counts for the ``unigram`` sampler.
        remove_accidental_hits: With ``loss: sampled``, a drawn word equal to a token's target does not
            count as a negative for that token (TF's default).
        bf16_lstm: Under bf16 mixed precision, run the LSTM in bf16 too. Off by default: the LSTM stays in
            float32 and the rest (the decoder's matrix products, most of a step) runs in bf16. A bf16 LSTM
            carries its state in bf16 from step to step: a little faster, but it learned worse on every seed
            measured (README, LM "Benchmark"). A CPU without a bf16 LSTM runs it in float32 anyway. No
            effect in float32.
        compile: ``torch.compile`` the network up to the decoder (see ``configure_model``).
        sample_prompts: Prompts whose continuations are logged to TensorBoard after each validation.
        sample_words: Words generated per prompt at validation.
        sample_top_k: Top-k used for the validation samples.

    Gradient clipping is the Trainer's job (``trainer.gradient_clip_val: 0.25`` in the configs).
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 200,
        hidden_dim: int = 200,
        num_layers: int = 2,
        tie_weights: bool = True,
        projection: bool | None = None,
        decoder_bias: bool = True,
        dropout_embedding: float = 0.2,
        dropout_lstm: float = 0.2,
        dropout_output: float = 0.2,
        init_range: float = 0.1,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        lr: float = 20.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lr_decay_factor: float = 4.0,
        lr_patience: int = 0,
        embedding_init: str | None = None,
        freeze_embedding: bool = False,
        loss: Literal["full", "sampled"] = "full",
        num_sampled: int = 1024,
        sampler: Literal["log_uniform", "unigram"] = "log_uniform",
        sampler_power: float = 1.0,
        remove_accidental_hits: bool = True,
        bf16_lstm: bool = False,
        compile: bool = False,
        sample_prompts: list[str] | None = None,
        sample_words: int = 30,
        sample_top_k: int | None = 50,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        if min(embedding_dim, hidden_dim, num_layers) < 1:
            raise ValueError(
                f"embedding_dim, hidden_dim and num_layers must be positive, got "
                f"{embedding_dim}, {hidden_dim}, {num_layers}"
            )
        if lr_decay_factor < 1:
            raise ValueError(f"lr_decay_factor divides the learning rate and must be >= 1, got {lr_decay_factor}")
        if loss not in ("full", "sampled"):
            raise ValueError(f"loss must be 'full' or 'sampled', got {loss!r}")
        if loss == "sampled" and not 1 <= num_sampled < vocab_size:
            raise ValueError(
                f"num_sampled must be between 1 and vocab_size - 1 = {vocab_size - 1} for loss='sampled', got "
                f"{num_sampled}; with a vocabulary this small use loss='full'"
            )
        use_projection = hidden_dim != embedding_dim if projection is None else projection
        if tie_weights and not use_projection and hidden_dim != embedding_dim:
            raise ValueError(
                f"tie_weights needs the decoder input to have the embedding's width, but hidden_dim={hidden_dim} "
                f"!= embedding_dim={embedding_dim} and projection=False. Set projection to true (or leave it "
                f"unset: a projection H -> E is then added when the sizes differ), make the sizes equal, or set "
                f"tie_weights to false."
            )

        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.dropout_embedding = nn.Dropout(dropout_embedding)
        self.lstm = nn.LSTM(
            embedding_dim,
            hidden_dim,
            num_layers=num_layers,
            dropout=dropout_lstm if num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.dropout_output = nn.Dropout(dropout_output)
        # Linear (no bias: the decoder has one), so the decoder sees vectors in the embedding's space.
        self.projection = nn.Linear(hidden_dim, embedding_dim, bias=False) if use_projection else None
        self.decoder = nn.Linear(embedding_dim if use_projection else hidden_dim, vocab_size, bias=decoder_bias)
        self._init_weights(init_range)
        if tie_weights:
            self.decoder.weight = self.embedding.weight  # THE tie: one Parameter, used twice.
        if freeze_embedding:
            self.embedding.weight.requires_grad_(False)  # tied: the decoder weight is this same tensor

        # Draws the shared negatives of the sampled softmax (LogUniformSampler has no state; UnigramSampler's
        # tables are buffers, filled from the vocabulary's counts in setup).
        self.sampler = make_sampler(sampler, vocab_size, power=sampler_power) if loss == "sampled" else None

        # Token-weighted mean NLL over a whole split, summed across DDP ranks.
        self.val_nll = TokenNLL()
        self.test_nll = TokenNLL()

        # Truncated-BPTT state, kept out of the state_dict (its shape follows the batch, not the model).
        self._train_hidden: Hidden | None = None
        self._eval_hidden: Hidden | None = None
        self._embedding_initialized = False  # set once embedding_init was applied (or restored)
        self._compiled_features: Any = None
        self._sample_generator: torch.Generator | None = None  # the negatives' own RNG, saved in checkpoints
        self._sample_generator_state: Tensor | None = None  # restored state, applied at the next draw
        self._tps_tokens = 0
        self._tps_start: float | None = None
        # Training loss summed on the device (no host sync per step) since the last progress-bar read
        # and over the epoch, and the steps summed.
        self._interval_loss: Tensor | None = None
        self._epoch_loss: Tensor | None = None
        self._interval_steps = self._epoch_steps = 0
        self.embedding_init_coverage: float | None = None

    # ------------------------------------------------------------------ the network

    def _init_weights(self, init_range: float) -> None:
        nn.init.uniform_(self.embedding.weight, -init_range, init_range)
        nn.init.uniform_(self.decoder.weight, -init_range, init_range)
        if self.decoder.bias is not None:
            nn.init.zeros_(self.decoder.bias)

    @property
    def is_tied(self) -> bool:
        """True while the decoder and the embedding hold the very same Parameter object."""
        return self.decoder.weight is self.embedding.weight

    def tie_weights(self) -> None:
        """Re-establish the tie if something replaced one of the two Parameters.

        Nothing in Lightning or ``.to()`` does, but ``load_state_dict(..., assign=True)`` assigns one new
        Parameter per key, so it is called after every ``load_state_dict``.
        """
        if self.hparams.tie_weights and not self.is_tied:
            self.decoder.weight = self.embedding.weight

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.tie_weights()
        return result

    def _apply(self, fn: Any, recurse: bool = True) -> LSTMLanguageModel:
        # .to()/.cuda()/.double() keep Parameter objects (the tie holds by itself), but a move to or from
        # a device with another tensor type (meta, to_empty) makes a new Parameter per attribute.
        super()._apply(fn, recurse)
        self.tie_weights()
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; the tied matrix counts once (``parameters()`` yields each Parameter once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def input_embeddings(self) -> Tensor:
        """The V x E matrix users keep; with the tie it is also the output embedding."""
        return self.embedding.weight

    def forward(self, inputs: Tensor, hidden: Hidden | None = None) -> tuple[Tensor, Hidden]:
        """Logits ``[B, T, V]`` for ids ``[B, T]``, and the LSTM state after the last step.

        ``hidden=None`` starts from zeros.
        """
        features, hidden = self.features(inputs, hidden)
        return self.decoder(features), hidden

    def features(self, inputs: Tensor, hidden: Hidden | None = None) -> tuple[Tensor, Hidden]:
        """The decoder's inputs ``[B, T, E]`` (the full and the sampled softmax both start here)."""
        if self._compiled_features is not None:
            return self._compiled_features(inputs, hidden)
        return self._features(inputs, hidden)

    def _forward(self, inputs: Tensor, hidden: Hidden | None) -> tuple[Tensor, Hidden]:
        features, hidden = self._features(inputs, hidden)
        return self.decoder(features), hidden

    def _features(self, inputs: Tensor, hidden: Hidden | None) -> tuple[Tensor, Hidden]:
        x = self.dropout_embedding(self.embedding(inputs))
        x, hidden = self._run_lstm(x, hidden)
        # The batch-first LSTM returns a transposed view. Made contiguous (a small B*T x H copy), the
        # decoder adds its bias inside the matrix product (addmm) instead of in a pass over the logits.
        x = self.dropout_output(x.contiguous())
        if self.projection is not None:
            x = self.projection(x)
        return x, hidden

    def _run_lstm(self, x: Tensor, hidden: Hidden | None) -> tuple[Tensor, Hidden]:
        """The LSTM; under bf16 autocast in float32 unless ``bf16_lstm`` (and the CPU, if on one, can).

        A CPU without a bf16 LSTM (e.g. AVX2 without AVX-512) would stop with oneDNN's "could not create a
        primitive descriptor for the LSTM forward propagation primitive". The rest stays in bf16.
        """
        device = x.device.type
        if (
            torch.is_autocast_enabled(device)
            and torch.get_autocast_dtype(device) == torch.bfloat16
            and (not self.hparams.bf16_lstm or (device == "cpu" and not cpu_runs_bf16_lstm()))
        ):
            with torch.autocast(device, enabled=False):
                if hidden is not None:
                    hidden = (hidden[0].float(), hidden[1].float())
                return self.lstm(x.float(), hidden)
        return self.lstm(x, hidden)

    def configure_model(self) -> None:
        """With ``compile: true``, compile the function up to the decoder, not the module.

        Compiling a bound method leaves the module (its state_dict keys, its Parameters, the tie)
        untouched; wrapping the module would prefix every checkpoint key with ``_orig_mod.``. Dynamo runs
        ``nn.LSTM`` itself eagerly (a graph break), so the gain is in the embedding/dropout/projection part;
        the decoder (full or sampled) is one matrix product either way, and on GPU the cuDNN LSTM is
        already one fused kernel.
        """
        if self.hparams.compile and self._compiled_features is None:
            self._compiled_features = torch.compile(self._features)

    # ------------------------------------------------------------------ truncated BPTT state

    def _initial_state(self, stored: Hidden | None, inputs: Tensor) -> Hidden | None:
        """The carried state for a batch, on the batch's device, detached; None (zeros) if it does not fit.

        The batch size is constant within an epoch, but a state restored from a checkpoint may be on
        the CPU, and evaluation uses another batch size, so shape and device are checked here.
        """
        if stored is None:
            return None
        h, c = stored
        if h.size(1) != inputs.size(0) or h.size(0) != self.hparams.num_layers:
            return None
        if not torch.is_autocast_enabled(inputs.device.type):
            dtype = self.lstm.weight_ih_l0.dtype  # e.g. bf16-true: the state follows the weights
            h, c = h.to(dtype), c.to(dtype)
        return h.detach().to(inputs.device), c.detach().to(inputs.device)

    @staticmethod
    def _detach(hidden: Hidden) -> Hidden:
        return hidden[0].detach(), hidden[1].detach()

    def on_train_epoch_start(self) -> None:
        # Lightning does not call this hook when it resumes in the middle of an epoch, so a restored
        # state survives exactly in the one case it must.
        self._train_hidden = None
        self._tps_start = None
        self._interval_loss = self._epoch_loss = None
        self._interval_steps = self._epoch_steps = 0

    def on_validation_epoch_start(self) -> None:
        self._eval_hidden = None

    def on_test_epoch_start(self) -> None:
        self._eval_hidden = None

    def on_predict_epoch_start(self) -> None:
        self._eval_hidden = None

    # ------------------------------------------------------------------ steps

    def _loss(self, logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        # float32 log-softmax whatever the autocast dtype: bf16 has 8 bits of mantissa, too few for a
        # log-sum-exp over tens of thousands of logits.
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction=reduction)

    def _sampled_loss(self, features: Tensor, targets: Tensor) -> Tensor:
        """Sampled softmax over the tied matrix: the decoder's rows for the targets and the shared draws.

        ``self.decoder.weight`` is the embedding's Parameter when tied, so the sampled rows' gradients add
        to the embedding's in the one matrix. The draws come from the module's own generator, whose state
        travels in checkpoints: a resumed run draws what the uninterrupted one would have.
        """
        labels = targets.reshape(-1)
        if self._sample_generator is None or self._sample_generator.device != labels.device:
            self._sample_generator = torch.Generator(device=labels.device)
            # every DDP rank gets the same seed (and so the same draws) after seed_everything
            self._sample_generator.manual_seed(torch.initial_seed())
            if self._sample_generator_state is not None:
                try:
                    self._sample_generator.set_state(self._sample_generator_state)
                except RuntimeError:  # e.g. a CPU generator's state resumed on a GPU
                    rank_zero_warn(
                        "the checkpoint's sampler state does not fit this device: draws restart from the seed"
                    )
                self._sample_generator_state = None
        hp = self.hparams
        sampled = self.sampler(labels, hp.num_sampled, unique=True, generator=self._sample_generator)
        return sampled_softmax_loss(
            self.decoder.weight,
            self.decoder.bias,
            labels,
            features.reshape(-1, features.size(-1)),
            sampled,
            remove_accidental_hits=hp.remove_accidental_hits,
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        features, hidden = self.features(inputs, self._initial_state(self._train_hidden, inputs))
        self._train_hidden = self._detach(hidden)  # the next window starts here; gradients stop here
        if self.hparams.loss == "sampled":
            loss = self._sampled_loss(features, targets)
        else:
            # the fused output layer + cross-entropy (same loss and gradients as self._loss(self.decoder(...)))
            flat = features.reshape(-1, features.size(-1))
            loss = linear_cross_entropy(flat, self.decoder.weight, self.decoder.bias, targets.reshape(-1))
        # Tensors only: Lightning converts them to numbers when it writes to the logger, so nothing
        # here waits for the device.
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log("train/ppl", loss.detach().exp(), on_step=True, on_epoch=False)
        self._accumulate_loss(loss.detach())
        self._count_tokens(targets.numel())
        if self._is_log_step():
            self._log_progress()
            self._log_throughput()
        elif self._trainer is not None and batch_idx + 1 == self.trainer.num_training_batches:
            self._log_progress()  # the epoch's last step: the bar's final value, also in runs shorter than the interval
        return loss

    def _accumulate_loss(self, loss: Tensor) -> None:
        loss = loss.float()
        self._interval_loss = loss if self._interval_loss is None else self._interval_loss + loss
        self._epoch_loss = loss if self._epoch_loss is None else self._epoch_loss + loss
        self._interval_steps += 1
        self._epoch_steps += 1

    def _log_progress(self) -> None:
        """The progress bar's ``loss`` and ``ppl``: the mean over the steps since the last read.

        Read (one host copy) only on logging steps, where Lightning waits for the device anyway, and at the
        end of the epoch's training batches, and logged as a CPU tensor, so the progress bar's conversion to a
        number at every step never waits for the device.
        """
        if self._interval_loss is None:
            return
        mean = self._interval_loss.cpu() / self._interval_steps
        self._interval_loss, self._interval_steps = None, 0
        self.log("loss", mean, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self.log("ppl", mean.exp(), prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def on_train_epoch_end(self) -> None:
        """``train/loss_epoch`` and ``train/ppl_epoch``, the mean over the epoch's steps (on every rank).

        Written at the end of every epoch whatever ``log_every_n_steps`` is, so a run shorter than the
        logging interval still leaves training scalars.
        """
        if self._epoch_loss is None:
            return
        mean = self._epoch_loss / self._epoch_steps
        self.log("train/loss_epoch", mean, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/ppl_epoch", mean.exp(), on_step=False, on_epoch=True, sync_dist=True)

    def _is_log_step(self) -> bool:
        """True on the steps where Lightning writes step metrics to the logger (log_every_n_steps)."""
        if self._trainer is None:
            return False
        return _lightning.is_logging_step(self.trainer)

    def _count_tokens(self, tokens: int) -> None:
        """Tokens trained since the last logging step; the first step after a restart only starts the clock."""
        if self._tps_start is None:
            self._tps_start, self._tps_tokens = time.perf_counter(), 0
        else:
            self._tps_tokens += tokens

    def _log_throughput(self) -> None:
        """Learning rate and tokens/s (all ranks together), on logging steps.

        Both are host numbers logged as CPU tensors: Lightning keeps a logged tensor on its device, so
        neither is copied to the accelerator (a copy that would wait for it). The interval runs from one
        logging step to the next, where Lightning waits for the device to write the step's scalars, so
        over the interval host time is device time. Validation time is excluded (the timer restarts).
        """
        if not self._tps_tokens:
            return  # the clock only started: nothing timed yet
        now = time.perf_counter()
        world = self.trainer.world_size if self._trainer is not None else 1
        tokens_per_sec = torch.tensor(self._tps_tokens * world / (now - self._tps_start))
        self.log("train/tokens_per_sec", tokens_per_sec, on_step=True, on_epoch=False)
        lr = torch.tensor(float(self.trainer.optimizers[0].param_groups[0]["lr"]))
        self.log("lr", lr, on_step=True, on_epoch=False)
        self._tps_start, self._tps_tokens = now, 0

    def _eval_step(self, batch: tuple[Tensor, Tensor], metric: TokenNLL) -> None:
        inputs, targets = batch
        logits, hidden = self(inputs, self._initial_state(self._eval_hidden, inputs))
        self._eval_hidden = self._detach(hidden)
        metric.update(self._loss(logits, targets, reduction="sum"), targets.numel())

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_nll)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_nll)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Log-probability of every target token, ``[B, T]`` (``lm-tying predict`` scores the test split)."""
        inputs, targets = batch
        logits, hidden = self(inputs, self._initial_state(self._eval_hidden, inputs))
        self._eval_hidden = self._detach(hidden)
        return -self._loss(logits, targets, reduction="none").view_as(targets)

    def _log_perplexity(self, stage: str, metric: TokenNLL) -> Tensor:
        """loss = total NLL / total tokens over every token of the split (all ranks); ppl = exp(loss)."""
        loss = metric.compute()  # reduces the sums across DDP ranks, so every rank gets the same value
        metric.reset()
        # sync_dist on a value already equal on all ranks: one scalar all-reduce per epoch, and no warning.
        self.log(f"{stage}/loss", loss, sync_dist=True)
        self.log(f"{stage}/ppl", loss.exp(), prog_bar=True, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val", self.val_nll)
        self._tps_start = None  # do not count validation time in tokens/s
        if not self.trainer.sanity_checking:
            self._log_samples()

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test", self.test_nll)

    # ------------------------------------------------------------------ optimization

    def configure_optimizers(self) -> Any:
        """SGD (default) / Adam / AdamW, and the learning rate divided when val/loss stops improving.

        The schedule is the PyTorch word_language_model example's ("lr /= 4 whenever the validation
        loss is not a new best"): ``ReduceLROnPlateau(factor=1/4, patience=0, threshold=0)``. It runs
        after each validation; without validation it is skipped with a warning (``strict: False``).
        """
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {hp.optimizer!r}")
        if hp.lr_decay_factor == 1:
            return opt
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=1.0 / hp.lr_decay_factor, patience=hp.lr_patience, threshold=0.0
        )
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss", "interval": "epoch", "strict": False},
        }

    # ------------------------------------------------------------------ setup and checkpoints

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if isinstance(self.sampler, UnigramSampler) and self.vocab is not None:
            self.sampler.set_counts(torch.as_tensor(self.vocab.counts))

    def on_fit_start(self) -> None:
        """Apply ``embedding_init`` once, before the first step, and never over a checkpoint's weights.

        Lightning restores a checkpoint (``fit(ckpt_path=...)``) after ``setup`` and before this hook, and
        ``on_load_checkpoint`` marks the embedding as initialized, so a resumed run (or a model from
        ``load_from_checkpoint``) keeps its trained matrix and does not even read the file. Under DDP every
        rank reads the same file, so the ranks stay identical.
        """
        if self.hparams.embedding_init and not self._embedding_initialized:
            self.init_embedding_from(self.hparams.embedding_init)

    def init_embedding_from(self, path: str | os.PathLike) -> float:
        """Copy word vectors into the embedding, row by row *by word*; returns the vocabulary coverage.

        Words of this model's vocabulary missing from the vectors keep their random initialization.
        """
        if self.vocab is None:
            raise RuntimeError("embedding_init needs the model's vocabulary (attach the data module first)")
        words, vectors = load_word_vectors(path)
        if vectors.shape[1] != self.hparams.embedding_dim:
            raise ValueError(
                f"embedding_init {str(path)!r} has {vectors.shape[1]}-dimensional vectors but this model's "
                f"embedding_dim is {self.hparams.embedding_dim}. Set model.embedding_dim to {vectors.shape[1]} "
                f"(hidden_dim may stay as it is: a projection H -> E is added when they differ)."
            )
        source = {w: i for i, w in enumerate(words)}
        rows, src_rows = [], []
        for i, word in enumerate(self.vocab.words):
            j = source.get(word)
            if j is not None:
                rows.append(i)
                src_rows.append(j)
        with torch.no_grad():
            weight = self.embedding.weight
            if rows:
                weight[torch.tensor(rows, device=weight.device)] = vectors[src_rows].to(weight.device, weight.dtype)
        coverage = len(rows) / len(self.vocab)
        self.embedding_init_coverage = coverage
        self._embedding_initialized = True
        rank_zero_info(
            f"embedding_init: {len(rows):,} of {len(self.vocab):,} words ({coverage:.1%}) initialized from {path}"
        )
        if self._trainer is not None and self.logger is not None:
            self.logger.log_metrics({"embedding_init/coverage": coverage}, step=0)
        if coverage < 0.5:
            rank_zero_warn(f"embedding_init covers only {coverage:.1%} of the vocabulary")
        return coverage

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the carried training state (every rank's, under DDP) so that a resume continues exactly."""
        super().on_save_checkpoint(checkpoint)
        hidden = self._train_hidden
        if hidden is not None:
            h, c = (t.detach().float() for t in hidden)
            if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
                # Every rank calls on_save_checkpoint and owns different streams; rank 0 writes the file.
                h, c = self.all_gather(h), self.all_gather(c)  # [world, L, B, H]
            else:
                h, c = h.unsqueeze(0), c.unsqueeze(0)
            hidden = (h.cpu(), c.cpu())
        generator = self._sample_generator
        checkpoint[_CKPT_KEY] = {
            "train_hidden": hidden,
            "embedding_initialized": self._embedding_initialized,
            # the same on every rank (same seed, same number of draws), so rank 0's stands for all
            "sample_generator": generator.get_state() if generator is not None else self._sample_generator_state,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        extra = checkpoint.get(_CKPT_KEY, {})
        # The weights come from the checkpoint: never apply embedding_init on top of them.
        self._embedding_initialized = True
        self._train_hidden = None
        self._sample_generator, self._sample_generator_state = None, extra.get("sample_generator")
        stored = extra.get("train_hidden")
        if stored is None:
            return
        h, c = stored
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        if h.size(0) != world:
            rank_zero_warn(
                f"the checkpoint holds the LSTM state of {h.size(0)} rank(s) but this run has {world}; "
                f"the carried state restarts from zeros (the resumed epoch is not continued exactly)"
            )
            return
        self._train_hidden = (h[rank], c[rank])  # moved to the batch's device at its first use

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        num_words: int = 50,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        allow_unk: bool = True,
    ) -> str:
        """Continue ``prompt`` by sampling ``num_words`` words; returns the prompt and the continuation.

        Args:
            prompt: Words separated by spaces (lower-cased; unknown words read as UNK). Must not be empty.
            num_words: Words to generate.
            temperature: Divides the logits; < 1 is more conservative, 0 means greedy (argmax).
            top_k: Sample only among the k most likely words (None: the whole vocabulary).
            seed: Seed for a private generator, for reproducible samples.
            allow_unk: Whether UNK may be generated.
        """
        if self.vocab is None:
            raise RuntimeError("generate() needs the vocabulary: load the model with load_from_checkpoint")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
        words = prompt.lower().split()
        if not words:
            raise ValueError("the prompt must contain at least one word")
        was_training = self.training
        self.eval()
        try:
            device = self.embedding.weight.device
            generator = torch.Generator(device=device)
            if seed is not None:
                generator.manual_seed(seed)
            else:
                generator.seed()
            ids = torch.as_tensor(self.vocab.encode(words), dtype=torch.long, device=device).unsqueeze(0)
            logits, hidden = self._forward(ids, None)
            out: list[str] = []
            for _ in range(num_words):
                next_logits = logits[0, -1].float()
                if not allow_unk:
                    next_logits[self.vocab.unk_id] = -math.inf
                if temperature == 0:
                    next_id = next_logits.argmax()
                else:
                    next_logits = next_logits / temperature
                    if top_k is not None and top_k < next_logits.numel():
                        kth = torch.topk(next_logits, top_k).values[-1]
                        next_logits = next_logits.masked_fill(next_logits < kth, -math.inf)
                    probs = torch.softmax(next_logits, dim=-1)
                    next_id = torch.multinomial(probs, 1, generator=generator)[0]
                out.append(self.vocab.words[int(next_id)])
                logits, hidden = self._forward(next_id.view(1, 1), hidden)
        finally:
            self.train(was_training)
        return " ".join(words + out)

    def _log_samples(self) -> None:
        """Continuations of ``sample_prompts`` as TensorBoard text (rank 0, TensorBoard only)."""
        prompts = self.hparams.sample_prompts
        if not prompts or self.vocab is None or not self.trainer.is_global_zero:
            return
        loggers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        text = "\n\n".join(
            self.generate(p, num_words=self.hparams.sample_words, top_k=self.hparams.sample_top_k, seed=i)
            for i, p in enumerate(prompts)
        )
        for lg in loggers:
            lg.experiment.add_text("samples", text, global_step=self.global_step)


@functools.cache
def cpu_runs_bf16_lstm() -> bool:
    """Whether this CPU runs ``nn.LSTM`` under bf16 autocast (oneDNN needs bf16 instructions, e.g. AVX-512).

    Probed once with a tiny LSTM: the capability checks oneDNN uses are not public.
    """
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            nn.LSTM(4, 4)(torch.zeros(2, 1, 4))
        return True
    except RuntimeError:
        rank_zero_warn(
            "this CPU cannot run the LSTM in bf16 (oneDNN has no bf16 LSTM for it): under bf16-mixed the "
            "LSTM runs in float32 and the rest in bf16"
        )
        return False


# ---------------------------------------------------------------------- perplexity


class TokenNLL(Metric):
    """Mean negative log-likelihood per token over everything seen: sum of NLL / number of tokens.

    Batches weigh by their tokens (the last, shorter window counts for what it holds), and under DDP
    both sums are added across ranks before the division, so ``exp(compute())`` is the split's exact
    perplexity. (torchmetrics' ``MeanMetric(weight=...)`` would do, but with ``nan_strategy="disable"``,
    the setting that avoids a host sync per batch, torchmetrics 1.9 silently drops the weights.)
    """

    full_state_update = False
    nll_sum: Tensor
    tokens: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, tokens: int) -> None:
        """``nll_sum``: summed NLL of a batch (a device tensor); ``tokens``: how many tokens it covers."""
        self.nll_sum += nll_sum.detach().to(self.nll_sum.dtype)
        self.tokens += tokens  # a Python number added on the device: no host-device copy

    def compute(self) -> Tensor:
        return self.nll_sum / self.tokens


# ---------------------------------------------------------------------- word vectors for embedding_init


def load_word_vectors(path: str | os.PathLike) -> tuple[list[str], Tensor]:
    """Words and a float32 matrix from a checkpoint of this project or a word2vec text/binary file.

    Checkpoints (``.ckpt``/``.pt``/``.pth``) name their model in ``checkpoint["lm_tying_model"]``; the
    vectors are that model's ``input_embeddings()``, its words the checkpoint's vocabulary. Other files
    are read as word2vec format: binary when the name ends in ``.bin``, text otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding_init: no such file {str(path)!r}")
    if path.suffix in {".ckpt", ".pt", ".pth"}:
        from lm_tying.checkpoint import load_model  # the project's one loader of its checkpoints (either model)

        wv = load_model(path).word_vectors()
    else:
        from lm_tying.vectors import WordVectors

        wv = WordVectors.load_word2vec_format(path, binary=path.suffix == ".bin")
    return list(wv.index_to_key), torch.as_tensor(wv.vectors, dtype=torch.float32)
