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

How the updates are applied is the job of an engine (``engines.py``), picked once at setup by the
``update`` setting: the compiled per-pair kernel on CPU, hand-written batched updates on GPU, autograd
for optimizers other than SGD. Training is manual-optimization with every engine, so they share the
step, schedule and logging.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Literal

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lm_tying import _lightning
from lm_tying.models.base import WordEmbeddingModule
from lm_tying.models.word2vec.engines import (
    AdaptiveThreads,
    Engine,
    EngineChoice,
    Update,
    build_engine,
    choose_engine,
    choose_threads,
    kernel_loss,
)
from lm_tying.nce import (
    CandidateSampler,
    LogUniformSampler,
    SampledValues,
    UnigramSampler,
    negative_sampling_loss,
    nce_loss,
)
from lm_tying.vectors import EVAL_FILES, WordVectors, default_eval_file

TRAIN_STATE_KEY = "word2vec_train_state"  # checkpoint entry of Word2Vec.on_save_checkpoint

DEFAULT_PROBE_WORDS = (
    "one", "american", "war", "king", "france", "computer", "music", "water", "god", "good", "three", "german",
)  # fmt: skip


def auto_lr(words_trained: int) -> float:
    """``lr: auto``: word2vec's per-pair learning rate for a run that trains on ``words_trained`` words (the
    training split's size times the passes over it). 0.05 up to 10M (text8-head's 1.9M words 5 times, where it
    beats word2vec's 0.025), 0.0125 from 80M (text8's 15.3M words 5 times, or text8-head's 40 times, where 0.025
    and above lose analogies and SimLex-999), a power law through both between (README, "word2vec")."""
    return 0.05 * min(1.0, max(0.25, (1e7 / max(words_trained, 1)) ** (2 / 3)))


