"""The tied LSTM language model: the tie is real everywhere, TBPTT carries state, perplexity is exact."""

from __future__ import annotations

import copy
import functools
import math
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.model_summary import ModelSummary

from lm_tying.data import Text8DataModule, Vocabulary
from lm_tying.models.lstm_lm import LSTMLanguageModel, load_word_vectors

# Warnings that tiny synthetic runs trigger by design.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*self.log.*trainer.*not registered.*"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric.*"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`.*"),
]

CYCLE = "alpha bravo charlie delta echo foxtrot golf hotel"  # 8 words, each followed by one word only


def tiny(vocab_size: int = 30, embedding_dim: int = 8, hidden_dim: int = 8, **kwargs) -> LSTMLanguageModel:
    kwargs.setdefault("dropout_embedding", 0.0)
    kwargs.setdefault("dropout_lstm", 0.0)
    kwargs.setdefault("dropout_output", 0.0)
    return LSTMLanguageModel(vocab_size, embedding_dim, hidden_dim, **kwargs)


def make_vocab(words: list[str]) -> Vocabulary:
    return Vocabulary(["UNK", *words], [1] + list(range(len(words) + 1, 1, -1)))


def batch(vocab_size: int = 30, b: int = 3, t: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (b, t), generator=g), torch.randint(0, vocab_size, (b, t), generator=g)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def lm_data(corpus: Path, tmp_path: Path, **kwargs) -> Text8DataModule:
    kwargs.setdefault("vocab_size", 9)
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("bptt", 8)
    kwargs.setdefault("eval_batch_size", 2)
    kwargs.setdefault("split", (0.8, 0.1, 0.1))
    return Text8DataModule(path=str(corpus), data_dir=str(tmp_path / "data"), mode="lm", num_workers=0, **kwargs)


# ---------------------------------------------------------------------- the tie


def test_tie_is_one_parameter_counted_once():
    tied, untied = tiny(100, 16, 16), tiny(100, 16, 16, tie_weights=False)
    assert tied.decoder.weight is tied.embedding.weight and tied.is_tied
    assert untied.decoder.weight is not untied.embedding.weight and not untied.is_tied
    names = [n for n, _ in tied.named_parameters()]
    assert "embedding.weight" in names and "decoder.weight" not in names  # yielded once
    assert tied.num_parameters() == sum(p.numel() for p in tied.parameters())
    assert untied.num_parameters() - tied.num_parameters() == 100 * 16
    # Lightning's summary totals agree (its per-layer rows show the matrix under both layers).
    assert ModelSummary(tied).total_parameters == tied.num_parameters()
    assert ModelSummary(untied).total_parameters == untied.num_parameters()


def test_tie_survives_dtype_and_device_moves():
    model = tiny()
    model.to(torch.float64)
    assert model.is_tied and model.decoder.weight.dtype == torch.float64
    model.to(torch.bfloat16).float()
    assert model.is_tied
    # Plain torch unties on meta moves (one new Parameter per attribute); the module re-ties.
    model.to("meta")
    assert model.is_tied and model.embedding.weight.is_meta
    model.to_empty(device="cpu")
    assert model.is_tied
    if torch.cuda.is_available():
        model.cuda()
        assert model.is_tied and model.decoder.weight.is_cuda


def test_tie_survives_load_state_dict_assign_and_deepcopy():
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # assign=True installs one new Parameter per key
    assert model.is_tied
    assert copy.deepcopy(model).is_tied


def test_tie_with_mismatched_sizes_needs_projection():
    with pytest.raises(ValueError, match="projection"):
        LSTMLanguageModel(50, embedding_dim=8, hidden_dim=12, projection=False)
    untied = LSTMLanguageModel(50, embedding_dim=8, hidden_dim=12, projection=False, tie_weights=False)
    assert untied.projection is None and untied.decoder.in_features == 12


