"""The LM's fused output layer + cross-entropy (``loss: full`` training) and what its training loop logs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lm_tying import nce
from lm_tying.nce import linear_cross_entropy
from tests.test_lstm_lm import CYCLE, batch, lm_data, tiny, trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*self.log.*trainer.*not registered.*"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric.*"),
]


def reference(inputs, weight, bias, targets):
    return F.cross_entropy(F.linear(inputs, weight, bias), targets)


def decoder_problem(seed: int, rows: int = 37, vocab: int = 50, width: int = 16, weight_scale: float = 3.0):
    """Random inputs, a decoder weight and bias needing gradients, and targets."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, width, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, width, generator=g) * weight_scale).requires_grad_()
    bias = torch.randn(vocab, generator=g, requires_grad=True)
    return inputs, weight, bias, torch.randint(0, vocab, (rows,), generator=g)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_loss_passes_gradcheck_in_float64(with_bias):
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    targets = torch.tensor([0, 6, 3, 3, 1])
    for chunk_rows in (2, 5, 64):  # chunks that split the rows unevenly, exactly, and not at all
        assert torch.autograd.gradcheck(
            lambda x, w, b: linear_cross_entropy(x, w, b, targets, chunk_rows), (inputs, weight, bias)
        )


def test_fused_loss_equals_cross_entropy_of_linear():
    inputs, weight, bias, targets = decoder_problem(1)
    want = reference(inputs, weight, bias, targets)
    want_grads = torch.autograd.grad(want, (inputs, weight, bias))
    got = linear_cross_entropy(inputs, weight, bias, targets, chunk_rows=8)
    got_grads = torch.autograd.grad(got * 3, (inputs, weight, bias))  # the incoming gradient scales them
    torch.testing.assert_close(got, want)
    for g_got, g_want in zip(got_grads, want_grads):
        torch.testing.assert_close(g_got, 3 * g_want)
    # only the inputs need a gradient (a frozen tied matrix): no gradient for the others, the same one here
    frozen = linear_cross_entropy(inputs, weight.detach(), bias.detach(), targets, chunk_rows=8)
    torch.testing.assert_close(torch.autograd.grad(frozen, inputs)[0], want_grads[0])
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(inputs, weight, bias, targets, chunk_rows=0)


@pytest.mark.parametrize("block_rows", [1, 3, 1000])
@pytest.mark.parametrize("chunk_rows", [4, 37, 64])
def test_fused_loss_in_softmax_blocks_and_chunks(monkeypatch, block_rows, chunk_rows):
    """The in-place softmax over blocks of rows (a CPU's cache-sized blocks, forced small here) inside the
    matmul's chunks gives the plain expression's loss and gradients, bias gradient included."""
    monkeypatch.setattr(nce, "_softmax_block_rows", lambda logits: block_rows)
    params = decoder_problem(2)
    want = reference(*params)
    got = linear_cross_entropy(*params, chunk_rows=chunk_rows)
    torch.testing.assert_close(got, want)
    for g_got, g_want in zip(torch.autograd.grad(got, params[:3]), torch.autograd.grad(want, params[:3])):
        torch.testing.assert_close(g_got, g_want)


def test_fused_loss_under_bf16_autocast_takes_the_softmax_in_float32():
    """bf16 logits (autocast's matmul) are copied into a float32 buffer: the loss is the float32
    cross-entropy of those very logits, and the gradients come back in the inputs' dtypes."""
    inputs, weight, bias, targets = decoder_problem(3, rows=29, weight_scale=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(inputs, weight, bias, targets)
        logits = F.linear(inputs, weight, bias)
    assert logits.dtype == torch.bfloat16 and got.dtype == torch.float32
    torch.testing.assert_close(got, F.cross_entropy(logits.float(), targets))
    grads = torch.autograd.grad(got, (inputs, weight, bias))
    assert [t.dtype for t in grads] == [torch.float32] * 3
    want = torch.autograd.grad(reference(inputs, weight, bias, targets), (inputs, weight, bias))
    for g_got, g_want in zip(grads, want):
        torch.testing.assert_close(g_got, g_want, atol=0.02, rtol=0.05)  # bf16 matmuls


def test_training_step_gives_the_unfused_loss_and_gradients_and_the_tie_holds():
    torch.manual_seed(0)
    model = tiny(30, 8, 8, num_layers=2)
    inputs, targets = batch(30, b=4, t=6)
    model.zero_grad()
    model._loss(model(inputs)[0], targets).backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model._train_hidden = None
    loss = model.training_step((inputs, targets), 0)
    loss.backward()
    torch.testing.assert_close(loss, model._loss(model(inputs)[0], targets))
    assert model.is_tied and model.decoder.weight.grad is model.embedding.weight.grad
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], msg=name)

    # the shared gradient is the sum of the two uses (the untied twin gets one each)
    untied = tiny(30, 8, 8, num_layers=2, tie_weights=False)
    untied.load_state_dict({**model.state_dict(), "decoder.weight": model.embedding.weight.detach().clone()})
    untied.training_step((inputs, targets), 0).backward()
    torch.testing.assert_close(model.embedding.weight.grad, untied.embedding.weight.grad + untied.decoder.weight.grad)


