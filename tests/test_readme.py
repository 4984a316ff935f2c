"""Every shell command in README.md is exercised, or classified and checked, so the docs cannot drift from the code.

Commands are read from the README's ``bash`` blocks and its indented command blocks. Each must match one rule of
:data:`RULES`; a command no rule claims fails :func:`test_every_readme_command_is_classified`. What each rule does:

- ``run``: ``validate``/``test``/``export``/``generate`` run for real, in a folder whose ``configs/word2vec.yaml`` and
  ``configs/lstm_lm.yaml`` are tiny configs trained there first, on a tiny corpus standing in for text8-head;
- ``parse``: ``fit`` commands (training text8 takes hours) are parsed with the repository's configs
  (``--print_config``), so every config, overlay and flag they use must exist;
- ``help``: ``--help``, ``--model.help``, ``--print_config`` run as written;
- the rest (installs, benchmarks, tools) are checked against what they name: extras in pyproject.toml, scripts and
  their flags, importable modules.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cli_support import REPO, env, tiny_config, write_corpus

README = REPO / "README.md"
TEXT8_HEAD = "../shared/data/text8-head.zip"
ENV_ASSIGNMENT = re.compile(r"^[A-Z_]+=\S*$")
OUTPUT = re.compile(r"lm-tying \w+: error: ")


def readme_commands() -> list[str]:
    """Shell commands of the README: lines of ``bash`` blocks and of indented blocks that start with a program, with
    backslash continuations joined, ``&&`` chains split and comments dropped."""
    commands, pending, fence = [], "", None
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence == "bash":
            text = line.strip()
        elif fence is None and line.startswith("    ") and (pending or re.match(r"(lm-tying|python|pip|tensorboard|torchrun|[A-Z_]+=)\S* ", line[4:])):
            text = line.strip()
        else:
            continue
        pending += text
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if OUTPUT.match(pending):  # a quoted message, not a command (no shell syntax to read)
            commands.append(pending)
            pending = ""
            continue
        for part in pending.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                commands.append(shlex.join(words))
        pending = ""
    return commands


def lm_tying_args(command: str) -> list[str] | None:
    """The arguments ``lm-tying`` gets from ``command`` (env assignments and ``torchrun ... -m lm_tying.cli``
    stripped), or None when it does not run ``lm-tying``."""
    words = shlex.split(command)
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if words[:1] == ["lm-tying"]:
        return words[1:]
    if words[:1] == ["torchrun"] and "lm_tying.cli" in words:
        return words[words.index("lm_tying.cli") + 1 :]
    return None


def classify(command: str) -> str:
    if OUTPUT.match(command):
        return "output"  # a quoted error message (tests/test_guard.py checks the CLI says it)
    args = lm_tying_args(command)
    if args is not None:
        if {"--help", "--model.help", "--print_config"} & set(args):
            return "help"
        if args[:1] == ["fit"]:
            return "parse"
        if args[:1] and args[0] in ("validate", "test", "export", "generate"):
            return "run"
        return "unclassified"
    for kind, pattern in (
        ("install", r"pip install "),
        ("suite", r"python -m pytest( |$)"),
        ("module", r"python -m [\w.]+$"),
        ("benchmark", r"python benchmarks/\w+\.py "),
        ("tool", r"tensorboard --logdir "),
    ):
        if re.match(pattern, command):
            return kind
    return "unclassified"


COMMANDS = list(dict.fromkeys(readme_commands()))
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")


def of_kind(kind: str) -> list[str]:
    return [c for c in COMMANDS if classify(c) == kind]


def test_every_readme_command_is_classified():
    assert len(COMMANDS) > 20  # the reader found the blocks
    unclassified = of_kind("unclassified")
    assert not unclassified, f"README commands no rule of tests/test_readme.py checks: {unclassified}"


# ------------------------------------------------------------------------------------------------ lm-tying
def in_process(args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """``lm-tying ARGS`` in this process (no interpreter start): exit status and output."""
    from lm_tying.cli import main

    monkeypatch.chdir(cwd)
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("command", of_kind("help"))
def test_help_commands(command, monkeypatch, capsys):
    code, out = in_process(lm_tying_args(command), REPO, monkeypatch, capsys)
    assert code == 0 and len(out) > 200, out[-2000:]


@pytest.mark.parametrize("command", of_kind("parse"))
def test_fit_commands_parse(command, monkeypatch, capsys):
    """Parsed as written against the repository's configs (``--print_config`` stops before any training)."""
    code, out = in_process([*lm_tying_args(command), "--print_config"], REPO, monkeypatch, capsys)
    assert code == 0 and "class_path: lm_tying.models." in out, out[-2000:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder where the README's ``configs/word2vec.yaml`` and ``configs/lstm_lm.yaml`` are tiny configs whose
    runs (``checkpoints/word2vec``, ``checkpoints/lstm_lm``) are trained, both at once."""
    import yaml

    root = tmp_path_factory.mktemp("readme")
    corpus = write_corpus(root)
    procs = []
    for name, model in (("word2vec", "word2vec"), ("lstm_lm", "lm")):
        config = root / "configs" / f"{name}.yaml"
        config.parent.mkdir(exist_ok=True)
        config.write_text(yaml.safe_dump(tiny_config(model, corpus), sort_keys=False))
        procs.append(subprocess.Popen([sys.executable, "-m", "lm_tying.cli", "fit", "--config", str(config)], cwd=root,
                                      env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    return root, corpus


@pytest.mark.parametrize("command", of_kind("run"))
def test_run_commands(command, workspace, monkeypatch, capsys):
    root, corpus = workspace
    args = [str(corpus) if a == TEXT8_HEAD else a for a in lm_tying_args(command)]
    code, out = in_process(args, root, monkeypatch, capsys)
    assert code == 0, out[-3000:]


# ------------------------------------------------------------------------------------------------ the rest
@pytest.mark.parametrize("command", of_kind("install"))
def test_install_commands_name_what_exists(command):
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    words = shlex.split(command)[2:]
    for word in words:
        extras = re.fullmatch(r"\.\[([\w,]+)\]", word)
        if extras:
            for extra in extras.group(1).split(","):
                assert extra in project["optional-dependencies"], f"{command}: no extra {extra!r}"
        elif word.startswith("torch=="):
            assert "torch" in " ".join(project["dependencies"])
        elif word.startswith("--index-url"):
            assert words[words.index(word) + 1].startswith("https://download.pytorch.org/whl/")
    assert words, command


@pytest.mark.parametrize("command", of_kind("benchmark"))
def test_benchmark_commands_name_their_script_and_its_flags(command):
    words = shlex.split(command)
    script = REPO / words[1]
    source = script.read_text(encoding="utf-8")
    own = words[2 : words.index("--cli_args")] if "--cli_args" in words else words[2:]
    for flag in (w for w in own if w.startswith("--")):
        assert f'"{flag}"' in source, f"{command}: {words[1]} defines no {flag}"
    if "--cli_args" in words:  # the rest goes to lm-tying fit: it must parse there
        rest = words[words.index("--cli_args") + 1 :]
        assert all(w.startswith("--trainer.") or w.startswith("--data.") or not w.startswith("--") for w in rest)


@pytest.mark.parametrize("command", of_kind("module") + of_kind("tool") + of_kind("suite"))
def test_modules_and_tools_exist(command):
    words = shlex.split(command)
    module = words[2] if words[:2] == ["python", "-m"] else words[0]
    assert importlib.util.find_spec(module) is not None, f"{command}: no module {module}"
