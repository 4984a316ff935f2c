"""Samplers and sampled losses against hand-written formulas (TensorFlow's semantics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lm_tying.nce import (
    LogUniformSampler,
    UnigramSampler,
    make_sampler,
    negative_sampling_loss,
    nce_loss,
)

V, D = 12, 5


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def log_uniform_p(k: int, num_classes: int) -> float:
    return math.log((k + 2) / (k + 1)) / math.log(num_classes + 1)


def fixed_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(V, D, generator=g, dtype=torch.float64)
    biases = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    inputs = torch.randn(4, D, generator=g, dtype=torch.float64)
    labels = torch.tensor([3, 0, 7, 3])
    return weights, biases, inputs, labels


def reference_nce(weights, biases, inputs, labels, sampled, num_tries, unique, remove_hits=False):
    """tf.nn.nce_loss written as loops over plain floats, expected counts from the formulas."""
    W, b, X = weights.tolist(), biases.tolist(), inputs.tolist()

    def expected(k: int) -> float:
        p = log_uniform_p(k, V)
        return 1 - (1 - p) ** num_tries if unique else len(sampled) * p

    def logit(x, k):
        return sum(xi * wi for xi, wi in zip(x, W[k])) + b[k]

    losses = []
    for x, rows in zip(X, labels.tolist()):
        rows = rows if isinstance(rows, list) else [rows]
        total = 0.0
        for t in rows:  # target 1/num_true: sigmoid CE = -(z log s + (1-z) log(1-s))
            s = sigmoid(logit(x, t) - math.log(expected(t)))
            z = 1 / len(rows)
            total += -(z * math.log(s) + (1 - z) * math.log(1 - s))
        for k in sampled.tolist():
            if remove_hits and k in rows:
                continue
            total += -math.log(1 - sigmoid(logit(x, k) - math.log(expected(k))))
        losses.append(total)
    return sum(losses) / len(losses)


# ------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("unique", [True, False])
def test_nce_loss_matches_loop_reference(unique):
    weights, biases, inputs, labels = fixed_problem()
    sampler = LogUniformSampler(V)
    sampled = torch.tensor([0, 5, 3, 9])  # contains label 3 and label 0: accidental hits
    num_tries = 7 if unique else 4
    sv = (
        sampled,
        sampler.expected_count(labels, 4, num_tries, unique),
        sampler.expected_count(sampled, 4, num_tries, unique),
    )
    got = nce_loss(weights, biases, labels, inputs, sv)
    want = reference_nce(weights, biases, inputs, labels, sampled, num_tries, unique)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got = nce_loss(weights, biases, labels, inputs, sv, remove_accidental_hits=True)
    want_hits = reference_nce(weights, biases, inputs, labels, sampled, num_tries, unique, remove_hits=True)
    assert got.item() == pytest.approx(want_hits, rel=1e-5)
    assert want_hits < want  # the option really removed terms


def test_nce_loss_multiple_true_classes():
    weights, biases, inputs, _ = fixed_problem(1)
    labels = torch.tensor([[1, 2], [4, 4], [0, 11], [6, 3]])
    sampler = LogUniformSampler(V)
    sampled = torch.tensor([2, 8, 10])
    sv = (sampled, sampler.expected_count(labels, 3, 5, True), sampler.expected_count(sampled, 3, 5, True))
    got = nce_loss(weights, biases, labels, inputs, sv)
    assert got.item() == pytest.approx(reference_nce(weights, biases, inputs, labels, sampled, 5, True), rel=1e-5)


def test_expected_counts_formulas():
    sampler = LogUniformSampler(V)
    ids = torch.arange(V)
    unique = sampler.expected_count(ids, 4, 9, unique=True)
    plain = sampler.expected_count(ids, 4, 4, unique=False)
    for k in range(V):
        p = log_uniform_p(k, V)
        assert unique[k].item() == pytest.approx(1 - (1 - p) ** 9, rel=1e-6)
        assert plain[k].item() == pytest.approx(4 * p, rel=1e-6)
    assert sampler.probs().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_negative_sampling_loss_matches_reference():
    weights, biases, inputs, labels = fixed_problem(2)
    sampled = torch.tensor([1, 1, 6])
    got = negative_sampling_loss(weights, None, labels, inputs, sampled, negative_weight=0.5)
    want = 0.0
    for x, t in zip(inputs, labels.tolist()):
        want += -math.log(sigmoid(float(x @ weights[t])))
        want += -0.5 * sum(math.log(sigmoid(-float(x @ weights[k]))) for k in sampled.tolist())
    assert got.item() == pytest.approx(want / len(labels), rel=1e-6)


def test_grouped_negatives_equal_separate_batches():
    """sampled of shape [n, K]: each consecutive group of the batch uses its own row (last group shorter)."""
    g = torch.Generator().manual_seed(3)
    weights, biases = torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    inputs, labels = torch.randn(7, D, generator=g), torch.randint(0, V, (7,), generator=g)
    sampled = torch.randint(0, V, (3, 2), generator=g)  # groups of 3, 3, 1
    whole = negative_sampling_loss(weights, biases, labels, inputs, sampled, reduction="none")
    parts = [
        negative_sampling_loss(weights, biases, labels[s], inputs[s], sampled[i], reduction="none")
        for i, s in enumerate([slice(0, 3), slice(3, 6), slice(6, 7)])
    ]
    torch.testing.assert_close(whole, torch.cat(parts))
    count = torch.full((3, 2), 0.5)
    nce_whole = nce_loss(weights, biases, labels, inputs, (sampled, torch.ones(7), count), reduction="none")
    nce_parts = [
        nce_loss(weights, biases, labels[s], inputs[s], (sampled[i], torch.ones(len(labels[s])), count[i]), reduction="none")
        for i, s in enumerate([slice(0, 3), slice(3, 6), slice(6, 7)])
    ]
    torch.testing.assert_close(nce_whole, torch.cat(nce_parts))


@pytest.mark.parametrize("loss_name", ["nce", "negative_sampling"])
def test_sparse_gradients_touch_only_used_rows(loss_name):
    g = torch.Generator().manual_seed(4)
    V_big = 50
    w_dense = torch.randn(V_big, D, generator=g, requires_grad=True)
    b_dense = torch.randn(V_big, generator=g, requires_grad=True)
    w_sparse = w_dense.detach().clone().requires_grad_(True)
    b_sparse = b_dense.detach().clone().requires_grad_(True)
    inputs = torch.randn(6, D, generator=g)
    labels = torch.tensor([1, 4, 4, 9, 20, 1])
    sampled = torch.tensor([0, 2, 9, 33])
    sv = (sampled, torch.full((6,), 0.3), torch.full((4,), 0.2))

    def run(w, b, sparse):
        if loss_name == "nce":
            return nce_loss(w, b, labels, inputs, sv, sparse=sparse)
        return negative_sampling_loss(w, b, labels, inputs, sampled, sparse=sparse)

    run(w_dense, b_dense, False).backward()
    run(w_sparse, b_sparse, True).backward()
    assert w_sparse.grad.is_sparse and b_sparse.grad.is_sparse
    used = set(labels.tolist()) | set(sampled.tolist())
    touched = set(w_sparse.grad.coalesce().indices()[0].tolist())
    assert touched == used
    assert set(b_sparse.grad.coalesce().indices()[0].tolist()) == used
    torch.testing.assert_close(w_sparse.grad.to_dense(), w_dense.grad)
    torch.testing.assert_close(b_sparse.grad.to_dense(), b_dense.grad)
    untouched = sorted(set(range(V_big)) - used)
    assert torch.all(w_dense.grad[untouched] == 0)


def test_bf16_autocast_loss_close_to_fp32():
    g = torch.Generator().manual_seed(5)
    weights = torch.randn(1000, 64, generator=g) * 0.3
    biases = torch.zeros(1000)
    inputs = torch.randn(256, 64, generator=g) * 0.3
    labels = torch.randint(0, 1000, (256,), generator=g)
    sampler = LogUniformSampler(1000)
    sv = sampler(labels, 32, unique=True, generator=torch.Generator().manual_seed(0))
    fp32 = nce_loss(weights, biases, labels, inputs, sv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = nce_loss(weights, biases, labels, inputs, sv)
        ns = negative_sampling_loss(weights, biases, labels, inputs, sv.sampled)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16) and torch.isfinite(ns)
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


# ------------------------------------------------------------------------------------------ samplers
def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson chi-square statistic over classes with expected count >= 5, and its degrees of freedom."""
    n = counts.sum()
    expected = n * probs
    keep = expected >= 5
    stat = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    return stat, int(keep.sum()) - 1