class Word2Vec(WordEmbeddingModule):
    """Skip-gram word2vec (input embedding, output weights and bias) with NCE or negative sampling."""

    # what FiniteGuard (the CLI's divergence check) advises when the training loss becomes non-finite
    divergence_levers = (
        "lower the learning rate (--model.init_args.lr) or the pairs per update (--model.init_args.update_pairs): "
        "with reduction='sum' a frequent word gets the summed step of all its occurrences in an update"
    )

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
        lr: float | Literal["auto"] = 1.0,
        reduction: Literal["mean", "sum"] = "mean",
        lr_decay: Literal["none", "linear"] = "none",
        min_lr_ratio: float = 1e-4,
        update: Update = "auto",
        update_pairs: int | None = None,
        threads: int | None = None,
        step_per_update: bool = False,
        ddp_merge: Literal["sum", "mean"] = "sum",
        sparse: bool = True,
        compile: bool = False,
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
                With large batches, a whole-batch draw concentrates B pairs' updates on K rows; groups of a
                few pairs keep word2vec's per-row dynamics. Needs unique=false.
            init: ``tutorial``: E ~ U[0, 1), W ~ truncated normal(std 1/sqrt(D)), b = 0 (the CS20 TF tutorial);
                ``word2vec``: E ~ U[-0.5/D, 0.5/D), W = 0, b = 0 (word2vec C, gensim).
            output_bias: Learn the output bias b (tf.nn.nce_loss has one). False keeps it at zero, as
                word2vec C, which has none.
            optimizer: ``sgd`` (the tutorial's), ``adagrad`` / ``sparse_adam`` (sparse-aware), ``adam``
                (dense only); all but ``sgd`` train through ``update: autograd``.
            lr: Learning rate of the optimised loss (see ``reduction``). ``auto`` (with ``reduction: sum``): the
                per-pair rate for the words the run trains on (the training split times the Trainer's
                ``max_epochs``; once when the run is bounded by steps alone), :func:`auto_lr`.
            reduction: Batch reduction of the optimised loss. ``mean`` as tf.reduce_mean (the tutorial's
                lr 1.0 at batch 128); ``sum``: every pair contributes a full step, so ``lr`` is per pair as in
                word2vec C / gensim (0.025) and does not depend on the batch size. Logged losses are means.
            lr_decay: ``linear``: decay to ``lr * min_lr_ratio`` over the run (word2vec C), per step.
            min_lr_ratio: Final fraction of the learning rate with linear decay (word2vec C: 1e-4).
            update: How updates are applied (``engines.py``): ``sequential`` (per-pair SGD in the compiled
                CPU kernel, as word2vec C), ``batched`` (hand-written SGD updates of ``update_pairs`` pairs
                from the same old values; any device), ``autograd`` (any optimizer), or ``auto``: sequential
                on CPU when the loss allows it, batched otherwise, autograd for optimizers other than SGD.
                Chosen once at setup and logged; under DDP the ranks' changes are summed after each batch.
            update_pairs: Pairs per update (per kernel call for ``sequential``). None: the whole batch, except
                for the batched and autograd engines with ``reduction: sum``, which then update every 4,096
                pairs (a whole large batch summed into one step would diverge).
            threads: Threads while training: torch's, or the sequential kernel's own (torch then keeps one). None:
                one for updates of fewer than 16,384 pairs (a second thread costs more than it brings, and much
                more on a busy machine), else the cores of the machine shared among its processes, and for the
                sequential kernel one while its calls are measured faster on one (other work holding the cores;
                ``engines.AdaptiveThreads``; a validation inside fit then evaluates on one torch thread too).
                The sequential kernel's threads update the tables lock-free (as gensim's workers):
                bit-reproducible with ``threads: 1``.
            step_per_update: Count every update of ``update_pairs`` pairs as a training step: ``max_steps``, the
                lr schedule, the "Average loss at step N" table and checkpoint intervals count updates. A large
                loader batch then carries many small updates, with the maths and figures of one batch per
                update and without the framework's cost per batch or per step (Lightning's loop and optimizer
                step, logging, the loader); a run that ``max_steps`` stops inside a batch resumes with the
                updates it left. Needs ``update_pairs``; with ``lr_decay: linear``, ``max_steps``.
            ddp_merge: DDP with the sequential and batched engines: how the ranks' changes to a row are combined
                after each batch. ``sum``: every pair keeps its full step, as in one process; ``mean``: a row
                changed by several ranks gets the mean of their changes, a row changed by one rank its change.
            sparse: Sparse embedding gradients for the autograd engine (only the rows a batch uses; dense
                under DDP, where gradients are all-reduced).
            compile: ``torch.compile`` the batched engine's math (helps on GPU; on CPU it needs a C++ compiler).
            average_loss_every: Log ``train/avg_loss``, the mean loss over the last this many steps, and
                print it (the tutorial's "Average loss at step 5000"); 0 disables.
            probe_words: Words whose nearest neighbours are written to TensorBoard at each validation
                (a default list of common words when None; words outside the vocabulary are skipped).
            probe_topn: Neighbours shown per probe word.
            evaluate: Analogy and word-similarity evaluation at each validation.
            eval_analogies: questions-words.txt-format file; None: the standard one (gensim's copy when gensim is
                installed, else downloaded by ``lm-tying fit`` into ``~/.cache/lm_tying/eval`` once).
            eval_pairs: Word-pair similarity files (word1<TAB>word2<TAB>score); None: the standard
                wordsim353.tsv and simlex999.txt (found as ``eval_analogies``'s).
            eval_restrict_vocab: Evaluate analogies/pairs among the first (most frequent) this many words.
        """
        super().__init__()
        self.save_hyperparameters()
        _check_choice("loss", loss, ("nce", "negative_sampling"))
        _check_choice("init", init, ("tutorial", "word2vec"))
        _check_choice("optimizer", optimizer, ("sgd", "adagrad", "sparse_adam", "adam"))
        _check_choice("reduction", reduction, ("mean", "sum"))
        _check_choice("lr_decay", lr_decay, ("none", "linear"))
        _check_choice("update", update, ("auto", "sequential", "batched", "autograd"))
        _check_choice("ddp_merge", ddp_merge, ("sum", "mean"))
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
        if update_pairs is not None and update_pairs < 1:
            raise ValueError(f"update_pairs={update_pairs}: expected a positive number of pairs or null")
        if step_per_update and update_pairs is None:
            raise ValueError("step_per_update=true counts updates of update_pairs pairs as steps: set update_pairs")
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads}: expected a positive number of threads or null (auto)")
        if lr == "auto" and reduction != "sum":
            raise ValueError("lr='auto' is a per-pair rate: it needs reduction='sum' (or give lr a number)")
        if lr != "auto" and not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr={lr!r}: expected a positive number or 'auto'")
        self.automatic_optimization = False  # every engine steps by hand

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
        self.engine: Engine | None = None  # chosen at setup (choose_engine)
        self.engine_choice: EngineChoice | None = None
        self._decay_steps: float | None = None  # the linear decay's length, read once training has started
        self._val_generator: torch.Generator | None = None
        self._reset_train_state()
        self._reset_log_window()

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

    def trained_tables(self) -> list[Tensor]:
        """The parameters training changes (the output bias only when it is learned)."""
        return [self.embedding, self.output_weight] + ([self.output_bias] if self.hparams.output_bias else [])

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if isinstance(self.sampler, UnigramSampler) and self.vocab is not None:
            counts = getattr(self.attached_datamodule(), "word_counts", self.vocab.counts)  # UNK 0 if the data drops it
            self.sampler.set_counts(torch.as_tensor(counts))
        if stage != "fit" or self._trainer is None:
            return
        self._reset_train_state()  # before a resumed fit restores it (on_load_checkpoint)
        strategy, world = self.trainer.strategy, self.trainer.world_size
        self.engine_choice = choose_engine(self.hparams, strategy.root_device, world)
        all_reduce_sum = (lambda t: strategy.reduce(t, reduce_op="sum")) if world > 1 else None
        batch = getattr(self.attached_datamodule(), "batch_size", None)
        pairs = self.engine_choice.update_pairs or batch
        pairs = None if pairs is None or batch is None else min(pairs, batch)
        self._threads = choose_threads(self.hparams.threads, pairs, self.trainer.num_devices)
        adapt = self.hparams.threads is None  # auto: at most that many, fewer while fewer are measured faster
        self.engine = build_engine(self.engine_choice, self, all_reduce_sum, self._threads, adapt)
        c = self.engine_choice
        whose = "kernel" if c.update == "sequential" else "torch"
        adaptive = self._adaptive_threads() is not None
        rank_zero_info(
            f"Word2Vec: update engine '{c.update}' ({c.reason}); "
            + (f"updates of {c.update_pairs:,} pairs" if c.update_pairs else "one update per batch")
            + (f"; {world} processes {'sum' if self.hparams.ddp_merge == 'sum' else 'average'} their changes after "
               "each batch" if c.sum_deltas else "")
            + (f"; {self._threads} {whose} thread(s)" if strategy.root_device.type == "cpu" else "")
            + (" (one while one is measured faster)" if adaptive else "")
        )

    # ------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        h = self.hparams
        opt = self.engine.optimizer(self.trained_tables(), self._learning_rate())  # engine: chosen in setup("fit")
        if h.lr_decay == "none":
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._linear_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _learning_rate(self) -> float:
        if self.hparams.lr != "auto":
            return self.hparams.lr
        split_tokens = getattr(self.attached_datamodule(), "split_tokens", None)
        if split_tokens is None:
            raise ValueError(
                "lr='auto' takes the rate from the training split's size, which needs the project's DataModule: "
                "give a number (--model.init_args.lr 0.025)"
            )
        words = len(split_tokens("train"))
        max_epochs = self.trainer.max_epochs
        passes = max_epochs if max_epochs is not None and max_epochs > 0 else 1  # a run bounded by steps: one
        lr = auto_lr(words * passes)
        rank_zero_info(
            f"Word2Vec: lr auto: {lr:.4g} per pair for {words * passes:,} words trained "
            f"({passes} pass{'es' if passes > 1 else ''} over a training split of {words:,})"
        )
        return lr

    def _linear_decay(self, step: int) -> float:
        """word2vec's linear decay. The run's length is read at the first scheduler step, after a resumed
        fit has restored the training loader's position (reading it in ``configure_optimizers`` would build
        the loader before the checkpoint is loaded, and the resumed epoch would start again at batch 0)."""
        if step == 0:
            return 1.0
        if self._decay_steps is None:
            total = self.trainer.max_steps if self.hparams.step_per_update else self.trainer.estimated_stepping_batches
            if not math.isfinite(total) or total <= 0:
                raise ValueError("lr_decay='linear' needs a finite run length: set trainer max_steps or max_epochs")
            self._decay_steps = total
        return max(1.0 - step / self._decay_steps, self.hparams.min_lr_ratio)

    def on_fit_start(self) -> None:
        self._saved_threads = torch.get_num_threads()
        self._use_training_threads()
        # Tiny updates of small weights (word2vec's zero-initialised output layer) produce denormal
        # floats, whose arithmetic is ~100x slower on x86 CPUs; flushing them to zero changes nothing else.
        torch.set_flush_denormal(True)
        self._reset_log_window()

    def on_fit_end(self) -> None:  # leave the process as we found it
        torch.set_num_threads(self._saved_threads)
        torch.set_flush_denormal(False)
        adaptive = self._adaptive_threads()
        if adaptive is not None and adaptive.calls[1]:
            calls = sum(adaptive.calls.values()) + sum(adaptive.checks.values())
            rank_zero_info(
                f"Word2Vec: the kernel ran {adaptive.calls[1]} of its {calls} calls on one thread, measured faster "
                f"then than {adaptive.most} (other work was holding the cores)"
            )

    def _adaptive_threads(self) -> AdaptiveThreads | None:
        """The sequential engine's thread count chooser (``threads: null``), inside a DDP wrapper or not."""
        engine = getattr(self.engine, "inner", self.engine)
        return getattr(engine, "adaptive", None)

    def _use_training_threads(self) -> None:
        if self.device.type == "cpu":
            # The compiled kernel runs threads of its own; torch's, spinning for a while after each of the few
            # torch ops between its calls, would take their cores (5-10 % measured). Torch gets one thread then.
            torch.set_num_threads(1 if self.engine_choice.update == "sequential" else self._threads)

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":  # the evaluation's matmuls get the process's threads back
            adaptive = self._adaptive_threads()
            # but one while the kernel measures one faster: what holds the cores back slows torch's threads too
            busy = adaptive is not None and adaptive.current == 1
            torch.set_num_threads(1 if busy else self._saved_threads)

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "fit":
            self._use_training_threads()

    def _reset_log_window(self) -> None:
        """The window of ``train/loss``, ``lr`` and ``train/pairs_per_sec`` (``trainer.log_every_n_steps``)."""
        self._win_loss: Tensor | float = 0.0
        self._win_steps = 0
        self._win_pairs = 0
        self._win_start = time.perf_counter()

    def _reset_train_state(self) -> None:
        """What a checkpoint carries besides weights and loops: the open "Average loss at step N" window and the
        updates of the last batch that ``max_steps`` left untrained (``step_per_update``)."""
        self._avg_loss: Tensor | float = 0.0
        self._avg_steps = 0
        self._pending: list[tuple[Tensor, Tensor]] = []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # Under DDP a checkpoint holds one rank's state: each rank's untrained updates differ, so they are
        # dropped there (as a batch cut by max_steps always was); in one process a resumed fit trains them first.
        pending = self._pending if self._trainer is None or self.trainer.world_size == 1 else []
        checkpoint[TRAIN_STATE_KEY] = {
            "avg_loss": float(self._avg_loss),
            "avg_steps": self._avg_steps,
            "pending": [(c.cpu(), x.cpu()) for c, x in pending],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(TRAIN_STATE_KEY)
        if state is None or self._trainer is None:  # no trainer: a model loaded for use, not a fit resumed
            return
        self._avg_loss, self._avg_steps, self._pending = state["avg_loss"], state["avg_steps"], list(state["pending"])

    # ------------------------------------------------------------------------------ the loss
    def negative_groups(self, pairs: int) -> int | None:
        """How many draws of negatives a batch of ``pairs`` gets: one per ``share_negatives`` pairs (None: one draw
        shared by the whole batch)."""
        share = self.hparams.share_negatives
        return None if share is None else -(-pairs // share)

    def sample_negatives(self, labels: Tensor, generator: torch.Generator | None = None) -> SampledValues:
        """The negatives of a batch: one draw per ``share_negatives`` pairs (None: one for the batch)."""
        groups = self.negative_groups(labels.numel())
        nce = self.hparams.loss == "nce"  # negative sampling does not use expected counts
        return self.sampler(labels, self.hparams.num_sampled, self.hparams.unique, generator, groups, expected_counts=nce)

    def compute_loss(
        self,
        center: Tensor,
        context: Tensor,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        sparse: bool = False,
    ) -> Tensor:
        """The loss of a batch through autograd (``sparse``: sparse gradients of the rows it uses)."""
        h = self.hparams
        sv = self.sample_negatives(context, generator)
        inputs = nn.functional.embedding(center, self.embedding, sparse=sparse)
        bias = self.output_bias if h.output_bias else None
        if h.loss == "nce":
            return nce_loss(
                self.output_weight, bias, context, inputs, sv,
                remove_accidental_hits=h.remove_accidental_hits, reduction=reduction, sparse=sparse,
            )  # fmt: skip
        return negative_sampling_loss(
            self.output_weight, bias, context, inputs, sv.sampled,
            negative_weight=h.negative_weight, remove_accidental_hits=h.remove_accidental_hits,
            reduction=reduction, sparse=sparse,
        )  # fmt: skip

    # ------------------------------------------------------------------------------ training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        center, context = batch
        opt, sched = self.optimizers(), self.lr_schedulers()
        first_step = self.global_step
        self.engine.begin_batch()
        if self.hparams.step_per_update:
            losses, lr, pairs = self._updates_as_steps(center, context, opt, sched)
        else:
            lr, pairs = opt.param_groups[0]["lr"], center.numel()
            losses = [self.engine.train_batch(center, context, opt)]  # one optimizer step: Lightning counts it
            if sched is not None:
                sched.step()
        self.engine.end_batch()
        loss = torch.stack(losses)
        self._log_train(loss, first_step, pairs, lr)
        return loss.mean()

    def _updates_as_steps(
        self, center: Tensor, context: Tensor, opt: Any, sched: Any
    ) -> tuple[list[Tensor], float, int]:
        """``step_per_update``: each update of ``update_pairs`` pairs is a step at its own lr. Only the last goes
        through Lightning's optimizer step (its machinery costs more than a 128-pair update); the others are
        applied by the engine directly and counted with ``_lightning.count_optimizer_steps``, so ``global_step``,
        ``max_steps``, checkpoints and resume count updates. Returns each update's mean loss in order, the last
        update's lr and the pairs trained."""
        size = self.hparams.update_pairs
        updates = [(c.to(center.device), x.to(center.device)) for c, x in self._pending]  # from a resumed checkpoint
        updates += zip(center.split(size), context.split(size))
        count = len(updates)
        if self.trainer.world_size > 1:  # a shorter last batch on one rank: all ranks step alike
            count = int(self.trainer.strategy.reduce(torch.tensor(count, device=center.device), reduce_op="max"))
        if self.trainer.max_steps > 0:
            count = min(count, self.trainer.max_steps - self.global_step)
        self._pending = updates[count:]  # what max_steps leaves of this batch: a resumed fit trains it first
        group, losses = opt.param_groups[0], []
        for i in range(count - 1):
            if i < len(updates):  # else nothing is left of this rank's batch: a step without pairs
                losses.append(self.engine.update(*updates[i], group["lr"]))
            if sched is not None:
                sched.step()
        _lightning.count_optimizer_steps(self.trainer, count - 1)
        lr = group["lr"]
        if count <= len(updates):
            losses.append(self.engine.train_batch(*updates[count - 1], opt))  # Lightning's step counts this one
        else:
            opt.step()
        if sched is not None:
            sched.step()
        return losses, lr, sum(c.numel() for c, _ in updates[:count])

    def _log_train(self, losses: Tensor, first_step: int, pairs: int, lr: float) -> None:
        """The batch's update losses (steps ``first_step + 1``...) into the "Average loss at step N" window, and
        into the logging window of loss, lr and throughput; one host sync per closed window, none per step."""
        losses = losses.double()  # window sums in any grouping print the same table
        every, start = self.hparams.average_loss_every, 0
        if every:
            for end_step in range(every * (first_step // every + 1), first_step + len(losses) + 1, every):
                end = end_step - first_step
                self._avg_loss = self._avg_loss + losses[start:end].sum()
                self._avg_steps += end - start
                avg = float(self._avg_loss) / self._avg_steps
                for logger in self.loggers:  # at this step, whichever step Lightning is logging at
                    logger.log_metrics({"train/avg_loss": avg}, step=end_step)
                self.print(f"Average loss at step {end_step}: {avg:.3f}")
                self._avg_loss, self._avg_steps, start = 0.0, 0, end
            if start < len(losses):
                self._avg_loss = self._avg_loss + losses[start:].sum()
                self._avg_steps += len(losses) - start
        self._win_loss = self._win_loss + losses.sum()
        self._win_steps += len(losses)
        self._win_pairs += pairs
        step = self.global_step
        log_every = max(self.trainer.log_every_n_steps, 1)
        if first_step // log_every == step // log_every:  # no multiple of log_every crossed
            return
        seconds = max(time.perf_counter() - self._win_start, 1e-9)
        metrics = {
            "train/loss": float(self._win_loss) / max(self._win_steps, 1),
            "lr": lr,
            "train/pairs_per_sec": self.trainer.world_size * self._win_pairs / seconds,
        }
        # to the loggers at the step (a batch may carry many steps), saved as Lightning saves what it logs; the
        # progress bar shows loss and pairs/s
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()
        for name, value in metrics.items():
            self.log(name, value, on_step=True, on_epoch=False, prog_bar=name != "lr", logger=False)
        self._reset_log_window()

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
        loss = kernel_loss(self, center, context, self._val_generator)
        if loss is None:
            loss = self.compute_loss(center, context, self._val_generator)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=center.numel(), sync_dist=True)

    def _eval_epoch_end(self, stage: str) -> None:
        if self.vocab is None:
            return
        wv = self.word_vectors()
        self._log_neighbours(wv)
        if self.hparams.evaluate:
            for name, value in self.evaluate(wv).items():
                self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, sync_dist=True)  # equal on every rank

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
        """Analogy accuracy and Spearman correlations on the configured (or the standard) files."""
        wv = wv or self.word_vectors()
        h = self.hparams
        out: dict[str, float] = {}
        analogies = h.eval_analogies or _eval_file_or_none(EVAL_FILES["analogies"])
        if analogies:
            acc, sections = wv.evaluate_word_analogies(analogies, restrict_vocab=h.eval_restrict_vocab)
            out["analogy_acc"] = acc
            out["analogy_coverage"] = sections[-1]["coverage"]
        pair_files = h.eval_pairs
        if pair_files is None:
            pair_files = [p for p in (_eval_file_or_none(EVAL_FILES[k]) for k in ("wordsim353", "simlex999")) if p]
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


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(repr(a) for a in allowed)}")


def _eval_file_or_none(name: str) -> str | None:
    """A standard evaluation file if at hand (gensim's, or downloaded before training by the CLI): an evaluation
    never waits on the network."""
    try:
        return default_eval_file(name, download=False)
    except FileNotFoundError:
        return None


def _stem(path: str) -> str:
    import os

    return os.path.splitext(os.path.basename(path))[0]
