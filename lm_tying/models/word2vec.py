"""Skip-gram word2vec trained with sampled NCE or negative sampling, as a LightningModule.

The model is two tables and a bias::

    input embedding  E  [V, D]   the word vectors users keep (``input_embeddings()``)
    output weights   W  [V, D]   one "context" vector per word
    output bias      b  [V]

and for a batch of ``(center, context)`` pairs with ``K`` negatives shared by the batch::

    h      = E[center]                                    [B, D]
    s_true = <h, W[context]> + b[context]                 [B]
    s_neg  = h @ W[negatives].T + b[negatives]            [B, K]   (one matmul: why shared negatives are fast)
    loss   = sigmoid CE(s_true, 1) + sum_k sigmoid CE(s_neg_k, 0)     (NCE first subtracts log Q from both)

Three ways to train it, same objective (tests check each against a reference):

* ``fused=True`` (default on CPU with ``optimizer="sgd"``): the gradients of this loss are written out
  by hand and applied with ``index_add_`` straight into the rows the batch used -- word2vec C's update,
  batched. No autograd graph, no sparse gradient tensors, no optimizer pass over 50,000 rows: on a
  2-core CPU this is ~2-3x faster than autograd + sparse SGD. An optimizer object still exists
  (``LearningRateHolder``): it holds the learning rate (so schedulers, ``LearningRateMonitor`` and
  checkpoints work) and lets Lightning count steps; no parameter ever receives a ``.grad``.
* ``sequential=True`` (on CPU, with ``fused``): word2vec C's own SGD, pair after pair, each update
  applied before the next pair reads the tables, in a compiled kernel (``lm_tying/csrc``, built on first
  use by ``lm_tying.native``); torch's threads share the pairs lock-free, as gensim's workers do.
* ``fused=False``: autograd with sparse gradients (``sparse=True``) and any of the optimizers
  ``sgd``, ``adagrad``, ``sparse_adam`` (sparse) or ``adam`` (dense). Used automatically under DDP,
  with dense gradients: fused updates would bypass DDP's gradient all-reduce, and NCCL has no
  all-reduce for sparse tensors.

Training is manual-optimization in every case, so the paths share the step, schedule and logging.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lm_tying import native
from lm_tying.models.base import WordEmbeddingModule
from lm_tying.nce import (
    CandidateSampler,
    LogUniformSampler,
    UnigramSampler,
    accidental_hits,
    negative_sampling_loss,
    nce_loss,
)
from lm_tying.vectors import EVAL_FILES, WordVectors, default_eval_file

DEFAULT_PROBE_WORDS = (
    "one", "american", "war", "king", "france", "computer", "music", "water", "god", "good", "three", "german",
)  # fmt: skip


class Word2Vec(WordEmbeddingModule):
    """Skip-gram word2vec (input embedding, output weights and bias) with NCE or negative sampling."""

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 128,
        loss: Literal["nce", "negative_sampling"] = "nce",
        num_sampled: int = 64,
        sampler: Literal["log_uniform", "unigram"] | None = None,
        sampler_power: float = 0.75,
        unique: bool = True,
        remove_accidental_hits: bool = False,
        negative_weight: float = 1.0,
        share_negatives: int | None = None,
        init: Literal["tutorial", "word2vec"] = "tutorial",
        output_bias: bool = True,
        optimizer: Literal["sgd", "adagrad", "sparse_adam", "adam"] = "sgd",
        lr: float = 1.0,
        reduction: Literal["mean", "sum"] = "mean",
        lr_decay: Literal["none", "linear"] = "none",
        min_lr_ratio: float = 1e-4,
        sparse: bool = True,
        fused: bool | None = None,
        compile: bool = False,
        num_threads: int | None = None,
        hogwild: int = 1,
        update_pairs: int | None = None,
        sequential: bool = False,
        average_loss_every: int = 5000,
        probe_words: list[str] | None = None,
        probe_topn: int = 8,
        evaluate: bool = True,
        eval_analogies: str | None = None,
        eval_pairs: list[str] | None = None,
        eval_restrict_vocab: int = 300_000,
    ) -> None:
        """
        Args:
            vocab_size: Number of words (rows of both tables), UNK included; the CLI links it to the data.
            embedding_dim: Dimension D of the word vectors.
            loss: ``nce`` (tf.nn.nce_loss: log Q correction) or ``negative_sampling`` (Mikolov et al.).
            num_sampled: K, negatives drawn once per batch and shared by all its pairs.
            sampler: Noise distribution: ``log_uniform`` (Zipf over frequency-sorted ids, TF's NCE default)
                or ``unigram`` (corpus counts ** sampler_power). Default: log_uniform for NCE, unigram for
                negative sampling.
            sampler_power: Exponent of the unigram sampler (0.75 as word2vec).
            unique: Draw until K distinct classes (TF's default; expected count 1-(1-p)^tries) instead of
                K draws with replacement (expected count K*p).
            remove_accidental_hits: Ignore sampled classes equal to the example's true class (TF option).
            negative_weight: Weight of each sampled term in the negative-sampling loss; ``n / num_sampled``
                makes K shared samples an unbiased estimate of word2vec's objective with n negatives per pair.
            share_negatives: Pairs that share one draw of negatives. None: the whole batch (tf.nn.nce_loss).
                With large batches and SGD, a whole-batch draw concentrates B pairs' updates on K rows (a
                step B times word2vec's); groups of a few pairs keep word2vec's per-row dynamics while the
                negative logits stay a (batched) matmul. Needs unique=false.
            init: ``tutorial``: E ~ U[0, 1), W ~ truncated normal(std 1/sqrt(D)), b = 0 (the CS20 TF tutorial);
                ``word2vec``: E ~ U[-0.5/D, 0.5/D), W = 0, b = 0 (word2vec C, gensim).
            output_bias: Learn the output bias b (tf.nn.nce_loss has one). False keeps it at zero, as
                word2vec C, which has none.
            optimizer: ``sgd`` (the tutorial's), ``adagrad`` / ``sparse_adam`` (sparse-aware), ``adam`` (dense only).
            lr: Learning rate of the optimised loss (see ``reduction``).
            reduction: Batch reduction of the optimised loss. ``mean`` as tf.reduce_mean (the tutorial's
                lr 1.0 at batch 128); ``sum``: every pair contributes a full step, so ``lr`` is per pair as in
                word2vec C / gensim (0.025) and does not depend on the batch size. Logged losses are means.
            lr_decay: ``linear``: decay to ``lr * min_lr_ratio`` over the run (word2vec C), per step.
            min_lr_ratio: Final fraction of the learning rate with linear decay (word2vec C: 1e-4).
            sparse: Sparse embedding gradients for the autograd path (only the rows a batch uses).
            fused: Hand-written update applied with index_add_ (plain SGD only; see the module docstring).
                Default: on when the optimizer is ``sgd``.
            compile: ``torch.compile`` the per-batch math (helps on GPU; on CPU it needs a C++ compiler).
            num_threads: ``torch.set_num_threads`` at fit start (None leaves torch's default).
            update_pairs: Fused path: apply one SGD update per this many pairs of a batch (of a hogwild
                slice), one after the other (None: one update per batch). Large loader batches with small
                updates: the per-batch costs of Lightning and the data pipeline (~1 ms) are paid once for
                several updates, while the updates stay as small (as stable) as a small batch's. With
                ``sequential``, only how many pairs each kernel call (and each draw of negatives) takes.
            hogwild: Fused path: split each batch into this many slices and apply their updates (each in
                runs of ``update_pairs``) from as many threads at once, without locks, as word2vec C and
                gensim do (each thread runs single-threaded ops, so ``num_threads`` is ignored). Uses
                several cores without OpenMP's per-op barriers (the step alone: 1.3-1.8x one thread on 2
                cores; whole runs here were no faster than OpenMP's threads); rows hit by two slices at
                the same time may lose one update, so runs are not bit-reproducible.
            sequential: Fused path on CPU: train pair after pair, each update applied before the next pair
                reads the tables (word2vec C's and gensim's SGD) instead of batched updates computed from the
                same old values, in a compiled kernel (``lm_tying/csrc/sequential_sgd.cpp``, built on first
                use; without a compiler it warns and keeps the batched step). Groups of pairs are shared
                among torch's threads without locks, as gensim's workers: exact with one thread, not
                bit-reproducible with more. Negative sampling without output bias, ``reduction: sum``.
            average_loss_every: Log ``train/avg_loss``, the mean loss over the last this many steps, and
                print it (the tutorial's "Average loss at step 5000"); 0 disables.
            probe_words: Words whose nearest neighbours are written to TensorBoard at each validation
                (a default list of common words when None; words outside the vocabulary are skipped).
            probe_topn: Neighbours shown per probe word.
            evaluate: Analogy and word-similarity evaluation at each validation.
            eval_analogies: questions-words.txt-format file; None: gensim's copy when gensim is installed.
            eval_pairs: Word-pair similarity files (word1<TAB>word2<TAB>score); None: gensim's
                wordsim353.tsv and simlex999.txt when gensim is installed.
            eval_restrict_vocab: Evaluate analogies/pairs among the first (most frequent) this many words.
        """
        super().__init__()
        self.save_hyperparameters()
        if loss not in ("nce", "negative_sampling"):
            raise ValueError(f"loss={loss!r}: expected 'nce' or 'negative_sampling'")
        if init not in ("tutorial", "word2vec"):
            raise ValueError(f"init={init!r}: expected 'tutorial' or 'word2vec'")
        if optimizer not in ("sgd", "adagrad", "sparse_adam", "adam"):
            raise ValueError(f"optimizer={optimizer!r}: expected 'sgd', 'adagrad', 'sparse_adam' or 'adam'")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")
        if lr_decay not in ("none", "linear"):
            raise ValueError(f"lr_decay={lr_decay!r}: expected 'none' or 'linear'")
        if vocab_size < 2 or embedding_dim < 1 or num_sampled < 1:
            raise ValueError("vocab_size must be >= 2, embedding_dim and num_sampled >= 1")
        if unique and num_sampled > vocab_size:
            raise ValueError(f"unique sampling of num_sampled={num_sampled} classes needs vocab_size >= num_sampled")
        if share_negatives is not None and (share_negatives < 1 or unique):
            raise ValueError("share_negatives needs a positive group size and unique=false (draws with replacement)")
        if optimizer == "adam" and sparse:
            raise ValueError("optimizer='adam' needs dense gradients: set sparse=false, or use 'sparse_adam'")
        if optimizer == "sparse_adam" and not sparse:
            raise ValueError("optimizer='sparse_adam' needs sparse gradients: set sparse=true")
        if fused is None:
            fused = optimizer == "sgd"
        if fused and optimizer != "sgd":
            raise ValueError(f"fused=true implements plain SGD; optimizer={optimizer!r} needs fused=false")
        if update_pairs is not None and (update_pairs < 1 or not fused):
            raise ValueError(f"update_pairs={update_pairs}: needs a value >= 1 and fused=true")
        if sequential and (not fused or loss != "negative_sampling" or output_bias or reduction != "sum" or hogwild > 1):
            raise ValueError(
                "sequential=true is word2vec's per-pair SGD: it needs optimizer 'sgd' (fused), loss "
                "'negative_sampling', output_bias=false, reduction='sum' and hogwild=1 (it uses every thread itself)"
            )
        if hogwild < 1 or (hogwild > 1 and not fused):
            raise ValueError(f"hogwild={hogwild}: needs a value >= 1, and fused=true when above 1")
        self.fused = fused
        self.sparse = sparse
        self.automatic_optimization = False  # both paths step by hand (see the module docstring)

        V, D = vocab_size, embedding_dim
        self.embedding = nn.Parameter(torch.empty(V, D))  # the input vectors (what users keep)
        self.output_weight = nn.Parameter(torch.empty(V, D))
        self.output_bias = nn.Parameter(torch.zeros(V), requires_grad=output_bias)
        self.reset_parameters()

        kind = sampler or ("log_uniform" if loss == "nce" else "unigram")
        if kind == "log_uniform":
            self.sampler: CandidateSampler = LogUniformSampler(V)
        elif kind == "unigram":
            self.sampler = UnigramSampler(V, power=sampler_power)  # counts arrive with the vocabulary (setup)
        else:
            raise ValueError(f"sampler={sampler!r}: expected 'log_uniform' or 'unigram'")

        self.probe_words = list(DEFAULT_PROBE_WORDS if probe_words is None else probe_words)
        self._fused_math = torch.compile(_fused_grads, dynamic=True) if compile else _fused_grads
        self._val_generator: torch.Generator | None = None
        self._pool: Any = None
        self._sequential_kernel: Any = None  # the compiled function, once on_fit_start has built it
        self._reset_windows()

    # ------------------------------------------------------------------------------ parameters
    @torch.no_grad()
    def reset_parameters(self) -> None:
        D = self.hparams.embedding_dim
        if self.hparams.init == "tutorial":
            self.embedding.uniform_(0.0, 1.0)
            std = 1.0 / math.sqrt(D)
            nn.init.trunc_normal_(self.output_weight, std=std, a=-2 * std, b=2 * std)  # TF truncates at 2 std
        else:
            self.embedding.uniform_(-0.5 / D, 0.5 / D)
            self.output_weight.zero_()
        self.output_bias.zero_()

    def input_embeddings(self) -> Tensor:
        return self.embedding

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if isinstance(self.sampler, UnigramSampler) and self.vocab is not None:
            counts = getattr(self.attached_datamodule(), "word_counts", self.vocab.counts)  # UNK 0 if the data drops it
            self.sampler.set_counts(torch.as_tensor(counts))
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and (self.fused or self.sparse):
            if self.hparams.optimizer == "sparse_adam":
                raise ValueError(
                    "optimizer='sparse_adam' cannot run under DDP (gradients must be dense there to be "
                    "all-reduced): use 'adagrad', 'sgd' or 'adam' with sparse=false"
                )
            warnings.warn(
                f"Word2Vec on {world} processes: using autograd with dense gradients (fused={self.fused}, "
                f"sparse={self.sparse} requested). Fused updates would bypass DDP's gradient all-reduce and "
                "sparse gradients cannot be all-reduced by NCCL.",
                stacklevel=2,
            )
            self.fused = False
            self.sparse = False

    # ------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        h = self.hparams
        params = [self.embedding, self.output_weight] + ([self.output_bias] if h.output_bias else [])
        if self.fused:
            opt: torch.optim.Optimizer = LearningRateHolder(params, lr=h.lr)
        elif h.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=h.lr)
        elif h.optimizer == "adagrad":
            opt = torch.optim.Adagrad(params, lr=h.lr)
        elif h.optimizer == "sparse_adam":
            opt = torch.optim.SparseAdam(params, lr=h.lr)
        else:
            opt = torch.optim.Adam(params, lr=h.lr)
        if h.lr_decay == "none":
            return opt
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError("lr_decay='linear' needs a finite run length: set trainer max_steps or max_epochs")

        def linear(step: int) -> float:
            return max(1.0 - step / total, h.min_lr_ratio)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        self._saved_threads = torch.get_num_threads()
        if self.hparams.hogwild > 1:
            from concurrent.futures import ThreadPoolExecutor

            torch.set_num_threads(1)  # one core per hogwild thread
            self._pool = ThreadPoolExecutor(
                self.hparams.hogwild - 1, thread_name_prefix="word2vec-hogwild", initializer=_single_threaded_flushing
            )
        elif self.hparams.num_threads:
            torch.set_num_threads(self.hparams.num_threads)
        # Tiny updates of small weights (word2vec's zero-initialised output layer) produce denormal
        # floats, whose arithmetic is ~100x slower on x86 CPUs; flushing them to zero changes nothing else.
        torch.set_flush_denormal(True)
        if self.hparams.sequential and self.fused:  # (not under DDP, where setup turned fused off)
            if self.device.type != "cpu":
                warnings.warn(f"sequential updates run on CPU: on {self.device.type} the batched step is used", stacklevel=2)
            else:
                rank_zero_info("Word2Vec: loading the compiled per-pair SGD kernel (built once per machine, ~20 s)")
                module = native.sequential_sgd()
                self._sequential_kernel = None if module is None else module.sequential_sgd
        self._reset_windows()

    def on_fit_end(self) -> None:  # leave the process as we found it
        torch.set_num_threads(self._saved_threads)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        torch.set_flush_denormal(False)

    def _reset_windows(self) -> None:
        self._win_loss: Tensor | None = None
        self._win_steps = 0
        self._win_pairs = 0
        self._win_start = time.perf_counter()
        self._avg_loss: Tensor | None = None
        self._avg_steps = 0

    # ------------------------------------------------------------------------------ the loss
    def _sample(self, labels: Tensor, generator: torch.Generator | None = None):
        share = self.hparams.share_negatives
        groups = None if share is None else -(-labels.numel() // share)
        nce = self.hparams.loss == "nce"  # negative sampling does not use expected counts
        return self.sampler(labels, self.hparams.num_sampled, self.hparams.unique, generator, groups, expected_counts=nce)

    def compute_loss(
        self, center: Tensor, context: Tensor, generator: torch.Generator | None = None, reduction: str = "mean"
    ) -> Tensor:
        """The loss of a batch through autograd (sparse gradients when ``sparse``)."""
        h = self.hparams
        sv = self._sample(context, generator)
        inputs = F.embedding(center, self.embedding, sparse=self.sparse)
        bias = self.output_bias if h.output_bias else None
        if h.loss == "nce":
            return nce_loss(
                self.output_weight, bias, context, inputs, sv,
                remove_accidental_hits=h.remove_accidental_hits, reduction=reduction, sparse=self.sparse,
            )  # fmt: skip
        return negative_sampling_loss(
            self.output_weight, bias, context, inputs, sv.sampled,
            negative_weight=h.negative_weight, remove_accidental_hits=h.remove_accidental_hits,
            reduction=reduction, sparse=self.sparse,
        )  # fmt: skip

    @torch.no_grad()
    def fused_sgd_step(
        self,
        center: Tensor,
        context: Tensor,
        lr: float,
        generator: torch.Generator | None = None,
        batch_pairs: int | None = None,
    ) -> Tensor:
        """One SGD step on the batch loss with hand-written gradients; returns the mean loss (detached).

        Identical to ``compute_loss(reduction=...)`` + backward + ``torch.optim.SGD(lr).step()``; the
        matmuls follow autocast (bf16-mixed runs them in bf16, tables and updates stay float32).
        ``batch_pairs``: size of the whole batch when this is one hogwild slice of it (for ``mean``).
        """
        h = self.hparams
        sv = self._sample(context, generator)
        neg = sv.sampled.reshape(-1)
        E, W, b = self.embedding, self.output_weight, self.output_bias
        inputs, w_true = E.index_select(0, center), W.index_select(0, context)
        w_neg = W.index_select(0, neg).view(*sv.sampled.shape, -1)
        b_true = b.index_select(0, context) if h.output_bias else None
        b_neg = b.index_select(0, neg).view(sv.sampled.shape) if h.output_bias else None
        if h.loss == "nce":  # the log Q correction
            log_q_true, log_q_neg = sv.true_expected_count.log(), sv.sampled_expected_count.log()
            b_true = -log_q_true if b_true is None else b_true - log_q_true
            b_neg = -log_q_neg if b_neg is None else b_neg - log_q_neg
            neg_weight = 1.0
        else:
            neg_weight = h.negative_weight
        hits = accidental_hits(context, sv.sampled) if h.remove_accidental_hits else None
        scale = torch.tensor(lr / (batch_pairs or center.numel()) if h.reduction == "mean" else lr, device=center.device)
        d_in, d_true, d_neg, db_true, db_neg, loss_sum = self._fused_math(
            inputs, w_true, w_neg, b_true, b_neg, hits, neg_weight, scale
        )
        # every gradient was computed from the pre-step values above; now apply them (duplicates add up)
        E.index_add_(0, center, d_in)
        W.index_add_(0, context, d_true)
        W.index_add_(0, neg, d_neg)
        if h.output_bias:
            b.index_add_(0, context, db_true)
            b.index_add_(0, neg, db_neg)
        return loss_sum / center.numel()

    @torch.no_grad()
    def sequential_sgd_step(self, center: Tensor, context: Tensor, lr: float, generator: torch.Generator | None = None) -> Tensor:
        """Per-pair SGD over the pairs in order (``sequential=True``; needs ``on_fit_start``'s compiled kernel).

        The negatives are drawn here, one draw per ``share_negatives`` pairs as for the batched step; the
        kernel applies each pair's update before the next pair's. Returns the mean loss of the pairs.
        """
        if self._sequential_kernel is None:
            raise RuntimeError("the sequential kernel is not loaded: it is built at fit start (on CPU, with sequential=true)")
        h = self.hparams
        sampled = self._sample(context, generator).sampled
        negatives = sampled.view(-1, sampled.shape[-1])  # one draw for the whole batch: [K] -> [1, K]
        loss = self._sequential_kernel(
            self.embedding, self.output_weight, center, context, negatives, lr, h.negative_weight, h.remove_accidental_hits
        )
        return loss.float() / center.numel()

    # ------------------------------------------------------------------------------ training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        center, context = batch
        opt = self.optimizers()
        lr = opt.param_groups[0]["lr"]
        if self.fused:
            loss = self._fused_updates(center, context, lr)
            opt.step()  # a no-op update: advances the step count that max_steps and schedulers use
        else:
            loss = self.compute_loss(center, context, reduction=self.hparams.reduction)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt.step()
            loss = loss.detach() / (center.numel() if self.hparams.reduction == "sum" else 1)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self._log_train(loss, center.numel(), lr)
        return loss

    def _fused_updates(self, center: Tensor, context: Tensor, lr: float) -> Tensor:
        """The batch's fused SGD updates, ``hogwild`` slices at once; returns the mean loss.

        The main thread applies the first slice itself and waits for the others: while the threads
        work, no Python-heavy code (Lightning's loop, the data pipeline) competes with them for the GIL,
        which each of them needs between two tensor ops.
        """
        h = self.hparams
        whole = None if h.update_pairs else center.numel()  # no update_pairs: the slices make one update
        slices = list(zip(center.chunk(h.hogwild), context.chunk(h.hogwild)))
        others = [self._pool.submit(self._apply_slice, c, x, lr, whole) for c, x in slices[1:]]
        losses = [self._apply_slice(*slices[0], lr, whole)] + [job.result() for job in others]
        return sum(losses) / center.numel()

    def _apply_slice(self, center: Tensor, context: Tensor, lr: float, batch_pairs: int | None) -> Tensor:
        """Fused SGD steps (or sequential passes) on consecutive runs of ``update_pairs`` pairs; returns
        their summed loss."""
        size = self.hparams.update_pairs or center.numel()
        losses = []
        for c, x in zip(center.split(size), context.split(size)):
            if self._sequential_kernel is not None:
                losses.append(self.sequential_sgd_step(c, x, lr) * c.numel())
            else:
                losses.append(self.fused_sgd_step(c, x, lr, None, batch_pairs) * c.numel())
        return sum(losses)

    def _log_train(self, loss: Tensor, pairs: int, lr: float) -> None:
        """Loss, lr and throughput averaged over the trainer's logging window; no per-step sync."""
        self._win_loss = loss if self._win_loss is None else self._win_loss + loss
        self._win_steps += 1
        self._win_pairs += pairs
        every = self.hparams.average_loss_every
        if every:
            self._avg_loss = loss if self._avg_loss is None else self._avg_loss + loss
            self._avg_steps += 1
            if self._avg_steps == every:
                avg = float(self._avg_loss) / every
                # straight to the loggers: written at this step even when it is not a logging step
                for logger in self.loggers:
                    logger.log_metrics({"train/avg_loss": avg}, step=self.global_step)
                self.print(f"Average loss at step {self.global_step}: {avg:.3f}")
                self._avg_loss, self._avg_steps = None, 0
        log_every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if self.global_step % max(log_every, 1) != 0:
            return
        now = time.perf_counter()
        world = self.trainer.world_size if self._trainer is not None else 1
        if not math.isfinite(float(self._win_loss)):
            raise FloatingPointError(
                f"Word2Vec diverged (training loss {float(self._win_loss)} at step {self.global_step}): lower "
                f"model.lr (now {self.hparams.lr}) or data.batch_size -- with reduction='sum' a frequent word "
                "gets the summed step of all its occurrences in a batch"
            )
        self.log("train/loss", self._win_loss / self._win_steps, on_step=True, on_epoch=False, prog_bar=True)
        self.log("lr", lr, on_step=True, on_epoch=False)
        self.log("train/pairs_per_sec", world * self._win_pairs / max(now - self._win_start, 1e-9), on_step=True, on_epoch=False)
        self._win_loss, self._win_steps, self._win_pairs, self._win_start = None, 0, 0, now

    # ------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        # the same negatives at every validation, so val/loss is comparable across epochs
        self._val_generator = torch.Generator(device=self.device).manual_seed(1234)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        if self._trainer is not None and self.trainer.sanity_checking:
            return
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_step(self, stage: str, batch: tuple[Tensor, Tensor]) -> None:
        center, context = batch
        loss = self.compute_loss(center, context, self._val_generator)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=center.numel(), sync_dist=True)

    def _eval_epoch_end(self, stage: str) -> None:
        if self.vocab is None:
            return
        wv = self.word_vectors()
        self._log_neighbours(wv)
        if self.hparams.evaluate:
            for name, value in self.evaluate(wv).items():
                self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True)

    @torch.no_grad()
    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Probability the model gives each ``(center, context)`` pair of being a true pair: sigmoid(score)."""
        center, context = batch
        score = (self.embedding[center] * self.output_weight[context]).sum(-1)
        if self.hparams.output_bias:
            score = score + self.output_bias[context]
        return torch.sigmoid(score.float())

    def _log_neighbours(self, wv: WordVectors) -> None:
        words = [w for w in self.probe_words if w in wv]
        if not words or not isinstance(self.logger, TensorBoardLogger):
            return
        lines = ["| word | nearest neighbours |", "| --- | --- |"]
        for w in words:
            near = ", ".join(f"{n} ({s:.2f})" for n, s in wv.most_similar(w, topn=self.hparams.probe_topn))
            lines.append(f"| {w} | {near} |")
        self.logger.experiment.add_text("nearest_neighbours", "\n".join(lines), self.global_step)

    def evaluate(self, wv: WordVectors | None = None) -> dict[str, float]:
        """Analogy accuracy and Spearman correlations on the configured (or gensim's) files."""
        wv = wv or self.word_vectors()
        h = self.hparams
        out: dict[str, float] = {}
        analogies = h.eval_analogies or _gensim_file_or_none(EVAL_FILES["analogies"])
        if analogies:
            acc, sections = wv.evaluate_word_analogies(analogies, restrict_vocab=h.eval_restrict_vocab)
            out["analogy_acc"] = acc
            out["analogy_coverage"] = sections[-1]["coverage"]
        pair_files = h.eval_pairs
        if pair_files is None:
            pair_files = [p for p in (_gensim_file_or_none(EVAL_FILES[k]) for k in ("wordsim353", "simlex999")) if p]
        for path in pair_files:
            name = _stem(path)
            try:
                _, spearman, _ = wv.evaluate_word_pairs(path, restrict_vocab=h.eval_restrict_vocab)
            except ValueError as err:  # e.g. a tiny vocabulary covering fewer than 2 pairs
                warnings.warn(f"skipping {path}: {err}", stacklevel=2)
                continue
            out[f"{name}_spearman"] = spearman
        return out

    # ------------------------------------------------------------------------------ gensim-like API
    def most_similar(self, positive: Any = None, negative: Any = None, topn: int = 10) -> list[tuple[str, float]]:
        return self.word_vectors().most_similar(positive, negative, topn)

    def evaluate_word_analogies(self, path: str | None = None, **kwargs: Any) -> tuple[float, list[dict]]:
        return self.word_vectors().evaluate_word_analogies(path, **kwargs)

    def evaluate_word_pairs(self, path: str | None = None, **kwargs: Any) -> tuple[float, float, float]:
        return self.word_vectors().evaluate_word_pairs(path, **kwargs)


class LearningRateHolder(torch.optim.SGD):
    """The optimizer of the fused path: it holds the learning rate (for schedulers, ``LearningRateMonitor``
    and checkpoints) and lets Lightning count steps; ``Word2Vec.fused_sgd_step`` applies the update.

    A plain ``torch.optim.SGD`` (same state dict, so checkpoints load into either) whose ``step`` skips the
    pass over parameters that never receive a ``.grad`` (~0.1-1 ms of Python per step).
    """

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return closure() if closure is not None else None


def _fused_grads(
    inputs: Tensor,
    w_true: Tensor,
    w_neg: Tensor,
    b_true: Tensor | None,
    b_neg: Tensor | None,
    hits: Tensor | None,
    neg_weight: float,
    scale: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The SGD updates (already multiplied by ``-lr``) of the sampled sigmoid loss, from gathered rows.

    ``w_neg``/``b_neg`` are ``[K, D]``/``[K]`` (negatives shared by the batch) or ``[n, K, D]``/``[n, K]``
    (one draw per group of ``ceil(B / n)`` consecutive pairs); the biases (None: zero) carry NCE's log Q
    correction. With ``s_true = <x, w_t> + b_t`` and ``s_neg = x W_n^T + b_n``::

        loss       = softplus(-s_true) + neg_weight * sum_k softplus(s_neg_k)
        dL/ds_true = sigmoid(s_true) - 1,    dL/ds_neg = neg_weight * sigmoid(s_neg)
        dL/dx = dL/ds_true * w_t + dL/ds_neg @ W_n,   dL/dw_t = dL/ds_true * x,   dL/dW_n = dL/ds_neg^T @ x

    ``inputs`` and ``w_true`` must be the caller's gathered copies: they are overwritten (with ``d_true``
    and ``dL/ds_true * w_t``), which saves two passes over ``[B, D]`` memory -- on a CPU this step is
    bound by memory traffic and, with several threads, by the number of ops (Python holds the GIL
    between them), so it is written with as few ops and temporaries as the math allows.
    Returns ``(d_inputs [B, D], d_w_true [B, D], d_w_neg [n*K, D], d_b_true [B], d_b_neg [n*K], loss_sum)``.
    """
    if w_neg.dim() == 2:  # shared by the batch: one group
        w_neg, b_neg = w_neg.unsqueeze(0), None if b_neg is None else b_neg.unsqueeze(0)
    n, K, D = w_neg.shape
    B = inputs.shape[0]
    G = -(-B // n)
    pad = n * G - B

    def grouped(rows: Tensor) -> Tensor:  # [B, D] -> [n, G, D], zero rows padding the last group
        return (F.pad(rows, (0, 0, 0, pad)) if pad else rows).view(n, G, D)

    x = grouped(inputs)
    s_true = torch.linalg.vecdot(inputs, w_true)
    s_neg = torch.bmm(x, w_neg.transpose(1, 2)).float()  # [n, G, K]; matmuls follow autocast
    if b_true is not None:
        s_true = s_true + b_true
    if b_neg is not None:
        s_neg = s_neg + b_neg.unsqueeze(1)
    loss_neg = F.softplus(s_neg)
    g_neg = torch.sigmoid(s_neg)
    if hits is not None or pad:  # accidental hits (as if logit -inf) and padding: no loss, no gradient
        drop = torch.zeros(n * G, K, dtype=torch.bool, device=inputs.device)
        if hits is not None:
            drop[:B] = hits
        drop[B:] = True
        drop = drop.view(n, G, K)
        loss_neg = loss_neg.masked_fill(drop, 0.0)
        g_neg = g_neg.masked_fill(drop, 0.0)
    loss_sum = F.softplus(-s_true).sum() + neg_weight * loss_neg.sum()

    g_true = torch.sigmoid(s_true).sub_(1.0).mul_(-scale)
    g_neg = g_neg.mul_(-scale * neg_weight)
    d_neg = torch.bmm(g_neg.transpose(1, 2), x).float().view(n * K, D)  # before x (= inputs) is overwritten
    d_in = torch.baddbmm(grouped(w_true.mul_(g_true.unsqueeze(1))), g_neg, w_neg).float().view(n * G, D)[:B]
    d_true = inputs.mul_(g_true.unsqueeze(1))
    return d_in, d_true, d_neg, g_true, g_neg.sum(1).view(n * K), loss_sum.detach()


def _single_threaded_flushing() -> None:
    """Start of a hogwild thread: OpenMP team size and denormal flushing are per-thread settings."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def _gensim_file_or_none(name: str) -> str | None:
    try:
        return default_eval_file(name)
    except FileNotFoundError:
        return None


def _stem(path: str) -> str:
    import os

    return os.path.splitext(os.path.basename(path))[0]
