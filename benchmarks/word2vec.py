"""Benchmark: this project's Word2Vec against gensim, as a user waits for it and training alone.

    python benchmarks/word2vec.py --corpus ../shared/data/text8-head.zip --repeats 3                 # all parts
    python benchmarks/word2vec.py --corpus ../shared/data/text8-head.zip --parts train --repeats 3   # training only
    python benchmarks/word2vec.py --corpus ../shared/data/text8-head.zip --parts train --no-gensim --set model.num_sampled=10

``--parts`` (comma-separated):

- ``whole``: the command as the user runs it, ``lm-tying fit --config configs/word2vec.yaml --data.path CORPUS
  --seed_everything SEED`` in a subprocess (imports, data, kernel load, training, the config's evaluation,
  checkpoints), against ``benchmarks/word2vec_gensim.py`` (gensim reading the same corpus, training on the same
  first 90 %, evaluating), each seed ours then gensim back to back; the vectors of our ``last.ckpt`` are
  evaluated afterwards, untimed. Each process's CPU time (user + system, its children included) is printed
  beside its wall time: the work each did, not counting time other jobs held the cores (their contention for
  caches and memory still counts). The first seed is a first run, as in a fresh checkout (an empty kernel
  cache and data directory: the compiled code is built and the corpus encoded; ``--no-first-run`` to skip; the
  evaluation files, downloaded once per machine where gensim is not installed, are not downloaded again);
  later seeds reuse both, as a user's second run does.
- ``startup``: where our time before the first step goes, each phase in a fresh process: Python, ``import
  lm_tying.cli``, ``import torch``, ``import lightning`` (both with the cycle collector paused, as the CLI
  imports them), loading the compiled kernel, loading the cached corpus; and the whole command with
  ``--trainer.max_steps 0`` (everything but training).
- ``first``: what a first run adds: ``--repeats`` pairs of the whole command, a first run (an empty kernel cache and
  data directory) then the same again with both kept, and when each phase ended, read off the output's lines as
  they come: the compiled code built, the imports and the CLI done (``Seed set``), the corpus encoded, the first
  epoch started, training done (the validation's start), the whole command.
- ``train``: training alone, through a ``Trainer`` in this process (``trainer.fit`` with validation off, the
  process's objects frozen out of the cycle collector's passes first as the CLI does, against
  gensim's ``train``), with the settings of ``--config`` (``--set section.key=value`` overrides) and gensim's
  matched: dimension, window, negatives per pair, subsampling, min_count, vocabulary cap, epochs, threads; its
  learning rate stays its default (0.025, ``--gensim-alpha``). Also pairs/s against a memory roofline: each pair
  reads and writes its two rows (center, context) and one row per negative (5 per pair), 4-byte floats, at the
  copy bandwidth measured in the same run.

``--repeat-corpus 8`` times text8-head at full text8's size (17M words, the same text 8 times over). Where the
vocabulary cap binds (it does there: ~81k distinct words, cap 50,000), gensim's ``max_final_vocab`` keeps fewer
words than our cap, and ``whole`` gives ours gensim's effective ``min_count`` so both are evaluated on the same
vocabulary.

On a shared machine the figures are noisy: compare the ratios taken in one run, and prefer ``--repeats``
(seeds seed, seed+1, ...): the summaries give the median time ratio, the ratio of the fastest runs (each program
at its quietest, the first run aside when another run was faster) and the mean quality over seeds (one
seed's SimLex-999 varies by about +-0.006, for gensim as for us). The load average is printed with each part.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from lm_tying.data import Text8DataModule  # noqa: E402
from lm_tying.models.word2vec import Word2Vec  # noqa: E402
from lm_tying.vectors import EVAL_FILES, default_eval_file  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="text8-format file or zip (e.g. ../shared/data/text8-head.zip)")
    p.add_argument("--parts", default="whole,startup,train", help="comma-separated: whole, first, startup, train")
    p.add_argument("--config", default=str(ROOT / "configs" / "word2vec.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. model.lr=0.05 or data.batch_size=8192 (YAML value)")
    p.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    p.add_argument("--threads", type=int, default=None, help="torch threads and gensim workers (default: CPU count)")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "lm_tying_bench"))
    p.add_argument("--split", type=float, default=0.99,
                   help="the train part's training fraction (the rest is val/test); the whole part trains on the "
                        "config's split, as the command does (change it with --set 'data.split=[0.99, 0.005, 0.005]')")
    p.add_argument("--no-gensim", action="store_true", help="only this project's model")
    p.add_argument("--repeat-corpus", type=int, default=1, metavar="N",
                   help="use the corpus N times over (e.g. 8: text8-head at full text8's 17M words)")
    p.add_argument("--no-first-run", action="store_true",
                   help="whole: the first seed too reuses the compiled code and encoded corpus of earlier runs")
    p.add_argument("--gensim-alpha", type=float, default=0.025, help="gensim's initial learning rate (its default)")
    p.add_argument("--python", default=sys.executable,
                   help="the Python that runs our command (whole, first, startup): that of an environment with this "
                        "project installed as the README says (`pip install -e .`: no gensim, hence no scipy, whose "
                        "import torchmetrics adds to Lightning's when installed); default: this one, which gensim needs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each (seeds seed, seed+1, ...), alternating ours and gensim; summary: median time "
                        "ratio and mean quality (one run's wall time on a shared VM varies by +-30 %%)")
    return p.parse_args()


def load_config(path: str, overrides: list[str]) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in ("model", "data", "trainer") or not name or not _:
            raise SystemExit(f"--set {item!r}: expected model.KEY=VALUE, data.KEY=VALUE or trainer.KEY=VALUE")
        target = cfg.setdefault(section, {})
        if section != "trainer":
            target = target.setdefault("init_args", {})
        target[name] = yaml.safe_load(value)
    return cfg


def evaluate(wv) -> dict[str, float]:
    """Analogy accuracy and Spearman correlations, on gensim's files (gensim's semantics for both)."""
    out = {"analogy": wv.evaluate_word_analogies(default_eval_file(EVAL_FILES["analogies"]))[0]}
    for key in ("wordsim353", "simlex999"):
        result = wv.evaluate_word_pairs(default_eval_file(EVAL_FILES[key]))
        spearman = result[1]
        out[key] = float(spearman[0] if isinstance(spearman, tuple) else getattr(spearman, "statistic", spearman))
    return out


def run_ours(args, cfg, seed: int) -> dict:
    data_args = dict(cfg["data"]["init_args"])
    data_args.update(path=args.corpus, data_dir=args.data_dir, split=(args.split, (1 - args.split) / 2, (1 - args.split) / 2))
    model_args = dict(cfg["model"]["init_args"])
    model_args.update(evaluate=False, threads=args.threads)
    trainer_args = {k: v for k, v in cfg.get("trainer", {}).items() if k not in ("logger", "callbacks")}
    if args.epochs is not None:
        trainer_args["max_epochs"] = args.epochs
    trainer_args.update(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, precision=args.precision, accelerator=args.accelerator,
        devices=1,
    )  # fmt: skip

    L.seed_everything(seed, verbose=False)
    t0 = time.perf_counter()
    dm = Text8DataModule(**data_args)
    dm.prepare_data()
    prepare = time.perf_counter() - t0
    model = Word2Vec(vocab_size=dm.num_words, **model_args)
    trainer = L.Trainer(**trainer_args)
    gc.collect()
    gc.freeze()  # as the CLI after its imports: full collections skip what exists (here also earlier seeds' corpora)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    train = time.perf_counter() - t0
    loader = trainer.train_dataloader
    pairs = trainer.global_step * dm.batch_size  # the last batch of each epoch may be smaller: upper bound
    if loader is not None and hasattr(loader, "dataset"):
        pairs = min(pairs, loader.dataset.pairs_per_epoch * trainer.current_epoch) or pairs
    words = len(dm.split_tokens("train")) * trainer.current_epoch
    return dict(name="lm-tying", prepare=prepare, train=train, words=words, pairs=pairs, vocab=dm.num_words,
                wv=model.word_vectors(), train_tokens=np.asarray(dm.split_tokens("train")), dm=dm, epochs=trainer.current_epoch)  # fmt: skip


def run_gensim(args, cfg, ours: dict, seed: int) -> dict | None:
    try:
        from gensim.models import Word2Vec as GensimWord2Vec
    except ImportError:
        print("gensim is not installed: only this project's model was measured")
        return None
    m, d = cfg["model"]["init_args"], cfg["data"]["init_args"]
    # the same training split, as raw words: gensim builds its own vocabulary (and drops rare words)
    raw = _raw_train_words(args.corpus, len(ours["train_tokens"]))
    sentences = [raw[i : i + 10_000] for i in range(0, len(raw), 10_000)]
    # gensim's own learning rate unless asked: lr is part of each method's tuning, not of the task
    lr = args.gensim_alpha
    # negatives per pair: K shared samples weighted w estimate word2vec's objective with K * w negatives
    negative = m.get("num_sampled", 5)
    if m.get("loss") == "negative_sampling":
        negative = max(1, round(negative * m.get("negative_weight", 1.0)))
    settings = dict(
        vector_size=m.get("embedding_dim", 128), window=d.get("window", 5), negative=negative,
        sample=d.get("subsample") or 0, min_count=d.get("min_count") or 1, max_final_vocab=d.get("vocab_size"),
        epochs=ours["epochs"], alpha=lr, min_alpha=lr * 1e-4,
        workers=args.threads or os.cpu_count(), sg=1, hs=0, seed=seed,
    )  # fmt: skip
    if seed == args.seed:
        print("gensim settings:", settings)
    model = GensimWord2Vec(**settings)
    t0 = time.perf_counter()
    model.build_vocab(sentences)
    prepare = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.train(sentences, total_examples=len(sentences), epochs=settings["epochs"])
    train = time.perf_counter() - t0
    # pairs: gensim does not count them; estimate with our stream's pairs per training word (same window
    # distribution and subsampling threshold), scaled to gensim's vocabulary-filtered words
    kept = sum(len(s) for s in sentences) * settings["epochs"]
    pairs = ours["pairs"] / max(ours["words"], 1) * kept
    return dict(name="gensim", prepare=prepare, train=train, words=len(raw) * settings["epochs"], pairs=pairs,
                vocab=len(model.wv), wv=model.wv)  # fmt: skip


def gensim_min_count(corpus: str, split: float, data_args: dict) -> int | None:
    """gensim's effective ``min_count`` when the vocabulary cap binds (None if it does not): ``max_final_vocab``
    raises ``min_count`` to one above the count of the first word past the cap, counted on its training words,
    so it keeps fewer words than our cap (the ``vocab_size - 1`` most frequent). Ours must use the same words for
    the evaluations to compare: rare words are more distractors for the analogies, and pairs gensim skips."""
    cap, min_count = data_args.get("vocab_size"), data_args.get("min_count") or 1
    words = _raw_train_words(corpus, None)
    counts = sorted(Counter(words[: int(len(words) * split)]).values(), reverse=True)
    if cap is None or len(counts) <= cap:
        return None
    effective = max(counts[cap] + 1, min_count)
    return effective if effective > min_count else None


def _raw_train_words(corpus: str, n: int | None) -> list[str]:
    import zipfile

    if zipfile.is_zipfile(corpus):
        with zipfile.ZipFile(corpus) as z:
            text = z.read("text8").decode()
    else:
        text = Path(corpus).read_text()
    return text.split()[:n]


def cli_overrides(overrides: list[str]) -> list[str]:
    """``--set`` values as ``lm-tying fit`` flags (model.X -> --model.init_args.X)."""
    flags = []
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        flags += [f"--{section}.init_args.{name}" if section == "model" else f"--{key}", value]
    return flags


def load_average() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def timed(command: list[str], cwd: Path, log: Path, **env: str) -> tuple[float, float]:
    """Wall time of ``command`` as a user's shell would time it, and the CPU time (user + system) of it and its
    children (a first run's compiler included); ``env``: extra variables. Its output goes to ``log``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env() | env)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {proc.returncode}); its output: {log}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fit_command(args, seed: int, run_name: str, *extra: str) -> list[str]:
    """The user's command; ``--overwrite true`` replaces the checkpoints of an earlier benchmark's run."""
    return [args.python, "-m", "lm_tying.cli", "fit", "--config", str(Path(args.config).resolve()),
            "--data.path", str(Path(args.corpus).resolve()), "--seed_everything", str(seed),
            "--run_name", run_name, "--overwrite", "true", *cli_overrides(args.set), *extra]  # fmt: skip


def work_dir(args) -> Path:
    """Where the subprocess parts run: their checkpoints, logs and first runs' directories."""
    work = Path(args.data_dir) / "whole"
    work.mkdir(parents=True, exist_ok=True)
    return work


def fresh_checkout(work: Path) -> tuple[list[str], dict[str, str]]:
    """The command's flags and environment for a first run, as in a fresh checkout: a new, empty data directory and
    kernel cache (the compiled code is built and the corpus encoded), kept for the runs that follow."""
    fresh = Path(tempfile.mkdtemp(prefix="first_run_", dir=work))
    return ["--data.data_dir", str(fresh / "data")], {"LM_TYING_KERNEL_CACHE": str(fresh / "kernels")}


def run_whole(args, cfg) -> None:
    """``lm-tying fit`` against gensim's whole process, per seed; quality of both."""
    work = work_dir(args)
    split = (cfg["data"]["init_args"].get("split") or [0.9])[0]
    epochs = args.epochs or cfg.get("trainer", {}).get("max_epochs", 5)
    extra = ["--trainer.max_epochs", str(epochs)] if args.epochs else []
    matched = gensim_min_count(args.corpus, split, cfg["data"]["init_args"])
    if matched is not None:  # the cap binds: gensim keeps fewer words; both then evaluate the same vocabulary
        extra += ["--data.min_count", str(matched)]
        print(f"the vocabulary cap binds: ours runs with gensim's effective min_count {matched} (--data.min_count)")
    print(f"\n== whole process ({load_average()}) ==")
    print(f"{'':10s} {'seed':>4s} {'wall s':>7s} {'cpu s':>7s} {'analogy':>8s} {'WS-353':>7s} {'SimLex':>7s}")
    ours_runs, their_runs = [], []
    for seed in range(args.seed, args.seed + args.repeats):
        command, env, name = fit_command(args, seed, f"bench_{seed}", *extra), {}, "lm-tying"
        if seed == args.seed and not args.no_first_run:
            flags, env = fresh_checkout(work)
            command, name = command + flags, "lm-tying*"
        wall, cpu = timed(command, work, work / f"lm_tying_{seed}.log", **env)
        model = Word2Vec.load_from_checkpoint(work / "checkpoints" / f"bench_{seed}" / "last.ckpt", map_location="cpu")
        rows = [dict(name=name, whole=wall, cpu=cpu, **evaluate(model.word_vectors()))]
        ours_runs.append(rows[0])
        if not args.no_gensim:
            log = work / f"gensim_{seed}.log"
            command = [sys.executable, str(ROOT / "benchmarks" / "word2vec_gensim.py"), "--corpus", str(Path(args.corpus).resolve()),
                       "--seed", str(seed), "--train-fraction", str(split), "--epochs", str(epochs),
                       "--workers", str(args.threads or os.cpu_count())]  # fmt: skip
            wall, cpu = timed(command, work, log)
            rows.append(dict(name="gensim", whole=wall, cpu=cpu, **json.loads(log.read_text().splitlines()[-1])))
            their_runs.append(rows[1])
        for r in rows:
            phases = ", ".join(f"{k[:-2]} {r[k]:.1f} s" for k in ("import_s", "read_s", "train_s", "evaluate_s") if k in r)
            print(f"{r['name']:10s} {seed:4d} {r['whole']:7.1f} {r['cpu']:7.1f} {100 * r['analogy']:7.2f}% {r['wordsim353']:7.3f} "
                  f"{r['simlex999']:7.3f}  {phases}")  # fmt: skip
        if len(rows) == 2:
            print(f"{'ratio':10s} {'':4s} {rows[0]['whole'] / rows[1]['whole']:7.2f} {rows[0]['cpu'] / rows[1]['cpu']:7.2f}"
                  f"   ({load_average()})")  # fmt: skip
    if not args.no_first_run:
        print("lm-tying*: a first run (the compiled code built and the corpus encoded, as in a fresh checkout)")
    if their_runs:
        summarise(ours_runs, their_runs, "whole")


FIRST_RUN_MARKS = {  # a phase's end, and the start of a line of the command's output that shows it
    "built": "Word2Vec: compiled code built",
    "started": "Seed set",
    "encoded": "text8:",
    "epoch 0": "Epoch 0:",
    "trained": "Validation",
}


def phase_times(command: list[str], cwd: Path, log: Path, **env: str) -> dict[str, float]:
    """Seconds from the start of ``command`` to the first output line of each of ``FIRST_RUN_MARKS``, and to its
    end (``whole``). Progress bars rewrite their line with carriage returns: each rewrite counts as a line."""
    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=subprocess_env() | env | {"PYTHONUNBUFFERED": "1"})  # fmt: skip
        pending = b""
        while chunk := proc.stdout.read1(1 << 16):
            now = time.perf_counter() - t0
            out.write(chunk)
            *lines, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").lstrip()
                for name, start in FIRST_RUN_MARKS.items():
                    if name not in marks and text.startswith(start):
                        marks[name] = now
        if proc.wait() != 0:
            raise SystemExit(f"{' '.join(command)} failed (exit {proc.returncode}); its output: {log}")
    marks["whole"] = time.perf_counter() - t0
    return marks


