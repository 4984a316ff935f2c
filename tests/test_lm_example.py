"""The tied LM computes what the PyTorch word_language_model example computes (benchmarks/lm_example.py).

Same batches (``batchify``/``get_batch`` vs ``LanguageModelStream``), same network (with the same weights,
the same loss and gradients over carried windows), same validation perplexity (``evaluate()`` vs
``trainer.validate``): what is left to differ between the two programs is random draws and speed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lm_tying.data import Text8DataModule
from lm_tying.data.streams import LanguageModelStream
from lm_tying.models.lstm_lm import LSTMLanguageModel

_spec = importlib.util.spec_from_file_location("lm_example", Path(__file__).resolve().parents[1] / "benchmarks/lm_example.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def twins(vocab_size: int, size: int = 16, seed: int = 0) -> tuple[example.RNNModel, LSTMLanguageModel]:
    """The example's tied RNNModel and ours, holding the same weights."""
    torch.manual_seed(seed)
    theirs = example.RNNModel(vocab_size, size, size, 2, dropout=0.2, tie_weights=True)
    ours = LSTMLanguageModel(vocab_size, embedding_dim=size, hidden_dim=size, num_layers=2, sample_prompts=None)
    state = {"embedding.weight": theirs.encoder.weight, "decoder.weight": theirs.encoder.weight}
    state |= {f"lstm.{k}": v for k, v in theirs.rnn.state_dict().items()}
    state["decoder.bias"] = theirs.decoder.bias
    ours.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    assert ours.is_tied
    return theirs, ours


@pytest.mark.parametrize("batch_size,bptt", [(20, 35), (10, 35), (3, 7)])
def test_the_stream_serves_the_examples_batches(batch_size, bptt):
    tokens = np.arange(1234, dtype=np.int32)  # every token distinct: any misplaced one shows
    source = example.batchify(torch.from_numpy(tokens.astype(np.int64)), batch_size)
    expected = [example.get_batch(source, i, bptt) for i in range(0, source.size(0) - 1, bptt)]
    served = list(LanguageModelStream(tokens, batch_size, bptt))
    assert len(served) == len(expected)
    for (inputs, targets), (data, target) in zip(served, expected):
        assert torch.equal(inputs, data.t())  # ours batch-first, theirs sequence-first
        assert torch.equal(targets.t().reshape(-1), target)


def test_same_weights_give_the_examples_loss_and_gradients_over_carried_windows():
    vocab = 50
    theirs, ours = twins(vocab)
    theirs.eval(), ours.eval()  # dropout off: masks are random draws, laid out differently
    ids = torch.randint(0, vocab, (4, 3 * 6 + 1), generator=torch.Generator().manual_seed(1))
    hidden_theirs, hidden_ours = theirs.init_hidden(4), None
    for start in range(0, 18, 6):
        inputs, targets = ids[:, start : start + 6], ids[:, start + 1 : start + 7]
        theirs.zero_grad(), ours.zero_grad()
        output, hidden_theirs = theirs(inputs.t(), example.repackage_hidden(hidden_theirs))
        loss_theirs = F.nll_loss(output, targets.t().reshape(-1))
        logits, hidden_ours = ours(inputs, None if hidden_ours is None else ours._detach(hidden_ours))
        loss_ours = ours._loss(logits, targets)
        loss_theirs.backward(), loss_ours.backward()
        torch.testing.assert_close(loss_ours, loss_theirs)
        torch.testing.assert_close(ours.embedding.weight.grad, theirs.encoder.weight.grad)
        torch.testing.assert_close(ours.lstm.weight_hh_l1.grad, theirs.rnn.weight_hh_l1.grad)
        torch.testing.assert_close(hidden_ours[1], hidden_theirs[1])


def test_validation_perplexity_is_the_examples_evaluate(make_corpus, tmp_path):
    data = Text8DataModule(
        path=str(make_corpus(num_words=3000)), data_dir=str(tmp_path / "data"), vocab_size=60, mode="lm",
        batch_size=4, bptt=7, eval_batch_size=3, num_workers=0,
    )  # fmt: skip
    data.prepare_data()
    data.setup("validate")
    theirs, ours = twins(data.num_words)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    [result] = trainer.validate(ours, data, verbose=False)

    class Args:
        eval_batch_size, bptt = 3, 7

    val = example.batchify(torch.from_numpy(data.split_tokens("val").astype(np.int64)), Args.eval_batch_size)
    assert result["val/loss"] == pytest.approx(example.evaluate(theirs, val, Args), rel=1e-5)


def test_step_times_runs_as_a_user_runs_the_script():
    """``python benchmarks/lm.py --step_times N`` times the example's step against the module's (it imports its sibling
    script the way a script run finds it, not as a package)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks/lm.py"
    out = subprocess.run([sys.executable, str(script), "--step_times", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "example's loop" in out.stdout and "fused loss (loss: full)" in out.stdout
