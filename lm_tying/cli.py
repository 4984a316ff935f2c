"""``lm-tying``: the command line of the project (a ``LightningCLI``).

::

    lm-tying fit --config configs/word2vec.yaml                       # train; run name "word2vec"
    lm-tying fit --config configs/word2vec.yaml --ckpt_path last      # continue checkpoints/word2vec/last.ckpt
    lm-tying validate|test --config configs/lstm_lm.yaml --ckpt_path best
    lm-tying export --config configs/word2vec.yaml --ckpt_path best --output vectors.bin
    lm-tying generate --config configs/lstm_lm.yaml --ckpt_path last --prompt "the king"

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
- ``export`` and ``generate``, which find a run's checkpoints from its config like the other commands;
- a summary at the end of every fit (checkpoints, TensorBoard, projector, export command), a compact model summary,
  and none of Lightning's advertisements;
- readable one-line errors (and a non-zero exit status) for user errors, instead of tracebacks.

This module stays light (no torch, no Lightning at import), so ``export --help`` and ``generate --help`` answer at
once; the ``LightningCLI`` subclass is in :mod:`lm_tying._lightning_cli`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

PROG = "lm-tying"
#: The commands that do not train, run here without Lightning (``lm-tying --help`` lists them with the others).
EXTRA_COMMANDS = {
    "export": "Write a checkpoint's word vectors (word2vec text/binary, projector TSV).",
    "generate": "Continue a prompt with a trained language model.",
}
DEBUG_ENV = "LM_TYING_DEBUG"
#: Lightning's log lines that tell a user of this CLI nothing they can act on.
LIGHTNING_NOISE = (
    "litlogger",  # "Tip: ... try installing litlogger" (an advertisement, on every run)
    "Trainer already configured with model summary callbacks",  # the CLI installs its compact summary
)


class UsageError(Exception):
    """A mistake in what the user asked for; reported as one line, exit status 2."""


def __getattr__(name: str) -> Any:
    """``lm_tying.cli.LmTyingCLI``, imported when first asked for (it imports Lightning; ``--help`` of the commands
    that do not train must not)."""
    if name == "LmTyingCLI":
        from lm_tying._lightning_cli import LmTyingCLI

        return LmTyingCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------- run paths
def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def run_name_for(run_name: Optional[str], config_paths: list[str], model_class_path: Optional[str]) -> str:
    """The run's name: ``run_name`` if given, else the last config file's stem, else the model class in snake_case."""
    if run_name:
        name = str(run_name)
    elif config_paths:
        name = Path(config_paths[-1]).stem
    else:
        name = _snake((model_class_path or "model").rsplit(".", 1)[-1])
    if not name or "/" in name or name in (".", ".."):
        raise UsageError(f"run_name {name!r} cannot name a directory")
    return name


def under_root(path: str | os.PathLike, default_root_dir: Optional[str | os.PathLike]) -> Path:
    """``path`` inside the trainer's ``default_root_dir`` when one is set (an absolute ``path`` stays where it is)."""
    return Path(default_root_dir or ".") / path


def resolve_ckpt_path(ckpt_path: str, run_dir: Path, run_name: str) -> str:
    """``last``/``best`` as the run's ``last.ckpt``/``best.ckpt`` (which must exist); any other value unchanged."""
    if ckpt_path not in ("last", "best"):
        return ckpt_path
    candidate = run_dir / f"{ckpt_path}.ckpt"
    if not candidate.is_file():
        raise UsageError(f"--ckpt_path {ckpt_path}: {candidate} does not exist (run {run_name!r} has none yet)")
    return str(candidate)


