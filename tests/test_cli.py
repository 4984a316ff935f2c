"""The CLI as a user runs it (subprocesses): help, fit for both models with the project's defaults (run name,
checkpoints, TensorBoard run, config record), validate/test/generate from checkpoints, and bad inputs that end
with a one-line message and a non-zero status instead of a traceback."""

from __future__ import annotations

import gc
import importlib
import json
import shutil
import subprocess
import sys
import warnings

import pytest
import yaml

from cli_support import MODELS, env, load_ckpt, run_cli, write_config, write_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``lm-tying fit --config <model>.yaml`` once per model in one working directory."""
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root)
    procs = {
        m: run_cli(["fit", "--config", str(write_config(root, m, corpus, enable_model_summary=True))], cwd=root)
        for m in MODELS
    }
    return root, corpus, procs


def lm_tying(args, cwd, monkeypatch, capsys):
    """``lm-tying ARGS`` in this process (for commands that do not train): exit status, stdout, stderr."""
    from lm_tying.cli import main

    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_help_lists_commands_and_model_flags(tmp_path):
    out = run_cli(["--help"], cwd=tmp_path).stdout
    for command in ("fit", "validate", "test", "predict", "export", "generate"):
        assert command in out
    out = run_cli(["fit", "--model.help", "lm_tying.models.word2vec.Word2Vec"], cwd=tmp_path).stdout
    assert "--model.num_sampled" in out and "negatives drawn once per batch" in out  # documented flags


@pytest.mark.parametrize("model", MODELS)
def test_fit_writes_run_checkpoints_and_logs(trained, model):
    root, _, _ = trained
    run = root / "checkpoints" / model  # run name = the config file's stem
    last, best = load_ckpt(run / "last.ckpt"), load_ckpt(run / "best.ckpt")
    assert last["global_step"] == 12
    assert best["global_step"] in (5, 10)  # validations at steps 5 and 10
    assert last["lm_tying_run"]["run_name"] == model and last["lm_tying_run"]["log_version"] == 0
    assert last["lm_tying_run"]["settings"]["trainer.max_steps"] == 12  # what a resume is compared with
    assert len(last["vocabulary"]["words"]) == last["hyper_parameters"]["vocab_size"] == 100  # linked from data
    assert "RandomStateCheckpoint" in last["callbacks"]
    logs = root / "logs" / model / "version_0"
    assert any(p.name.startswith("events.out.tfevents") for p in logs.iterdir())
    config = yaml.safe_load((logs / "config.yaml").read_text())
    assert config["data"]["init_args"]["vocab_size"] == 100  # the full config, for reproducing the run
    assert config["run_name"] == model  # so that `export --config <it>` finds the run
    hparams = yaml.safe_load((logs / "hparams.yaml").read_text())
    assert hparams["vocab_size"] == 100
    assert (logs / "projector_config.pbtxt").exists()


def test_run_name_override_and_print_config(trained, tmp_path):
    root, corpus, _ = trained
    cfg = write_config(tmp_path, "word2vec", corpus)
    printed = run_cli(["fit", "--config", str(cfg), "--run_name", "mine", "--print_config"], cwd=tmp_path).stdout
    parsed = yaml.safe_load(printed)
    assert parsed["run_name"] == "mine"
    assert parsed["checkpoint"]["every_n_train_steps"] == 4 and parsed["projector"]["num_visualize"] == 50
    assert parsed["model"]["class_path"] == "lm_tying.models.word2vec.Word2Vec"
    run_cli(["fit", "--config", str(cfg), "--run_name", "mine", "--trainer.max_steps", "2"], cwd=tmp_path)
    assert load_ckpt(tmp_path / "checkpoints/mine/last.ckpt")["global_step"] == 2
    assert (tmp_path / "logs/mine/version_0").is_dir()


@pytest.mark.parametrize(
    "command, model, metric",
    [("validate", "word2vec", "val/loss"), ("test", "word2vec", "test/loss"), ("test", "lm", "test/loss")],
)
def test_validate_and_test_from_best(trained, command, model, metric):
    root, _, _ = trained
    out = run_cli([command, "--config", f"{model}.yaml", "--ckpt_path", "best"], cwd=root)
    assert metric in out.stdout


@pytest.mark.parametrize("model", MODELS)
def test_fit_ends_with_a_summary_and_without_noise(trained, model, monkeypatch, capsys):
    root, _, procs = trained
    out = procs[model].stdout + procs[model].stderr
    assert f"Run '{model}' finished at step 12." in out
    assert f"best checkpoint: checkpoints/{model}/best.ckpt" in out and f"last checkpoint: checkpoints/{model}/last.ckpt" in out
    assert f"tensorboard --logdir logs/{model}" in out and f"logs/{model}/version_0/projector_config.pbtxt" in out
    export = next(line for line in out.splitlines() if "export vectors:" in line).split(":", 1)[1].split()
    assert export[:2] == ["lm-tying", "export"]
    assert lm_tying([*export[1:-1], f"summary_{model}.txt"], root, monkeypatch, capsys)[0] == 0  # it works as printed
    assert (root / f"summary_{model}.txt").read_text().split()[0] == "100"  # word2vec text header: 100 words
    assert "Params" in out and "parameters (0 frozen)" in out  # the compact model summary
    for noise in ("litlogger", "FLOPs", "other params", "n/a"):
        assert noise not in out, noise


@pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
def test_automatic_optimizer_flags_are_refused(trained, capsys, monkeypatch):
    from lm_tying.cli import main

    root, _, _ = trained
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "lm.yaml", "--run_name", "adam", "--optimizer", "Adam"])
    assert exit_info.value.code == 2 and "unknown option(s) --optimizer Adam" in capsys.readouterr().err
    assert not (root / "checkpoints/adam").exists()


@pytest.mark.parametrize("command", ["export", "generate"])
def test_extra_commands_help_without_importing_lightning(command, tmp_path):
    """``--help`` of the commands that do not train answers without importing torch or Lightning (seconds)."""
    script = (
        "import sys\nfrom lm_tying.cli import main\ntry:\n    main(['%s', '--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0\nheavy = [m for m in ('torch', 'lightning') if m in sys.modules]\nprint('HEAVY', heavy)"
    ) % command
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert "--ckpt_path" in proc.stdout and "--config" in proc.stdout and "--run_name" in proc.stdout
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def test_export_and_generate_find_the_run_from_its_config(trained, monkeypatch, capsys):
    root, _, _ = trained
    export = ["export", "--config", "word2vec.yaml", "--ckpt_path", "best", "--output", "best.txt"]
    assert lm_tying(export, root, monkeypatch, capsys)[0] == 0
    export = ["export", "--run_name", "word2vec", "--output", "last.txt"]  # --ckpt_path last by default
    assert lm_tying(export, root, monkeypatch, capsys)[0] == 0
    assert (root / "best.txt").read_text().split()[:2] == (root / "last.txt").read_text().split()[:2] == ["100", "16"]
    generate = ["generate", "--config", "lm.yaml", "--ckpt_path", "last", "--prompt", "the", "--num_words", "3"]
    code, out, _ = lm_tying(generate, root, monkeypatch, capsys)
    assert code == 0 and len(out.split()) == 4
    missing = ["export", "--config", "lm.yaml", "--run_name", "none", "--output", "x.txt"]
    code, _, err = lm_tying(missing, root, monkeypatch, capsys)
    assert code == 2 and "checkpoints/none/last.ckpt does not exist" in err
    code, _, err = lm_tying(["export", "--output", "x.txt"], root, monkeypatch, capsys)
    assert code == 2 and "needs the run: give --config" in err


def test_default_root_dir_and_a_users_own_model_checkpoint(trained, tmp_path, monkeypatch, capsys):
    """Checkpoints and logs go under --trainer.default_root_dir; a ModelCheckpoint of the user's own is kept and so
    are last.ckpt/best.ckpt, which --ckpt_path last finds (export from the config, a resumed fit)."""
    _, corpus, _ = trained
    cfg = write_config(tmp_path, "lm", corpus, name="rooted", default_root_dir="out", max_steps=6)
    mine = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": "mine", "every_n_train_steps": 3, "save_top_k": -1}}]  # fmt: skip
    run_cli(["fit", "--config", str(cfg), "--trainer.callbacks", json.dumps(mine)], cwd=tmp_path)
    assert load_ckpt(tmp_path / "out/checkpoints/rooted/last.ckpt")["global_step"] == 6
    assert (tmp_path / "out/checkpoints/rooted/best.ckpt").is_file()
    assert (tmp_path / "out/logs/rooted/version_0/config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt"]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "logs").exists()
    assert lm_tying(["export", "--config", str(cfg), "--output", "v.txt"], tmp_path, monkeypatch, capsys)[0] == 0
    resumed = run_cli(["fit", "--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "8",
                       "--accept_changes", "true"], cwd=tmp_path)  # fmt: skip
    assert load_ckpt(tmp_path / "out/checkpoints/rooted/last.ckpt")["global_step"] == 8, resumed.stderr[-2000:]


WITHOUT_GENSIM = """
import importlib.util, json, os, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "gensim" else find_spec(name, *a)
from lm_tying import vectors
vectors.EVAL_SOURCES.update({k: tuple(v) for k, v in json.loads(os.environ["EVAL_SOURCES"]).items()})
from lm_tying.cli import main
sys.argv = ["lm-tying", *sys.argv[1:]]
main()
"""


def test_fit_without_gensim_downloads_the_evaluation_files_once_and_scores_on_them(tmp_path):
    """As a user installed by the README (no gensim): the first fit fetches the three files (here from a loopback
    server standing in for GitHub, with the real files' hashes), evaluates on them, and the next fit reuses them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import LocalServer
    from lm_tying.data.corpus import file_sha256
    from lm_tying.vectors import EVAL_SOURCES, default_eval_file

    files = {name: default_eval_file(name) for name in EVAL_SOURCES}  # gensim's copies (the [dev] extra has it)
    pairs = "love sex tiger cat book paper computer keyboard plane car train car television radio media radio "
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(pairs * 200)
    config = write_config(tmp_path, "word2vec", corpus, max_steps=6, val_check_interval=6)
    with LocalServer({f"/{name}": open(path, "rb").read() for name, path in files.items()}) as server:
        sources = {name: (f"{server.url}/{name}", file_sha256(path)) for name, path in files.items()}
        environment = env() | {"EVAL_SOURCES": json.dumps(sources), "LM_TYING_EVAL_CACHE": str(tmp_path / "eval")}
        for run in ("a", "b"):
            args = ["fit", "--config", str(config), "--data.init_args.vocab_size", "15", "--model.init_args.evaluate", "true",
                    "--run_name", run]
            done = subprocess.run([sys.executable, "-c", WITHOUT_GENSIM, *args], cwd=tmp_path, env=environment,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
            assert sorted(server.requests) == sorted(f"/{name}" for name in files), "downloaded once, then reused"
            events = EventAccumulator(str(next((tmp_path / "logs" / run).glob("version_*"))))
            assert "val/wordsim353_spearman" in events.Reload().Tags()["scalars"], f"run {run} scored nothing"
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(files)


def test_missing_evaluation_files_are_a_warning_naming_the_fix(monkeypatch):
    import lm_tying._lightning_cli as lightning_cli

    tried = []

    def unreachable(name, download=True):
        tried.append(download)
        raise FileNotFoundError(f"evaluation file {name!r} could not be downloaded from https://...: no network.")

    monkeypatch.setattr(lightning_cli, "default_eval_file", unreachable)
    expected = (r"logs no score on questions-words.txt, wordsim353.tsv, simlex999.txt: evaluation file "
                r"'questions-words.txt' could not be downloaded .*no network. Or give your own files")
    with pytest.warns(UserWarning, match=expected):
        lightning_cli.fetch_eval_files({"evaluate": True, "eval_analogies": None, "eval_pairs": None})
    assert tried == [True, False, False], "after one failed download the others are not waited for"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lightning_cli.fetch_eval_files({"evaluate": True, "eval_analogies": "q.txt", "eval_pairs": []})
        lightning_cli.fetch_eval_files({"evaluate": False})


def test_generate_from_lm_checkpoint(trained):
    root, _, _ = trained
    args = ["generate", "--ckpt_path", "checkpoints/lm/last.ckpt", "--prompt", "the", "--num_words", "7", "--seed", "1"]
    first = run_cli(args, cwd=root).stdout.split()
    assert len(first) == 8 and first[0] == "the"  # the prompt + 7 words
    vocab = set(load_ckpt(root / "checkpoints/lm/last.ckpt")["vocabulary"]["words"])
    assert set(first[1:]) <= vocab
    bad = run_cli(["generate", "--ckpt_path", "checkpoints/word2vec/last.ckpt", "--prompt", "a"], cwd=root, check=False)
    assert bad.returncode != 0 and "cannot generate" in bad.stderr and "Traceback" not in bad.stderr


def _bad_alphabet(root):
    path = root / "bad.txt"
    path.write_text("Hello World, 123 words")
    return ["--data.path", str(path)]


BAD_INPUTS = [
    # (case, arguments after "fit", expected message, run in a subprocess (else in-process, to keep the suite fast))
    ("missing config", ["--config", "nope.yaml"], "File does not exist", True),
    ("missing checkpoint", ["--config", "lm.yaml", "--ckpt_path", "nope.ckpt"], "does not exist", False),
    (
        "not a checkpoint",
        ["--config", "lm.yaml", "--ckpt_path", "corpus.txt"],
        "not a readable PyTorch checkpoint",
        False,
    ),
    (
        "checkpoint of the other model",
        ["--config", "word2vec.yaml", "--ckpt_path", "checkpoints/lm/last.ckpt"],
        "is a LSTMLanguageModel checkpoint, but the config selects Word2Vec",
        True,
    ),
    (
        "vocabulary of other data",
        ["--config", "lm.yaml", "--data.init_args.vocab_size", "50", "--ckpt_path", "checkpoints/lm/last.ckpt"],
        "vocabulary does not match the data",
        False,
    ),
    # (a new run name: run "lm" has a last.ckpt, which a fit without --ckpt_path refuses first)
    ("missing corpus", ["--config", "lm.yaml", "--run_name", "new", "--data.path", "missing.txt"], "missing.txt does not exist", False),
    ("bad alphabet", ["--config", "lm.yaml", "--run_name", "new", "--data.path", "bad.txt"], "is not in text8 format", True),
    ("no best.ckpt", ["--config", "lm.yaml", "--run_name", "other", "--ckpt_path", "best"], "does not exist", False),
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case, extra, message, in_subprocess", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_exit_nonzero_with_a_readable_message(
    trained, case, extra, message, in_subprocess, capsys, monkeypatch
):
    root, _, _ = trained
    (root / "bad.txt").write_text("Hello World, 123 words")
    if in_subprocess:
        proc = run_cli(["fit", *extra], cwd=root, check=False)
        code, stderr = proc.returncode, proc.stderr
    else:
        from lm_tying.cli import main

        monkeypatch.chdir(root)
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *extra])
        code, stderr = exit_info.value.code, capsys.readouterr().err
    assert code not in (0, None), case
    assert message in stderr, stderr[-2000:]
    assert "Traceback" not in stderr


@pytest.mark.skipif(shutil.which("lm-tying") is None, reason="package not installed (pip install -e .)")
def test_console_script(tmp_path):
    proc = subprocess.run(["lm-tying", "export", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--ckpt_path" in proc.stdout


def test_the_cli_ends_a_ddp_process_group_before_exiting(tmp_path):
    """Lightning leaves a gloo process group to the interpreter's exit, where its threads can abort a finished
    run (exit status -6); every ``lm-tying`` command ends the group it ran in."""
    import torch.distributed as dist

    from lm_tying.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert not dist.is_initialized()


def test_the_cycle_collector_is_off_only_while_torch_and_lightning_are_imported():
    """The CLI pauses Python's cycle collector for its heavy imports and freezes what they made; it is on again
    afterwards, also when an import fails."""
    from lm_tying.cli import _collector_paused

    gc.unfreeze()
    try:
        with pytest.raises(ModuleNotFoundError), _collector_paused():
            assert not gc.isenabled()
            importlib.import_module("lm_tying_no_such_module")
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
