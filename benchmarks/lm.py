"""The tied LM through ``lm-tying fit`` against the PyTorch word_language_model example's program.

    python benchmarks/lm.py --corpus ../shared/data/text8-head.zip --seeds 0 1 2            # one epoch each
    python benchmarks/lm.py --corpus ../shared/data/text8-head.zip --seeds 0 --max_steps 300 --variants
    python benchmarks/lm.py --step_times 20                                                 # one step, in isolation
    python benchmarks/lm.py --help

Both programs train the example's network and recipe on identical data: text8-head, vocabulary UNK +
the 9,999 most frequent words, contiguous 90/5/5 split, batch 20, bptt 35, 2 x LSTM 200/200, dropout
0.2, SGD lr 20, clipping 0.25, tied, one epoch:

- ``example``: ``benchmarks/lm_example.py``, a re-implementation of the example's own program (its
  ``RNNModel``, ``train()``, ``evaluate()``) reading the token ids of ``Text8DataModule``;
- ``cli``: ``python -m lm_tying.cli fit --config configs/lstm_lm.yaml`` with the example's sizes on
  the command line, as a user runs it, plus one callback (``TrainingClock`` below, no per-step work
  beyond counting tokens) that records the training time and the validation perplexities.

For every seed the two programs run at the same time (``--all_at_once``: every seed's too), each in its own process with the same number of
torch threads (``--threads``, default 1) and the same niceness, so that load from other work on the
machine hits both alike; the load average is recorded before and after. Training tokens/s is the
tokens of the epoch over its training wall time (evaluation excluded; data loading, logging and
checkpoints included). ``--variants`` adds runs of the CLI with one setting changed each (``--variants
bf16_mixed``: only that one), to show where the CLI path spends its time and what a setting gains;
``--without_cli`` leaves out the CLI with its defaults. Results: one line per run, then the table (median
and range over seeds), and ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]

# The example's network and recipe, as overrides of the LM config (whatever the config's sizes are).
EXAMPLE_ARGS = [
    "--data.vocab_size", "10000",
    "--data.batch_size", "20",
    "--data.bptt", "35",
    "--data.eval_batch_size", "10",
    "--data.split", "[0.9, 0.05, 0.05]",
    "--model.init_args.embedding_dim", "200",
    "--model.init_args.hidden_dim", "200",
    "--model.init_args.num_layers", "2",
    "--model.init_args.tie_weights", "true",
    "--model.init_args.dropout_embedding", "0.2",
    "--model.init_args.dropout_lstm", "0.2",
    "--model.init_args.dropout_output", "0.2",
    "--model.init_args.optimizer", "sgd",
    "--model.init_args.lr", "20",
    "--trainer.gradient_clip_val", "0.25",
    "--trainer.accelerator", "cpu",
    "--trainer.max_epochs", "1",
]  # fmt: skip

# One setting changed at a time (--variants NAME ...): where does the CLI path spend its time, what does it gain?
VARIANTS: dict[str, list[str]] = {
    "num_workers_0": ["--data.num_workers", "0"],
    "no_progress_bar": ["--trainer.enable_progress_bar", "false"],
    "lean": [  # no data-loader worker, progress bar, samples or checkpoints
        "--data.num_workers", "0",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.sample_prompts", "null",
        "--trainer.enable_checkpointing", "false",
    ],
    "bf16_mixed": ["--trainer.precision", "bf16-mixed"],  # bf16 matmuls; float32 LSTM, weights and loss
    "bf16_mixed_bf16_lstm": ["--trainer.precision", "bf16-mixed", "--model.init_args.bf16_lstm", "true"],
}  # fmt: skip


class TrainingClock(Callback):
    """Training wall time of the fit (validation excluded), tokens trained, and every validation's val/ppl.

    Loaded by the CLI run by class path (``--trainer.callbacks+=benchmarks.lm.TrainingClock``); writes
    ``json_path`` when the fit ends.
    """

    def __init__(self, json_path: str) -> None:
        self.json_path = json_path
        self.tokens = 0
        self.steps = 0
        self.started = self.started_cpu = 0.0
        self.validating = self.validating_cpu = 0.0
        self.validation_seconds = self.validation_cpu_seconds = 0.0
        self.validations: list[dict[str, float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started, self.started_cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, idx) -> None:
        self.tokens += batch[1].numel()
        self.steps += 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validating, self.validating_cpu = time.perf_counter(), time.process_time()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validation_seconds += time.perf_counter() - self.validating
        self.validation_cpu_seconds += time.process_time() - self.validating_cpu
        if not trainer.sanity_checking:
            self.validations.append({"step": trainer.global_step, "val_ppl": float(trainer.callback_metrics["val/ppl"])})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self.started - self.validation_seconds
        cpu_seconds = time.process_time() - self.started_cpu - self.validation_cpu_seconds
        result = {
            "steps": self.steps,
            "tokens": self.tokens,
            "train_seconds": seconds,
            "tokens_per_sec": self.tokens / seconds,
            "tokens_per_cpu_sec": self.tokens / cpu_seconds,
            "validation_seconds": self.validation_seconds,
            "validations": self.validations,
            "val_ppl": self.validations[-1]["val_ppl"] if self.validations else None,
        }
        Path(self.json_path).write_text(json.dumps(result, indent=2))


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def example_command(args: argparse.Namespace, seed: int, out: Path) -> list[str]:
    command = [sys.executable, str(REPO / "benchmarks/lm_example.py"), "--corpus", args.corpus]
    command += ["--data_dir", args.data_dir, "--seed", str(seed), "--threads", str(args.threads), "--json", str(out)]
    if args.max_steps:
        command += ["--max_steps", str(args.max_steps)]
    if args.skip_validation:
        command += ["--no_eval"]
    return command


def cli_command(args: argparse.Namespace, seed: int, out: Path, root: Path, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "lm_tying.cli", "fit", "--config", str(REPO / args.config)]
    command += ["--data.path", args.corpus, "--data.data_dir", args.data_dir, "--seed_everything", str(seed)]
    command += EXAMPLE_ARGS + ["--log_dir", str(root / "logs"), "--checkpoint.dir", str(root / "checkpoints")]
    command += ["--trainer.callbacks+=benchmarks.lm.TrainingClock", f"--trainer.callbacks.json_path={out}"]
    if args.max_steps:
        command += ["--trainer.limit_train_batches", str(args.max_steps)]  # a shorter epoch, validated at its end
    if args.skip_validation:
        command += ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
    return command + list(args.cli_args) + extra


def run_together(commands: dict[str, list[str]], args: argparse.Namespace, logs: Path) -> None:
    """Start every command at once (niced, same threads); wait for all; fail loudly with a log's tail."""
    procs = {}
    for name, command in commands.items():
        log = open(logs / f"{abs(hash(name))}.log", "w")
        procs[name] = (subprocess.Popen(["nice", "-n", str(args.nice), *command], cwd=logs, env=child_env(args.threads),
                                        stdout=log, stderr=subprocess.STDOUT), log)  # fmt: skip
    for name, (proc, log) in procs.items():
        proc.wait()
        log.close()
        if proc.returncode != 0:
            tail = Path(log.name).read_text()[-3000:]
            raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{tail}")