class StepLosses(Callback):
    """Each step's train/loss and the progress bar's metrics after it."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.bar: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.bar.append(dict(trainer.progress_bar_metrics))


def test_progress_bar_shows_the_interval_mean_and_a_short_run_writes_scalars(make_corpus, tmp_path):
    corpus = make_corpus(" ".join([CYCLE] * 40))
    torch.manual_seed(0)
    model = tiny(9, 8, 8, optimizer="adam", lr=0.01, lr_decay_factor=1.0)
    record = StepLosses()
    logger = CSVLogger(tmp_path, name="logs")
    run = trainer(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=3, callbacks=[record])
    run.fit(model, lm_data(corpus, tmp_path, batch_size=2, bptt=8))
    steps = len(record.losses)
    assert steps >= 6
    assert "loss" not in record.bar[1]  # nothing read before the first logging step (step 3)
    for last in range(2, steps, 3):  # logging steps: 3, 6, ... (0-based 2, 5, ...)
        interval = record.losses[last - 2 : last + 1]
        bar = record.bar[last]
        assert isinstance(bar["loss"], float)
        assert bar["loss"] == pytest.approx(sum(interval) / 3, rel=1e-5)
        assert bar["ppl"] == pytest.approx(math.exp(bar["loss"]), rel=1e-5)
        if last + 2 < steps:
            assert record.bar[last + 1]["loss"] == bar["loss"]  # kept until the next read

    # a run shorter than log_every_n_steps still writes training scalars: the epoch's mean loss
    torch.manual_seed(0)
    logger = CSVLogger(tmp_path, name="short")
    record = StepLosses()
    run = trainer(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=100, callbacks=[record])
    run.fit(tiny(9, 8, 8), lm_data(corpus, tmp_path, batch_size=2, bptt=8))
    # the epoch's last step shows the mean since the last read (here: the whole epoch) in the progress bar
    assert record.bar[-1]["loss"] == pytest.approx(sum(record.losses) / len(record.losses), rel=1e-5)
    lines = Path(logger.log_dir, "metrics.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    assert "train/loss_epoch" in header and "train/ppl_epoch" in header and "val/ppl" in header
    [epoch] = [r for r in rows if r["train/loss_epoch"]]
    assert float(epoch["train/loss_epoch"]) == pytest.approx(sum(record.losses) / len(record.losses), rel=1e-5)
    assert float(epoch["train/ppl_epoch"]) == pytest.approx(math.exp(float(epoch["train/loss_epoch"])), rel=1e-5)


def test_lr_and_tokens_per_sec_are_logged_as_cpu_tensors(make_corpus, tmp_path):
    """A logged CPU tensor stays on the CPU in Lightning: writing it never copies to (and waits for) a device."""
    corpus = make_corpus(" ".join([CYCLE] * 40))
    torch.manual_seed(0)
    model = tiny(9, 8, 8)
    logged: dict[str, torch.Tensor] = {}
    original = model.log

    def spy(name, value, *args, **kwargs):
        logged[name] = value
        return original(name, value, *args, **kwargs)

    model.log = spy
    run = trainer(tmp_path, max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=2)
    run.fit(model, lm_data(corpus, tmp_path, batch_size=2, bptt=8))
    for name in ("lr", "train/tokens_per_sec", "loss", "ppl"):
        assert isinstance(logged[name], torch.Tensor) and logged[name].device.type == "cpu", name
    assert logged["lr"].item() == pytest.approx(20.0) and logged["train/tokens_per_sec"].item() > 0