def assert_matches(draws: torch.Tensor, probs: torch.Tensor) -> None:
    counts = np.bincount(draws.numpy(), minlength=len(probs)).astype(np.float64)
    stat, dof = chi_square(counts, probs.numpy())
    # mean dof, sd sqrt(2 dof): 6 sd is a very loose bound for a correct sampler and far below a wrong one
    assert stat < dof + 6 * math.sqrt(2 * dof), (stat, dof)


def test_log_uniform_empirical_distribution():
    torch.manual_seed(0)
    sampler = LogUniformSampler(1000)
    draws = sampler.draw(400_000)
    assert draws.min() >= 0 and draws.max() < 1000
    probs = sampler.probs()
    assert probs[7].item() == pytest.approx(log_uniform_p(7, 1000))
    assert_matches(draws, probs)
    # and a wrong distribution is detected: uniform probabilities
    with pytest.raises(AssertionError):
        assert_matches(draws, torch.full((1000,), 1e-3, dtype=torch.float64))


def test_unigram_empirical_distribution():
    torch.manual_seed(1)
    counts = np.array([500, 0, 120, 60, 30, 9, 7, 3, 1, 1], dtype=np.int64)
    sampler = UnigramSampler(len(counts), counts, power=0.75)
    want = counts**0.75 / (counts**0.75).sum()
    torch.testing.assert_close(sampler.probs(), torch.tensor(want))
    draws = sampler.draw(200_000)
    assert (draws != 1).all()  # zero count: never drawn
    assert_matches(draws, sampler.probs())
    with pytest.raises(AssertionError):  # power 1 differs visibly from power 0.75
        assert_matches(draws, torch.tensor(counts / counts.sum()))


