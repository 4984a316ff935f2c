"""Candidate samplers and the sampled losses: NCE and negative sampling (word2vec), sampled softmax (the LM);
and the LM's full softmax fused with its output layer for training (``linear_cross_entropy``).

Everything here follows TensorFlow's ``tf.nn.nce_loss`` / ``tf.random.*_candidate_sampler`` semantics,
written as plain tensor math so each step can be checked against the formulas:

* A sampler draws ``num_sampled`` classes **once per batch**; all examples share them.
* The *expected count* of a class is how often it is expected to appear among the draws:
  ``num_sampled * p`` for sampling with replacement (``unique=False``), and
  ``1 - (1 - p) ** num_tries`` for ``unique=True``, where the sampler kept drawing
  (``num_tries`` draws in total) until it had ``num_sampled`` distinct classes.
* NCE subtracts ``log(expected count)`` from the true and the sampled logits (the "log Q" correction),
  applies the sigmoid cross-entropy with target 1 for the true class and 0 for the sampled ones, sums
  over those ``num_true + num_sampled`` terms and averages over the batch.
* Negative sampling (Mikolov et al., 2013) is the same objective *without* the log Q correction,
  with noise drawn from the unigram distribution raised to the power 0.75.

Samplers are ``nn.Module``s whose tables are buffers: they move with the model (``.to(device)``),
are saved in checkpoints, and keep float64 precision even when the model is cast to a low precision
(a bf16 cumulative distribution over 50,000 words would be useless). Sampling uses the global torch RNG
of the target device unless an explicit ``torch.Generator`` is passed, so ``seed_everything`` makes runs
reproducible.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SampledValues",
    "CandidateSampler",
    "LogUniformSampler",
    "UnigramSampler",
    "make_sampler",
    "gather_rows",
    "sampled_logits",
    "grouped_matmul",
    "expand_groups",
    "accidental_hits",
    "nce_loss",
    "negative_sampling_loss",
    "sampled_softmax_loss",
    "linear_cross_entropy",
]


class SampledValues(NamedTuple):
    """What a candidate sampler returns, as TF's ``sampled_values`` triple."""

    sampled: Tensor  # LongTensor[num_sampled] (shared by the batch) or [groups, num_sampled]
    true_expected_count: Tensor | None  # float32, shape of labels (None when not asked for)
    sampled_expected_count: Tensor | None  # float32, shape of sampled
    num_tries: int  # draws made (== num_sampled unless unique=True)


def _first_occurrence(x: Tensor) -> Tensor:
    """Boolean mask marking the first position at which each value of the 1-D tensor ``x`` occurs.

    Why a stable sort: among equal values the earliest position comes first, so "differs from its
    sorted predecessor" is exactly "first occurrence" -- vectorised, no Python loop over draws.
    """
    sorted_x, order = torch.sort(x, stable=True)
    first_sorted = torch.ones_like(sorted_x, dtype=torch.bool)
    first_sorted[1:] = sorted_x[1:] != sorted_x[:-1]
    mask = torch.empty_like(first_sorted)
    mask[order] = first_sorted
    return mask


