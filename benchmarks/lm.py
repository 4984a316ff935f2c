"""LSTM language model figures: Lightning overhead, tokens/s, and tied vs untied at equal wall time.

    python benchmarks/lm.py --corpus ../shared/data/text8-head.zip

Defaults reproduce the PyTorch word_language_model example's network and batches (2-layer LSTM,
200/200, dropout 0.2, batch 20, bptt 35, SGD lr 20, clipping 0.25) on text8-head with a 10,000-word
vocabulary and a 90/5/5 split. Two parts:

1. Throughput. The same ``LSTMLanguageModel`` (same weights, same batches from the same data module)
   trained by ``lightning.Trainer`` and by a plain PyTorch loop written like the example's
   ``train()`` (detach the state, zero_grad, forward, cross-entropy, backward, clip_grad_norm_, step).
   The runs alternate (plain, Lightning, Lightning, plain, ...) so that load from other processes hits
   both alike; the best round of each is compared, and the median tokens per CPU-second of this process
   (steadier when other processes share the CPU). Target: Lightning / plain >= 0.95.
   The example's own figure on this 2-core CPU is about 7,400 tokens/s.
2. Quality at equal cost. The tied and the untied model (same sizes, same seed, same recipe) each train
   for ``--budget`` seconds of wall time through Lightning, then are evaluated on the whole validation
   split (token-weighted perplexity). Target: tied perplexity below untied, with fewer parameters.

Timings on a shared machine are noisy; ratios measured in the same run are the meaningful figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lm_tying.data import Text8DataModule
from lm_tying.models.lstm_lm import LSTMLanguageModel

REFERENCE_TOKENS_PER_SEC = 7_400  # PyTorch word_language_model example, 2-layer 200/200 tied, this 2-core CPU


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(args: argparse.Namespace, vocab_size: int, tie: bool) -> LSTMLanguageModel:
    torch.manual_seed(args.seed)
    return LSTMLanguageModel(
        vocab_size,
        embedding_dim=args.embedding_dim,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        tie_weights=tie,
        dropout_embedding=args.dropout,
        dropout_lstm=args.dropout,
        dropout_output=args.dropout,
        optimizer="sgd",
        lr=args.lr,
        compile=args.compile,
        sample_prompts=None,
    )


def trainer_kwargs(args: argparse.Namespace, root: Path, **overrides: Any) -> dict[str, Any]:
    """A lean but ordinary Trainer: TensorBoard logging every 50 steps, no progress bar, no checkpoints."""
    kwargs: dict[str, Any] = dict(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        gradient_clip_val=0.25,
        logger=TensorBoardLogger(root, name="bench", default_hp_metric=False),
        log_every_n_steps=50,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )
    kwargs.update(overrides)
    return kwargs


# ---------------------------------------------------------------------- part 1: throughput


class WindowTimer(Callback):
    """Wall time of training steps [warmup, warmup + steps), measured like the plain loop's window."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start: float | None = None
        self.cpu_start = 0.0
        self.elapsed = self.cpu = 0.0
        self.tokens = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.warmup:
            synchronize(pl_module.device)
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.start is None:
            return
        self.tokens += batch[1].numel()
        if trainer.global_step == self.warmup + self.steps:
            synchronize(pl_module.device)
            self.elapsed = time.perf_counter() - self.start
            self.cpu = time.process_time() - self.cpu_start


def lightning_tokens_per_sec(args: argparse.Namespace, data: Text8DataModule, root: Path) -> tuple[float, float]:
    """Tokens per wall-clock second and per CPU second of this process."""
    model = make_model(args, data.num_words, tie=True)
    timer = WindowTimer(args.warmup, args.steps)
    trainer = L.Trainer(**trainer_kwargs(args, root, max_steps=args.warmup + args.steps, callbacks=[timer]))
    trainer.fit(model, data)
    return timer.tokens / timer.elapsed, timer.tokens / timer.cpu