def spread(values: list[float], digits: int = 1) -> str:
    """``median (min-max)`` of a list."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def step_times(steps: int) -> None:
    """CPU time of one training step at one thread, without Lightning: the example's loop and the module's.

    Random ids, the example's sizes; steps of the four programs interleaved, so load from other work hits
    each alike, and timed in thread CPU time (what the step itself executed). The module's step is
    ``features`` + the training loss + backward + clipping + SGD, as Lightning runs it.
    """
    import torch.nn.functional as F

    from lm_example import RNNModel  # the sibling script (python puts benchmarks/ on sys.path)
    from lm_tying.models.lstm_lm import LSTMLanguageModel
    from lm_tying.nce import linear_cross_entropy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab, width, batch, bptt = 10_000, 200, 20, 35
    inputs, targets = torch.randint(0, vocab, (batch, bptt)), torch.randint(0, vocab, (batch, bptt))
    example_inputs, example_targets = inputs.t().contiguous(), targets.t().reshape(-1)  # its [T, B] layout
    example = RNNModel(vocab, width, width, 2, 0.2, tie_weights=True)
    example_hidden = example.init_hidden(batch)

    def example_step() -> None:
        nonlocal example_hidden
        example_hidden = tuple(h.detach() for h in example_hidden)
        example.zero_grad()
        output, example_hidden = example(example_inputs, example_hidden)
        F.nll_loss(output, example_targets).backward()
        torch.nn.utils.clip_grad_norm_(example.parameters(), 0.25)
        for p in example.parameters():
            p.data.add_(p.grad, alpha=-1e-3)

    def module_step(fused: bool, bf16: bool = False, bf16_lstm: bool = False):
        model = LSTMLanguageModel(vocab, width, width, bf16_lstm=bf16_lstm)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step() -> None:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                features, hidden = model.features(inputs, model._initial_state(model._train_hidden, inputs))
                model._train_hidden = model._detach(hidden)
                if fused:
                    flat = features.reshape(-1, width)
                    loss = linear_cross_entropy(flat, model.decoder.weight, model.decoder.bias, targets.reshape(-1))
                else:
                    loss = model._loss(model.decoder(features), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            optimizer.step()

        return step

    programs = {
        "example's loop": example_step,
        "module, unfused loss": module_step(fused=False),
        "module, fused loss (loss: full)": module_step(fused=True),
        "module, fused loss, bf16 autocast": module_step(fused=True, bf16=True),
        "  the same, bf16_lstm": module_step(fused=True, bf16=True, bf16_lstm=True),
    }
    times: dict[str, list[float]] = {name: [] for name in programs}
    for step in programs.values():
        step()  # warm-up
    for _ in range(steps):
        for name, step in programs.items():
            started = time.thread_time()
            step()
            times[name].append(time.thread_time() - started)
    reference = statistics.median(times["example's loop"])
    print(f"CPU time per step, one thread, median of {steps} (load average {os.getloadavg()[0]:.1f}):")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:36s} {median * 1e3:6.1f} ms   example's / this: {reference / median:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", help="text8-format file or zip (e.g. ../shared/data/text8-head.zip)")
    parser.add_argument("--step_times", type=int, default=None, metavar="STEPS",
                        help="only time single training steps (no corpus, no Lightning) over this many steps")
    parser.add_argument("--data_dir", default=str(REPO / "data"), help="cache of the encoded corpus (shared by both)")
    parser.add_argument("--config", default="configs/lstm_lm.yaml", help="the CLI's config; sizes are overridden")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each program (OMP_NUM_THREADS)")
    parser.add_argument("--nice", type=int, default=1, help="niceness of every program")
    parser.add_argument("--max_steps", type=int, default=None, help="cut the epoch to this many steps (validated at its end)")
    parser.add_argument("--skip_validation", action="store_true", help="speed only: no validation perplexity")
    parser.add_argument("--all_at_once", action="store_true", help="run every seed at the same time")
    parser.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS), metavar="NAME",
                        help=f"also run the CLI with these settings changed, one each ({', '.join(VARIANTS)}; "
                             f"--variants alone: all)")  # fmt: skip
    parser.add_argument("--without_cli", action="store_true",
                        help="run the example and the --variants only, not the CLI with its defaults")
    parser.add_argument("--cli_args", nargs=argparse.REMAINDER, default=[], help="more CLI overrides (last)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = parser.parse_args()
    args.variants = list(VARIANTS) if args.variants == [] else args.variants or []  # given alone: all
    if args.step_times:
        return step_times(args.step_times)
    if not args.corpus:
        parser.error("--corpus is required (or --step_times STEPS)")
    args.corpus = str(Path(args.corpus).resolve())
    args.data_dir = str(Path(args.data_dir).resolve())

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.threads} torch thread(s) per program, "
          f"nice {args.nice}; {'one epoch' if not args.max_steps else f'{args.max_steps} steps'} per run")  # fmt: skip
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        groups = [args.seeds] if args.all_at_once else [[seed] for seed in args.seeds]
        for seeds in groups:
            programs = {} if args.without_cli else {"cli": []}
            programs |= {f"cli, {name}": VARIANTS[name] for name in args.variants}
            outputs, commands = {}, {}
            for seed in seeds:
                outputs[seed, "example"] = root / f"example-{seed}.json"
                commands[f"example, seed {seed}"] = example_command(args, seed, outputs[seed, "example"])
                for i, (name, extra) in enumerate(programs.items()):
                    outputs[seed, name] = root / f"cli{i}-{seed}.json"
                    commands[f"{name}, seed {seed}"] = cli_command(
                        args, seed, outputs[seed, name], root / f"cli{i}-{seed}", extra
                    )
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            run_together(commands, args, root)
            load_after = os.getloadavg()[0]
            for (seed, name), path in outputs.items():
                result = json.loads(path.read_text())
                if name == "example":
                    result = result["epochs"][0]
                run = {
                    "program": name,
                    "seed": seed,
                    "val_ppl": None if args.skip_validation else result["val_ppl"],
                    "tokens_per_sec": result["tokens_per_sec"],
                    "tokens_per_cpu_sec": result["tokens_per_cpu_sec"],
                    "steps": result["steps"],
                    "load_before": load_before,
                    "load_after": load_after,
                    "wall_seconds": time.perf_counter() - started,
                    "processes_at_once": len(commands),
                }
                runs.append(run)
                ppl = "-" if run["val_ppl"] is None else f"{run['val_ppl']:.1f}"
                print(f"seed {seed} {name:58s} val ppl {ppl:>7s}  {run['tokens_per_sec']:7,.0f} tokens/s, "
                      f"{run['tokens_per_cpu_sec']:7,.0f} per CPU-s of its process  "
                      f"({run['steps']:,} steps; {len(commands)} processes at once; "
                      f"load {load_before:.1f} -> {load_after:.1f})", flush=True)  # fmt: skip

    names = ["example"] + [n for n in dict.fromkeys(r["program"] for r in runs) if n != "example"]
    example_tps = {r["seed"]: r["tokens_per_sec"] for r in runs if r["program"] == "example"}
    example_ppl = {r["seed"]: r["val_ppl"] for r in runs if r["program"] == "example"}
    example_cpu = {r["seed"]: r["tokens_per_cpu_sec"] for r in runs if r["program"] == "example"}
    print(f"\n| program ({len(args.seeds)} seeds: median (min-max)) | val perplexity | ppl - example's, same seed | "
          f"training tokens/s | / example's, same seed | tokens per CPU-s | / example's, same seed |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        mine = [r for r in runs if r["program"] == name]
        ratio = [r["tokens_per_sec"] / example_tps[r["seed"]] for r in mine]
        ppl = [r["val_ppl"] for r in mine if r["val_ppl"] is not None]
        delta = [r["val_ppl"] - example_ppl[r["seed"]] for r in mine if r["val_ppl"] is not None]
        cpu = [r["tokens_per_cpu_sec"] for r in mine]
        cpu_ratio = [r["tokens_per_cpu_sec"] / example_cpu[r["seed"]] for r in mine]
        print(f"| {name} | {spread(ppl)} | {spread(delta, 1) if name != 'example' else '-'} | "
              f"{spread([r['tokens_per_sec'] for r in mine], 0)} | {spread(ratio, 2)} | {spread(cpu, 0)} | "
              f"{spread(cpu_ratio, 2)} |")  # fmt: skip
    if all(r["val_ppl"] is not None for r in runs):
        mean = {n: statistics.mean(r["val_ppl"] for r in runs if r["program"] == n) for n in names}
        print("\nmean val perplexity: " + ", ".join(f"{n} {v:.1f}" for n, v in mean.items()))
    loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
    print(f"load average during the runs: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2, default=str))
    if any(r["val_ppl"] is not None and math.isnan(r["val_ppl"]) for r in runs):
        raise SystemExit("a run ended with a NaN perplexity")


if __name__ == "__main__":
    main()
