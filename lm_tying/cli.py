"""``lm-tying``: the command line of the project (a ``LightningCLI``).

::

    lm-tying fit --config configs/word2vec.yaml                       # train; run name "word2vec"
    lm-tying fit --config configs/word2vec.yaml --ckpt_path last      # continue checkpoints/word2vec/last.ckpt
    lm-tying validate|test --config configs/lstm_lm.yaml --ckpt_path best
    lm-tying export --ckpt_path checkpoints/word2vec/last.ckpt --output vectors.bin
    lm-tying generate --ckpt_path checkpoints/lstm_lm/last.ckpt --prompt "the king"

What the CLI adds to a plain ``LightningCLI`` (all defaults, all overridable):

- a *run name* (``--run_name``; default: the config file's stem, else the model class) that decides
  ``checkpoints/<run>/`` and the TensorBoard run ``logs/<run>/version_<n>``;
- ``TensorBoardLogger`` (hyperparameters recorded), ``checkpoints/<run>/last.ckpt`` every
  ``--checkpoint.every_n_train_steps`` steps and ``--checkpoint.every_n_minutes`` minutes, at the end and on
  SIGTERM/Ctrl-C, ``best.ckpt`` by ``--checkpoint.monitor``, the embedding projector (``--projector.*``), random
  state in checkpoints;
- atomic, verified checkpoints (``AtomicCheckpointIO``): a killed run always leaves a loadable ``last.ckpt``, a
  corrupt one is named on load, and ``FiniteGuard`` stops a diverged run before it saves non-finite weights;
- one ``fit`` per run at a time (a lock, ``checkpoints/.<run>.lock``), and no ``fit`` silently starting over a run
  that has a ``last.ckpt`` (``--ckpt_path last`` continues it, ``--overwrite true`` starts anew);
- ``--ckpt_path last|best`` resolve to ``checkpoints/<run>/{last,best}.ckpt``; a resumed fit logs into the
  TensorBoard run of the checkpoint, and is refused when the model, data or run settings differ from the
  checkpoint's, unless ``--accept_changes true``;
- the vocabulary size linked from the data (``data.num_words`` -> ``model.init_args.vocab_size``);
- readable one-line errors (and a non-zero exit status) for user errors, instead of tracebacks.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from lm_tying.atomic import RunLock, RunLockedError
from lm_tying.callbacks import (
    BestCheckpoint,
    DataHyperparameters,
    EmbeddingProjector,
    FiniteGuard,
    GracefulInterrupt,
    LastCheckpoint,
    RandomStateCheckpoint,
    RunMetadata,
    TrainingDivergedError,
    ValidateLastEpoch,
)
from lm_tying.checkpoint_io import AtomicCheckpointIO
from lm_tying.data import Text8DataModule
from lm_tying.export import checkpoint_model_class_path, load_checkpoint_header
from lm_tying.models.base import WordEmbeddingModule

PROG = "lm-tying"
EXTRA_COMMANDS = ("export", "generate")
DEBUG_ENV = "LM_TYING_DEBUG"

# Trainer settings recorded in every checkpoint (the model's and the data's are there as their hyperparameters):
# a resume that changes one of them changes the run's course (its length, and so the LR schedules, its steps ...).
RUN_TRAINER_SETTINGS = (
    "max_steps",
    "max_epochs",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "precision",
)
# Data settings a resume does not compare: where the corpus is and how its vocabulary is cut (the corpus fingerprint
# and the vocabulary itself are compared instead), and num_workers (the skip-gram loader refuses a change that
# alters the batch order itself).
DATA_SETTINGS_NOT_COMPARED = ("path", "data_dir", "url", "vocab_size", "min_count", "num_workers")


class UsageError(Exception):
    """A mistake in what the user asked for; reported as one line, exit status 2."""


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data (namespaces as dicts, tuples as lists), so a config and a checkpoint compare."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    return json.loads(json.dumps(value, default=str))


class LmTyingCLI(LightningCLI):
    """``LightningCLI`` with the project's defaults (see the module docstring)."""

    def __init__(self, args: Any = None, run: bool = True) -> None:
        self.run_name: str = "run"
        self._resume_log_version: Optional[int | str] = None
        self._run_lock: Optional[RunLock] = None
        try:
            super().__init__(
                WordEmbeddingModule,
                Text8DataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                seed_everything_default=0,
                # config.yaml goes into the TensorBoard run, which a resumed fit reuses.
                save_config_kwargs={"overwrite": True},
                parser_kwargs={
                    "prog": PROG,
                    "description": (
                        "word2vec and a weight-tied LSTM LM on text8. Extra commands: "
                        f"`{PROG} export --help`, `{PROG} generate --help`."
                    ),
                },
                args=args,
                run=run,
            )
        finally:
            if run:  # the command has run: the run is free again, also after an error
                self.release_run_lock()

    def release_run_lock(self) -> None:
        """Let another process train this run (done when a ``run=True`` command ends; call it after your own fit)."""
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None

    # ------------------------------------------------------------------------------------------------ parser
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Raise instead of printing the whole usage: main() reports the offending key and the fix in one line.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_words", "model.init_args.vocab_size", apply_on="instantiate")
        parser.add_argument(
            "--run_name",
            type=Optional[str],
            default=None,
            help="Name of the run: checkpoints go to <checkpoint.dir>/<run_name>/, TensorBoard logs to "
            "<log_dir>/<run_name>/version_<n>/. Default: the (last) config file's name without extension, "
            "else the model class in snake_case.",
        )
        parser.add_argument("--log_dir", type=str, default="logs", help="Root directory of the TensorBoard logs.")
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: start the run anew even though checkpoints/<run_name>/last.ckpt exists (its checkpoints are "
            "replaced as the new run saves). Without it such a fit is refused: continue with --ckpt_path last.",
        )
        parser.add_argument(
            "--accept_changes",
            type=bool,
            default=False,
            help="fit --ckpt_path: continue the run with model, data or trainer settings that differ from the "
            "checkpoint's (batch size, window, seed, bptt, optimizer, lr, max_steps ...), which changes the run's "
            "course. Without it such a resume is refused with the list of differences. Settings that cannot "
            "continue the run (weight shapes, vocabulary, corpus) are refused regardless.",
        )
        parser.add_argument(
            "--checkpoint.dir", type=str, default="checkpoints", help="Root directory of the checkpoints."
        )
        parser.add_argument(
            "--checkpoint.every_n_train_steps",
            type=int,
            default=1000,
            help="Write last.ckpt every this many training steps (it is also written at the end of fit and on "
            "SIGTERM/Ctrl-C; 0: only then).",
        )
        parser.add_argument(
            "--checkpoint.every_n_minutes",
            type=Optional[float],
            default=5.0,
            help="Also write last.ckpt when this many minutes of training passed since the last save, so that a "
            "killed run loses at most that much work however long its steps are (null or 0: no time-based saves).",
        )
        parser.add_argument(
            "--checkpoint.monitor",
            type=Optional[str],
            default="val/loss",
            help="Metric that selects best.ckpt (lower is better); null: no best.ckpt.",
        )
        parser.add_lightning_class_args(EmbeddingProjector, "projector")

    # ------------------------------------------------------------------------------------------------ run name
    def _subconfig(self) -> Any:
        return self.config.get(str(self.config.get("subcommand")), self.config)

    def _compute_run_name(self) -> str:
        cfg = self._subconfig()
        if cfg.get("run_name"):
            name = str(cfg.run_name)
        else:
            configs = [c for c in (cfg.get("config") or []) if c is not None]
            if configs:
                name = Path(str(getattr(configs[-1], "relative", configs[-1]))).stem
            else:
                class_path = cfg.get("model", {}).get("class_path") or "model"
                name = _snake(class_path.rsplit(".", 1)[-1])
        if not name or "/" in name or name in (".", ".."):
            raise UsageError(f"run_name {name!r} cannot name a directory")
        return name

    def _run_checkpoint_dir(self) -> Path:
        return Path(self._subconfig()["checkpoint"]["dir"]) / self.run_name

    def _run_settings(self) -> dict[str, Any]:
        """The trainer settings and seed this run is asked for (recorded in its checkpoints, compared on resume)."""
        cfg = self._subconfig()
        trainer = cfg.get("trainer") or {}
        settings = {f"trainer.{key}": _plain(trainer.get(key)) for key in RUN_TRAINER_SETTINGS}
        settings["seed_everything"] = _plain(cfg.get("seed_everything"))
        return settings

    def _resume_differences(self, checkpoint: dict[str, Any]) -> list[str]:
        """``key: checkpoint -> requested`` for every setting of the model, the data and the run that differs."""
        cfg = self._subconfig()
        saved_run = (checkpoint.get("lm_tying_run") or {}).get("settings") or {}
        pairs = [
            ("model", checkpoint.get("hyper_parameters") or {}, _plain(cfg.get("model", {}).get("init_args")) or {}),
            ("data", checkpoint.get("datamodule_hyper_parameters") or {}, _plain(cfg.get("data", {}).get("init_args")) or {}),
            ("", saved_run, self._run_settings()),
        ]
        skipped = {"model": {"vocab_size"}, "data": set(DATA_SETTINGS_NOT_COMPARED), "": set()}
        differences = []
        for group, saved, requested in pairs:
            for key in sorted(set(saved) & set(requested) - skipped[group]):
                if key.startswith("_"):
                    continue
                old, new = _plain(saved[key]), requested[key]
                if old != new:
                    differences.append(f"{group + '.' if group else ''}{key} {old!r} -> {new!r}")
        return differences

    def _lock_run(self) -> None:
        """Hold ``checkpoints/.<run>.lock`` for the life of this fit (global rank 0 only: the other ranks of a DDP
        run are its own processes)."""
        node_rank = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
        if getattr(rank_zero_only, "rank", 0) != 0 or node_rank != 0:
            return
        self._run_lock = RunLock(self._run_checkpoint_dir())
        self._run_lock.acquire()

    # ------------------------------------------------------------------------------------------------ ckpt_path
    def _parse_ckpt_path(self) -> None:
        """Resolve ``last``/``best`` to this run's files, refuse a checkpoint of another model *before*
        Lightning copies its hyperparameters into the config (which would silently switch the model class),
        and remember its TensorBoard version so that a resumed fit logs into the same run."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        self.run_name = self._compute_run_name()
        cfg = self.config[subcommand]
        if subcommand == "fit":
            self._lock_run()
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path in ("last", "best"):
            candidate = self._run_checkpoint_dir() / f"{ckpt_path}.ckpt"
            if candidate.is_file():
                ckpt_path = str(candidate)
            elif ckpt_path == "last" and subcommand == "fit":
                rank_zero_info(f"--ckpt_path last: no {candidate} yet; starting run {self.run_name!r} from scratch.")
                ckpt_path = None
            else:
                raise UsageError(f"--ckpt_path {ckpt_path}: {candidate} does not exist")
            cfg["ckpt_path"] = ckpt_path
        if ckpt_path is None:
            last = self._run_checkpoint_dir() / "last.ckpt"
            if subcommand == "fit" and last.is_file() and not cfg.get("overwrite"):
                raise UsageError(
                    f"run {self.run_name!r} already has {last}: continue it with --ckpt_path last, or start anew "
                    "with another --run_name or with --overwrite true (which replaces its checkpoints)"
                )
            return
        if ckpt_path == "hpc" or str(ckpt_path).startswith(("http://", "https://", "s3://", "gs://")):
            return super()._parse_ckpt_path()
        checkpoint = load_checkpoint_header(ckpt_path)
        ckpt_class = checkpoint_model_class_path(checkpoint, ckpt_path)
        config_class = cfg.get("model", {}).get("class_path")
        if config_class and ckpt_class.rsplit(".", 1)[-1] != str(config_class).rsplit(".", 1)[-1]:
            raise UsageError(
                f"{ckpt_path!r} is a {ckpt_class.rsplit('.', 1)[-1]} checkpoint, but the config selects "
                f"{str(config_class).rsplit('.', 1)[-1]}: use the config the checkpoint was trained with"
            )
        if subcommand != "fit":
            del checkpoint
            # Evaluate the model the checkpoint holds: Lightning takes its hyperparameters over the config's.
            super()._parse_ckpt_path()
            return
        run_info = checkpoint.get("lm_tying_run") or {}
        if run_info.get("run_name") == self.run_name:
            self._resume_log_version = run_info.get("log_version")
        # A resumed fit runs with the settings asked for, never silently with the checkpoint's: any difference is
        # refused unless accepted (and then listed). Shapes and vocabulary are refused again when the state loads.
        differences = self._resume_differences(checkpoint)
        if differences and not cfg.get("accept_changes"):
            raise UsageError(
                f"{ckpt_path} was trained with other settings ({'; '.join(differences)}): resume with the run's "
                "settings, or pass --accept_changes true to continue with the new ones"
            )
        if differences:
            rank_zero_info(f"Resuming {ckpt_path} with changed settings: {'; '.join(differences)}")

    # ------------------------------------------------------------------------------------------------ trainer
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Add the project's logger, callbacks and checkpoint plugin to what the config asks for."""
        cfg = self._subconfig()
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        ckpt_cfg = cfg["checkpoint"]
        run_dir = self._run_checkpoint_dir()

        logger = trainer_cfg.get("logger")
        if logger is None or logger is True:
            kwargs["logger"] = TensorBoardLogger(
                save_dir=cfg["log_dir"], name=self.run_name, version=self._resume_log_version, default_hp_metric=False
            )

        callbacks = list(trainer_cfg.get("callbacks") or [])
        callbacks += [
            RunMetadata(self.run_name, self._run_settings()),
            RandomStateCheckpoint(),
            GracefulInterrupt(),
            FiniteGuard(),
            ValidateLastEpoch(),
        ]
        if self.datamodule is not None:
            callbacks.append(DataHyperparameters())
        if trainer_cfg.get("enable_checkpointing", True) is not False:
            user_ckpt = any(isinstance(c, ModelCheckpoint) for c in callbacks)
            if not user_ckpt:
                callbacks.append(
                    LastCheckpoint(
                        str(run_dir),
                        every_n_train_steps=ckpt_cfg["every_n_train_steps"],
                        every_n_minutes=ckpt_cfg["every_n_minutes"],
                    )
                )
                if ckpt_cfg.get("monitor"):
                    callbacks.append(BestCheckpoint(str(run_dir), monitor=ckpt_cfg["monitor"]))
        kwargs["callbacks"] = callbacks

        plugins = trainer_cfg.get("plugins")
        plugins = [] if plugins is None else (list(plugins) if isinstance(plugins, (list, tuple)) else [plugins])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


