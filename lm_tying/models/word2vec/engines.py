"""How word2vec's updates are applied: one engine per way, chosen once by :func:`choose_engine`.

Every engine trains the same objective (``Word2Vec.compute_loss``) with SGD-like updates and returns the
batch's mean loss. They differ in how an update is computed:

* :class:`SequentialEngine` -- word2vec C's and gensim's SGD: pair after pair, each pair's update applied
  before the next pair reads the tables, in the compiled CPU kernel ``lm_tying/csrc/sequential_sgd.cpp``. ``lr`` is
  per pair (needs ``reduction: sum``); the kernel's own threads share the pairs lock-free (Hogwild!, as
  gensim's workers): exact with one thread. Negative sampling without output bias only; CPU only.
* :class:`BatchedEngine` -- the gradients of ``update_pairs`` pairs written out by hand, all from the same
  old values, applied with ``index_add_`` to the rows they touch: a handful of tensor ops per update, on any
  device and precision (the matmuls follow autocast), any loss. Exactly one ``torch.optim.SGD`` step of the
  autograd loss (tested).
* :class:`AutogradEngine` -- autograd and a torch optimizer (``sgd``, ``adagrad``, ``sparse_adam``,
  ``adam``), one backward and optimizer step per ``update_pairs`` pairs.

Under DDP, the sequential and batched engines run on each rank's shard and :class:`SummedDeltas` adds up
the ranks' changes after each batch (an all-reduce through Lightning's strategy), so every pair keeps its
full per-pair step as in one process; autograd relies on DDP's gradient all-reduce.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lm_tying import native
from lm_tying.nce import UnigramSampler, accidental_hits

if TYPE_CHECKING:
    from lm_tying.models.word2vec.model import Word2Vec

Update = Literal["auto", "sequential", "batched", "autograd"]

# The batched engine's update size when ``lr`` is per pair (reduction: sum) and none is given: one update
# of a whole batch (262,144 pairs in configs/word2vec.yaml) would move a frequent word's row by the sum of
# thousands of per-pair steps.
BATCHED_SUM_UPDATE_PAIRS = 4096
# Below this many pairs per update (per kernel call), one thread: the work is shorter than the cost of
# waking and joining a second thread, which grows to milliseconds when another process holds the cores.
MIN_PAIRS_PER_THREAD = 16384


class EngineError(ValueError):
    """A requested update engine that cannot run with these settings."""


@dataclass(frozen=True)
class EngineChoice:
    """What :func:`choose_engine` decided, and why (logged once at setup)."""

    update: Literal["sequential", "batched", "autograd"]
    update_pairs: int | None  # pairs per update (per kernel call); None: the whole batch
    sum_deltas: bool  # DDP: all-reduce the ranks' parameter changes after each batch
    reason: str


def kernel_loss_requirements(hparams: Any) -> list[str]:
    """The settings under which the compiled kernel computes the model's loss that ``hparams`` does not have."""
    missing = []
    if hparams.loss != "negative_sampling":
        missing.append("loss: negative_sampling")
    if hparams.output_bias:
        missing.append("output_bias: false")
    return missing


def sequential_requirements(hparams: Any) -> list[str]:
    """The settings the compiled per-pair kernel needs to train that ``hparams`` does not have: its loss's, and SGD
    with a step per pair."""
    missing = [] if hparams.optimizer == "sgd" else ["optimizer: sgd"]
    missing += kernel_loss_requirements(hparams)
    if hparams.reduction != "sum":
        missing.append("reduction: sum")
    return missing