def run_first(args, cfg) -> None:
    """First runs against the runs after them, alternating, with each phase's end."""
    work = work_dir(args)
    print(f"\n== first runs and the runs after ({load_average()}) ==")
    columns = [*FIRST_RUN_MARKS, "whole"]
    print(f"{'':12s} {'pair':>4s} " + " ".join(f"{c:>8s}" for c in columns) + "   (s from the start)")
    firsts, afters = [], []
    for pair in range(args.repeats):
        flags, env = fresh_checkout(work)
        command = fit_command(args, args.seed + pair, f"bench_first_{pair}", *flags)
        for name, runs in (("first run", firsts), ("run after", afters)):
            marks = phase_times(command, work, work / f"first_{pair}_{name.split()[0]}.log", **env)
            runs.append(marks["whole"])
            cells = " ".join(f"{marks[c]:8.2f}" if c in marks else f"{'-':>8s}" for c in columns)
            print(f"{name:12s} {pair:4d} {cells}   ({load_average()})")
    print(f"whole command: first runs {' / '.join(f'{t:.2f}' for t in firsts)} s, the runs after "
          f"{' / '.join(f'{t:.2f}' for t in afters)} s; median difference "
          f"{float(np.median(np.subtract(firsts, afters))):+.2f} s")


STARTUP_PHASES = {  # the imports as the CLI makes them: with Python's cycle collector paused
    "python": "pass",
    "import lm_tying.cli": "from lm_tying.cli import _collector_paused",
    "import torch": "with _collector_paused():\n    import torch",
    "import lightning": "with _collector_paused():\n    import lightning.pytorch",
    "kernel load": "from lm_tying import native; native.library()",
}


