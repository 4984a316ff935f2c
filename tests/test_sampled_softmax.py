"""sampled_softmax_loss against a loop over plain floats and against TensorFlow's definition written out."""

from __future__ import annotations

import math

import pytest
import torch

from lm_tying.nce import LogUniformSampler, UnigramSampler, sampled_softmax_loss

V, D = 12, 5
FLT_MAX = 3.4028234663852886e38


def fixed_problem(seed: int = 0, labels: list | None = None):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(V, D, generator=g, dtype=torch.float64)
    biases = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    inputs = torch.randn(4, D, generator=g, dtype=torch.float64)
    return weights, biases, inputs, torch.tensor(labels if labels is not None else [3, 0, 7, 3])


def reference_loop(weights, biases, inputs, labels, sampled, expected, remove_hits):
    """Per example: -1/num_true * sum_t log softmax over {true (t), sampled (k)} of (w.x + b - log E)."""
    W, b, X = weights.tolist(), biases.tolist(), inputs.tolist()

    def logit(x, k):
        return sum(xi * wi for xi, wi in zip(x, W[k])) + b[k] - math.log(expected(k))

    losses = []
    for x, rows in zip(X, labels.tolist()):
        rows = rows if isinstance(rows, list) else [rows]
        terms = [logit(x, t) for t in rows] + [logit(x, k) for k in sampled.tolist() if not (remove_hits and k in rows)]
        log_z = math.log(sum(math.exp(z) for z in terms))
        losses.append(-sum(logit(x, t) - log_z for t in rows) / len(rows))
    return losses


def tf_sampled_softmax_loss(weights, biases, labels, inputs, sampled_values, remove_accidental_hits=True):
    """``tf.nn.sampled_softmax_loss`` step by step as TF 2.x's nn_impl.py writes it (_compute_sampled_logits)."""
    if labels.dim() == 1:
        labels = labels.unsqueeze(1)  # labels come as int64 [batch_size, num_true]
    sampled, true_expected_count, sampled_expected_count = sampled_values
    num_true = labels.shape[1]
    labels_flat = labels.reshape(-1)
    all_ids = torch.cat([labels_flat, sampled])  # one embedding_lookup for labels and samples
    all_w = weights[all_ids]
    true_w = all_w[: labels_flat.numel()]
    sampled_w = all_w[labels_flat.numel() :]
    sampled_logits = inputs @ sampled_w.T  # matmul(inputs, sampled_w, transpose_b=True)
    all_b = biases[all_ids]
    true_b, sampled_b = all_b[: labels_flat.numel()], all_b[labels_flat.numel() :]
    row_wise_dots = inputs.unsqueeze(1) * true_w.view(-1, num_true, weights.shape[1])
    dots_as_matrix = row_wise_dots.reshape(-1, weights.shape[1])
    true_logits = dots_as_matrix.sum(1).view(-1, num_true) + true_b.view(-1, num_true)
    sampled_logits = sampled_logits + sampled_b
    if remove_accidental_hits:
        # compute_accidental_hits -> (indices, ids, weights=-FLT_MAX), sparse_to_dense, added to the logits
        acc = torch.zeros_like(sampled_logits)
        for i, row in enumerate(labels.tolist()):
            for j, k in enumerate(sampled.tolist()):
                if k in row:
                    acc[i, j] = -FLT_MAX
        sampled_logits = sampled_logits + acc
    true_logits = true_logits - torch.log(true_expected_count)  # subtract_log_q=True
    sampled_logits = sampled_logits - torch.log(sampled_expected_count)
    out_logits = torch.cat([true_logits, sampled_logits], 1)
    out_labels = torch.cat([torch.ones_like(true_logits) / num_true, torch.zeros_like(sampled_logits)], 1)
    # softmax_cross_entropy_with_logits_v2: -sum(labels * log_softmax(logits)), per example (not reduced)
    return -(out_labels * torch.log_softmax(out_logits, 1)).sum(1)


def log_uniform_values(labels, sampled, num_tries, unique=True):
    sampler = LogUniformSampler(V)
    k = len(sampled)
    return (
        sampled,
        sampler.expected_count(labels.view(len(labels), -1), k, num_tries, unique).double(),  # [B, num_true]
        sampler.expected_count(sampled, k, num_tries, unique).double(),
    )


