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
  ``--checkpoint.every_n_train_steps`` steps, at the end and on SIGTERM/Ctrl-C, ``best.ckpt`` by
  ``--checkpoint.monitor``, the embedding projector (``--projector.*``), random state in checkpoints;
- atomic checkpoint writes (``AtomicCheckpointIO``), so a killed run always leaves a loadable ``last.ckpt``;
- ``--ckpt_path last|best`` resolve to ``checkpoints/<run>/{last,best}.ckpt``; a resumed fit logs into the
  TensorBoard run of the checkpoint;
- the vocabulary size linked from the data (``data.num_words`` -> ``model.init_args.vocab_size``);
- readable one-line errors (and a non-zero exit status) for user errors, instead of tracebacks.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lm_tying.callbacks import (
    BestCheckpoint,
    DataHyperparameters,
    EmbeddingProjector,
    GracefulInterrupt,
    LastCheckpoint,
    RandomStateCheckpoint,
    RunMetadata,
)
from lm_tying.checkpoint_io import AtomicCheckpointIO
from lm_tying.data import Text8DataModule
from lm_tying.export import checkpoint_model_class_path, load_checkpoint_header
from lm_tying.models.base import WordEmbeddingModule

PROG = "lm-tying"
EXTRA_COMMANDS = ("export", "generate")
DEBUG_ENV = "LM_TYING_DEBUG"


class UsageError(Exception):
    """A mistake in what the user asked for; reported as one line, exit status 2."""


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


class LmTyingCLI(LightningCLI):
    """``LightningCLI`` with the project's defaults (see the module docstring)."""

    def __init__(self, args: Any = None, run: bool = True) -> None:
        self.run_name: str = "run"
        self._resume_log_version: Optional[int | str] = None
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

    # ------------------------------------------------------------------------------------------------ parser
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
        run_info = checkpoint.get("lm_tying_run") or {}
        if subcommand == "fit" and run_info.get("run_name") == self.run_name:
            self._resume_log_version = run_info.get("log_version")
        del checkpoint
        super()._parse_ckpt_path()

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
        callbacks += [RunMetadata(self.run_name), RandomStateCheckpoint(), GracefulInterrupt()]
        if self.datamodule is not None:
            callbacks.append(DataHyperparameters())
        if trainer_cfg.get("enable_checkpointing", True) is not False:
            user_ckpt = any(isinstance(c, ModelCheckpoint) for c in callbacks)
            if not user_ckpt:
                callbacks.append(LastCheckpoint(str(run_dir), every_n_train_steps=ckpt_cfg["every_n_train_steps"]))
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
    model = load_model(args.ckpt_path)
    if not callable(getattr(model, "generate", None)):
        raise UsageError(f"{args.ckpt_path!r} holds a {type(model).__name__}, which cannot generate text")
    print(model.generate(args.prompt, args.num_words, args.temperature, args.top_k, args.seed))
    return 0


# Errors that are the user's to fix: reported as one line. Anything else is a bug and keeps its traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    ValueError,  # includes CorpusError and CheckpointMismatchError
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    MisconfigurationException,
)


def _is_state_dict_mismatch(error: BaseException) -> bool:
    return str(error).startswith("Error(s) in loading state_dict")


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
        message = str(e)
        if _is_state_dict_mismatch(e):
            message = f"the checkpoint's weights do not fit this model (written by another version of it?): {message}"
        print(f"{PROG}{where}: error: {message}", file=sys.stderr)
        print(f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)


if __name__ == "__main__":
    main()
