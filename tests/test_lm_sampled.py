"""The LM with a sampled softmax: one tied Parameter through both uses, full softmax at evaluation, compile,
bf16 on CPUs with and without bf16 LSTM support (checkpoints, resume and DDP: tests/test_lstm_lm.py)."""

from __future__ import annotations

import functools
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from lm_tying.models import lstm_lm
from lm_tying.models.lstm_lm import LSTMLanguageModel
from lm_tying.nce import LogUniformSampler, UnigramSampler
from test_lstm_lm import CYCLE, batch, lm_data, tiny, trainer
from test_lstm_lm import pytestmark as lm_warnings

pytestmark = [*lm_warnings, pytest.mark.filterwarnings("ignore:.*cannot run the LSTM in bf16.*")]


def sampled(vocab_size: int = 30, embedding_dim: int = 8, hidden_dim: int = 8, **kwargs) -> LSTMLanguageModel:
    kwargs.setdefault("num_sampled", 6)
    return tiny(vocab_size, embedding_dim, hidden_dim, loss="sampled", **kwargs)


def sampled_loss(model: LSTMLanguageModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    model._sample_generator = None  # every call draws the same negatives (seeded from torch.initial_seed())
    return model._sampled_loss(model.features(inputs)[0], targets)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="num_sampled"):
        sampled(30, num_sampled=30)
    with pytest.raises(ValueError, match="loss must be"):
        tiny(30, loss="nce")
    assert isinstance(sampled(30).sampler, LogUniformSampler) and tiny(30).sampler is None
    assert isinstance(sampled(30, sampler="unigram").sampler, UnigramSampler)


def test_sampled_gradient_is_the_sum_of_both_uses_and_touches_only_used_decoder_rows():
    torch.manual_seed(0)
    tied = sampled(30, 8, 8, num_layers=2)
    inputs, targets = batch(30, b=3, t=4)
    sampled_loss(tied, inputs, targets).backward()

    untied = sampled(30, 8, 8, num_layers=2, tie_weights=False)
    untied.load_state_dict({**tied.state_dict(), "decoder.weight": tied.embedding.weight.detach().clone()})
    sampled_loss(untied, inputs, targets).backward()
    as_input, as_output = untied.embedding.weight.grad, untied.decoder.weight.grad
    torch.testing.assert_close(tied.embedding.weight.grad, as_input + as_output)
    # the decoder's gradient lives on the target rows and the drawn rows only
    gen = torch.Generator().manual_seed(torch.initial_seed())
    drawn, _ = untied.sampler.sample(6, unique=True, generator=gen)
    used = set(targets.flatten().tolist()) | set(drawn.tolist())
    touched = set((as_output.abs().sum(1) > 0).nonzero().flatten().tolist())
    assert touched == used and len(used) < 30


def test_validation_is_the_full_softmax(make_corpus, tmp_path):
    corpus = make_corpus(" ".join([CYCLE] * 40))
    torch.manual_seed(0)
    model = sampled(9, num_sampled=4)
    full = tiny(9, loss="full")
    full.load_state_dict(model.state_dict())
    results = [trainer(tmp_path).validate(m, lm_data(corpus, tmp_path), verbose=False)[0] for m in (model, full)]
    assert results[0]["val/loss"] == results[1]["val/loss"]
    data = lm_data(corpus, tmp_path)
    data.setup("validate")
    nll, count, hidden = 0.0, 0, None
    with torch.no_grad():
        for inputs, targets in data.val_dataloader():
            logits, hidden = model(inputs, hidden)
            nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
    assert results[0]["val/loss"] == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.parametrize("sampler", ["log_uniform", "unigram"])
def test_sampled_training_learns_the_pattern(make_corpus, tmp_path, sampler):
    corpus = make_corpus(" ".join([CYCLE] * 100))
    torch.manual_seed(0)
    model = sampled(9, 16, 16, num_sampled=4, sampler=sampler, optimizer="adam", lr=0.05, lr_decay_factor=1.0)
    run = trainer(tmp_path, max_epochs=6)
    run.fit(model, lm_data(corpus, tmp_path, batch_size=8, bptt=10))
    assert run.callback_metrics["val/ppl"] < 2.0 and model.is_tied  # full softmax; untrained: about 9
    if sampler == "unigram":  # the tables were filled from the vocabulary's counts at setup
        counts = torch.as_tensor(model.vocab.counts, dtype=torch.float64)
        torch.testing.assert_close(model.sampler.probs_table, counts / counts.sum())


def test_sampled_loss_under_torch_compile(monkeypatch):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch.manual_seed(0)
    eager = sampled(30)
    compiled = sampled(30, compile=True)
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()
    inputs, targets = batch(30)
    for model in (eager, compiled):
        sampled_loss(model, inputs, targets).backward()
    assert compiled.is_tied and set(compiled.state_dict()) == set(eager.state_dict())
    torch.testing.assert_close(compiled.embedding.weight.grad, eager.embedding.weight.grad)


# ---------------------------------------------------------------------- bf16 on CPUs without bf16 LSTM


def test_bf16_lstm_without_cpu_support_runs_the_lstm_in_float32(monkeypatch):
    """Whatever this CPU can do, the fallback path: LSTM in float32, the decoder in bf16, finite loss."""
    monkeypatch.setattr(lstm_lm, "cpu_runs_bf16_lstm", lambda: False)
    model = sampled(30, bf16_lstm=True)
    seen = []
    model.lstm.register_forward_hook(lambda mod, args, out: seen.append(out[0].dtype))
    inputs, targets = batch(30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(inputs)
        loss = sampled_loss(model, inputs, targets)
    assert seen[0] == torch.float32 and logits.dtype == torch.bfloat16
    loss.backward()
    assert math.isfinite(loss.item()) and model.embedding.weight.grad.abs().sum() > 0


@pytest.mark.skipif(
    not lstm_lm.cpu_runs_bf16_lstm(),
    reason="this CPU's oneDNN has no bf16 LSTM (it needs AVX-512 BF16 or AMX); the float32 fallback is tested",
)
def test_bf16_lstm_runs_the_lstm_in_bf16_where_the_cpu_can():
    model = tiny(30, bf16_lstm=True)
    seen = []
    model.lstm.register_forward_hook(lambda mod, args, out: seen.append(out[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(batch(30)[0])
    assert seen == [torch.bfloat16]


def test_bf16_autocast_keeps_the_lstm_in_float32_by_default(monkeypatch):
    """The choice is the setting's, not the CPU's: with a bf16 LSTM available, the default (``bf16_lstm:
    false``) still runs it in float32 (state carried in float32 to the next window), the decoder stays bf16,
    and training steps work."""
    monkeypatch.setattr(lstm_lm, "cpu_runs_bf16_lstm", lambda: True)
    torch.manual_seed(0)
    model = tiny(30)
    seen = []
    model.lstm.register_forward_hook(lambda mod, args, out: seen.append((out[0].dtype, out[1][1].dtype)))
    inputs, targets = batch(30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(inputs)
        for step in range(2):
            loss = model.training_step((inputs, targets), step)
            loss.backward()
    assert seen == [(torch.float32, torch.float32)] * 3 and logits.dtype == torch.bfloat16
    assert model._train_hidden[1].dtype == torch.float32 and math.isfinite(loss.item())
    assert model.embedding.weight.grad.abs().sum() > 0 and model.lstm.weight_hh_l0.grad.dtype == torch.float32