def run_startup(args, cfg) -> None:
    """Each phase before the first step, timed inside a fresh process that first ran the phases before it
    (median of 3); then the whole command without training."""
    work = work_dir(args)
    data_args = {k: v for k, v in cfg["data"]["init_args"].items() if k not in ("path", "data_dir")}
    phases = dict(STARTUP_PHASES)
    phases["data (cached corpus)"] = (
        "from lm_tying.data import Text8DataModule; "
        f"dm = Text8DataModule(path={str(Path(args.corpus).resolve())!r}, data_dir='data', **{data_args!r}); "
        "dm.prepare_data(); dm.setup('fit')"
    )
    print(f"\n== start-up ({load_average()}) ==")
    before = ""
    for name, statement in phases.items():
        body = f"import time\n{before}t = time.perf_counter()\n{statement}\nprint(time.perf_counter() - t)"
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = subprocess.run([args.python, "-c", body], cwd=work, capture_output=True, text=True, env=subprocess_env())
            if out.returncode != 0:
                raise SystemExit(f"start-up phase {name!r} failed: {out.stderr[-2000:]}")
            runs.append((time.perf_counter() - t0, float(out.stdout.split()[-1])))
        wall, own = sorted(runs)[1]
        print(f"{name:24s} {wall if name == 'python' else own:6.2f} s")
        before += statement + "\n"
    wall, _ = timed(fit_command(args, args.seed, "bench_no_training", "--trainer.max_steps", "0"), work, work / "no_training.log")
    print(f"{'lm-tying fit, 0 steps':24s} {wall:6.2f} s   (the whole command without training; {load_average()})")


