"""Validation perplexity against time and tokens: tied, untied, word2vec-initialised, sampled softmax.

    python benchmarks/lm_curves.py --corpus ../shared/data/text8-head.zip \\
        --word2vec checkpoints/word2vec/last.ckpt      # from: lm-tying fit --config configs/word2vec.yaml

Every variant is the same 2-layer LSTM LM on text8-head with a 50,000-word vocabulary (embedding 128 =
the word2vec vectors' width, LSTM 256 with a projection 256 -> 128 in front of the decoder, dropout 0.2,
batch 20, bptt 35, SGD lr 20, clipping 0.25, constant lr), trained through ``lightning.Trainer`` for the
same wall time (``--budget`` seconds of training; evaluation time is not counted):

* ``tied`` / ``untied``: full softmax, the decoder is / is not the embedding matrix;
* ``w2v_frozen`` / ``w2v_finetuned``: tied, the matrix starts from the word2vec vectors (frozen: neither
  the embedding nor, being the same matrix, the decoder learns);
* ``sampled`` / ``sampled_w2v``: tied, sampled softmax (``--num_sampled`` log-uniform draws per batch),
  from a random / the word2vec start.

The variants run at the same time on the CPU, niced, one process and one thread each, so they share
whatever load the machine has (the table reports the load average). Every ``--eval_every`` seconds of
training each one scores the first ``--eval_tokens`` tokens of the validation split (full softmax), and at the end the
first ``--final_tokens`` (default: the whole split; 50,000 logits per token make that minutes on a CPU).
Writes ``--out``.png (perplexity against training seconds and against tokens)
and ``--out``.md (the table), plus the raw points as JSON.

``--throughput`` instead measures training tokens per CPU-second (one thread, random batches of the 50k
vocabulary, so no corpus is read) of the networks of configs/lstm_lm.yaml and of its CPU overlay: CPU time,
unlike wall time, holds up when other processes share the machine.

    python benchmarks/lm_curves.py --throughput
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lm_tying.data import Text8DataModule
from lm_tying.models.lstm_lm import LSTMLanguageModel

VARIANTS: dict[str, dict[str, Any]] = {
    "tied": {},
    "untied": {"tie_weights": False},
    "w2v_frozen": {"embedding_init": "WORD2VEC", "freeze_embedding": True},
    "w2v_finetuned": {"embedding_init": "WORD2VEC"},
    "sampled": {"loss": "sampled"},
    "sampled_w2v": {"loss": "sampled", "embedding_init": "WORD2VEC"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", help="text8 or text8-head (.zip or plain text)")
    p.add_argument("--word2vec", default="checkpoints/word2vec/last.ckpt", help="vectors for the w2v variants")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--budget", type=float, default=600, help="seconds of training per variant")
    p.add_argument("--eval_every", type=float, default=100, help="seconds of training between curve points")
    p.add_argument("--eval_tokens", type=int, default=20_000, help="validation tokens per curve point")
    p.add_argument("--final_tokens", type=int, help="validation tokens of the final point (default: all)")
    p.add_argument("--vocab_size", type=int, default=50_000)
    p.add_argument("--embedding_dim", type=int, default=128)
    p.add_argument("--hidden_dim", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=20)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--num_sampled", type=int, default=1024)
    p.add_argument("--lr", type=float, default=20.0)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default="data")
    p.add_argument("--out", default="docs/lm_curves", help="writes OUT.png, OUT.md and OUT.json")
    p.add_argument("--throughput", action="store_true", help="tokens per CPU-second of the configs' networks")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, write its JSON
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def data_module(args: argparse.Namespace) -> Text8DataModule:
    return Text8DataModule(
        path=args.corpus,
        data_dir=args.data_dir,
        vocab_size=args.vocab_size,
        mode="lm",
        batch_size=args.batch_size,
        bptt=args.bptt,
        eval_batch_size=10,
        num_workers=0,
    )


@torch.no_grad()
def perplexity(model: LSTMLanguageModel, loader: Any, max_tokens: int | None) -> float:
    """exp(mean NLL) over the first ``max_tokens`` validation tokens (all if None), full softmax, state carried."""
    was_training = model.training
    model.eval()
    nll, count, hidden = 0.0, 0, None
    for inputs, targets in loader:
        logits, hidden = model(inputs, hidden)
        nll += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
        count += targets.numel()
        if max_tokens is not None and count >= max_tokens:
            break
    model.train(was_training)
    return math.exp(nll / count)


class TimedEvaluation(Callback):
    """Scores the validation prefix every ``eval_every`` seconds of training and stops after ``budget``.

    The training clock stops while evaluating, so every variant gets the same training time.
    """

    def __init__(self, budget: float, eval_every: float, eval_tokens: int) -> None:
        self.budget, self.eval_every, self.eval_tokens = budget, eval_every, eval_tokens
        self.points: list[dict[str, float]] = []
        self.train_seconds = self.cpu_seconds = 0.0
        self.tokens = self.steps = 0
        self._since = self._cpu_since = 0.0

    def _record(self, trainer: L.Trainer, model: LSTMLanguageModel, max_tokens: int | None) -> dict[str, float]:
        point = {
            "seconds": self.train_seconds,
            "cpu_seconds": self.cpu_seconds,
            "tokens": self.tokens,
            "steps": self.steps,
            "val_ppl": perplexity(model, trainer.datamodule.val_dataloader(), max_tokens),
        }
        self.points.append(point)
        print(json.dumps(point), flush=True)
        return point

    def on_train_start(self, trainer: L.Trainer, model: LSTMLanguageModel) -> None:
        self._record(trainer, model, self.eval_tokens)  # the starting point (word2vec init shows here)
        self._since, self._cpu_since = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: L.Trainer, model: LSTMLanguageModel, outputs, batch, batch_idx) -> None:
        self.train_seconds += time.perf_counter() - self._since
        self.cpu_seconds += time.process_time() - self._cpu_since
        self.tokens += batch[1].numel()
        self.steps += 1
        if self.train_seconds >= self.budget:
            trainer.should_stop = True
        elif self.train_seconds >= self.eval_every * len(self.points):
            self._record(trainer, model, self.eval_tokens)
        self._since, self._cpu_since = time.perf_counter(), time.process_time()


def run_variant(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    L.seed_everything(args.seed, verbose=False)
    data = data_module(args)
    data.prepare_data()
    settings = {k: (args.word2vec if v == "WORD2VEC" else v) for k, v in VARIANTS[args.variant].items()}
    model = LSTMLanguageModel(
        data.num_words,
        embedding_dim=args.embedding_dim,
        hidden_dim=args.hidden_dim,
        num_layers=2,
        dropout_embedding=args.dropout,
        dropout_lstm=args.dropout,
        dropout_output=args.dropout,
        lr=args.lr,
        lr_decay_factor=1.0,  # constant lr: the runs are too short for the plateau schedule
        num_sampled=args.num_sampled,
        sample_prompts=None,
        **settings,
    )
    timer = TimedEvaluation(args.budget, args.eval_every, args.eval_tokens)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1000,
        gradient_clip_val=0.25,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, data)
    final = timer._record(trainer, model, args.final_tokens)
    result = {
        "variant": args.variant,
        "points": timer.points[:-1],  # the curve: every point on the same --eval_tokens
        "final": final,
        "parameters": model.num_parameters(),
        "trainable": model.num_parameters(trainable_only=True),
        "embedding_init_coverage": model.embedding_init_coverage,
        "tokens_per_sec": timer.tokens / timer.train_seconds,
    }
    Path(args.result).write_text(json.dumps(result))


def launch(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """All variants at once, niced, one thread each; returns their results."""
    data_module(args).prepare_data()  # build the cache once, before the processes read it
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {}
    for name in args.variants:
        result = out.with_name(f"{out.name}.{name}.json")
        log = open(out.with_name(f"{out.name}.{name}.log"), "w")
        cmd = ["nice", "-n", "10", sys.executable, __file__, *argv, "--variant", name, "--result", str(result)]
        procs[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), result, log)
    loads = []
    while any(p.poll() is None for p, _, _ in procs.values()):
        loads.append(os.getloadavg()[0])
        time.sleep(10)
    results = []
    for name, (proc, result, log) in procs.items():
        log.close()
        if proc.returncode != 0:
            raise SystemExit(f"variant {name} failed (exit {proc.returncode}): see {log.name}")
        results.append({**json.loads(result.read_text()), "load_avg": sum(loads) / max(len(loads), 1)})
        result.unlink()
    return results


def write_table(args: argparse.Namespace, results: list[dict[str, Any]], path: Path) -> None:
    full_tps = {r["variant"]: r["tokens_per_sec"] for r in results}.get("tied")
    lines = [
        f"Training budget {args.budget:.0f} s per variant (evaluation not counted), all variants at once, one "
        f"thread each, mean 1-min load average {results[0]['load_avg']:.1f} on {os.cpu_count()} CPUs.",
        "",
        f"| variant | val ppl (first {args.final_tokens or 'all'} tokens) | training tokens | tokens/s "
        "| vs tied full softmax | parameters (trainable) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ratio = f"{r['tokens_per_sec'] / full_tps:.1f}x" if full_tps else "-"
        lines.append(
            f"| {r['variant']} | {r['final']['val_ppl']:.1f} | {r['final']['tokens']:,} | {r['tokens_per_sec']:,.0f} "
            f"| {ratio} | {r['parameters']:,} ({r['trainable']:,}) |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for r in results:
        points = r["points"]
        for ax, key in zip(axes, ("seconds", "tokens")):
            ax.plot([p[key] for p in points], [p["val_ppl"] for p in points], marker="o", ms=3, label=r["variant"])
    axes[0].set_xlabel("training wall time (s)")
    axes[1].set_xlabel("training tokens")
    axes[0].set_ylabel(f"val perplexity, first {args.eval_tokens:,} tokens (full softmax)")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend()
    fig.suptitle(f"LSTM LM on text8-head, 50k vocabulary, same wall time per variant (seed {args.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# (name, config overrides of configs/lstm_lm.yaml): the networks the configs train
CONFIG_NETWORKS = {
    "lstm_lm.yaml (650, full softmax)": dict(embedding_dim=650, hidden_dim=650, dropout=0.3, loss="full"),
    "+ lstm_lm_cpu.yaml (256, sampled softmax)": dict(embedding_dim=256, hidden_dim=256, dropout=0.2, loss="sampled"),
}


def throughput(vocab_size: int = 50_000, batch_size: int = 64, bptt: int = 35, steps: int = 3) -> None:
    """Median training tokens per CPU-second of one SGD step with clipping, on one thread."""
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; batch {batch_size} x bptt {bptt}")
    for name, net in CONFIG_NETWORKS.items():
        torch.manual_seed(0)
        dropout = net.pop("dropout")
        model = LSTMLanguageModel(vocab_size, **net, dropout_embedding=dropout, dropout_lstm=dropout,
                                  dropout_output=dropout, num_sampled=1024, sample_prompts=None)  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        batch = (torch.randint(0, vocab_size, (batch_size, bptt)), torch.randint(0, vocab_size, (batch_size, bptt)))
        seconds = []
        for step in range(steps + 1):  # the first step warms up
            started = time.process_time()
            loss = model.training_step(batch, step)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
            seconds.append(time.process_time() - started)
        rate = batch_size * bptt / sorted(seconds[1:])[steps // 2]
        hours = 15.3e6 / rate / 3600
        print(f"{name}: {rate:,.0f} tokens per CPU-second; full text8 (15.3M tokens): {hours:.1f} CPU-hours")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.throughput:
        throughput(args.vocab_size)
        return
    if args.corpus is None:
        raise SystemExit("--corpus is required (the text8 or text8-head file)")
    if args.variant:
        run_variant(args)
        return
    if any("embedding_init" in VARIANTS[v] for v in args.variants) and not Path(args.word2vec).exists():
        raise SystemExit(
            f"--word2vec {args.word2vec} does not exist: train it first with "
            f"`lm-tying fit --config configs/word2vec.yaml --data.path {args.corpus}` or leave out the w2v variants"
        )
    started = time.time()
    results = launch(args, argv)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_table(args, results, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    plot(results, out.with_suffix(".png"), args)
    print(f"wrote {out.with_suffix('.png')}, {out.with_suffix('.md')} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