@pytest.mark.parametrize("remove_hits", [True, False])
def test_matches_loop_reference_and_tf_definition(remove_hits):
    weights, biases, inputs, labels = fixed_problem()
    sampled = torch.tensor([0, 1, 3, 5, 9])  # 3 and 0 are true classes of some examples: accidental hits
    values = log_uniform_values(labels, sampled, num_tries=7)
    ours = sampled_softmax_loss(weights, biases, labels, inputs, values, remove_hits, reduction="none")
    p = lambda k: math.log((k + 2) / (k + 1)) / math.log(V + 1)  # noqa: E731
    expected = lambda k: 1 - (1 - p(k)) ** 7  # noqa: E731 -- unique sampling, 7 tries
    reference = reference_loop(weights, biases, inputs, labels, sampled, expected, remove_hits)
    tf = tf_sampled_softmax_loss(weights, biases, labels, inputs, values, remove_hits)
    assert ours.tolist() == pytest.approx(reference, rel=1e-5)
    torch.testing.assert_close(ours.double(), tf.double(), rtol=1e-5, atol=1e-6)
    assert sampled_softmax_loss(weights, biases, labels, inputs, values, remove_hits).item() == pytest.approx(
        sum(reference) / 4, rel=1e-5
    )


def test_multiple_true_classes_and_no_bias():
    weights, biases, inputs, labels = fixed_problem(seed=1, labels=[[3, 4], [0, 1], [7, 2], [3, 11]])
    sampled = torch.tensor([1, 2, 6, 8])
    values = log_uniform_values(labels, sampled, num_tries=4, unique=False)
    ours = sampled_softmax_loss(weights, None, labels, inputs, values, reduction="none")
    tf = tf_sampled_softmax_loss(weights, torch.zeros(V, dtype=torch.float64), labels, inputs, values)
    torch.testing.assert_close(ours.double(), tf.double(), rtol=1e-5, atol=1e-6)


def test_gradients_flow_into_the_used_rows_only():
    weights, biases, inputs, labels = fixed_problem()
    weights.requires_grad_(True)
    sampled = torch.tensor([1, 5, 9])
    values = log_uniform_values(labels, sampled, num_tries=3)
    sampled_softmax_loss(weights, biases, labels, inputs, values).backward()
    touched = weights.grad.abs().sum(1) > 0
    assert set(touched.nonzero().flatten().tolist()) == {0, 1, 3, 5, 7, 9}  # the targets and the draws


def test_tends_to_the_full_softmax_when_every_class_is_drawn_uniformly():
    """Uniform Q over all V classes (each drawn once): the log Q terms cancel and the sum runs over the
    whole vocabulary, so the sampled loss is exactly the full softmax's cross-entropy."""
    weights, biases, inputs, labels = fixed_problem()
    sampled = torch.arange(V)
    ones = torch.ones(V, dtype=torch.float64)
    values = (sampled, torch.ones(4, 1, dtype=torch.float64), ones)
    ours = sampled_softmax_loss(weights, biases, labels, inputs, values, remove_accidental_hits=True)
    full = torch.nn.functional.cross_entropy(inputs @ weights.T + biases, labels)
    assert ours.item() == pytest.approx(full.item(), rel=1e-6)


def test_unbiased_enough_to_rank_models_like_the_full_softmax():
    """Averaged over many draws, the sampled loss is lower for the logits that the full softmax prefers."""
    torch.manual_seed(0)
    V_big, D_big = 2000, 16
    weights = torch.randn(V_big, D_big) * 0.3
    labels = torch.randint(0, V_big, (64,))
    good = weights[labels] * 3 + torch.randn(64, D_big) * 0.1  # inputs pointing at their targets
    bad = torch.randn(64, D_big)
    full = [torch.nn.functional.cross_entropy(x @ weights.T, labels).item() for x in (good, bad)]
    sampler, gen = UnigramSampler(V_big, torch.ones(V_big), power=1.0), torch.Generator().manual_seed(0)
    sampled = [
        sum(
            sampled_softmax_loss(weights, None, labels, x, sampler(labels, 200, generator=gen)).item()
            for _ in range(20)
        )
        for x in (good, bad)
    ]
    assert full[0] < full[1] and sampled[0] < sampled[1]


def test_rejects_grouped_negatives_and_missing_counts():
    weights, biases, inputs, labels = fixed_problem()
    with pytest.raises(ValueError, match="shared by the whole batch"):
        sampled_softmax_loss(weights, biases, labels, inputs, (torch.zeros(2, 3, dtype=torch.long), None, None))
    with pytest.raises(ValueError, match="expected counts"):
        sampled_softmax_loss(weights, biases, labels, inputs, (torch.tensor([1, 2]), None, None))