def plain_tokens_per_sec(
    args: argparse.Namespace, data: Text8DataModule, device: torch.device
) -> tuple[float, float]:
    """The example's training loop over the same module and the same batches."""
    model = make_model(args, data.num_words, tie=True).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    hidden = None
    tokens, start, cpu_start = 0, None, 0.0
    for step, (inputs, targets) in enumerate(data.train_dataloader()):
        if step == args.warmup:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
        elif step == args.warmup + args.steps:
            break
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if hidden is not None:
            hidden = (hidden[0].detach(), hidden[1].detach())
        optimizer.zero_grad()
        with autocast:
            logits, hidden = model(inputs, hidden)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        if start is not None:
            tokens += targets.numel()
    synchronize(device)
    if start is None or step < args.warmup + args.steps:
        raise SystemExit(f"the training split has fewer than {args.warmup + args.steps} batches: lower --steps")
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu_start)


# ---------------------------------------------------------------------- part 2: tied vs untied


def train_for_budget(args: argparse.Namespace, data: Text8DataModule, root: Path, tie: bool) -> dict[str, Any]:
    model = make_model(args, data.num_words, tie=tie)
    if args.budget_steps:
        limit: dict[str, Any] = {"max_steps": args.budget_steps}
    else:
        limit = {"max_time": {"seconds": int(args.budget)}, "max_epochs": 1000}
    trainer = L.Trainer(**trainer_kwargs(args, root, **limit))
    started = time.perf_counter()
    trainer.fit(model, data)
    trained = time.perf_counter() - started
    [result] = L.Trainer(**trainer_kwargs(args, root, limit_val_batches=None, logger=False)).validate(
        model, data, verbose=False
    )
    return {
        "tied": tie,
        "parameters": model.num_parameters(),
        "steps": trainer.global_step,
        "tokens": trainer.global_step * data.batch_size * data.bptt,
        "train_seconds": round(trained, 1),
        "val_loss": result["val/loss"],
        "val_ppl": result["val/ppl"],
    }


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="text8-format file or zip (e.g. ../shared/data/text8-head.zip)")
    parser.add_argument("--data_dir", default="data", help="cache of the encoded corpus")
    parser.add_argument("--vocab_size", type=int, default=10_000)
    parser.add_argument("--embedding_dim", type=int, default=200)
    parser.add_argument("--hidden_dim", type=int, default=200)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=20.0)
    parser.add_argument("--batch_size", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--warmup", type=int, default=10, help="steps before the timed window")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain/Lightning throughput rounds")
    parser.add_argument("--budget", type=float, default=150, help="training seconds for each of tied and untied")
    parser.add_argument(
        "--budget_steps", type=int, default=None, help="train each this many steps instead (equal tokens)"
    )
    parser.add_argument("--skip_throughput", action="store_true")
    parser.add_argument("--skip_quality", action="store_true")
    parser.add_argument("--accelerator", default="cpu", help="cpu, cuda/gpu or auto")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward in both paths")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    wants_gpu = args.accelerator in ("cuda", "gpu") or (args.accelerator == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if wants_gpu else "cpu")
    data = Text8DataModule(
        path=args.corpus,
        data_dir=args.data_dir,
        vocab_size=args.vocab_size,
        split=(0.9, 0.05, 0.05),
        mode="lm",
        batch_size=args.batch_size,
        bptt=args.bptt,
        eval_batch_size=10,
        num_workers=0,
    )
    data.prepare_data()
    data.setup("fit")
    train_tokens = len(data.split_tokens("train"))
    print(
        f"corpus {args.corpus}: {len(data.tokens):,} tokens, vocabulary {data.num_words:,}, "
        f"train {train_tokens:,} tokens = {train_tokens // (args.batch_size * args.bptt):,} batches of "
        f"{args.batch_size} x {args.bptt}; network {args.num_layers} x LSTM {args.embedding_dim}/{args.hidden_dim}, "
        f"device {device}, precision {args.precision}, torch threads {torch.get_num_threads()}"
    )
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5:
        # Other processes on the CPU: with more threads than free cores, OpenMP threads spin and wait on
        # each other, and every figure (plain and Lightning alike) collapses; --threads 1 is steadier.
        print(f"note: load average {load:.1f} on {cores} cores before starting: timings are shared with other work")
    figures: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.skip_throughput:
            plain, lightning, plain_cpu, lightning_cpu = [], [], [], []
            for r in range(args.rounds):
                # The order alternates too, so that neither path always runs on a warmer process.
                for path in ("plain", "lightning") if r % 2 == 0 else ("lightning", "plain"):
                    if path == "plain":
                        wall, cpu = plain_tokens_per_sec(args, data, device)
                        plain.append(wall)
                        plain_cpu.append(cpu)
                    else:
                        wall, cpu = lightning_tokens_per_sec(args, data, root)
                        lightning.append(wall)
                        lightning_cpu.append(cpu)
                print(
                    f"  round {r + 1}: plain {plain[-1]:,.0f} tokens/s ({plain_cpu[-1]:,.0f} per CPU-s), "
                    f"Lightning {lightning[-1]:,.0f} tokens/s ({lightning_cpu[-1]:,.0f} per CPU-s)"
                )
            best_plain, best_lightning = max(plain), max(lightning)
            ratio = best_lightning / best_plain
            cpu_ratio = statistics.median(lightning_cpu) / statistics.median(plain_cpu)
            figures["throughput"] = {
                "plain_tokens_per_sec": plain,
                "lightning_tokens_per_sec": lightning,
                "plain_tokens_per_cpu_sec": plain_cpu,
                "lightning_tokens_per_cpu_sec": lightning_cpu,
                "best_plain": best_plain,
                "best_lightning": best_lightning,
                "ratio": ratio,
                "median_ratio": statistics.median(lightning) / statistics.median(plain),
                "cpu_time_ratio": cpu_ratio,
                "reference_example": REFERENCE_TOKENS_PER_SEC,
            }
            print(
                f"THROUGHPUT ({args.rounds} rounds of {args.steps} steps x {args.batch_size * args.bptt} tokens): "
                f"Lightning / plain PyTorch = {figures['throughput']['median_ratio']:.3f} (median of rounds; "
                f"target >= 0.95), {ratio:.3f} best of rounds, {cpu_ratio:.3f} per CPU-second of this process "
                f"(the steadiest when other processes share the CPU). Best: plain {best_plain:,.0f} tokens/s, "
                f"Lightning {best_lightning:,.0f} tokens/s; the PyTorch example's reference on this CPU is "
                f"{REFERENCE_TOKENS_PER_SEC:,} tokens/s -> Lightning at "
                f"{best_lightning / REFERENCE_TOKENS_PER_SEC:.2f}x"
            )

        if not args.skip_quality:
            runs = [train_for_budget(args, data, root, tie) for tie in (True, False)]
            figures["quality"] = runs
            if args.budget_steps:
                budget = f"equal steps ({args.budget_steps:,} each)"
            else:
                budget = f"equal wall time ({args.budget:.0f} s of training each)"
            print(f"QUALITY at {budget}, validation split:")
            for run in runs:
                print(
                    f"  {'tied  ' if run['tied'] else 'untied'}: {run['parameters']:,} parameters, "
                    f"{run['steps']:,} steps ({run['tokens']:,} tokens) in {run['train_seconds']} s, "
                    f"val loss {run['val_loss']:.4f}, val perplexity {run['val_ppl']:.1f}"
                )
            tied, untied = runs
            print(
                f"  tied - untied perplexity: {tied['val_ppl'] - untied['val_ppl']:+.1f} "
                f"(target < 0), parameters saved: {untied['parameters'] - tied['parameters']:,}"
            )

    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