def choose_engine(hparams: dict[str, Any], device: torch.device, world_size: int) -> EngineChoice:
    """The one place that decides how updates are applied, from the settings, the device and the strategy.

    ``auto``: the compiled per-pair kernel on CPU when the settings allow it and it builds, the batched
    step otherwise (GPU, NCE, an output bias, a mean loss), autograd for optimizers other than SGD. A
    requested engine that cannot work raises :class:`EngineError` saying why.
    """
    h = hparams
    update = h["update"]  # (``h.update`` is the dict method of Lightning's AttributeDict)
    cpu = device.type == "cpu"
    if update == "auto":
        if h.optimizer != "sgd":
            update, reason = "autograd", f"optimizer {h.optimizer!r} needs autograd"
        elif not cpu:
            update, reason = "batched", f"on {device.type} (the per-pair kernel is CPU-only)"
        elif missing := sequential_requirements(h):
            update, reason = "batched", "per-pair kernel needs " + ", ".join(missing)
        elif native.library() is None:
            update, reason = "batched", "the per-pair kernel could not be built (see the warning above)"
        else:
            update, reason = "sequential", "CPU, per-pair SGD in the compiled kernel"
    else:
        reason = "requested"
        if update in ("sequential", "batched") and h.optimizer != "sgd":
            raise EngineError(
                f"update={update!r} applies plain SGD; optimizer={h.optimizer!r} needs update: autograd (or auto)"
            )
        if update == "sequential":
            if not cpu:
                raise EngineError(f"update='sequential' runs on CPU only; on {device.type} use update: batched (or auto)")
            missing = sequential_requirements(h)
            if missing:
                raise EngineError("update='sequential' (the per-pair kernel) needs " + ", ".join(missing))
            if native.library() is None:
                raise EngineError(
                    "update='sequential': the compiled kernel could not be built (see the warning above); "
                    "install a C++ compiler (or set CXX), or use update: batched"
                )
    if world_size > 1 and update == "autograd" and h.optimizer == "sparse_adam":
        raise EngineError(
            "optimizer='sparse_adam' cannot run under DDP (its gradients must be dense to be all-reduced): "
            "use 'sgd', 'adagrad' or 'adam'"
        )
    update_pairs = h.update_pairs
    if update_pairs is None and update != "sequential" and h.reduction == "sum":
        update_pairs = BATCHED_SUM_UPDATE_PAIRS  # lr is per pair: keep each update small (see above)
    return EngineChoice(update, update_pairs, sum_deltas=world_size > 1 and update != "autograd", reason=reason)


def choose_threads(requested: int | None, pairs_per_update: int | None, processes_per_machine: int) -> int:
    """Torch threads for training: ``requested``, else one for small updates and the machine's cores
    shared among this machine's processes for large ones."""
    if requested is not None:
        if requested < 1:
            raise EngineError(f"threads={requested}: expected a positive number of threads or null (auto)")
        return requested
    if pairs_per_update is not None and pairs_per_update < MIN_PAIRS_PER_THREAD:
        return 1
    return native.cores_per_process(processes_per_machine)