# ---------------------------------------------------------------------------------------------------- export etc.
def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that find a checkpoint, shared by ``export`` and ``generate``."""
    parser.add_argument(
        "--config", action="append", default=[], help="the run's config file(s), as given to `fit` (finds the run's "
        "checkpoint directory, its checkpoint.dir and trainer.default_root_dir); may be repeated for overlays",
    )
    parser.add_argument("--run_name", default=None, help="the run's name (default: the last config file's name)")
    parser.add_argument(
        "--ckpt_path", default="last", help="last or best (the run's last.ckpt / best.ckpt), or a checkpoint file "
        "written by `lm-tying fit` (default: last)",
    )


def _extra_parser(command: str) -> argparse.ArgumentParser:
    if command == "export":
        parser = argparse.ArgumentParser(
            prog=f"{PROG} export",
            description=f"{EXTRA_COMMANDS['export']} The embedding is word2vec's input embedding or the LM's tied "
            "matrix, with the checkpoint's vocabulary: OUT.txt = word2vec text format, OUT.bin = word2vec binary format (both load with gensim's "
            "KeyedVectors.load_word2vec_format), a directory = vectors.tsv + metadata.tsv for "
            "projector.tensorflow.org.",
        )
        _run_arguments(parser)
        parser.add_argument("--output", required=True, help="OUT.txt, OUT.bin or a directory")
        parser.add_argument("--limit", type=int, default=None, help="only the LIMIT most frequent words")
        return parser
    parser = argparse.ArgumentParser(
        prog=f"{PROG} generate", description=EXTRA_COMMANDS["generate"]
    )
    _run_arguments(parser)
    parser.add_argument("--prompt", required=True, help="words separated by spaces")
    parser.add_argument("--num_words", type=int, default=50, help="how many words to add")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the K most likely words only")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: random)")
    return parser


def _read_configs(paths: list[str]) -> dict[str, Any]:
    """The run's config files merged in order (later files override earlier ones, key by key, as in `fit`)."""
    import yaml

    merged: dict[str, Any] = {}
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"--config {path}: the file does not exist")
        try:
            config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"--config {path}: not a YAML file ({str(e).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise UsageError(f"--config {path}: not a config (a YAML mapping of settings)")
        for key, value in config.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


def _checkpoint_of(args: argparse.Namespace) -> str:
    """The checkpoint ``--config``/``--run_name``/``--ckpt_path`` name, as `fit` would have written it."""
    if args.ckpt_path not in ("last", "best"):
        return args.ckpt_path
    if not args.config and not args.run_name:
        raise UsageError(
            f"--ckpt_path {args.ckpt_path} needs the run: give --config (the run's config file) or --run_name, "
            "or pass the checkpoint file itself (--ckpt_path checkpoints/<run>/last.ckpt)"
        )
    config = _read_configs(args.config)
    model_class = (config.get("model") or {}).get("class_path") if isinstance(config.get("model"), dict) else None
    run_name = run_name_for(args.run_name or config.get("run_name"), args.config, model_class)
    checkpoint_dir = (config.get("checkpoint") or {}).get("dir") or "checkpoints"
    run_dir = under_root(checkpoint_dir, (config.get("trainer") or {}).get("default_root_dir")) / run_name
    return resolve_ckpt_path(args.ckpt_path, run_dir, run_name)


def _export_main(argv: list[str]) -> int:
    args = _extra_parser("export").parse_args(argv)
    with _collector_paused():
        from lm_tying.export import export

    written = export(_checkpoint_of(args), args.output, limit=args.limit)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _generate_main(argv: list[str]) -> int:
    args = _extra_parser("generate").parse_args(argv)
    if args.num_words < 1:
        raise UsageError(f"--num_words {args.num_words}: it must be at least 1")
    if args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: it must be 0 (greedy) or more")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top_k {args.top_k}: it must be at least 1 (or left out: every word)")
    ckpt_path = _checkpoint_of(args)
    with _collector_paused():
        from lm_tying.checkpoint import load_model

    model = load_model(ckpt_path)
    if not callable(getattr(model, "generate", None)):
        raise UsageError(f"{ckpt_path!r} holds a {type(model).__name__}, which cannot generate text")
    unknown = [w for w in dict.fromkeys(args.prompt.lower().split()) if w not in model.vocab]
    if unknown:
        print(
            f"{PROG} generate: warning: not in the model's vocabulary, read as UNK: {', '.join(unknown)}",
            file=sys.stderr,
        )
    print(model.generate(args.prompt, args.num_words, args.temperature, args.top_k, args.seed))
    return 0