class CandidateSampler(nn.Module):
    """Base class: i.i.d. draws from a fixed distribution ``p`` over ``[0, num_classes)``.

    Subclasses implement :meth:`log_prob` (float64) and :meth:`draw`. This class adds TF's
    ``unique`` sampling and the expected counts that the NCE correction needs.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)

    # --- to implement -------------------------------------------------------------------------
    def log_prob(self, ids: Tensor) -> Tensor:
        """log p(ids) in float64."""
        raise NotImplementedError

    def draw(self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``n`` i.i.d. class ids (LongTensor[n])."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------
    def probs(self, device: torch.device | str | None = None) -> Tensor:
        """The full distribution p (float64[num_classes])."""
        return self.log_prob(torch.arange(self.num_classes, device=device)).exp()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # Follow device moves but keep the float64 tables float64 under .half()/.to(bfloat16):
        # low-precision probabilities would bias both the draws and the log Q correction.
        saved = {k: b for k, b in self._buffers.items() if b is not None and b.dtype == torch.float64}
        super()._apply(fn, recurse)
        for k, b in saved.items():
            new = self._buffers[k]
            if new is not None and new.dtype != torch.float64:
                self._buffers[k] = b.to(new.device)
        return self

    def sample(
        self,
        num_sampled: int,
        unique: bool = True,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, int]:
        """Draw the shared negatives: returns ``(ids[num_sampled], num_tries)``.

        ``unique=False``: ``num_sampled`` draws with replacement, ``num_tries == num_sampled``.
        ``unique=True``: keep drawing until ``num_sampled`` distinct classes were seen; ids are the
        distinct classes in the order of their first draw and ``num_tries`` counts all draws (TF).
        Vectorised: draws come in chunks that are *extended* (never redrawn, which would bias
        ``num_tries`` towards short runs) until enough distinct classes appeared.
        """
        if num_sampled < 1:
            raise ValueError(f"num_sampled must be >= 1, got {num_sampled}")
        if not unique:
            return self.draw(num_sampled, device, generator), num_sampled
        if num_sampled > self.num_classes:
            raise ValueError(
                f"unique sampling of {num_sampled} distinct classes is impossible with {self.num_classes} classes"
            )
        draws = self.draw(max(2 * num_sampled, 16), device, generator)
        while True:
            first = _first_occurrence(draws)
            distinct = torch.cumsum(first, 0)
            if int(distinct[-1]) >= num_sampled:
                # the draw that brought the num_sampled-th new class ends the run
                num_tries = int(torch.searchsorted(distinct, torch.tensor(num_sampled, device=distinct.device))) + 1
                kept = draws[:num_tries]
                return kept[first[:num_tries]], num_tries
            draws = torch.cat([draws, self.draw(draws.numel(), device, generator)])

    def expected_count(self, ids: Tensor, num_sampled: int, num_tries: int, unique: bool) -> Tensor:
        """Expected number of times each class of ``ids`` appears among the sampled candidates (float32).

        unique=False: ``num_sampled * p``; unique=True: ``1 - (1 - p) ** num_tries``
        (computed as ``-expm1(num_tries * log1p(-p))`` for accuracy at small p, as TF does).
        """
        p = self.log_prob(ids).exp()
        if unique:
            count = -torch.expm1(num_tries * torch.log1p(-p))
        else:
            count = num_sampled * p
        return count.float()

    def forward(
        self,
        labels: Tensor,
        num_sampled: int,
        unique: bool = True,
        generator: torch.Generator | None = None,
        groups: int | None = None,
        expected_counts: bool = True,
    ) -> SampledValues:
        """Sample negatives for a batch with true ``labels`` and return TF's sampled_values.

        ``groups=None``: one draw of ``num_sampled`` shared by the whole batch (``sampled`` is ``[K]``),
        as tf.nn.nce_loss. ``groups=n``: ``n`` independent draws (``sampled`` is ``[n, K]``), each shared
        by one of ``n`` consecutive groups of the batch -- smaller groups spread the negative updates over
        more rows (see ``sampled_logits``); needs ``unique=False``. ``expected_counts=False`` skips
        the counts (negative sampling does not use them).
        """
        if groups is None:
            sampled, num_tries = self.sample(num_sampled, unique, labels.device, generator)
        else:
            if unique:
                raise ValueError("grouped negatives (groups=n) are drawn with replacement: use unique=False")
            sampled, num_tries = self.draw(groups * num_sampled, labels.device, generator).view(groups, num_sampled), num_sampled
        if not expected_counts:
            return SampledValues(sampled, None, None, num_tries)
        return SampledValues(
            sampled,
            self.expected_count(labels, num_sampled, num_tries, unique),
            self.expected_count(sampled, num_sampled, num_tries, unique),
            num_tries,
        )


class LogUniformSampler(CandidateSampler):
    """Zipfian sampler over frequency-sorted ids: ``P(k) = log((k + 2) / (k + 1)) / log(V + 1)``.

    TF's ``log_uniform_candidate_sampler`` and the default for NCE. Drawn by inverting the CDF
    ``F(k) = log(k + 2) / log(V + 1)``: ``k = floor(exp(u * log(V + 1))) - 1`` with ``u ~ U[0, 1)``;
    no table is needed.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.log_range = math.log(num_classes + 1)

    def log_prob(self, ids: Tensor) -> Tensor:
        k = ids.to(torch.float64)
        return torch.log(torch.log1p(1.0 / (k + 1.0)) / self.log_range)

    def draw(self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
        if generator is not None:
            device = generator.device
        u = torch.rand(n, dtype=torch.float64, device=device, generator=generator)
        k = torch.floor(torch.exp(u * self.log_range)).long() - 1
        return k.clamp_(0, self.num_classes - 1)


class UnigramSampler(CandidateSampler):
    """Sampler with ``P(k) ∝ counts[k] ** power`` (``power=0.75``: word2vec's noise distribution).

    The tables are buffers sized ``num_classes`` at construction, so that they exist before the
    vocabulary is known and are restored from checkpoints; :meth:`set_counts` fills them. Drawing uses
    Walker's alias method (O(1) per draw, exact): one uniform picks a column ``k`` and, by its
    fractional part, either ``k`` or its alias ``alias[k]`` -- two gathers, no search over the vocabulary.
    """

    probs_table: Tensor
    alias_accept: Tensor
    alias: Tensor

    def __init__(self, num_classes: int, counts: Tensor | np.ndarray | None = None, power: float = 0.75) -> None:
        super().__init__(num_classes)
        self.power = float(power)
        self.register_buffer("probs_table", torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64))
        self.register_buffer("alias_accept", torch.ones(num_classes, dtype=torch.float64))
        self.register_buffer("alias", torch.arange(num_classes))
        if counts is not None:
            self.set_counts(counts)

    @torch.no_grad()
    def set_counts(self, counts: Tensor | np.ndarray) -> None:
        """(Re)build the tables from raw class counts (in place, so the buffers keep their device)."""
        c = (counts.detach().cpu() if isinstance(counts, Tensor) else torch.as_tensor(np.asarray(counts))).double()
        if c.shape != (self.num_classes,):
            raise ValueError(f"counts must have shape ({self.num_classes},), got {tuple(c.shape)}")
        if (c < 0).any() or not torch.isfinite(c).all():
            raise ValueError("counts must be finite and non-negative")
        w = c.pow(self.power)
        if w.sum() <= 0:
            raise ValueError("counts are all zero: nothing to sample from")
        p = w / w.sum()
        accept, alias = _alias_tables(p.numpy())
        self.probs_table.copy_(p)
        self.alias_accept.copy_(torch.from_numpy(accept))
        self.alias.copy_(torch.from_numpy(alias))

    def log_prob(self, ids: Tensor) -> Tensor:
        return self.probs_table[ids].log()

    def draw(self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
        V = self.num_classes
        u = torch.rand(n, dtype=torch.float64, device=self.alias.device, generator=generator) * V
        k = u.long().clamp_(max=V - 1)
        keep = (u - k) < self.alias_accept[k]  # the fractional part is a second, independent uniform
        return torch.where(keep, k, self.alias[k])


def _alias_tables(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias tables for the distribution ``p``: column ``k`` keeps ``k`` with probability
    ``accept[k]`` and gives ``alias[k]`` otherwise; every column has mass ``1 / len(p)``."""
    n = len(p)
    scaled = p * n
    accept = np.ones(n)
    alias = np.arange(n, dtype=np.int64)
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        s, big = small.pop(), large.pop()
        accept[s], alias[s] = scaled[s], big
        scaled[big] -= 1.0 - scaled[s]  # the big class fills the rest of column s
        (small if scaled[big] < 1.0 else large).append(big)
    # what is left holds mass 1 up to rounding: keep itself (zero-mass classes are never left over)
    return accept, alias


def make_sampler(
    kind: Literal["log_uniform", "unigram"], num_classes: int, counts: Tensor | np.ndarray | None = None, power: float = 0.75
) -> CandidateSampler:
    """Build a sampler by name (the model's ``sampler`` hyperparameter)."""
    if kind == "log_uniform":
        return LogUniformSampler(num_classes)
    if kind == "unigram":
        return UnigramSampler(num_classes, counts, power)
    raise ValueError(f"unknown sampler {kind!r}; expected 'log_uniform' or 'unigram'")


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------


class _GatherRows(torch.autograd.Function):
    """``table[ids]`` whose gradient w.r.t. ``table`` is a sparse COO tensor touching only ``ids``.

    ``F.embedding(sparse=True)`` does this for 2-D tables; this also covers the 1-D output bias.
    """

    @staticmethod
    def forward(ctx, table: Tensor, ids: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.table_shape = table.shape
        return table.index_select(0, ids)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        g = torch.sparse_coo_tensor(ids.unsqueeze(0), grad, ctx.table_shape, check_invariants=False)
        return g, None


def gather_rows(table: Tensor, ids: Tensor, sparse: bool = False) -> Tensor:
    """Rows ``table[ids]``; with ``sparse=True`` the gradient is sparse (only the used rows)."""
    if sparse and table.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(table, ids)
    return table.index_select(0, ids)


def sampled_logits(
    weights: Tensor,
    biases: Tensor | None,
    labels: Tensor,
    inputs: Tensor,
    sampled: Tensor,
    sparse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Logits of the true classes ``[B, num_true]`` and of the sampled classes ``[B, K]`` (float32).

    ``labels`` is ``[B]`` or ``[B, num_true]``. ``sampled`` is ``[K]``, shared by the whole batch: the
    sampled logits are one matmul against the K sampled rows -- the reason shared negatives are fast.
    ``sampled`` may also be ``[n, K]``: the batch is cut into ``n`` consecutive groups of
    ``ceil(B / n)`` examples (the last one shorter) and group ``i`` uses row ``i`` (a batched matmul).
    """
    if labels.dim() == 1:
        labels = labels.unsqueeze(1)
    B, T = labels.shape
    flat = labels.reshape(-1)
    true_w = gather_rows(weights, flat, sparse).view(B, T, -1)  # [B, T, D]
    samp_w = gather_rows(weights, sampled.reshape(-1), sparse)  # [K, D] or [n * K, D]
    true_logits = torch.einsum("bd,btd->bt", inputs, true_w) if T > 1 else (inputs * true_w[:, 0]).sum(-1, keepdim=True)
    if sampled.dim() == 1:
        samp_logits = inputs @ samp_w.t()  # [B, K]
    else:
        samp_logits = grouped_matmul(inputs, samp_w.view(*sampled.shape, -1))
    # the rest in float32 whatever the autocast dtype: the log Q correction and the sigmoid CE
    # need the precision (log expected counts go down to about -15)
    true_logits = true_logits.float()
    samp_logits = samp_logits.float()
    if biases is not None:
        true_logits = true_logits + gather_rows(biases, flat, sparse).view(B, T).float()
        samp_b = gather_rows(biases, sampled.reshape(-1), sparse).float()
        samp_logits = samp_logits + (samp_b if sampled.dim() == 1 else expand_groups(samp_b.view(sampled.shape), B))
    return true_logits, samp_logits


def group_size(batch: int, groups: int) -> int:
    """Examples per group when a batch of ``batch`` is cut into ``groups`` consecutive groups."""
    return -(-batch // groups)


def grouped_matmul(inputs: Tensor, rows: Tensor) -> Tensor:
    """``out[b] = inputs[b] @ rows[group(b)].T`` for ``rows`` of shape ``[n, K, D]``: ``[B, K]``."""
    n, K, D = rows.shape
    B = inputs.shape[0]
    G = group_size(B, n)
    padded = F.pad(inputs, (0, 0, 0, n * G - B)) if n * G != B else inputs
    return torch.bmm(padded.view(n, G, D), rows.transpose(1, 2)).reshape(n * G, K)[:B]


def expand_groups(values: Tensor, batch: int) -> Tensor:
    """Per-group values ``[n, K]`` repeated for every example of its group: ``[batch, K]``."""
    n = values.shape[0]
    G = group_size(batch, n)
    return values.repeat_interleave(G, dim=0)[:batch]


def accidental_hits(labels: Tensor, sampled: Tensor) -> Tensor:
    """``[B, K]`` mask: sampled class k (of the example's group) equals one of example b's true classes."""
    if labels.dim() == 1:
        labels = labels.unsqueeze(1)
    per_example = sampled.view(1, -1) if sampled.dim() == 1 else expand_groups(sampled, labels.shape[0])
    return (labels.unsqueeze(2) == per_example.unsqueeze(1)).any(1)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'")


def nce_loss(
    weights: Tensor,
    biases: Tensor | None,
    labels: Tensor,
    inputs: Tensor,
    sampled_values: SampledValues | tuple[Tensor, Tensor, Tensor],
    remove_accidental_hits: bool = False,
    reduction: Literal["mean", "sum", "none"] = "mean",
    sparse: bool = False,
) -> Tensor:
    """Noise-contrastive estimation loss with exactly the semantics of ``tf.nn.nce_loss``.

    Args:
        weights: output weights ``[V, D]``; biases: ``[V]`` or None.
        labels: true classes ``[B]`` or ``[B, num_true]``; inputs: ``[B, D]`` (the input embeddings).
        sampled_values: ``(sampled[K], true_expected_count, sampled_expected_count)`` from a sampler.
        remove_accidental_hits: sampled classes equal to a true class of an example get logit
            ``-FLT_MAX`` for that example (TF's option; default off as there).
        sparse: gradients of ``weights``/``biases`` as sparse tensors touching only the used rows.

    Per example: ``sum_j sigmoid_ce(s_j - log E_j, y_j)`` over the true classes (target
    ``1 / num_true``) and the K sampled ones (target 0); then reduced over the batch (mean by default,
    as ``tf.reduce_mean`` in the tutorial).
    """
    sampled, true_count, samp_count = sampled_values[0], sampled_values[1], sampled_values[2]
    if true_count is None or samp_count is None:
        raise ValueError("nce_loss needs the expected counts: sample with expected_counts=True")
    true_logits, samp_logits = sampled_logits(weights, biases, labels, inputs, sampled, sparse)
    if remove_accidental_hits:
        hits = accidental_hits(labels, sampled)
        samp_logits = samp_logits.masked_fill(hits, torch.finfo(torch.float32).min)
    # the "log Q" correction: logits of the noise-vs-data classifier
    true_logits = true_logits - true_count.float().view_as(true_logits).log()
    samp_log_count = samp_count.float().log()
    samp_logits = samp_logits - (samp_log_count if samp_log_count.dim() == 1 else expand_groups(samp_log_count, len(labels)))
    num_true = true_logits.shape[1]
    # sigmoid CE: target 1/num_true for the true classes, 0 for the sampled
    true_loss = F.binary_cross_entropy_with_logits(
        true_logits, torch.full_like(true_logits, 1.0 / num_true), reduction="none"
    ).sum(1)
    samp_loss = F.softplus(samp_logits).sum(1)  # == sigmoid_ce(x, 0), stable for x = -FLT_MAX too
    return _reduce(true_loss + samp_loss, reduction)


def negative_sampling_loss(
    weights: Tensor,
    biases: Tensor | None,
    labels: Tensor,
    inputs: Tensor,
    sampled: Tensor,
    negative_weight: float = 1.0,
    remove_accidental_hits: bool = False,
    reduction: Literal["mean", "sum", "none"] = "mean",
    sparse: bool = False,
) -> Tensor:
    """Mikolov et al.'s negative-sampling loss with shared negatives (no log Q correction).

    Per example: ``-log sigmoid(s_true) - negative_weight * sum_k log sigmoid(-s_k)`` over the K shared
    samples (drawn from unigram^0.75). ``negative_weight = n / K`` makes K shared samples an unbiased
    estimate of the word2vec objective with n negatives per pair; the default 1 is the plain sum.
    ``labels`` must be ``[B]`` (one true class per example).
    """
    if labels.dim() != 1:
        raise ValueError("negative_sampling_loss takes one true class per example (labels of shape [B])")
    true_logits, samp_logits = sampled_logits(weights, biases, labels, inputs, sampled, sparse)
    samp_term = F.softplus(samp_logits)  # -log sigmoid(-s)
    if remove_accidental_hits:
        samp_term = samp_term.masked_fill(accidental_hits(labels, sampled), 0.0)
    loss = F.softplus(-true_logits[:, 0]) + negative_weight * samp_term.sum(1)
    return _reduce(loss, reduction)


def sampled_softmax_loss(
    weights: Tensor,
    biases: Tensor | None,
    labels: Tensor,
    inputs: Tensor,
    sampled_values: SampledValues | tuple[Tensor, Tensor, Tensor],
    remove_accidental_hits: bool = True,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """Sampled softmax loss (Jean et al. 2015) with exactly the semantics of ``tf.nn.sampled_softmax_loss``.

    Args:
        weights: output weights ``[V, D]`` (for a tied LM: the embedding matrix itself, so the sampled
            rows' gradients land in the one shared Parameter); biases: ``[V]`` or None.
        labels: true classes ``[B]`` or ``[B, num_true]``; inputs: ``[B, D]`` (the decoder's inputs).
        sampled_values: ``(sampled[K], true_expected_count, sampled_expected_count)`` from a sampler,
            shared by the whole batch.
        remove_accidental_hits: a sampled class equal to a true class of an example gets logit
            ``-FLT_MAX`` for that example, so it does not compete with itself (TF's default: on).

    Per example: the softmax cross-entropy over the ``num_true + K`` logits ``s_j - log E_j`` (the
    "log Q" correction: E_j is the class's expected count among the draws), with target ``1 / num_true``
    on the true classes and 0 on the sampled ones. As K grows to cover the vocabulary it tends to the
    full softmax's cross-entropy; the cost is ``(num_true + K) x D`` per example instead of ``V x D``.
    """
    sampled, true_count, samp_count = sampled_values[0], sampled_values[1], sampled_values[2]
    if sampled.dim() != 1:
        raise ValueError("sampled_softmax_loss takes negatives shared by the whole batch (sampled of shape [K])")
    if true_count is None or samp_count is None:
        raise ValueError("sampled_softmax_loss needs the expected counts: sample with expected_counts=True")
    true_logits, samp_logits = sampled_logits(weights, biases, labels, inputs, sampled)
    true_logits = true_logits - true_count.float().view_as(true_logits).log()
    samp_logits = samp_logits - samp_count.float().log()
    if remove_accidental_hits:
        samp_logits = samp_logits.masked_fill(accidental_hits(labels, sampled), torch.finfo(torch.float32).min)
    log_probs = torch.cat([true_logits, samp_logits], dim=1).log_softmax(dim=1)
    num_true = true_logits.shape[1]
    loss = -log_probs[:, :num_true].sum(1) / num_true  # targets 1/num_true on the true classes, 0 elsewhere
    return _reduce(loss, reduction)


# ------------------------------------------------------------------------------------------------
# full softmax, fused with the output layer
# ------------------------------------------------------------------------------------------------


def _softmax_block_rows(logits: Tensor) -> int:
    """Rows of logits softmaxed at a time: about 1 MiB on a CPU (they stay in cache between the passes
    over them), all of them on an accelerator (one kernel launch per pass)."""
    if logits.device.type != "cpu":
        return max(1, logits.shape[0])
    return max(1, (1 << 20) // (logits.shape[1] * 4))


def _softmax_cross_entropy_(logits: Tensor, targets: Tensor, scale: float) -> Tensor:
    """Each row's cross-entropy; ``logits`` is overwritten with ``(softmax - onehot(targets)) * scale``."""
    target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    top = logits.amax(1, keepdim=True)
    logits.sub_(top).exp_()
    total = logits.sum(1, keepdim=True)
    losses = total.log().add_(top).squeeze(1) - target_logits
    logits.mul_(total.reciprocal_().mul_(scale))
    logits[torch.arange(logits.shape[0], device=logits.device), targets] -= scale
    return losses


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean ``cross_entropy(inputs @ weight.T + bias, targets)`` whose backward is two matrix products.

    The forward computes the logits ``chunk_rows`` rows at a time and turns them, in place, into the
    gradient of the mean loss w.r.t. the logits, ``(softmax - onehot) / N``: one ``[N, V]`` buffer (float32
    at least: autocast's bf16 logits are copied into it), kept for the backward. The softmax runs over
    blocks of rows that stay in a CPU's cache (``_softmax_block_rows``), so each logit goes through memory
    once, and the bias gradient is summed on the way. The unfused path keeps the logits and the
    log-softmax output for its backward and makes several more ``N x V`` passes (the log-softmax, the NLL's
    gradient, the log-softmax's, the bias sum); here the backward only multiplies the buffer by the weight
    and by the inputs, and scales the results by the incoming gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, inputs: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_rows: int
    ) -> Tensor:
        n, vocab = inputs.shape[0], weight.shape[0]
        grad_logits = grad_bias = losses = compute_dtype = None
        for start in range(0, n, chunk_rows):
            x = inputs[start : start + chunk_rows]
            logits = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
            if grad_logits is None:
                # the matmuls run in logits' dtype (autocast's, if on); the softmax in float32 at least
                compute_dtype, dtype = logits.dtype, torch.promote_types(logits.dtype, torch.float32)
                in_place = len(x) == n and logits.dtype == dtype  # one chunk: the logits become the buffer
                grad_logits = logits if in_place else torch.empty(n, vocab, dtype=dtype, device=inputs.device)
                losses = torch.empty(n, dtype=dtype, device=inputs.device)
                grad_bias = torch.zeros(vocab, dtype=dtype, device=inputs.device) if bias is not None else None
            block_rows = _softmax_block_rows(logits)
            for first in range(0, len(x), block_rows):
                rows = slice(start + first, start + min(first + block_rows, len(x)))
                block = logits[first : first + block_rows]
                if not in_place:
                    block = grad_logits[rows].copy_(block)
                losses[rows] = _softmax_cross_entropy_(block, targets[rows], scale=1.0 / n)
                if grad_bias is not None:
                    grad_bias += block.sum(0)
        ctx.save_for_backward(inputs, weight, grad_logits, grad_bias)
        ctx.has_bias = bias is not None
        ctx.compute_dtype = compute_dtype
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        inputs, weight, grad_logits, grad_bias = ctx.saved_tensors
        g = grad_logits.to(ctx.compute_dtype)
        grad_inputs = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_inputs = (g @ weight.to(ctx.compute_dtype)).mul_(grad_loss).to(inputs.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (g.t() @ inputs.to(ctx.compute_dtype)).mul_(grad_loss).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_bias.mul(grad_loss)
        else:
            grad_bias = None
        return grad_inputs, grad_weight, grad_bias, None, None


def linear_cross_entropy(
    inputs: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_rows: int = 1024
) -> Tensor:
    """``F.cross_entropy(F.linear(inputs, weight, bias), targets)`` (mean over rows), fused for training.

    Same loss and gradients, but no ``[N, V]`` logits tensor is kept for the backward: the forward leaves
    the gradient w.r.t. the logits behind instead, so the backward is two matrix products (see
    ``_LinearCrossEntropy``). ``inputs`` ``[N, D]``, ``weight`` ``[V, D]`` (for a tied LM the embedding's
    Parameter: its gradient adds to the embedding's), ``targets`` ``[N]``. ``chunk_rows`` rows of logits
    are formed at a time: chunks bound the temporary memory of large batches, but each one more makes the
    matrix products less efficient (measured in the README's LM "Benchmark"), so the default keeps a usual
    batch whole. Without autograd (evaluation) it is the plain expression.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    if not (torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad)):
        return F.cross_entropy(F.linear(inputs, weight, bias).float(), targets)
    return _LinearCrossEntropy.apply(inputs, weight, bias, targets, chunk_rows)
