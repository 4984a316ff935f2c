"""The Word2Vec LightningModule and its engines: batched step == autograd SGD, the kernel == per-pair SGD, sparse
rows, planted structure, engine choice, logging, configs."""

from __future__ import annotations

import copy
import math
import random
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from conftest import compiled_library
from lm_tying.data import Text8DataModule
from lm_tying import native
from lm_tying.models.word2vec import Word2Vec
from lm_tying.models.word2vec import model as word2vec_model
from lm_tying.models.word2vec.model import auto_lr
from lm_tying.models.word2vec import engines
from lm_tying.models.word2vec.engines import (
    AdaptiveThreads, BatchedEngine, EngineError, LearningRateHolder, choose_engine, kernel_loss,
)
from lm_tying.nce import negative_sampling_loss

ROOT = Path(__file__).resolve().parents[1]


def small_model(**kw) -> Word2Vec:
    args = dict(vocab_size=30, embedding_dim=8, evaluate=False, average_loss_every=0, num_sampled=6)
    args.update(kw)
    model = Word2Vec(**args)
    if hasattr(model.sampler, "set_counts"):
        model.sampler.set_counts(np.arange(30, 0, -1) ** 2)
    return model


def batched(model: Word2Vec, update_pairs: int | None = None) -> BatchedEngine:
    return BatchedEngine(model, update_pairs)


def batch(seed: int = 0, n: int = 37):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30, (n,), generator=g), torch.randint(0, 30, (n,), generator=g)


@pytest.mark.parametrize(
    "kw",
    [
        dict(loss="nce", unique=True),
        dict(loss="nce", unique=True, remove_accidental_hits=True, reduction="sum"),
        dict(loss="nce", unique=False, sampler="unigram", share_negatives=5),
        dict(loss="negative_sampling", unique=False, negative_weight=0.5, reduction="sum"),
        dict(loss="negative_sampling", unique=False, share_negatives=8, remove_accidental_hits=True),
        dict(loss="negative_sampling", unique=False, share_negatives=4, output_bias=False),
    ],
)
def test_batched_step_equals_autograd_sgd(kw):
    """The hand-written update is exactly one torch.optim.SGD step on the autograd loss."""
    hand = small_model(**kw)
    with torch.no_grad():  # non-trivial starting point, bias included
        hand.output_bias.normal_()
    auto = copy.deepcopy(hand)
    start_bias = hand.output_bias.detach().clone()
    center, context = batch()
    lr = 0.7
    loss_f = batched(hand).update(center, context, lr, generator=torch.Generator().manual_seed(3))
    loss_a = auto.compute_loss(center, context, torch.Generator().manual_seed(3), reduction=auto.hparams.reduction)
    loss_a.backward()
    opt = torch.optim.SGD([auto.embedding, auto.output_weight, auto.output_bias], lr=lr)
    opt.step()
    n = center.numel() if auto.hparams.reduction == "sum" else 1
    assert loss_f.item() == pytest.approx(loss_a.item() / n, rel=1e-5)
    for name in ("embedding", "output_weight", "output_bias"):
        torch.testing.assert_close(getattr(hand, name), getattr(auto, name), rtol=1e-5, atol=1e-6)
    bias_moved = not torch.equal(hand.output_bias, start_bias)
    assert bias_moved == hand.hparams.output_bias


def test_update_pairs_are_successive_sgd_steps():
    """A batch with update_pairs=u is the same as batched steps on its consecutive slices of u pairs."""
    model = small_model(loss="negative_sampling", unique=False, share_negatives=4, reduction="sum")
    ref = copy.deepcopy(model)
    center, context = batch(n=37)
    torch.manual_seed(0)
    opt = LearningRateHolder([model.embedding, model.output_weight], lr=0.3)
    batched(model, update_pairs=10).train_batch(center, context, opt)
    torch.manual_seed(0)
    for c, x in zip(center.split(10), context.split(10)):
        batched(ref).update(c, x, 0.3)
    torch.testing.assert_close(model.embedding, ref.embedding)
    torch.testing.assert_close(model.output_weight, ref.output_weight)