def copy_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write), best of 5: the memory roofline's bandwidth."""
    x = torch.ones(2**26)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


def run_train(args, cfg) -> None:
    print(f"\n== training only ({load_average()}) ==")
    header = f"{'':10s} {'seed':>4s} {'vocab':>6s} {'prepare s':>9s} {'train s':>8s} {'words/s':>9s} {'pairs/s':>9s} {'analogy':>8s} {'WS-353':>7s} {'SimLex':>7s}"
    runs: dict[str, list[dict]] = {"lm-tying": [], "gensim": []}
    for seed in range(args.seed, args.seed + args.repeats):
        ours = run_ours(args, cfg, seed)
        ours.update(evaluate(ours["wv"]), seed=seed)
        runs["lm-tying"].append(ours)
        theirs = None if args.no_gensim else run_gensim(args, cfg, ours, seed)
        if theirs is not None:
            theirs.update(evaluate(theirs["wv"]), seed=seed)
            runs["gensim"].append(theirs)
        print("\n" + header)
        for r in [ours] + ([theirs] if theirs else []):
            print(
                f"{r['name']:10s} {seed:4d} {r['vocab']:6d} {r['prepare']:9.1f} {r['train']:8.1f} {r['words'] / r['train'] / 1e3:8.0f}k "
                f"{r['pairs'] / r['train'] / 1e6:8.2f}M {100 * r['analogy']:7.2f}% {r['wordsim353']:7.3f} {r['simlex999']:7.3f}"
            )
        if theirs is not None:
            print(f"{'ratio':10s} {'':4s} {'':6s} {'':9s} {ours['train'] / theirs['train']:8.2f}   ({load_average()})")
    if runs["gensim"]:
        summarise(runs["lm-tying"], runs["gensim"], "train")
    m = cfg["model"]["init_args"]
    negatives = max(1, round(m.get("num_sampled", 5) * m.get("negative_weight", 1.0)))
    bytes_per_pair = 2 * (2 + negatives) * m.get("embedding_dim", 128) * 4  # rows read and written, float32
    bandwidth = copy_bandwidth()
    pairs_per_s = float(np.median([r["pairs"] / r["train"] for r in runs["lm-tying"]]))
    print(
        f"memory roofline: {bandwidth / 1e9:.1f} GB/s copy bandwidth / {bytes_per_pair} bytes per pair = "
        f"{bandwidth / bytes_per_pair / 1e6:.2f}M pairs/s; ours {pairs_per_s / 1e6:.2f}M pairs/s "
        f"({100 * pairs_per_s * bytes_per_pair / bandwidth:.0f} % of it; {load_average()})"
    )