# ---------------------------------------------------------------------------------------------------- export etc.
def _export_main(argv: list[str]) -> int:
    import argparse

    from lm_tying.export import export

    parser = argparse.ArgumentParser(
        prog=f"{PROG} export",
        description="Write a checkpoint's embedding (word2vec: input embedding; LM: the tied matrix) with its "
        "vocabulary: OUT.txt = word2vec text format, OUT.bin = word2vec binary format (both load with gensim's "
        "KeyedVectors.load_word2vec_format), a directory = vectors.tsv + metadata.tsv for projector.tensorflow.org.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `lm-tying fit`")
    parser.add_argument("--output", required=True, help="OUT.txt, OUT.bin or a directory")
    parser.add_argument("--limit", type=int, default=None, help="only the LIMIT most frequent words")
    args = parser.parse_args(argv)
    written = export(args.ckpt_path, args.output, limit=args.limit)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _generate_main(argv: list[str]) -> int:
    import argparse

    from lm_tying.export import load_model

    parser = argparse.ArgumentParser(
        prog=f"{PROG} generate", description="Continue a prompt with a trained language model checkpoint."
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint of an LSTMLanguageModel")
    parser.add_argument("--prompt", required=True, help="words separated by spaces")
    parser.add_argument("--num_words", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.num_words < 1:
        raise UsageError(f"--num_words {args.num_words}: it must be at least 1")
    if args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: it must be 0 (greedy) or more")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top_k {args.top_k}: it must be at least 1 (or left out: every word)")
    model = load_model(args.ckpt_path)
    if not callable(getattr(model, "generate", None)):
        raise UsageError(f"{args.ckpt_path!r} holds a {type(model).__name__}, which cannot generate text")
    unknown = [w for w in dict.fromkeys(args.prompt.lower().split()) if w not in model.vocab]
    if unknown:
        print(
            f"{PROG} generate: warning: not in the model's vocabulary, read as UNK: {', '.join(unknown)}",
            file=sys.stderr,
        )
    print(model.generate(args.prompt, args.num_words, args.temperature, args.top_k, args.seed))
    return 0


# Errors that are the user's to fix: reported as one line. Anything else is a bug and keeps its traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    ArgumentError,  # a config mistake, condensed to one line by _config_error
    RunLockedError,
    TrainingDivergedError,
    FloatingPointError,  # a model's own divergence check
    ValueError,  # includes CorpusError, CheckpointMismatchError and CorruptCheckpointError
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    MisconfigurationException,
)


