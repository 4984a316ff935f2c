"""The PyTorch word_language_model example's program, re-implemented, on this project's data.

    python benchmarks/lm_example.py --corpus ../shared/data/text8-head.zip --seed 0 --json example.json

A re-implementation of pytorch/examples ``word_language_model`` (``model.py``'s ``RNNModel`` and
``main.py``'s ``batchify``, ``get_batch``, ``train()``, ``evaluate()`` and epoch loop), written for
``benchmarks/lm.py`` to compare against: same layout (sequence-first LSTM, one ``Dropout`` module on the
embedding and on the LSTM output, the LSTM's own inter-layer dropout, tie by assignment), same
initialisation (embedding and decoder uniform in +-0.1, decoder bias zero, PyTorch's default LSTM
init), same loop (fresh zero state per epoch, state detached per window, ``zero_grad``, log-softmax +
NLL, ``clip_grad_norm_``, SGD by hand ``p -= lr * grad``, ``lr /= 4`` after an epoch whose validation
loss is not a new best), same evaluation (``eval_batch_size`` 10 streams, state carried across windows,
token-weighted mean loss). Only the corpus differs from the example's: the token ids come from
``Text8DataModule`` (its vocabulary and its contiguous split), so both programs see identical data.

Prints one JSON line (and writes it to ``--json``): validation perplexity after each epoch and the
training tokens per second of each epoch (``train()``'s wall time, evaluation excluded) and per second
of this process's CPU time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm_tying.data import Text8DataModule


class RNNModel(nn.Module):
    """The example's container: encoder, recurrent module, decoder (tied: the encoder's matrix)."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float, tie_weights: bool):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            if nhid != ninp:
                raise ValueError("when using the tied flag, nhid must be equal to emsize")
            self.decoder.weight = self.encoder.weight
        self.init_weights()
        self.nhid, self.nlayers = nhid, nlayers

    def init_weights(self) -> None:
        init_range = 0.1
        nn.init.uniform_(self.encoder.weight, -init_range, init_range)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -init_range, init_range)

    def forward(self, inputs: Tensor, hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        emb = self.drop(self.encoder(inputs))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> tuple[Tensor, Tensor]:
        weight = next(self.parameters())
        return weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid)


def batchify(data: Tensor, bsz: int) -> Tensor:
    """``[nbatch, bsz]``: column ``j`` is the ``j``-th contiguous stretch of the sequence."""
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()


def get_batch(source: Tensor, i: int, bptt: int) -> tuple[Tensor, Tensor]:
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


def repackage_hidden(h: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return tuple(v.detach() for v in h)  # type: ignore[return-value]


def train_epoch(model: RNNModel, train_data: Tensor, args: argparse.Namespace, lr: float) -> tuple[float, float]:
    """One epoch of the example's ``train()``; returns its wall-clock and CPU seconds."""
    model.train()
    criterion = nn.NLLLoss()
    start, start_cpu = time.perf_counter(), time.process_time()
    hidden = model.init_hidden(args.batch_size)
    for batch, i in enumerate(range(0, train_data.size(0) - 1, args.bptt)):
        if args.max_steps is not None and batch >= args.max_steps:
            break
        data, targets = get_batch(train_data, i, args.bptt)
        hidden = repackage_hidden(hidden)
        model.zero_grad()
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
    return time.perf_counter() - start, time.process_time() - start_cpu


@torch.no_grad()
def evaluate(model: RNNModel, data_source: Tensor, args: argparse.Namespace) -> float:
    """Mean NLL per token of a split (``eval_batch_size`` streams, state carried across windows)."""
    model.eval()
    criterion = nn.NLLLoss()
    total_loss = 0.0
    hidden = model.init_hidden(args.eval_batch_size)
    for i in range(0, data_source.size(0) - 1, args.bptt):
        data, targets = get_batch(data_source, i, args.bptt)
        output, hidden = model(data, hidden)
        hidden = repackage_hidden(hidden)
        total_loss += len(data) * criterion(output, targets).item()
    return total_loss / (len(data_source) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="text8-format file or zip")
    parser.add_argument("--data_dir", default="data", help="cache of the encoded corpus (Text8DataModule's)")
    parser.add_argument("--vocab_size", type=int, default=10_000)
    parser.add_argument("--emsize", type=int, default=200)
    parser.add_argument("--nhid", type=int, default=200)
    parser.add_argument("--nlayers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=20.0)
    parser.add_argument("--clip", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=20)
    parser.add_argument("--eval_batch_size", type=int, default=10)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--untied", action="store_true", help="give the decoder its own matrix")
    parser.add_argument("--seed", type=int, default=1111)
    parser.add_argument("--max_steps", type=int, default=None, help="cut each epoch after this many batches")
    parser.add_argument("--no_eval", action="store_true", help="speed only: skip the validation")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    data = Text8DataModule(
        path=args.corpus, data_dir=args.data_dir, vocab_size=args.vocab_size, split=(0.9, 0.05, 0.05), mode="lm"
    )
    data.prepare_data()
    data.setup("fit")

    def split(stage: str) -> Tensor:
        return torch.from_numpy(data.split_tokens(stage).astype("int64"))

    train_data = batchify(split("train"), args.batch_size)
    val_data = batchify(split("val"), args.eval_batch_size)

    model = RNNModel(data.num_words, args.emsize, args.nhid, args.nlayers, args.dropout, not args.untied)
    lr, best_val_loss = args.lr, None
    epochs = []
    for epoch in range(1, args.epochs + 1):
        seconds, cpu_seconds = train_epoch(model, train_data, args, lr)
        steps = math.ceil((train_data.size(0) - 1) / args.bptt)
        if args.max_steps is not None:
            steps = min(steps, args.max_steps)
        tokens = sum(
            min(args.bptt, train_data.size(0) - 1 - i) * args.batch_size
            for i in range(0, steps * args.bptt, args.bptt)
        )
        val_loss = math.nan if args.no_eval else evaluate(model, val_data, args)
        epochs.append(
            {
                "epoch": epoch,
                "steps": steps,
                "lr": lr,
                "train_seconds": seconds,
                "tokens_per_sec": tokens / seconds,
                "tokens_per_cpu_sec": tokens / cpu_seconds,
                "val_loss": val_loss,
                "val_ppl": math.exp(val_loss),
            }
        )
        if best_val_loss is None or val_loss < best_val_loss or args.no_eval:
            best_val_loss = val_loss
        else:
            lr /= 4.0
    result = {"program": "example", "seed": args.seed, "threads": torch.get_num_threads(), "epochs": epochs,
              "load_after": os.getloadavg()[0]}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