def main() -> None:
    args = parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # rows in order with the subprocesses' and Lightning's output
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LitLogger.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("gensim").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    if args.repeat_corpus > 1:
        args.corpus = str(repeated_corpus(args.corpus, args.repeat_corpus, Path(args.data_dir)))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    runners = {"whole": run_whole, "first": run_first, "startup": run_startup, "train": run_train}
    unknown = set(parts) - runners.keys()
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(runners)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, corpus {args.corpus}, {load_average()}")
    if args.python != sys.executable:
        print(f"our command runs in {args.python}'s environment; gensim in this one's ({sys.executable})")
    for part in parts:
        runners[part](args, cfg)


def repeated_corpus(corpus: str, times: int, directory: Path) -> Path:
    """``corpus``'s words ``times`` over, as one plain text8-format file (made once): a corpus of full text8's
    size for timing when only a prefix of text8 is at hand."""
    out = directory / f"{Path(corpus).stem}-x{times}"
    if not out.exists():
        text = " " + " ".join(_raw_train_words(corpus, None))
        directory.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        partial.write_text(text * times)
        partial.replace(out)
    return out


def summarise(ours: list[dict], theirs: list[dict], timing: str) -> None:
    """Median of the per-seed time ratios (each pair ran back to back), the ratio of the fastest runs, and the ratios
    of mean quality."""
    keys = ("analogy", "wordsim353", "simlex999")
    mean = {name: {k: float(np.mean([r[k] for r in rs])) for k in keys} for name, rs in (("ours", ours), ("gensim", theirs))}
    ratios = [a[timing] / b[timing] for a, b in zip(ours, theirs)]
    print(f"\nover {len(ours)} seed(s): median {timing} time ratio {float(np.median(ratios)):.2f} "
          f"(per seed {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    fastest, their_fastest = min(r[timing] for r in ours), min(r[timing] for r in theirs)
    print(f"fastest against fastest {fastest / their_fastest:.2f} ({fastest:.1f} s against {their_fastest:.1f} s: "
          f"each program at its quietest)")
    if all("cpu" in r for r in ours + theirs):
        cpu = [a["cpu"] / b["cpu"] for a, b in zip(ours, theirs)]
        print(f"median CPU time ratio {float(np.median(cpu)):.2f} (per seed {', '.join(f'{r:.2f}' for r in cpu)})")
    print(f"{'mean':10s} {'analogy':>8s} {'WS-353':>7s} {'SimLex':>7s}")
    for name in ("ours", "gensim"):
        m = mean[name]
        print(f"{name:10s} {100 * m['analogy']:7.2f}% {m['wordsim353']:7.3f} {m['simlex999']:7.3f}")
    print(f"{'ratio':10s} " + " ".join(f"{mean['ours'][k] / max(mean['gensim'][k], 1e-9):{w}.3f}" for k, w in zip(keys, (8, 7, 7))))
    print("(ratio = lm-tying / gensim: time <= 1 and quality >= 1 is the target)")


if __name__ == "__main__":
    main()