def _is_config_error(error: BaseException) -> bool:
    """A parser error, or a data/model argument refused at instantiation (jsonargparse wraps it in union noise)."""
    return isinstance(error, ArgumentError) or "Does not validate against any of the Union subtypes" in str(error)


def _is_state_dict_mismatch(error: BaseException) -> bool:
    return str(error).startswith("Error(s) in loading state_dict")


def _config_error(message: str, command: str) -> str:
    """jsonargparse's error for a config mistake (up to dozens of lines, the cause nested in union subtypes) as one
    line: the offending key, what is wrong, and where to look for the right one."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "invalid configuration"
    if lines[0].startswith("unrecognized arguments:"):
        options = lines[0].split(":", 1)[1].strip()
        return f"unknown option(s) {options}: check the spelling against `{PROG} {command} --help`"
    keys, reason = [], None
    for line in lines:
        key = re.match(r'(?:- )?Parser key "([^"]+)":?\s*(.*)', line)
        if key:
            keys.append(key.group(1))
            if key.group(2):
                reason = key.group(2)
                break
            continue
        if line.startswith("Subtypes:"):
            if not keys:  # a value refused by the class itself: name its group
                keys.append("data" if "DataModule" in line else "model")
            continue
        if line.startswith(("Does not validate against", "Errors:", "Given value", "- Expected a <class 'NoneType'>")):
            continue
        problem = re.match(r"- Problem with given class_path '([^']+)':", line)
        if problem and problem.group(1).endswith(".WordEmbeddingModule"):  # no class_path given: the base class
            return (
                f"{'.'.join(keys) or 'model'}: no class_path names the model; a config that only changes settings "
                "(an overlay such as configs/lstm_lm_cpu.yaml) goes after the one it changes: "
                "--config configs/lstm_lm.yaml --config configs/lstm_lm_cpu.yaml"
            )
        if problem:
            keys.append("init_args")
            continue
        option = re.match(r"(?:- )?(?:Option|Key) '?\"?([\w.]+)'?\"? is not (?:accepted|expected)", line)
        if option:
            keys.append(option.group(1))
            reason = "no such option"
            break
        unknown = re.match(r"(?:- )?Subcommand '\w+' does not accept option '([\w.]+)'", line)
        if unknown:
            keys.append(unknown.group(1))
            reason = "no such option"
            break
        nested = re.match(r"(?:- )?Group '([\w.]+)' does not accept nested key '([\w.]+)'", line)
        if nested:
            keys += [nested.group(1), nested.group(2)]
            reason = "no such option"
            break
        reason = line.lstrip("- ")
        break
    key = ".".join(k for k in keys if k) or "config"
    expected = re.match(r"Expected a <class '(\w+)'>\. Got value: (.*)", reason or "")
    if expected:
        reason = f"expected {expected.group(1)}, got {expected.group(2)!r}"
    fix = "check its spelling" if reason == "no such option" else "give a valid value"
    return f"{key}: {reason or lines[0]}; {fix} (`{PROG} {command} --help` lists the options)"


def _quiet_known_warnings() -> None:
    """Silence warnings that say nothing to a user of this CLI (Lightning internals, a check that does not apply)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Text8DataModule's loaders give each worker its own share; Lightning cannot see that and warns.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``lm-tying`` (and ``python -m lm_tying.cli``)."""
    _quiet_known_warnings()
    args = sys.argv[1:] if argv is None else list(argv)
    command = args[0] if args else None
    try:
        if command == "export":
            sys.exit(_export_main(args[1:]))
        if command == "generate":
            sys.exit(_generate_main(args[1:]))
        LmTyingCLI(args=None if argv is None else args)
    except SIGTERMException:
        signum = GracefulInterrupt.received or 15
        print(f"{PROG}: stopped by signal {signum}; resume with the same command and --ckpt_path last", file=sys.stderr)
        sys.exit(128 + int(signum))
    except (*_USER_ERRORS, RuntimeError) as e:
        # RuntimeError only for a checkpoint whose weights do not fit the model (e.g. written by another version).
        if os.environ.get(DEBUG_ENV) or (isinstance(e, RuntimeError) and not _is_state_dict_mismatch(e)):
            raise
        where = f" {command}" if command in EXTRA_COMMANDS or command in ("fit", "validate", "test", "predict") else ""
        message = _config_error(str(e), command or "fit") if _is_config_error(e) else str(e)
        if _is_state_dict_mismatch(e):
            message = f"the checkpoint's weights do not fit this model (written by another version of it?): {message}"
        print(f"{PROG}{where}: error: {message}", file=sys.stderr)
        print(f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(2 if isinstance(e, (UsageError, ArgumentError)) else 1)


if __name__ == "__main__":
    main()