def test_projection_path_for_h_different_from_e():
    model = tiny(40, embedding_dim=6, hidden_dim=10, num_layers=2)
    assert model.projection is not None and model.is_tied
    assert tuple(model.projection.weight.shape) == (6, 10)
    inputs, targets = batch(40, b=2, t=7)
    logits, (h, c) = model(inputs)
    assert logits.shape == (2, 7, 40) and h.shape == (2, 2, 10) and c.shape == (2, 2, 10)
    model._loss(logits, targets).backward()
    assert model.projection.weight.grad is not None and model.projection.weight.grad.abs().sum() > 0
    assert tiny(40, 8, 8).projection is None  # H == E: no projection unless asked for


def test_one_gradient_accumulates_both_uses():
    torch.manual_seed(0)
    tied = tiny(30, 8, 8, num_layers=2)
    inputs, targets = batch(30, b=4, t=6)
    tied._loss(tied(inputs)[0], targets).backward()
    shared_grad = tied.embedding.weight.grad.clone()

    # The same network with two separate (equal) matrices: each gets the gradient of one use.
    untied = tiny(30, 8, 8, num_layers=2, tie_weights=False)
    untied.load_state_dict({**tied.state_dict(), "decoder.weight": tied.embedding.weight.detach().clone()})
    untied._loss(untied(inputs)[0], targets).backward()
    as_input, as_output = untied.embedding.weight.grad, untied.decoder.weight.grad
    assert as_input.abs().sum() > 0 and as_output.abs().sum() > 0
    torch.testing.assert_close(shared_grad, as_input + as_output)
    assert not torch.allclose(shared_grad, as_output)


