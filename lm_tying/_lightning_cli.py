"""``LmTyingCLI``: the ``LightningCLI`` behind ``lm-tying`` (see :mod:`lm_tying.cli` for what it adds).

Kept apart from :mod:`lm_tying.cli` so that the commands that do not train (``export``, ``generate``, their
``--help``) never import Lightning.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from lm_tying.atomic import RunLock
from lm_tying.callbacks import (
    BestCheckpoint,
    CompactModelSummary,
    DataHyperparameters,
    EmbeddingProjector,
    FiniteGuard,
    FitSummary,
    GracefulInterrupt,
    LastCheckpoint,
    RandomStateCheckpoint,
    RunMetadata,
    ValidateLastEpoch,
)
from lm_tying.checkpoint import RUN_KEY, AtomicCheckpointIO, checkpoint_model_class_path, load_checkpoint_header
from lm_tying.cli import EXTRA_COMMANDS, PROG, UsageError, resolve_ckpt_path, run_name_for, under_root
from lm_tying.data import Text8DataModule
from lm_tying.models.base import WordEmbeddingModule
from lm_tying.vectors import EVAL_FILES, default_eval_file

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


def fetch_eval_files(hparams: Any) -> None:
    """Before training, get the standard evaluation files a model that evaluates its vectors (word2vec's
    ``evaluate``) will look for: gensim's copies, or downloads cached once (:func:`default_eval_file`). Warn once,
    naming the fix, when one cannot be had: that evaluation would log nothing (it never downloads at its end)."""
    if not hparams.get("evaluate"):
        return
    wanted = []
    if hparams.get("eval_analogies") is None:
        wanted.append(EVAL_FILES["analogies"])
    if hparams.get("eval_pairs") is None:
        wanted += [EVAL_FILES["wordsim353"], EVAL_FILES["simlex999"]]
    missing: dict[str, str] = {}
    for name in wanted:
        try:
            default_eval_file(name, download=not missing)  # one failed download is enough to wait for
        except FileNotFoundError as e:
            missing[name] = str(e)
    if missing:
        rank_zero_warn(
            f"this run logs no score on {', '.join(missing)}: {next(iter(missing.values()))} Or give your own files "
            "(--model.init_args.eval_analogies, --model.init_args.eval_pairs), or set --model.init_args.evaluate false"
        )


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
        argv = sys.argv[1:] if args is None else args
        first_word = next((a for a in argv if not a.startswith("-")), None) if isinstance(argv, list) else None
        self._command = first_word if first_word in self.subcommands() else None
        try:
            super().__init__(
                WordEmbeddingModule,
                Text8DataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                seed_everything_default=0,
                # Each model configures its own optimizer from its hyperparameters: no --optimizer/--lr_scheduler
                # flags, which would replace it with one that the checkpoint records but the run never steps.
                auto_configure_optimizers=False,
                # config.yaml goes into the TensorBoard run, which a resumed fit reuses.
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"prog": PROG, "description": "word2vec and a weight-tied LSTM LM on text8."},
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

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """The full parser for the command being run only (each is built from the classes' signatures, ~0.07 s); the
        other commands get a bare one, enough for ``--help`` to list them."""
        if self._command not in (None, subcommand):
            return LightningArgumentParser(description=kwargs.get("description"))
        return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands, then ``export`` and ``generate`` (run by :func:`lm_tying.cli.main` before this
        class is built; added here so that ``lm-tying --help`` lists them with the others)."""
        super()._add_subcommands(parser, **kwargs)
        for command, help in EXTRA_COMMANDS.items():
            description = f"{help} `{PROG} {command} --help` lists its options."
            parser._subcommands_action.add_subcommand(command, LightningArgumentParser(description=description), help=help)

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
        parser.add_argument(
            "--log_dir",
            type=str,
            default="logs",
            help="Root directory of the TensorBoard logs (inside --trainer.default_root_dir when that is set).",
        )
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
            "--checkpoint.dir",
            type=str,
            default="checkpoints",
            help="Root directory of the checkpoints (inside --trainer.default_root_dir when that is set).",
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
        configs = [str(getattr(c, "relative", c)) for c in (cfg.get("config") or []) if c is not None]
        return run_name_for(cfg.get("run_name"), configs, cfg.get("model", {}).get("class_path"))

    def _under_root(self, path: str) -> Path:
        """``path`` (a checkpoint or log root) inside ``--trainer.default_root_dir`` when one is set."""
        return under_root(path, (self._subconfig().get("trainer") or {}).get("default_root_dir"))

    def _run_checkpoint_dir(self) -> Path:
        return self._under_root(self._subconfig()["checkpoint"]["dir"]) / self.run_name

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
        saved_run = (checkpoint.get(RUN_KEY) or {}).get("settings") or {}
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
        cfg["run_name"] = self.run_name  # the config.yaml saved with the logs names its run (export --config finds it)
        if subcommand == "fit":
            self._lock_run()
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path in ("last", "best"):
            last = self._run_checkpoint_dir() / "last.ckpt"
            if ckpt_path == "last" and subcommand == "fit" and not last.is_file():
                rank_zero_info(f"--ckpt_path last: no {last} yet; starting run {self.run_name!r} from scratch.")
                ckpt_path = None
            else:
                ckpt_path = resolve_ckpt_path(ckpt_path, self._run_checkpoint_dir(), self.run_name)
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
        run_info = checkpoint.get(RUN_KEY) or {}
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

    def before_fit(self) -> None:
        fetch_eval_files(self.model.hparams)

    def before_validate(self) -> None:
        fetch_eval_files(self.model.hparams)

    def before_test(self) -> None:
        fetch_eval_files(self.model.hparams)

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
                save_dir=self._under_root(cfg["log_dir"]), name=self.run_name, version=self._resume_log_version, default_hp_metric=False
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
        if trainer_cfg.get("enable_model_summary", True) is not False:
            callbacks.append(CompactModelSummary())
        # Beside any ModelCheckpoint of the user's own: last.ckpt and best.ckpt are what --ckpt_path last|best find.
        if trainer_cfg.get("enable_checkpointing", True) is not False:
            callbacks.append(
                LastCheckpoint(
                    str(run_dir),
                    every_n_train_steps=ckpt_cfg["every_n_train_steps"],
                    every_n_minutes=ckpt_cfg["every_n_minutes"],
                )
            )
            if ckpt_cfg.get("monitor"):
                callbacks.append(BestCheckpoint(str(run_dir), monitor=ckpt_cfg["monitor"]))
        callbacks.append(FitSummary(self.run_name, prog=PROG))
        kwargs["callbacks"] = callbacks

        plugins = trainer_cfg.get("plugins")
        plugins = [] if plugins is None else (list(plugins) if isinstance(plugins, (list, tuple)) else [plugins])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)