# ---------------------------------------------------------------------------------------------- engines
class Engine:
    """Applies the updates of one training batch and returns its mean loss (detached)."""

    def __init__(self, model: Word2Vec, update_pairs: int | None) -> None:
        self.model = model
        self.update_pairs = update_pairs

    def optimizer(self, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
        return LearningRateHolder(params, lr=lr)

    def train_batch(self, center: Tensor, context: Tensor, optimizer: Any) -> Tensor:
        """Updates of ``update_pairs`` pairs in order at the optimizer's lr; ``optimizer.step()`` once (Lightning's
        wrapper counts the step)."""
        lr = optimizer.param_groups[0]["lr"]
        size = self.update_pairs or center.numel()
        loss = sum(self.update(c, x, lr) * c.numel() for c, x in zip(center.split(size), context.split(size)))
        optimizer.step()
        return loss / center.numel()

    def update(self, center: Tensor, context: Tensor, lr: float, generator: torch.Generator | None = None) -> Tensor:
        """One update on these pairs, outside Lightning's optimizer step (nothing counts it); returns their mean
        loss."""
        raise NotImplementedError

    def begin_batch(self) -> None:
        """Called before the first ``train_batch`` of a loader batch (several with ``step_per_update``)."""

    def end_batch(self) -> None:
        """Called after the last ``train_batch`` of a loader batch."""


class AdaptiveThreads:
    """The kernel's thread count under ``threads: null``: ``most``, or one while one is measured faster.

    On a shared machine a second thread does not always help: while other work holds part of the cores (another
    process, or a busy host running a VM's virtual cores on fewer physical ones), the two threads' calls can take
    longer than one thread's, for seconds at a time (README, "Threads"). Every call's speed is measured; the
    other count is measured again after ``check[count]`` calls (one thread first at the third call, after two warm
    calls on ``most``) and taken when its check is faster than the current count's latest call, or when two calls
    in a row on the current count were slower than the other's latest (one slow call is often a hiccup). A check
    costs one call at the slower count."""

    def __init__(self, most: int, check_one: int = 64, check_most: int = 8) -> None:
        self.most = most
        self.check = {1: check_one, most: check_most}
        self.since = {1: check_one - 2, most: 0}  # calls since each count was last measured
        self.rate: dict[int, float] = {}  # pairs/s of each count's latest call
        self.current = most
        self.slower = 0  # the current count's calls in a row slower than the other's latest
        self.calls = {1: 0, most: 0}  # calls on each count as the current one
        self.checks = {1: 0, most: 0}  # and as a check

    def __call__(self) -> int:
        """The thread count of the next call."""
        other = 1 if self.current == self.most else self.most
        return other if self.since[other] >= self.check[other] else self.current

    def record(self, threads: int, pairs: int, seconds: float) -> None:
        """A call on ``threads`` threads trained ``pairs`` pairs in ``seconds``."""
        current = threads == self.current
        (self.calls if current else self.checks)[threads] += 1
        for count in self.since:
            self.since[count] = 0 if count == threads else self.since[count] + 1
        if pairs <= 0 or seconds <= 0:
            return
        self.rate[threads] = pairs / seconds
        other = 1 if threads == self.most else self.most
        faster = other in self.rate and self.rate[threads] > self.rate[other]
        if not current:
            if faster:  # the check beat the current count's latest call
                self.current, self.slower = threads, 0
        elif other in self.rate and not faster:
            self.slower += 1
            if self.slower >= 2:
                self.current, self.slower = other, 0
        else:
            self.slower = 0


class SequentialEngine(Engine):
    """Per-pair SGD in the compiled CPU kernel (see the module docstring), on ``threads`` threads of its own, or
    as many as :class:`AdaptiveThreads` finds faster (``adaptive``, with ``threads`` at most)."""

    def __init__(self, model: Word2Vec, update_pairs: int | None, threads: int, adaptive: bool = False) -> None:
        super().__init__(model, update_pairs)
        module = native.library()
        if module is None:
            raise EngineError("the compiled per-pair kernel could not be built (see the warning above)")
        self.kernel = module.sequential_sgd
        self.threads = threads
        self.adaptive = AdaptiveThreads(threads) if adaptive and threads > 1 else None

    @torch.no_grad()
    def update(self, center: Tensor, context: Tensor, lr: float, generator: torch.Generator | None = None) -> Tensor:
        threads = self.threads if self.adaptive is None else self.adaptive()
        start = time.perf_counter()
        loss = kernel_pass(self.kernel, self.model, center, context, lr, generator, threads)
        if self.adaptive is not None:
            self.adaptive.record(threads, center.numel(), time.perf_counter() - start)
        return loss


def kernel_pass(
    kernel: Callable[..., Tensor], model: Word2Vec, center: Tensor, context: Tensor, lr: float,
    generator: torch.Generator | None, threads: int,
) -> Tensor:  # fmt: skip
    """One call of the compiled kernel on these pairs at ``lr`` (0: the loss alone, nothing written); their mean
    loss, each pair's taken before its own update.

    Grouped draws from the unigram sampler are made by the kernel, from a seed drawn from torch's generator (so the
    checkpointed RNG state fixes them); other draws (one shared by the batch, log-uniform) by the sampler."""
    m, h, groups = model, model.hparams, model.negative_groups(center.numel())
    if groups is not None and isinstance(m.sampler, UnigramSampler):
        seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
        negatives = native.AliasDraws(m.sampler.alias_accept, m.sampler.alias, groups, h.num_sampled, seed)
    else:
        sampled = m.sample_negatives(context, generator).sampled
        negatives = sampled.view(-1, sampled.shape[-1])  # one draw for the whole batch: [K] -> [1, K]
    loss = kernel(m.embedding, m.output_weight, center, context, negatives, lr, h.negative_weight,
                  h.remove_accidental_hits, threads)  # fmt: skip
    return loss.float() / center.numel()


@torch.no_grad()
def kernel_loss(model: Word2Vec, center: Tensor, context: Tensor, generator: torch.Generator | None) -> Tensor | None:
    """The mean loss of these pairs at the current tables, scored by the compiled kernel (at lr 0) where it computes
    this model's loss: faster than :meth:`Word2Vec.compute_loss`, whose row gathers (~0.5 GB for an evaluation
    batch of 262,144 pairs) are most of its time. None elsewhere (a GPU, NCE, an output bias, no compiler)."""
    table = model.output_weight
    if table.device.type != "cpu" or table.dtype != torch.float32 or kernel_loss_requirements(model.hparams):
        return None
    library = native.library()
    if library is None:
        return None
    processes = model.trainer.num_devices if model._trainer is not None else 1
    threads = choose_threads(None, center.numel(), processes)
    return kernel_pass(library.sequential_sgd, model, center, context, 0.0, generator, threads)


class BatchedEngine(Engine):
    """Hand-written SGD updates of ``update_pairs`` pairs, each computed from the same old values."""

    def __init__(self, model: Word2Vec, update_pairs: int | None) -> None:
        super().__init__(model, update_pairs)
        self.math = torch.compile(batched_sgd_updates, dynamic=True) if model.hparams.compile else batched_sgd_updates

    @torch.no_grad()
    def update(self, center: Tensor, context: Tensor, lr: float, generator: torch.Generator | None = None) -> Tensor:
        """Identical to ``compute_loss(reduction=...)`` + backward + ``torch.optim.SGD(lr).step()``."""
        m, h = self.model, self.model.hparams
        sv = m.sample_negatives(context, generator)
        neg = sv.sampled.reshape(-1)
        E, W, b = m.embedding, m.output_weight, m.output_bias
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
        scale = torch.tensor(lr / center.numel() if h.reduction == "mean" else lr, device=center.device)
        d_in, d_true, d_neg, db_true, db_neg, loss_sum = self.math(
            inputs, w_true, w_neg, b_true, b_neg, hits, neg_weight, scale
        )
        # every gradient was computed from the pre-update values above; now apply them (duplicates add up)
        E.index_add_(0, center, d_in)
        W.index_add_(0, context, d_true)
        W.index_add_(0, neg, d_neg)
        if h.output_bias:
            b.index_add_(0, context, db_true)
            b.index_add_(0, neg, db_neg)
        return loss_sum / center.numel()


class AutogradEngine(Engine):
    """Autograd and a torch optimizer: one backward and step per ``update_pairs`` pairs."""

    def __init__(self, model: Word2Vec, update_pairs: int | None, sparse: bool) -> None:
        super().__init__(model, update_pairs)
        self.sparse = sparse

    def optimizer(self, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
        name = self.model.hparams.optimizer
        kinds: dict[str, Callable[..., torch.optim.Optimizer]] = {
            "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "sparse_adam": torch.optim.SparseAdam,
            "adam": torch.optim.Adam,
        }  # fmt: skip
        self.bare_optimizer = kinds[name](params, lr=lr)  # what ``update`` steps (Lightning wraps this one)
        return self.bare_optimizer

    def update(self, center: Tensor, context: Tensor, lr: float, generator: torch.Generator | None = None) -> Tensor:
        """One backward and step of the bare optimizer, at its own lr (the one the caller read)."""
        return self._backward_and_step(center, context, self.bare_optimizer, generator)

    def train_batch(self, center: Tensor, context: Tensor, optimizer: Any) -> Tensor:
        size = self.update_pairs or center.numel()
        chunks = list(zip(center.split(size), context.split(size)))
        total = center.new_zeros((), dtype=torch.float32)
        for i, (c, x) in enumerate(chunks):
            # Lightning counts a step at each step of its optimizer wrapper: the last update steps through it
            last = i == len(chunks) - 1
            total += self._backward_and_step(c, x, optimizer if last else self.bare_optimizer) * c.numel()
        return total / center.numel()

    def _backward_and_step(
        self, center: Tensor, context: Tensor, optimizer: Any, generator: torch.Generator | None = None
    ) -> Tensor:
        m, reduction = self.model, self.model.hparams.reduction
        loss = m.compute_loss(center, context, generator, reduction=reduction, sparse=self.sparse)
        optimizer.zero_grad(set_to_none=True)
        m.manual_backward(loss)
        optimizer.step()
        return loss.detach().float() / (center.numel() if reduction == "sum" else 1)


class SummedDeltas(Engine):
    """DDP for the engines that write the tables themselves: each rank updates its copy from its shard, then
    the ranks' changes are combined (one all-reduce) and added to the tables as they were before the batch;
    the ranks end every batch with identical tables.

    ``merge="sum"`` keeps every pair's full step (``lr`` per pair as in one process); ``"mean"`` gives a row
    changed by several ranks the mean of their changes (each rank's change of a frequent word's row is
    already a whole batch of steps towards the same target, so their sum overshoots) and a row changed by
    one rank that rank's change.
    """

    def __init__(self, inner: Engine, all_reduce_sum: Callable[[Tensor], Tensor], merge: str) -> None:
        super().__init__(inner.model, inner.update_pairs)
        self.inner = inner
        self.all_reduce_sum = all_reduce_sum
        self.merge = merge
        self.before: list[Tensor] | None = None

    def update(self, center: Tensor, context: Tensor, lr: float, generator: torch.Generator | None = None) -> Tensor:
        return self.inner.update(center, context, lr, generator)

    def train_batch(self, center: Tensor, context: Tensor, optimizer: Any) -> Tensor:
        return self.inner.train_batch(center, context, optimizer)

    @torch.no_grad()
    def begin_batch(self) -> None:
        tables = self.model.trained_tables()
        if self.before is None:
            self.before = [t.detach().clone() for t in tables]
        else:
            for b, t in zip(self.before, tables):
                b.copy_(t)

    @torch.no_grad()
    def end_batch(self) -> None:
        tables = self.model.trained_tables()
        deltas = [t - b for t, b in zip(tables, self.before)]
        parts = [d.view(-1) for d in deltas]
        if self.merge == "mean":  # and how many ranks changed each row
            parts += [(d != 0).view(d.shape[0], -1).any(1).to(d.dtype) for d in deltas]
        flat = self.all_reduce_sum(torch.cat(parts))
        combined, offset = [], 0
        for d in deltas:
            combined.append(flat[offset : offset + d.numel()].view_as(d))
            offset += d.numel()
        if self.merge == "mean":
            for c in combined:
                ranks = flat[offset : offset + c.shape[0]].clamp(min=1)
                c.div_(ranks.view(-1, *[1] * (c.dim() - 1)))
                offset += c.shape[0]
        for t, b, c in zip(tables, self.before, combined):
            torch.add(b, c, out=t)


class LearningRateHolder(torch.optim.SGD):
    """The optimizer of the engines that apply updates themselves: it holds the learning rate (for
    schedulers, ``LearningRateMonitor`` and checkpoints) and lets Lightning count steps.

    A plain ``torch.optim.SGD`` (same state dict) whose ``step`` skips the pass over parameters that never
    receive a ``.grad``.
    """

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return closure() if closure is not None else None


def batched_sgd_updates(
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

    ``inputs`` and ``w_true`` must be the caller's gathered copies: they are overwritten, which saves two
    passes over ``[B, D]`` memory (on a CPU this step is bound by memory traffic and the number of ops).
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


def build_engine(
    choice: EngineChoice, model: Word2Vec, all_reduce_sum: Callable[[Tensor], Tensor] | None, threads: int,
    adaptive: bool = False,
) -> Engine:  # fmt: skip
    """The engine ``choice`` names, wrapped in :class:`SummedDeltas` when it must sum the ranks' changes;
    ``threads``: the compiled kernel's (the other engines run on torch's), at most that many with ``adaptive``."""
    if choice.update == "sequential":
        engine: Engine = SequentialEngine(model, choice.update_pairs, threads, adaptive)
    elif choice.update == "batched":
        engine = BatchedEngine(model, choice.update_pairs)
    else:  # dense gradients under DDP: they are all-reduced, which not every backend does for sparse ones
        engine = AutogradEngine(model, choice.update_pairs, sparse=model.hparams.sparse and all_reduce_sum is None)
    if choice.sum_deltas:
        assert all_reduce_sum is not None
        engine = SummedDeltas(engine, all_reduce_sum, model.hparams.ddp_merge)
    return engine