def test_tie_under_torch_compile(monkeypatch):
    """compile=True compiles the forward function; the module (and the tie) are left as they are."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        # Inductor needs a C++ compiler on CPU; AOTAutograd (where parameters get deduplicated) still runs.
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch.manual_seed(0)
    eager = tiny(30, 8, 8)
    compiled = tiny(30, 8, 8, compile=True)
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()
    assert compiled._compiled_features is not None
    inputs, targets = batch(30)
    for model in (eager, compiled):
        model._loss(model(inputs)[0], targets).backward()
    assert compiled.is_tied
    assert set(compiled.state_dict()) == set(eager.state_dict())  # no "_orig_mod." prefixes
    torch.testing.assert_close(compiled.embedding.weight.grad, eager.embedding.weight.grad)


# ---------------------------------------------------------------------- truncated BPTT


def test_batch_two_starts_from_detached_final_state_of_batch_one():
    model = tiny(30, 8, 8, num_layers=2)
    seen: list = []
    model.lstm.register_forward_hook(lambda mod, args, out: seen.append((args[1] if len(args) > 1 else None, out[1])))
    model.on_train_epoch_start()
    model.training_step(batch(30, seed=1), 0).backward()
    model.training_step(batch(30, seed=2), 1).backward()
    (start1, end1), (start2, _) = seen
    assert start1 is None  # zeros at the start of an epoch
    assert end1[0].requires_grad  # the final state is part of batch 1's graph ...
    for carried, final in zip(start2, end1):
        assert not carried.requires_grad  # ... and batch 2 gets it detached
        torch.testing.assert_close(carried, final.detach(), rtol=0, atol=0)
    model.on_train_epoch_start()
    model.training_step(batch(30, seed=3), 0)
    assert seen[-1][0] is None  # reset at each epoch


def test_state_follows_batch_shape_and_evaluation_has_its_own():
    model = tiny()
    model.training_step(batch(b=3, t=5), 0)
    train_state = model._train_hidden
    model.training_step(batch(b=3, t=2), 1)  # last batch of an epoch: fewer time steps
    assert model._train_hidden[0].shape == (2, 3, 8)  # [layers, B, H]
    train_state = model._train_hidden
    model.on_validation_epoch_start()
    model.validation_step(batch(b=2, t=5), 0)  # eval_batch_size differs
    assert model._eval_hidden[0].shape == (2, 2, 8)
    assert model._train_hidden is train_state  # validation in the middle of an epoch leaves it alone
    inputs = batch(b=5)[0]  # a batch of another size cannot continue the state: zeros
    assert model._initial_state(model._train_hidden, inputs) is None


def test_module_level_resume_continues_exactly(tmp_path):
    """A checkpoint taken mid-epoch restores the carried state; the resumed steps match exactly."""
    torch.manual_seed(0)
    model = tiny(30, 8, 8, num_layers=2)
    model.vocab = make_vocab([f"w{i}" for i in range(29)])
    batches = [batch(30, seed=s) for s in range(5)]

    def step(m: LSTMLanguageModel, opt: torch.optim.Optimizer, b: tuple) -> float:
        opt.zero_grad()
        loss = m.training_step(b, 0)
        loss.backward()
        opt.step()
        return loss.item()

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.on_train_epoch_start()
    for b in batches[:2]:
        step(model, opt, b)
    checkpoint = {"state_dict": copy.deepcopy(model.state_dict())}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "mid.ckpt")
    expected = [step(model, opt, b) for b in batches[2:]]

    resumed = tiny(30, 8, 8, num_layers=2)
    restored = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    resumed.on_load_checkpoint(restored)
    resumed.load_state_dict(restored["state_dict"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=1.0)
    assert [step(resumed, opt2, b) for b in batches[2:]] == expected
    torch.testing.assert_close(resumed.embedding.weight, model.embedding.weight, rtol=0, atol=0)

    # Without the carried state (what a fresh epoch start would do) the losses differ: the test can fail.
    fresh = tiny(30, 8, 8, num_layers=2)
    fresh.load_state_dict(restored["state_dict"])
    fresh.on_train_epoch_start()
    assert step(fresh, torch.optim.SGD(fresh.parameters(), lr=1.0), batches[2]) != expected[0]


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_trainer_resume_mid_epoch_matches_uninterrupted(make_corpus, tmp_path, loss):
    """With the sampled softmax the negatives' generator travels in the checkpoint, so the resumed run
    draws what the uninterrupted one drew, whatever the global seed."""
    corpus = make_corpus(" ".join([CYCLE] * 60))
    kwargs = dict(optimizer="adam", lr=0.01, lr_decay_factor=1.0, loss=loss, num_sampled=4)

    torch.manual_seed(0)
    full = tiny(9, 8, 8, **kwargs)
    initial = copy.deepcopy(full.state_dict())
    trainer(tmp_path / "a", max_steps=8, limit_val_batches=0).fit(full, lm_data(corpus, tmp_path))

    interrupted = tiny(9, 8, 8, **kwargs)
    interrupted.load_state_dict(initial)
    every3 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    run = trainer(tmp_path / "b", max_steps=3, limit_val_batches=0, enable_checkpointing=True, callbacks=[every3])
    run.fit(interrupted, lm_data(corpus, tmp_path))
    ckpt = next((tmp_path / "ckpt").glob("*step=3*.ckpt"))
    stored = torch.load(ckpt, weights_only=False)["lstm_lm"]
    assert stored["train_hidden"] is not None and (stored["sample_generator"] is not None) == (loss == "sampled")

    torch.manual_seed(123)
    resumed = tiny(9, 8, 8, **kwargs)
    trainer(tmp_path / "c", max_steps=8, limit_val_batches=0).fit(resumed, lm_data(corpus, tmp_path), ckpt_path=ckpt)
    assert resumed.is_tied
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


# ---------------------------------------------------------------------- perplexity


def test_perplexity_is_token_weighted_exp_mean_nll():
    """Fixed output distribution p = (1/2, 1/4, 1/8, 1/8): NLLs are log 2, log 4, log 8, log 8."""
    model = tiny(4, 4, 4)
    with torch.no_grad():
        model.embedding.weight.zero_()  # tied: the decoder weight is zero too, so logits = bias
        model.decoder.bias.copy_(torch.tensor([0.5, 0.25, 0.125, 0.125]).log())
    model.on_validation_epoch_start()
    model.validation_step((torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, 0, 1]])), 0)  # 4 log 2 nats
    model.validation_step((torch.zeros(1, 1, dtype=torch.long), torch.tensor([[2]])), 1)  # 3 log 2 nats
    nll = model.val_nll.compute()
    # 7 log 2 nats over 4 tokens; averaging the two batch means would give (4/3 + 3)/2 log 2 instead.
    assert nll.item() == pytest.approx(7 / 4 * math.log(2), rel=1e-6)
    assert nll.exp().item() == pytest.approx(2 ** (7 / 4), rel=1e-6)


def test_learns_deterministic_pattern_to_perplexity_near_one(make_corpus, tmp_path):
    corpus = make_corpus(" ".join([CYCLE] * 100))
    torch.manual_seed(0)
    model = tiny(9, 16, 16, optimizer="adam", lr=0.05, lr_decay_factor=1.0)
    logger = CSVLogger(tmp_path, name="logs")
    run = trainer(tmp_path, max_epochs=6, logger=logger, log_every_n_steps=5)
    run.fit(model, lm_data(corpus, tmp_path, batch_size=8, bptt=10))
    assert run.callback_metrics["val/ppl"] < 1.1
    [result] = run.test(model, lm_data(corpus, tmp_path, batch_size=8, bptt=10), verbose=False)
    assert result["test/ppl"] < 1.1 and result["test/loss"] == pytest.approx(math.log(result["test/ppl"]), rel=1e-5)
    logged = Path(logger.log_dir, "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/ppl", "train/tokens_per_sec", "lr", "val/loss", "val/ppl"):
        assert key in logged
    # Samples follow the pattern once learned (a whole cycle as prompt: the model was trained on
    # carried states, and a zero state is rare in training).
    assert model.generate(CYCLE, num_words=10, temperature=0) == f"{CYCLE} {CYCLE} alpha bravo"
    # predict scores the test split token by token: the same total as test/loss
    log_probs = torch.cat([b.flatten() for b in run.predict(model, lm_data(corpus, tmp_path, batch_size=8, bptt=10))])
    assert (log_probs <= 0).all() and -log_probs.mean().item() == pytest.approx(result["test/loss"], rel=1e-4)


def test_bf16_mixed_trains_with_finite_loss(make_corpus, tmp_path):
    corpus = make_corpus(" ".join([CYCLE] * 40))
    model = tiny(9, 8, 8, optimizer="adam", lr=0.01)
    run = trainer(tmp_path, max_epochs=1, limit_train_batches=6, limit_val_batches=2, precision="bf16-mixed")
    run.fit(model, lm_data(corpus, tmp_path))
    assert model.is_tied and math.isfinite(run.callback_metrics["val/loss"].item())
    assert model._train_hidden[0].device == model.device


# ---------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_checkpoint_round_trip_keeps_tie_and_vocabulary(make_corpus, tmp_path, loss):
    corpus = make_corpus(" ".join([CYCLE] * 40))
    model = tiny(9, 8, 12, loss=loss, num_sampled=4)  # with a projection
    run = trainer(tmp_path, max_steps=2, limit_val_batches=1)
    run.fit(model, lm_data(corpus, tmp_path))
    run.save_checkpoint(tmp_path / "m.ckpt")
    loaded = LSTMLanguageModel.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.is_tied and loaded.vocab == model.vocab and loaded.hparams.loss == loss
    torch.testing.assert_close(loaded.embedding.weight, model.embedding.weight)
    loaded.embedding.weight.data.add_(1.0)
    assert torch.equal(loaded.decoder.weight, loaded.embedding.weight)


def test_checkpoint_stores_the_tied_matrix_once(make_corpus, tmp_path):
    corpus = make_corpus(num_words=6000)
    sizes = {}
    for tie in (True, False):
        model = tiny(150, 32, 32, tie_weights=tie)
        run = trainer(tmp_path / str(tie), max_steps=1, limit_val_batches=0)
        run.fit(model, lm_data(corpus, tmp_path, vocab_size=150))
        run.save_checkpoint(tmp_path / f"{tie}.ckpt")
        sizes[tie] = (tmp_path / f"{tie}.ckpt").stat().st_size
    matrix = 150 * 32 * 4
    assert sizes[False] - sizes[True] == pytest.approx(matrix, rel=0.05)


def test_load_rejects_word2vec_kind(tmp_path):
    model = tiny()
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    checkpoint["lm_tying_model"] = "Word2Vec"
    with pytest.raises(ValueError, match="Word2Vec"):
        tiny().on_load_checkpoint(checkpoint)


# ---------------------------------------------------------------------- embedding_init


def _lm_checkpoint(path: Path, words: list[str], weight: torch.Tensor) -> Path:
    """A checkpoint of this project whose vocabulary is ``words`` and whose matrix is ``weight``."""
    source = tiny(len(words), weight.shape[1], weight.shape[1])
    with torch.no_grad():
        source.embedding.weight.copy_(weight)
    torch.save(
        {
            "state_dict": source.state_dict(),
            "hyper_parameters": dict(source.hparams),
            "lm_tying_model": "LSTMLanguageModel",
            "pytorch-lightning_version": L.__version__,
            "vocabulary": {"words": words, "counts": [1] * len(words)},
        },
        path,
    )
    return path


def test_embedding_init_maps_rows_by_word(tmp_path):
    words = ["UNK", "the", "of", "and", "one", "zero"]
    model = tiny(len(words), 4, 4)
    model.vocab = make_vocab(words[1:])
    before = model.embedding.weight.detach().clone()
    # The source lists the words in another order, lacks "zero" and has a word the model lacks.
    src_words = ["UNK", "one", "and", "extra", "the", "of"]
    src = torch.arange(len(src_words) * 4, dtype=torch.float32).reshape(-1, 4)
    coverage = model.init_embedding_from(_lm_checkpoint(tmp_path / "src.ckpt", src_words, src))
    assert coverage == pytest.approx(5 / 6)
    for i, word in enumerate(words):
        expected = src[src_words.index(word)] if word in src_words else before[i]
        torch.testing.assert_close(model.embedding.weight[i], expected)
    assert model.is_tied  # the decoder starts from the same vectors


def test_embedding_init_dimension_mismatch_is_a_clear_error(tmp_path):
    model = tiny(3, 4, 4)
    model.vocab = make_vocab(["a", "b"])
    path = _lm_checkpoint(tmp_path / "wide.ckpt", ["UNK", "a", "b"], torch.zeros(3, 6))
    with pytest.raises(ValueError, match="embedding_dim to 6"):
        model.init_embedding_from(path)
    with pytest.raises(FileNotFoundError):
        model.init_embedding_from(tmp_path / "missing.ckpt")


def test_embedding_init_from_word2vec_text_and_binary(tmp_path):
    vectors = pytest.importorskip("lm_tying.vectors")
    words = ["UNK", "king", "queen", "man"]
    model = tiny(4, 3, 3)
    model.vocab = make_vocab(words[1:])
    wv = vectors.WordVectors(["man", "queen", "king"], np.arange(9, dtype=np.float32).reshape(3, 3))
    for binary, name in ((False, "v.txt"), (True, "v.bin")):
        wv.save_word2vec_format(tmp_path / name, binary=binary)
        got_words, got = load_word_vectors(tmp_path / name)
        assert got_words == ["man", "queen", "king"]
        assert model.init_embedding_from(tmp_path / name) == pytest.approx(3 / 4)
        torch.testing.assert_close(model.embedding.weight[1], torch.tensor([6.0, 7.0, 8.0]))  # king
        torch.testing.assert_close(model.embedding.weight[3], torch.tensor([0.0, 1.0, 2.0]))  # man


def test_embedding_init_happens_in_fit_setup_and_not_on_reload(make_corpus, tmp_path):
    corpus = make_corpus(" ".join([CYCLE] * 40))
    data = lm_data(corpus, tmp_path)
    src = torch.randn(9, 8)
    path = _lm_checkpoint(tmp_path / "src.ckpt", data.vocab.words, src)
    model = tiny(9, 8, 8, embedding_init=str(path), freeze_embedding=True, lr=1.0)
    run = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    run.fit(model, data)
    assert model.embedding_init_coverage == 1.0
    # Frozen, and tied: neither use changed the matrix; the decoder bias did learn.
    torch.testing.assert_close(model.embedding.weight, src)
    assert model.is_tied and not model.decoder.weight.requires_grad
    assert model.decoder.bias.abs().sum() > 0
    # A checkpoint's weights are never overwritten by embedding_init when training goes on.
    run.save_checkpoint(tmp_path / "m.ckpt")
    loaded = LSTMLanguageModel.load_from_checkpoint(tmp_path / "m.ckpt", freeze_embedding=False)
    path.unlink()  # would fail if setup tried to read it again
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(loaded, lm_data(corpus, tmp_path))
    assert not torch.allclose(loaded.embedding.weight, src)
    # Resuming a fit (ckpt_path) of a model configured with embedding_init does not read it either.
    resumed = tiny(9, 8, 8, embedding_init=str(path), freeze_embedding=True, lr=1.0)
    resume = trainer(tmp_path, max_steps=4, limit_val_batches=0)
    resume.fit(resumed, lm_data(corpus, tmp_path), ckpt_path=tmp_path / "m.ckpt")
    torch.testing.assert_close(resumed.embedding.weight, src)


# ---------------------------------------------------------------------- optimizers and generation


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_and_plateau_schedule(name):
    model = tiny(optimizer=name, lr=0.5, lr_decay_factor=4.0, freeze_embedding=True)
    config = model.configure_optimizers()
    opt = config["optimizer"]
    assert type(opt).__name__.lower() == name
    assert all(p.requires_grad for group in opt.param_groups for p in group["params"])
    scheduler = config["lr_scheduler"]
    assert scheduler["monitor"] == "val/loss"
    scheduler["scheduler"].step(1.0)
    scheduler["scheduler"].step(1.0)  # no improvement: divide by 4 (patience 0, as the PyTorch example)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)
    assert not isinstance(tiny(lr_decay_factor=1.0).configure_optimizers(), dict)


def test_generate_samples_words_of_the_vocabulary():
    words = [f"w{i}" for i in range(29)]
    model = tiny(30)
    model.vocab = make_vocab(words)
    model.train()
    text = model.generate("w1 w2 unknownword", num_words=12, temperature=0.8, top_k=5, seed=3)
    out = text.split()
    assert out[:3] == ["w1", "w2", "unknownword"] and len(out) == 15
    assert all(w in model.vocab for w in out[3:])
    assert model.training  # mode restored
    assert text == model.generate("w1 w2 unknownword", num_words=12, temperature=0.8, top_k=5, seed=3)
    greedy = model.generate("w1", num_words=5, temperature=0)
    assert greedy == model.generate("w1", num_words=5, top_k=1, seed=7)
    assert "UNK" not in model.generate("w1", num_words=40, temperature=5.0, seed=1, allow_unk=False).split()
    with pytest.raises(ValueError, match="at least one word"):
        model.generate("   ")
    with pytest.raises(RuntimeError, match="vocabulary"):
        tiny().generate("w1")


# ---------------------------------------------------------------------- DDP

DDP_SCRIPT = r'''
import json, sys
from pathlib import Path
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lm_tying.data import Text8DataModule
from lm_tying.models.lstm_lm import LSTMLanguageModel

tmp, corpus, mode, loss = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.manual_seed(0)
model = LSTMLanguageModel(50, 8, 8, num_layers=2, optimizer="adam", lr=0.01, dropout_embedding=0.0,
                          dropout_lstm=0.0, dropout_output=0.0, loss=loss, num_sampled=8)
data = Text8DataModule(path=corpus, data_dir=str(tmp / "data"), vocab_size=50, mode="lm", batch_size=4,
                       bptt=8, eval_batch_size=2, num_workers=0, split=(0.8, 0.1, 0.1))
callbacks = [ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=3, save_top_k=-1)] if mode == "full" else []
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, limit_val_batches=3,
                    val_check_interval=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=mode == "full", callbacks=callbacks, default_root_dir=tmp)
ckpt = str(tmp / "ckpt" / "epoch=0-step=3.ckpt") if mode == "resume" else None
trainer.fit(model, data, ckpt_path=ckpt)
out = {"val_ppl": trainer.callback_metrics["val/ppl"].item(), "tied": model.is_tied,
       "weights": [p.detach().sum().item() for p in model.parameters()]}
(tmp / f"{mode}-rank{trainer.global_rank}.json").write_text(json.dumps(out))
torch.distributed.destroy_process_group()  # as lm-tying's CLI does: gloo's threads otherwise may abort the exit
'''


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_ddp_two_processes_resume_exactly(make_corpus, tmp_path, loss):
    """2 gloo processes: each rank's carried state goes into the checkpoint; resume matches; ranks agree.

    With the sampled softmax the tie holds too, and the ranks draw the same negatives (same seed), whose
    generator state rank 0 writes and every rank restores."""
    import json
    import os
    import subprocess
    import sys

    corpus = make_corpus(num_words=6000)
    script = tmp_path / "ddp_lm.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    for mode in ("full", "resume"):
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path), str(corpus), mode, loss],
            capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    hidden = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=False)["lstm_lm"]["train_hidden"]
    assert hidden[0].shape == (2, 2, 4, 8)  # [ranks, layers, streams, H]
    assert not torch.equal(hidden[0][0], hidden[0][1])  # the ranks carry their own streams
    results = {f.stem: json.loads(f.read_text()) for f in tmp_path.glob("*-rank*.json")}
    assert set(results) == {"full-rank0", "full-rank1", "resume-rank0", "resume-rank1"}
    assert all(r["tied"] for r in results.values())
    assert results["full-rank0"]["weights"] == results["full-rank1"]["weights"]  # DDP keeps ranks identical
    assert results["resume-rank0"]["weights"] == results["full-rank0"]["weights"]  # exact resume
    assert results["resume-rank0"]["val_ppl"] == results["full-rank0"]["val_ppl"] == results["full-rank1"]["val_ppl"]


def test_embedding_init_from_a_word2vec_checkpoint(make_corpus, tmp_path):
    word2vec = pytest.importorskip("lm_tying.models.word2vec")
    corpus = make_corpus(num_words=3000)
    w2v_data = Text8DataModule(
        path=str(corpus), data_dir=str(tmp_path / "data"), vocab_size=40, mode="skipgram", batch_size=64, num_workers=0
    )
    w2v = word2vec.Word2Vec(40, embedding_dim=6, num_sampled=4, evaluate=False)
    run = trainer(tmp_path / "w2v", max_steps=2, limit_val_batches=0)
    run.fit(w2v, w2v_data)
    run.save_checkpoint(tmp_path / "w2v.ckpt")
    vectors = w2v.word_vectors()

    # The LM's vocabulary is smaller (a prefix of the same ranking) and listed in reverse: rows follow words.
    lm_words = list(reversed(w2v_data.vocab.words[1:30])) + ["notaword"]
    model = tiny(31, 6, 10)
    model.vocab = make_vocab(lm_words)
    assert model.init_embedding_from(tmp_path / "w2v.ckpt") == pytest.approx(30 / 31)  # UNK and 29 words
    for i, word in enumerate(model.vocab.words[:-1]):
        torch.testing.assert_close(model.embedding.weight[i], torch.as_tensor(vectors[word]))
