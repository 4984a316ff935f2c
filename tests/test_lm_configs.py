"""Every shipped LM config, as the README stacks them, trains through the CLI (in process) on a tiny corpus."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from lm_tying.cli import LmTyingCLI, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = "lstm_lm.yaml"
OVERLAYS = sorted(p.name for p in CONFIGS.glob("lstm_lm_*.yaml"))

pytestmark = [pytest.mark.filterwarnings("ignore")]  # tiny runs trigger Lightning's size warnings by design


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_overlays_change_few_settings_and_cannot_run_alone(capsys):
    """An overlay names no model class: alone it fails to parse instead of silently training defaults."""
    assert set(OVERLAYS) == {"lstm_lm_cpu.yaml", "lstm_lm_from_word2vec.yaml", "lstm_lm_untied.yaml"}
    base = load(BASE)
    for name in OVERLAYS:
        overlay = load(name)
        assert "class_path" not in overlay["model"] and "seed_everything" not in overlay
        with pytest.raises(SystemExit) as exited:
            main(["fit", f"--config={CONFIGS / name}"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "no class_path names the model" in err and "--config configs/lstm_lm.yaml" in err
        for section, values in overlay.items():
            assert set(values["init_args"]) <= set(base[section]["init_args"]) | {"embedding_init", "freeze_embedding"}
    assert load("lstm_lm_from_word2vec.yaml")["model"]["init_args"]["embedding_dim"] == (
        load("word2vec.yaml")["model"]["init_args"]["embedding_dim"]
    )


@pytest.mark.parametrize(
    "stack, precision",
    [
        ([BASE], "32-true"),
        ([BASE, "lstm_lm_cpu.yaml"], "32-true"),
        ([BASE, "lstm_lm_untied.yaml"], "32-true"),
        ([BASE, "lstm_lm_cpu.yaml", "lstm_lm_from_word2vec.yaml"], "32-true"),
        ([BASE], "bf16-mixed"),  # the configs' headers offer it (a CPU without bf16 emulates it: slow, works)
        ([BASE, "lstm_lm_cpu.yaml"], "bf16-mixed"),
    ],
    ids=lambda value: "+".join(Path(c).stem for c in value) if isinstance(value, list) else value,
)
def test_shipped_config_trains_with_finite_loss(stack, precision, tmp_path, monkeypatch, make_corpus):
    corpus = make_corpus(num_words=4000)
    monkeypatch.chdir(tmp_path)
    words = corpus.read_text().split()
    w2v = "lstm_lm_from_word2vec.yaml" in stack
    sizes = ["--model.init_args.hidden_dim", "12", "--model.init_args.num_sampled", "8"]
    if w2v:  # the overlay's E (128, the word2vec width) stays; vectors of that width for some words
        vectors = tmp_path / "vectors.txt"
        kept = list(dict.fromkeys(words))[:20]
        rows = [f"{w} " + " ".join(f"{0.01 * (i + j) % 0.3:.3f}" for j in range(128)) for i, w in enumerate(kept)]
        vectors.write_text(f"{len(kept)} 128\n" + "\n".join(rows) + "\n")
        sizes += ["--model.init_args.embedding_init", str(vectors)]
    else:
        sizes += ["--model.init_args.embedding_dim", "12"]
    cli = LmTyingCLI(
        args=[
            "fit",
            *[f"--config={CONFIGS / c}" for c in stack],
            *sizes,
            *["--data.path", str(corpus), "--data.vocab_size", "60", "--data.batch_size", "4", "--data.bptt", "8"],
            *["--data.eval_batch_size", "2"],  # the config's loader workers kept
            *["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2"],
            *["--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false"],
            *["--trainer.accelerator", "cpu", "--trainer.precision", precision],
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 3
    assert cli.datamodule.num_workers == load(BASE)["data"]["init_args"]["num_workers"] > 0  # worker processes ran
    assert math.isfinite(metrics["train/loss"].item()) and math.isfinite(metrics["val/loss"].item())
    model = cli.model
    assert model.is_tied == ("lstm_lm_untied.yaml" not in stack)
    assert model.hparams.loss == ("sampled" if "lstm_lm_cpu.yaml" in stack else "full")
    if w2v:
        assert model.hparams.embedding_dim == 128 and model.projection is not None
        assert 0 < model.embedding_init_coverage < 1
    assert cli.run_name == Path(stack[-1]).stem  # the last config names the run (checkpoints/<run>/)
    assert (tmp_path / "checkpoints" / cli.run_name / "last.ckpt").exists()
    assert torch.isfinite(model.embedding.weight).all()
