"""Benchmark: this project's Word2Vec (through the DataModule and a Lightning Trainer) against gensim.

    python benchmarks/word2vec.py --corpus ../shared/data/text8-head.zip
    python benchmarks/word2vec.py --corpus ../shared/data/text8-head.zip --repeats 3   # seeds 0, 1, 2 and a summary
    python benchmarks/word2vec.py --corpus ../shared/data/text8-head.zip --no-gensim --set model.num_sampled=10

The model, data and trainer settings come from ``configs/word2vec.yaml`` (``--config``; ``--set
section.key=value`` overrides); gensim's skip-gram gets the matched settings: dimension, window,
negatives per pair, subsampling threshold, min_count, vocabulary cap, epochs and the same number of
threads; its learning rate stays its default (0.025, ``--gensim-alpha``). Both train on the same
training split of the corpus. Printed for both: training wall time, words/s, pairs/s, Google analogy
accuracy, WordSim-353 and SimLex-999 Spearman, and the ratios ours/gensim.

Timing covers training only (``trainer.fit`` with validation off / gensim's ``train``); building the
vocabulary and encoding the corpus (``prepare``) is reported separately. On a shared machine the
figures are noisy: compare the ratios taken in one run, and prefer ``--repeats``: each seed runs ours
then gensim back to back, and the summary gives the median time ratio and the mean quality over seeds
(one seed's SimLex-999 varies by about +-0.006, for gensim as for us).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
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
    p.add_argument("--config", default=str(ROOT / "configs" / "word2vec.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. model.lr=0.05 or data.batch_size=8192 (YAML value)")
    p.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    p.add_argument("--threads", type=int, default=None, help="torch threads and gensim workers (default: CPU count)")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "lm_tying_bench"))
    p.add_argument("--split", type=float, default=0.99, help="training fraction (the rest is val/test)")
    p.add_argument("--no-gensim", action="store_true", help="only this project's model")
    p.add_argument("--gensim-alpha", type=float, default=0.025, help="gensim's initial learning rate (its default)")
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


def _raw_train_words(corpus: str, n: int) -> list[str]:
    import zipfile

    if zipfile.is_zipfile(corpus):
        with zipfile.ZipFile(corpus) as z:
            text = z.read("text8").decode()
    else:
        text = Path(corpus).read_text()
    return text.split()[:n]


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LitLogger.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("gensim").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, corpus {args.corpus}")
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
            print(f"{'ratio':10s} {'':4s} {'':6s} {'':9s} {ours['train'] / theirs['train']:8.2f}")
    if runs["gensim"]:
        summarise(runs["lm-tying"], runs["gensim"])


def summarise(ours: list[dict], theirs: list[dict]) -> None:
    """Median of the per-seed time ratios (each pair ran back to back) and the ratios of mean quality."""
    keys = ("analogy", "wordsim353", "simlex999")
    mean = {name: {k: float(np.mean([r[k] for r in rs])) for k in keys} for name, rs in (("ours", ours), ("gensim", theirs))}
    time_ratio = float(np.median([a["train"] / b["train"] for a, b in zip(ours, theirs)]))
    pairs_per_s = float(np.median([r["pairs"] / r["train"] for r in ours]))
    print(f"\nover {len(ours)} seed(s): median train time ratio {time_ratio:.2f}, our median {pairs_per_s / 1e6:.2f}M pairs/s")
    print(f"{'mean':10s} {'analogy':>8s} {'WS-353':>7s} {'SimLex':>7s}")
    for name in ("ours", "gensim"):
        m = mean[name]
        print(f"{name:10s} {100 * m['analogy']:7.2f}% {m['wordsim353']:7.3f} {m['simlex999']:7.3f}")
    print(f"{'ratio':10s} " + " ".join(f"{mean['ours'][k] / max(mean['gensim'][k], 1e-9):{w}.3f}" for k, w in zip(keys, (8, 7, 7))))
    print("(ratio = lm-tying / gensim: time <= 1 and quality >= 1 is the target)")


if __name__ == "__main__":
    main()
