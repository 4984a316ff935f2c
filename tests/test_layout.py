"""The package's layout rules, checked on the source: imports run one way (the checkpoint and export modules never
import the models), and the callbacks package holds one callback a file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lm_tying"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (``from x import y`` gives ``x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("module", ["checkpoint.py", "export.py", "atomic.py", "_lightning.py"])
def test_low_level_modules_do_not_import_upward(module):
    upward = sorted(
        m for m in imported_modules(PACKAGE / module) if m.startswith(("lm_tying.models", "lm_tying.callbacks", "lm_tying.cli"))
    )
    assert not upward, f"lm_tying/{module} imports {upward}: the models and callbacks import it, not the other way"


def test_models_take_checkpoint_keys_from_the_checkpoint_module():
    """The keys live in one place: no module but checkpoint.py spells them as string literals."""
    from lm_tying.checkpoint import MODEL_KEY, RUN_KEY, VOCAB_KEY

    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "checkpoint.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in (MODEL_KEY, RUN_KEY, VOCAB_KEY):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_one_callback_a_file():
    from lightning.pytorch.callbacks import Callback

    import lm_tying.callbacks as package

    files: dict[str, list[str]] = {}
    for name in package.__all__:
        obj = getattr(package, name)
        if isinstance(obj, type) and issubclass(obj, Callback):
            files.setdefault(obj.__module__, []).append(name)
    crowded = {module: names for module, names in files.items() if len(names) > 1}
    # last.ckpt and best.ckpt are the run's two checkpoints: one file by design.
    assert crowded == {"lm_tying.callbacks.checkpoints": ["BestCheckpoint", "LastCheckpoint"]}, crowded
    on_disk = {p.stem for p in (PACKAGE / "callbacks").glob("*.py")} - {"__init__"}
    assert on_disk == {module.rsplit(".", 1)[-1] for module in files}, "a file of callbacks/ exports no callback"