# ---------------------------------------------------------------------------------------------------- errors
def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: reported as one line. Anything else is a bug and keeps its traceback."""
    from jsonargparse import ArgumentError
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lm_tying.atomic import RunLockedError
    from lm_tying.callbacks import TrainingDivergedError

    return (
        UsageError,
        ArgumentError,  # a config mistake, condensed to one line by _config_error
        RunLockedError,
        TrainingDivergedError,
        ValueError,  # includes CorpusError, CheckpointError, CheckpointMismatchError, ExportError
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        MisconfigurationException,
    )


def _is_config_error(error: BaseException) -> bool:
    """A parser error, or a data/model argument refused at instantiation (jsonargparse wraps it in union noise)."""
    from jsonargparse import ArgumentError

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


class _DropLightningNoise(logging.Filter):
    """Drops the :data:`LIGHTNING_NOISE` lines from Lightning's info log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in LIGHTNING_NOISE)


def _quiet_known_warnings() -> None:
    """Silence what says nothing to a user of this CLI (Lightning internals and adverts, a check that does not apply)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Text8DataModule's loaders give each worker its own share; Lightning cannot see that and warns.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropLightningNoise())


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
        if _names_word2vec(args):
            from lm_tying import kernel_build

            kernel_build.build_in_background()  # a first run compiles while torch and Lightning are imported
        with _collector_paused():
            from lm_tying._lightning_cli import LmTyingCLI

        LmTyingCLI(args=None if argv is None else args)
    except SystemExit as e:
        if type(e) is SystemExit:  # --help, argparse's usage errors, our own exits: already said what to say
            raise
        _exit_for(e, command)  # Lightning's SIGTERMException
    except Exception as e:
        _exit_for(e, command)
    finally:
        _end_process_group()


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while torch and Lightning are imported, then their objects frozen out of its
    passes: it would otherwise walk the long-lived objects the imports make (about a million) again and again as
    they are made, and every later full collection would walk them again (README, word2vec, "Where the time
    goes", has what it saves)."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _names_word2vec(args: list[str]) -> bool:
    """Whether a command's arguments or its ``--config`` files name the word2vec model (a quick look, before the
    parsers exist: a miss only means the compiled code is built later, when the data or the model asks for it)."""
    if args[:1] not in (["fit"], ["validate"], ["test"], ["predict"]) or "--help" in args or "-h" in args:
        return False
    texts = list(args)
    for flag, value in zip(args, args[1:]):
        if flag == "--config" and Path(value).is_file():
            texts.append(Path(value).read_text(errors="replace"))
    for arg in args:
        if arg.startswith("--config=") and Path(arg.split("=", 1)[1]).is_file():
            texts.append(Path(arg.split("=", 1)[1]).read_text(errors="replace"))
    return any("Word2Vec" in text or "lm_tying.models.word2vec" in text for text in texts)


def _end_process_group() -> None:
    """End a DDP run's process group before the interpreter exits.

    Lightning ends NCCL's at exit but not gloo's (CPU DDP), whose threads then now and then abort the finished
    process as it exits ("terminate called without an active exception", exit status -6).
    """
    dist = sys.modules.get("torch.distributed")  # never imported for export, generate or --help: nothing to end
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _exit_for(error: BaseException, command: Optional[str]) -> None:
    """Exit as the error asks: 128 + the signal for a clean stop, one line for a user error; re-raise a bug."""
    from jsonargparse import ArgumentError
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lm_tying.callbacks import GracefulInterrupt

    if isinstance(error, SIGTERMException):
        signum = GracefulInterrupt.received or 15
        print(f"{PROG}: stopped by signal {signum}; resume with the same command and --ckpt_path last", file=sys.stderr)
        sys.exit(128 + int(signum))
    # RuntimeError only for a checkpoint whose weights do not fit the model (e.g. written by another version).
    if not isinstance(error, _user_errors()) and not _is_state_dict_mismatch(error):
        raise error
    if os.environ.get(DEBUG_ENV):
        raise error
    where = f" {command}" if command in EXTRA_COMMANDS or command in ("fit", "validate", "test", "predict") else ""
    message = _config_error(str(error), command or "fit") if _is_config_error(error) else str(error)
    if _is_state_dict_mismatch(error):
        message = f"the checkpoint's weights do not fit this model (written by another version of it?): {message}"
    print(f"{PROG}{where}: error: {message}", file=sys.stderr)
    print(f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
    sys.exit(2 if isinstance(error, (UsageError, ArgumentError)) else 1)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: lm_tying._lightning_cli raises lm_tying.cli's errors.
    from lm_tying.cli import main as imported_main

    imported_main()