def sequential_reference(E, W, center, context, negatives, lr, neg_weight, remove_hits):
    """Per-pair SGD in plain Python (float64), the specification of csrc/sequential_sgd.cpp: each pair's
    gradient at the values the pair starts from, applied before the next pair (a row drawn twice gets both
    steps)."""
    E, W = E.double().clone(), W.double().clone()
    G, loss = -(-len(center) // negatives.shape[0]), 0.0  # pairs per group of shared negatives
    for p, (c, t) in enumerate(zip(center.tolist(), context.tolist())):
        x, W_start = E[c].clone(), W.clone()
        s = float(x @ W_start[t])
        g_true = lr * (1 - 1 / (1 + math.exp(-s)))
        E[c] += g_true * W_start[t]
        W[t] += g_true * x
        loss += math.log1p(math.exp(-s))
        for k in negatives[p // G].tolist():
            if remove_hits and k == t:
                continue
            s_k = float(x @ W_start[k])
            g_k = -lr * neg_weight / (1 + math.exp(-s_k))
            E[c] += g_k * W_start[k]
            W[k] += g_k * x
            loss += neg_weight * math.log1p(math.exp(s_k))
    return E, W, loss


@pytest.mark.parametrize("remove_hits", [False, True])
@pytest.mark.parametrize("dim, num_sampled", [(8, 3), (13, 11)])  # one pass per pair; a tail and several passes
def test_sequential_kernel_is_per_pair_sgd(remove_hits, dim, num_sampled):
    """One thread: the compiled kernel equals per-pair SGD, pair after pair, incl. its loss. Rows repeat
    within the batch and within a pair's negatives, so one batched update from the old values would not pass."""
    kernel = native.library()
    if kernel is None:
        pytest.skip("no C++ compiler here: the kernel cannot be built (the model falls back, tested below)")
    g = torch.Generator().manual_seed(0)
    E, W = torch.randn(30, dim, generator=g) * 0.5, torch.randn(30, dim, generator=g) * 0.5
    center, context = batch(n=37)
    context[:3] = torch.tensor([1, 1, 1])  # repeated rows, and accidental hits with the negatives below
    negatives = torch.randint(0, 30, (10, num_sampled), generator=g)
    negatives[0, :2] = 1
    negatives[1, :2] = 7  # a row drawn twice for the same pairs
    E_ref, W_ref, loss_ref = sequential_reference(E, W, center, context, negatives, 0.3, 0.7, remove_hits)
    loss = kernel.sequential_sgd(E, W, center, context, negatives, 0.3, 0.7, remove_hits, threads=1)
    torch.testing.assert_close(E, E_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W, W_ref.float(), rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(loss_ref, rel=1e-5)
    # lr 0: the loss of every pair at the tables as they are, nothing written (what evaluation uses)
    E_start, W_start = E.clone(), W.clone()
    loss = kernel.sequential_sgd(E, W, center, context, negatives, 0.0, 0.7, remove_hits, threads=2)
    assert torch.equal(E, E_start) and torch.equal(W, W_start)
    _, _, loss_ref = sequential_reference(E, W, center, context, negatives, 0.0, 0.7, remove_hits)
    assert loss.item() == pytest.approx(loss_ref, rel=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        kernel.sequential_sgd(E, W, center + 30, context, negatives, 0.3, 0.7, False)


def test_evaluation_loss_is_the_models_loss_scored_by_the_kernel():
    """``kernel_loss`` (validation's and test's loss on CPU) is ``negative_sampling_loss`` on the same negatives, the
    kernel's draws from the seed the generator gives, and leaves the tables as they were; NCE gets None (the caller
    then runs ``compute_loss``)."""
    if native.library() is None:
        pytest.skip("no C++ compiler here: evaluation takes compute_loss")
    model = small_model(loss="negative_sampling", sampler="unigram", unique=False, share_negatives=4,
                        negative_weight=5 / 6, output_bias=False, reduction="sum", lr=0.05)  # fmt: skip
    with torch.no_grad():
        model.embedding.normal_(std=0.5)
        model.output_weight.normal_(std=0.5)
    tables = [t.detach().clone() for t in (model.embedding, model.output_weight)]
    center, context = batch(n=41)
    loss = kernel_loss(model, center, context, torch.Generator().manual_seed(5))
    assert torch.equal(tables[0], model.embedding) and torch.equal(tables[1], model.output_weight)
    seed = int(torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(5)))
    groups = model.negative_groups(41)
    drawn = native.library().alias_draws(model.sampler.alias_accept, model.sampler.alias, seed, groups * 6)
    expected = negative_sampling_loss(model.output_weight, None, context, model.embedding[center],
                                      drawn.view(groups, 6), negative_weight=5 / 6)  # fmt: skip
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert kernel_loss(small_model(loss="nce"), center, context, None) is None


def test_without_a_compiler_auto_uses_the_batched_engine_and_numpy_pairs_and_sequential_fails_clearly(
    tmp_path, make_corpus, monkeypatch
):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    monkeypatch.setenv("LM_TYING_KERNEL_CACHE", str(tmp_path / "kernels"))  # no cached build to load
    with pytest.warns(UserWarning, match="cannot build word2vec.s compiled code.*no C\\+\\+ compiler"):
        assert native.library.__wrapped__() is None  # the uncached builder
    monkeypatch.setattr(native, "library", lambda: None)  # what a failed build returns
    corpus = make_corpus(planted_corpus(3000))
    model, trainer, _ = fit(tmp_path, corpus, model_kw=dict(share_negatives=4, output_bias=False),
                            trainer_kw=dict(max_steps=3, max_epochs=None, log_every_n_steps=1))  # fmt: skip
    assert model.engine_choice.update == "batched" and "could not be built" in model.engine_choice.reason
    assert model.engine_choice.update_pairs == 4096  # lr per pair: small updates, whatever the batch
    assert trainer.train_dataloader.dataset.pair_shuffle == "numpy"  # the pairs too fall back
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    with pytest.raises(EngineError, match="could not be built"):
        fit(tmp_path, corpus, model_kw=dict(update="sequential", share_negatives=4, output_bias=False),
            trainer_kw=dict(max_steps=1, max_epochs=None))  # fmt: skip


def test_autograd_gradients_are_sparse_and_local():
    model = small_model(loss="negative_sampling", unique=False, num_sampled=4)
    center, context = torch.tensor([1, 2, 2, 5]), torch.tensor([3, 3, 9, 1])
    g = torch.Generator().manual_seed(0)
    sampled = model.sample_negatives(context, torch.Generator().manual_seed(0)).sampled
    model.compute_loss(center, context, g, sparse=True).backward()
    assert model.embedding.grad.is_sparse and model.output_weight.grad.is_sparse and model.output_bias.grad.is_sparse
    assert set(model.embedding.grad.coalesce().indices()[0].tolist()) == {1, 2, 5}
    assert set(model.output_weight.grad.coalesce().indices()[0].tolist()) == {3, 9, 1} | set(sampled.tolist())


def test_batched_step_touches_only_used_rows():
    model = small_model(loss="negative_sampling", unique=False, num_sampled=3, init="tutorial")
    before = [p.detach().clone() for p in (model.embedding, model.output_weight)]
    center, context = torch.tensor([4, 7]), torch.tensor([8, 8])
    g = torch.Generator().manual_seed(1)
    sampled = model.sample_negatives(context, torch.Generator().manual_seed(1)).sampled
    batched(model).update(center, context, 0.5, generator=g)
    changed_e = (model.embedding != before[0]).any(1).nonzero().flatten().tolist()
    changed_w = (model.output_weight != before[1]).any(1).nonzero().flatten().tolist()
    assert set(changed_e) == {4, 7}
    assert set(changed_w) <= {8} | set(sampled.tolist()) and 8 in changed_w


# ---------------------------------------------------------------------------------------- training
def planted_corpus(words_per_half: int = 15_000, seed: int = 0) -> str:
    """Two vocabularies that never co-occur: the first half uses only ``a*`` words, the second only ``b*``."""
    rng = random.Random(seed)
    letters = "cdefghijklmnopqrstuvwxyz"
    group_a = ["a" + letters[i] + letters[j] for i in range(4) for j in range(5)]
    group_b = ["b" + letters[i] + letters[j] for i in range(4) for j in range(5)]
    return " ".join([rng.choice(group_a) for _ in range(words_per_half)] + [rng.choice(group_b) for _ in range(words_per_half)])


def fit(tmp_path, corpus_path, model_kw=None, data_kw=None, trainer_kw=None):
    L.seed_everything(0, verbose=False)
    data_args = dict(path=str(corpus_path), data_dir=str(tmp_path / "data"), vocab_size=None, min_count=1,
                     split=(0.9, 0.05, 0.05), batch_size=256, window=2, num_workers=0)  # fmt: skip
    data_args.update(data_kw or {})
    dm = Text8DataModule(**data_args)
    # one thread: tiny matmuls gain nothing from two, and OpenMP barriers stall when other processes share the CPU
    args = dict(vocab_size=dm.num_words, embedding_dim=16, evaluate=False, average_loss_every=0, init="word2vec",
                loss="negative_sampling", unique=False, num_sampled=5, share_negatives=16, reduction="sum", lr=0.05,
                threads=1)  # fmt: skip
    args.update(model_kw or {})
    model = Word2Vec(**args)
    trainer_args = dict(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))  # fmt: skip
    trainer_args.update(trainer_kw or {})
    trainer = L.Trainer(**trainer_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm)
    return model, trainer, dm


@pytest.fixture
def three_torch_threads():
    """The process on 3 torch threads (a count no default gives), as it was afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("update, training", [("sequential", 1), ("batched", 2)])
def test_threads_while_training_validating_and_after(tmp_path, make_corpus, three_torch_threads, update, training):
    """The kernel's threads are its own: torch keeps one while it trains (else torch's idle workers spin on the
    kernel's cores); the other engines train on ``threads`` of torch's; validation's evaluation gets the
    process's threads back, and so does the process after fit."""
    if update == "sequential" and native.library() is None:
        pytest.skip("no C++ compiler here: the kernel cannot be built")
    seen: dict[str, set[int]] = {"train": set(), "val": set()}

    class Record(L.Callback):
        def on_train_batch_start(self, *args):
            seen["train"].add(torch.get_num_threads())

        def on_validation_batch_start(self, *args):
            seen["val"].add(torch.get_num_threads())

    corpus = make_corpus(planted_corpus(3000))
    fit(tmp_path, corpus, model_kw=dict(update=update, share_negatives=4, output_bias=False, threads=2),
        trainer_kw=dict(max_epochs=2, callbacks=[Record()]))  # fmt: skip
    assert seen == {"train": {training}, "val": {3}}
    assert torch.get_num_threads() == 3


def test_adaptive_threads_use_the_faster_count_and_check_the_other_now_and_then():
    """``threads: null``: the kernel's calls run on the thread count measured faster (two threads can be slower
    than one on a machine whose cores other work holds); the other count is measured again every ``check`` calls."""
    adaptive = AdaptiveThreads(2, check_one=10, check_most=4)
    speed = {2: 8.0, 1: 5.0}  # pairs per second of each count, as the machine is

    def calls(n: int) -> list[int]:
        counts = []
        for _ in range(n):
            threads = adaptive()
            adaptive.record(threads, 1000, 1000 / speed[threads])
            counts.append(threads)
        return counts

    assert calls(14) == [2, 2, 1] + [2] * 10 + [1]  # one thread first checked at the third call, then every 10
    speed[2] = 3.0  # the machine gets busy: two threads slower than one
    assert calls(12) == [2, 2] + [1] * 4 + [2] + [1] * 4 + [2]  # after two slow calls; two threads checked every 4
    speed[2] = 8.0  # quiet again: back at the next check
    assert calls(5) == [1, 1, 1, 1, 2]
    assert adaptive.checks == {1: 2, 2: 3} and adaptive.calls == {1: 12, 2: 14}
    speed[2] = 4.0  # one slow call (a hiccup) changes nothing
    assert calls(1) == [2]
    speed[2] = 8.0
    assert calls(3) == [2, 2, 2]


def test_sequential_engine_adapts_its_threads_to_the_measured_speed_only_under_threads_auto(monkeypatch):
    """The engine runs each kernel call on the count :class:`AdaptiveThreads` gives and reports the call's time to
    it; with a thread count given, every call runs on it."""
    compiled_library()
    clock = [0.0]
    monkeypatch.setattr(engines.time, "perf_counter", lambda: clock[0])
    model = small_model(loss="negative_sampling", unique=False, share_negatives=4, output_bias=False, reduction="sum")
    for adaptive, expected in [(True, [2, 2, 1, 1, 1]), (False, [2] * 5)]:
        engine = engines.SequentialEngine(model, None, threads=2, adaptive=adaptive)
        used: list[int] = []

        def kernel(*args, _real=engine.kernel):
            used.append(args[-1])  # the thread count, the kernel's last argument
            clock[0] += {1: 1.0, 2: 3.0}[args[-1]]  # two threads slower, as on a busy machine
            return _real(*args)

        engine.kernel = kernel
        for seed in range(5):
            engine.update(*batch(seed), lr=0.01)
        assert used == expected
        model.engine = engines.SummedDeltas(engine, all_reduce_sum=lambda t: t, merge="sum")  # under DDP
        assert model._adaptive_threads() is engine.adaptive and (engine.adaptive is None) == (not adaptive)


def test_validation_inside_fit_evaluates_on_one_thread_while_the_kernel_measures_one_faster(
    tmp_path, make_corpus, three_torch_threads
):
    """Under ``threads: null`` the evaluation follows the kernel's measurement: one torch thread while one kernel
    thread was measured faster (a busy machine), the process's threads otherwise."""
    compiled_library()
    if native.cores_per_process(1) < 2:
        pytest.skip("one core here: nothing to adapt")
    seen: list[int] = []

    class Busy(L.Callback):
        """Epoch 0's training ends as if a busy spell had been measured, epoch 1's as if it had passed."""

        def on_train_batch_end(self, trainer, model, *args):
            adaptive = model._adaptive_threads()
            adaptive.current = 1 if trainer.current_epoch == 0 else adaptive.most

        def on_validation_batch_start(self, *args):
            seen.append(torch.get_num_threads())

    corpus = make_corpus(planted_corpus(3000))
    fit(tmp_path, corpus, model_kw=dict(update="sequential", share_negatives=4, output_bias=False, threads=None,
                                        update_pairs=None),
        data_kw=dict(batch_size=16_384), trainer_kw=dict(max_epochs=2, callbacks=[Busy()]))  # fmt: skip
    assert set(seen[: len(seen) // 2]) == {1} and set(seen[len(seen) // 2 :]) == {3}


def separation(model: Word2Vec) -> tuple[float, float, float]:
    """Mean cosine within the planted groups, across them, and the share of nearest neighbours in-group."""
    wv = model.word_vectors()
    ids = {g: [i for i, w in enumerate(wv.index_to_key) if w.startswith(g)] for g in "ab"}
    u = torch.from_numpy(wv.unit_vectors())
    sims = u @ u.t()
    within = np.mean([sims[ids[g]][:, ids[g]].fill_diagonal_(float("nan")).nanmean().item() for g in "ab"])
    across = sims[ids["a"]][:, ids["b"]].mean().item()
    same = np.mean([wv.most_similar(w, topn=1)[0][0][0] == w[0] for g in "ab" for w in (wv.index_to_key[i] for i in ids[g])])
    return float(within), float(across), float(same)


@pytest.mark.parametrize(
    "model_kw",
    [
        dict(update="batched"),  # hand-written SGD updates, grouped negative sampling
        dict(update="sequential", share_negatives=4, output_bias=False),  # per-pair SGD in the compiled kernel
        dict(update="sequential", share_negatives=4, output_bias=False, threads=2),  # its lock-free threads
        dict(update="autograd", update_pairs=64),  # autograd SGD, four updates per batch
        dict(loss="nce", unique=True, share_negatives=None, num_sampled=8, optimizer="sparse_adam", lr=0.01,
             reduction="mean", init="tutorial"),  # fmt: skip
    ],
    ids=["batched-ns", "sequential-ns", "sequential-2-threads", "autograd-sgd-ns", "sparse-adam-nce"],
)
def test_training_separates_planted_vocabularies(tmp_path, make_corpus, model_kw):
    corpus = make_corpus(planted_corpus())
    model, trainer, _ = fit(tmp_path, corpus, model_kw)
    within, across, same = separation(model)
    assert within > across + 0.3, (within, across)
    assert same >= 0.9, same
    # and an untrained model does not pass the same bar (the test can fail)
    fresh = Word2Vec(**{**model.hparams, "init": "word2vec"})  # untrained
    fresh.vocab = model.vocab
    w0, a0, _ = separation(fresh)
    assert not w0 > a0 + 0.3


def test_checkpoint_round_trip_keeps_sampler_and_vocab(tmp_path, make_corpus):
    corpus = make_corpus(planted_corpus(3000))
    model, trainer, dm = fit(tmp_path, corpus, trainer_kw=dict(max_epochs=1))
    assert model.sampler.probs_table[1:].sum() > 0
    expected = torch.tensor(dm.vocab.counts, dtype=torch.float64) ** 0.75
    torch.testing.assert_close(model.sampler.probs_table, expected / expected.sum())
    path = tmp_path / "w2v.ckpt"
    trainer.save_checkpoint(path)
    loaded = Word2Vec.load_from_checkpoint(path)
    torch.testing.assert_close(loaded.sampler.alias_accept, model.sampler.alias_accept)
    assert torch.equal(loaded.sampler.alias, model.sampler.alias)
    assert loaded.vocab == dm.vocab
    np.testing.assert_array_equal(loaded.word_vectors().vectors, model.word_vectors().vectors)
    assert loaded.most_similar(dm.vocab.words[1], topn=3) == model.most_similar(dm.vocab.words[1], topn=3)


def test_test_and_predict_score_held_out_pairs(tmp_path, make_corpus):
    corpus = make_corpus(planted_corpus(3000))
    model, trainer, dm = fit(tmp_path, corpus, trainer_kw=dict(max_epochs=2))
    [result] = trainer.test(model, dm, verbose=False)
    assert result["test/loss"] > 0
    probs = torch.cat(trainer.predict(model, dm))
    assert probs.numel() == dm.predict_dataloader().dataset.pairs_per_epoch and ((probs > 0) & (probs < 1)).all()
    # true test pairs score higher than the same centers with contexts from the other planted half
    center, context = next(iter(dm.test_dataloader()))
    half = {i: w[0] for i, w in enumerate(dm.vocab.words)}
    other = torch.tensor([next(j for j in range(1, len(half)) if half[j] != half[int(c)]) for c in center])
    true_p = model.predict_step((center, context), 0)
    false_p = model.predict_step((center, other), 0)
    assert true_p.mean() > false_p.mean() + 0.2


def test_validation_logs_metrics_and_neighbours(tmp_path, make_corpus, monkeypatch):
    from lightning.pytorch.loggers import TensorBoardLogger

    corpus = make_corpus(planted_corpus(3000))
    questions = tmp_path / "q.txt"
    questions.write_text(": planted\nacc acd bcc bcd\nzzz acd bcc bcd\n")
    pairs = tmp_path / "mypairs.tsv"
    pairs.write_text("acc\tacd\t9\nacc\tbcc\t1\nacd\tbcd\t2\nbcc\tbcd\t8\n")
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="w2v")
    texts = []
    monkeypatch.setattr(logger.experiment, "add_text", lambda tag, text, step=None: texts.append((tag, text)))
    model, trainer, _ = fit(
        tmp_path, corpus,
        model_kw=dict(evaluate=True, eval_analogies=str(questions), eval_pairs=[str(pairs)], probe_words=["acc", "zzz"]),
        data_kw=dict(vocab_size=41),  # 40 words + UNK: equal to the model's, as the logger merges both hparams
        trainer_kw=dict(max_epochs=1, logger=logger, log_every_n_steps=1),
    )  # fmt: skip
    metrics = trainer.callback_metrics
    for key in ("val/loss", "val/analogy_acc", "val/analogy_coverage", "val/mypairs_spearman", "train/loss", "lr",
                "train/pairs_per_sec"):  # fmt: skip
        assert key in metrics, key
    assert metrics["val/analogy_coverage"].item() == pytest.approx(0.5)
    assert texts and texts[0][0] == "nearest_neighbours" and "| acc |" in texts[0][1] and "zzz" not in texts[0][1]
    assert model.evaluate_word_pairs(str(pairs))[1] == pytest.approx(metrics["val/mypairs_spearman"].item(), abs=1e-6)


def test_average_loss_and_linear_decay(tmp_path, make_corpus, capsys):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    corpus = make_corpus(planted_corpus(3000))
    logger = CSVLogger(str(tmp_path / "csv"), name="w2v")
    model, trainer, _ = fit(
        tmp_path, corpus,
        model_kw=dict(average_loss_every=4, lr_decay="linear", min_lr_ratio=0.01, lr=0.1),
        data_kw=dict(vocab_size=41),  # == the model's: the logger merges both hparams
        trainer_kw=dict(max_steps=12, max_epochs=None, limit_val_batches=0, logger=logger, log_every_n_steps=5),
    )  # fmt: skip
    assert trainer.global_step == 12
    printed = capsys.readouterr().out
    assert "Average loss at step 4:" in printed and "Average loss at step 12:" in printed
    logger.save()
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    avg_steps = [int(r["step"]) for r in rows if r.get("train/avg_loss")]
    assert avg_steps == [4, 8, 12]  # written although 4, 8 and 12 are not logging steps (every 5)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.01)


@pytest.mark.parametrize("update", ["batched", "autograd"])
def test_bf16_mixed_precision_trains(tmp_path, make_corpus, update):
    corpus = make_corpus(planted_corpus(3000))
    model, trainer, _ = fit(
        tmp_path, corpus,
        model_kw=dict(update=update),
        trainer_kw=dict(max_steps=20, max_epochs=None, precision="bf16-mixed", limit_val_batches=0, log_every_n_steps=5),
    )  # fmt: skip
    assert model.embedding.dtype == torch.float32
    assert torch.isfinite(model.embedding).all() and torch.isfinite(trainer.callback_metrics["train/loss"])
    # one step under autocast is close to the float32 step
    ref = copy.deepcopy(model)
    center, context = batch(n=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb = batched(model).update(center % model.hparams.vocab_size, context % model.hparams.vocab_size, 0.05,
                                   torch.Generator().manual_seed(0))  # fmt: skip
    lf = batched(ref).update(center % ref.hparams.vocab_size, context % ref.hparams.vocab_size, 0.05,
                             torch.Generator().manual_seed(0))  # fmt: skip
    assert lb.item() == pytest.approx(lf.item(), rel=2e-2)


def test_noise_never_draws_unk_when_the_data_drops_it(tmp_path, make_corpus):
    """With drop_unk, UNK never occurs in training: the unigram noise gives it probability 0 (as gensim,
    which has no UNK); without drop_unk it is drawn by its count like any word."""
    corpus = make_corpus(planted_corpus(3000))
    data_kw, one_step = dict(vocab_size=20, min_count=None), dict(max_steps=1, max_epochs=None)
    model, _, dm = fit(tmp_path / "drop", corpus, data_kw={**data_kw, "drop_unk": True}, trainer_kw=one_step)
    assert dm.vocab.counts[0] > 0 and model.sampler.probs_table[0] == 0
    assert not (model.sampler.draw(20_000) == 0).any()
    expected = torch.tensor(dm.word_counts[1:], dtype=torch.float64) ** 0.75
    torch.testing.assert_close(model.sampler.probs_table[1:], expected / expected.sum())
    model, _, dm = fit(tmp_path / "keep", corpus, data_kw=data_kw, trainer_kw=one_step)
    assert model.sampler.probs_table[0] > 0 and (dm.word_counts == np.asarray(dm.vocab.counts)).all()


def test_divergence_fails_clearly(tmp_path, make_corpus):
    """The CLI's FiniteGuard stops a diverged run with word2vec's own advice (the model itself never syncs)."""
    from lm_tying.callbacks import FiniteGuard, TrainingDivergedError

    corpus = make_corpus(planted_corpus(3000))
    with pytest.raises(TrainingDivergedError, match=r"non-finite at step \d+.*lower the learning rate.*update_pairs"):
        fit(tmp_path, corpus, model_kw=dict(lr=1e4, init="tutorial"), trainer_kw=dict(max_steps=30, max_epochs=None,
            limit_val_batches=0, log_every_n_steps=10, callbacks=[FiniteGuard()]))  # fmt: skip


CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "kw, device, world, expected",
    [
        (dict(), CPU, 1, ("sequential", None, False)),  # the shipped word2vec.yaml's settings, one CPU process
        (dict(), CPU, 2, ("sequential", None, True)),  # DDP: the same kernel, the ranks' changes summed
        (dict(), GPU, 1, ("batched", 4096, False)),  # GPU: batched, lr per pair -> 4096-pair updates
        (dict(), GPU, 2, ("batched", 4096, True)),
        (dict(update_pairs=512), GPU, 1, ("batched", 512, False)),
        (dict(loss="nce", output_bias=True, reduction="mean"), CPU, 1, ("batched", None, False)),  # the tutorial
        (dict(optimizer="adagrad"), CPU, 2, ("autograd", 4096, False)),  # DDP's own gradient all-reduce
        (dict(update="batched"), CPU, 1, ("batched", 4096, False)),
    ],
)
def test_auto_chooses_the_engine_from_device_strategy_and_settings(kw, device, world, expected):
    compiled_library()
    settings = dict(loss="negative_sampling", output_bias=False, reduction="sum", unique=False, lr=0.05)
    model = small_model(**{**settings, **kw})
    choice = choose_engine(model.hparams, device, world)
    assert (choice.update, choice.update_pairs, choice.sum_deltas) == expected


def test_combinations_that_cannot_work_fail_clearly():
    with pytest.raises(EngineError, match="needs loss: negative_sampling, output_bias: false, reduction: sum"):
        choose_engine(small_model(loss="nce", update="sequential").hparams, CPU, 1)
    ns = dict(loss="negative_sampling", output_bias=False, reduction="sum", unique=False)
    with pytest.raises(EngineError, match="CPU only"):
        choose_engine(small_model(update="sequential", **ns).hparams, GPU, 1)
    with pytest.raises(EngineError, match="needs update: autograd"):
        choose_engine(small_model(update="batched", optimizer="adagrad").hparams, CPU, 1)
    with pytest.raises(EngineError, match="DDP"):
        choose_engine(small_model(optimizer="sparse_adam", lr=0.01).hparams, CPU, 2)


def test_invalid_arguments_fail_clearly():
    with pytest.raises(ValueError, match="sparse_adam"):
        Word2Vec(10, num_sampled=4, optimizer="adam")
    with pytest.raises(ValueError, match="sparse=true"):
        Word2Vec(10, num_sampled=4, optimizer="sparse_adam", sparse=False)
    with pytest.raises(ValueError, match="update="):
        Word2Vec(10, num_sampled=4, update="fused")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads=0"):
        Word2Vec(10, num_sampled=4, threads=0)
    with pytest.raises(ValueError, match="unique=false"):
        Word2Vec(10, num_sampled=4, share_negatives=4, unique=True)
    with pytest.raises(ValueError, match="loss="):
        Word2Vec(10, num_sampled=4, loss="softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs vocab_size"):
        Word2Vec(10, num_sampled=64, unique=True)
    with pytest.raises(RuntimeError, match="no vocabulary"):
        Word2Vec(10, num_sampled=4).most_similar("the")


@pytest.mark.parametrize("name", ["word2vec.yaml", "word2vec_cs20.yaml"])
def test_configs_instantiate(name):
    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert cfg["model"]["class_path"] == "lm_tying.models.word2vec.Word2Vec"
    assert cfg["data"]["class_path"] == "lm_tying.data.Text8DataModule"
    model = Word2Vec(vocab_size=100, **cfg["model"]["init_args"])
    data = Text8DataModule(**cfg["data"]["init_args"])
    assert data.mode == "skipgram"
    if name == "word2vec_cs20.yaml":  # the classic TensorFlow tutorial, faithfully
        h = model.hparams
        assert (h.embedding_dim, h.num_sampled, h.loss, h.unique, h.lr, h.optimizer, h.init) == (
            128, 64, "nce", True, 1.0, "sgd", "tutorial")  # fmt: skip
        assert model.sampler.__class__.__name__ == "LogUniformSampler" and not h.remove_accidental_hits
        assert h.share_negatives is None and h.reduction == "mean" and h.lr_decay == "none"
        assert h.average_loss_every == 5000
        assert (h.update_pairs, h.step_per_update) == (128, True)  # 128-pair updates, each a step
        assert (data.vocab_size, data.window, data.dynamic_window, data.subsample) == (50000, 1, False, None)
        assert data.batch_size % h.update_pairs == 0
        assert cfg["trainer"]["max_steps"] == 100_000


def test_step_per_update_carries_many_updates_with_the_same_maths_and_loss_table(tmp_path, make_corpus, capsys):
    """Small updates (the tutorial's have 128 pairs), ten to a loader batch with step_per_update: the same steps, the same
    "Average loss at step N" lines and the same tables as one small batch per step (across an epoch's end)."""
    corpus = make_corpus(planted_corpus(1500))
    tutorial = dict(loss="nce", unique=True, share_negatives=None, num_sampled=8, lr=1.0, reduction="mean",
                    init="tutorial", average_loss_every=14)  # fmt: skip
    run = dict(max_steps=140, max_epochs=None, limit_val_batches=0)
    one, trainer_one, dm = fit(tmp_path / "one", corpus, tutorial, data_kw=dict(batch_size=64), trainer_kw=run)
    table_one = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Average loss")]
    many, trainer_many, _ = fit(tmp_path / "many", corpus, {**tutorial, "update_pairs": 64, "step_per_update": True},
                                data_kw=dict(batch_size=640), trainer_kw=run)  # fmt: skip
    table_many = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Average loss")]
    assert dm.train_dataloader().dataset.pairs_per_epoch < 140 * 64  # the run crosses an epoch's end
    assert trainer_one.global_step == trainer_many.global_step == 140
    assert len(table_one) == 10 and table_many == table_one
    torch.testing.assert_close(many.embedding, one.embedding, rtol=0, atol=0)
    torch.testing.assert_close(many.output_weight, one.output_weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="set update_pairs"):
        Word2Vec(10, num_sampled=4, step_per_update=True)


def test_auto_lr_is_word2vecs_double_on_small_corpora_and_half_of_word2vecs_at_text8s_size():
    assert auto_lr(5_000) == auto_lr(5 * 1_925_773) == 0.05  # text8-head's training split, 5 epochs
    assert auto_lr(5 * 15_300_000) == pytest.approx(0.0129, abs=1e-4)  # text8's
    assert auto_lr(80_000_000) == auto_lr(10**10) == 0.0125
    sizes = np.geomspace(1e7, 8e7, 20)
    assert all(np.diff([auto_lr(int(n)) for n in sizes]) < 0)  # one smooth step down in between


def test_lr_auto_takes_the_training_splits_size_from_the_data(tmp_path, make_corpus, monkeypatch):
    seen = []
    monkeypatch.setattr(word2vec_model, "auto_lr", lambda words: seen.append(words) or 0.0125)
    corpus = make_corpus(planted_corpus(3000))
    model, trainer, dm = fit(tmp_path, corpus, model_kw=dict(lr="auto"), trainer_kw=dict(max_steps=2, max_epochs=None))
    assert seen == [len(dm.split_tokens("train"))]  # bounded by steps alone: one pass
    assert model.optimizers().param_groups[0]["lr"] == 0.0125  # no decay in this run
    fit(tmp_path, corpus, model_kw=dict(lr="auto"), trainer_kw=dict(max_steps=2, max_epochs=3))
    assert seen[1] == 3 * len(dm.split_tokens("train"))  # the split once per epoch
    with pytest.raises(ValueError, match="lr='auto' is a per-pair rate: it needs reduction='sum'"):
        Word2Vec(vocab_size=100, lr="auto", reduction="mean")
    with pytest.raises(ValueError, match="lr='auto' takes the rate from the training split's size"):
        plain = Word2Vec(vocab_size=dm.num_words, lr="auto", reduction="sum", loss="negative_sampling", unique=False,
                         share_negatives=4, output_bias=False, evaluate=False, threads=1)  # fmt: skip
        L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(plain, dm.train_dataloader())  # fmt: skip