def test_unigram_alias_tables_on_a_zipf_vocabulary():
    torch.manual_seed(2)
    counts = (1e6 / np.arange(1, 3001)).astype(np.int64)
    counts[[5, 700]] = 0
    sampler = UnigramSampler(3000, counts, power=0.75)
    draws = sampler.draw(300_000)
    assert not torch.isin(draws, torch.tensor([5, 700])).any()
    assert_matches(draws, sampler.probs())
    # every alias column carries mass 1/V: the tables reproduce p exactly
    V = 3000
    acc, alias = sampler.alias_accept, sampler.alias
    mass = acc / V + torch.zeros(V, dtype=torch.float64).index_add_(0, alias, (1 - acc) / V)
    torch.testing.assert_close(mass, sampler.probs(), rtol=1e-9, atol=1e-12)


def test_unique_sampling_follows_tf_semantics():
    """Same random stream, replayed by a plain loop: distinct ids in first-draw order, num_tries counted."""
    sampler = LogUniformSampler(40)
    for seed in range(20):
        ids, tries = sampler.sample(10, unique=True, generator=torch.Generator().manual_seed(seed))
        stream = sampler.draw(4 * tries + 64, generator=torch.Generator().manual_seed(seed)).tolist()
        seen: list[int] = []
        n = 0
        while len(seen) < 10:
            if stream[n] not in seen:
                seen.append(stream[n])
            n += 1
        assert ids.tolist() == seen
        assert tries == n


def test_unique_sampling_extends_until_enough_distinct():
    # 9 distinct out of 10 classes with a skewed distribution needs many draws: exercises the extension
    sampler = UnigramSampler(10, np.array([1000, 500, 100, 50, 20, 10, 5, 2, 1, 1]), power=1.0)
    ids, tries = sampler.sample(9, unique=True, generator=torch.Generator().manual_seed(0))
    assert len(set(ids.tolist())) == 9 and tries >= 9
    with pytest.raises(ValueError, match="impossible"):
        sampler.sample(11, unique=True)


def test_unique_inclusion_frequency_matches_expected_count():
    """Empirical P(class in the unique sample) against the mean of 1 - (1 - p)^num_tries."""
    sampler = LogUniformSampler(30)
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(30, dtype=torch.float64)
    expected = torch.zeros(30, dtype=torch.float64)
    trials = 3000
    for _ in range(trials):
        ids, tries = sampler.sample(8, unique=True, generator=g)
        hits[ids] += 1
        expected += sampler.expected_count(torch.arange(30), 8, tries, True).double()
    torch.testing.assert_close(hits / trials, expected / trials, atol=0.03, rtol=0.0)


def test_samplers_reproducible_and_keep_precision():
    torch.manual_seed(7)
    a = make_sampler("log_uniform", 100).sample(16, unique=True)[0]
    torch.manual_seed(7)
    b = make_sampler("log_uniform", 100).sample(16, unique=True)[0]
    assert torch.equal(a, b)
    s = make_sampler("unigram", 5, counts=np.array([5, 4, 3, 2, 1]))
    s = s.to(torch.bfloat16)
    assert s.alias_accept.dtype == torch.float64 and s.probs_table.dtype == torch.float64
    assert {"alias", "alias_accept", "probs_table"} <= set(s.state_dict())
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("zipf", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        UnigramSampler(3, np.array([1, 2]))


def test_grouped_sampling_shapes_and_errors():
    s = LogUniformSampler(50)
    labels = torch.tensor([1, 2, 3, 4, 5])
    sv = s(labels, 4, unique=False, groups=3)
    assert sv.sampled.shape == (3, 4) and sv.sampled_expected_count.shape == (3, 4)
    with pytest.raises(ValueError, match="unique=False"):
        s(labels, 4, unique=True, groups=3)
