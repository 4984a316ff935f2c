"""Helpers for the end-to-end CLI tests: run ``lm-tying`` in a subprocess on a tiny corpus, tiny configs,
and test-only callbacks that the subprocesses load by class path (this directory is put on PYTHONPATH).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.callbacks import Callback

from conftest import zipf_text

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MODELS = ("word2vec", "lm")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONWARNINGS"] = "ignore"
    e["PYTHONFAULTHANDLER"] = "1"  # Python stacks on SIGABRT: what run_cli shows of a command that hangs
    e.pop("LM_TYING_DEBUG", None)
    return e


def run_cli(args: list[str], cwd: Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m lm_tying.cli ARGS`` in ``cwd``; fails the test with the output when ``check`` and rc != 0.

    The command runs in its own process group. If it outlives ``timeout`` (a hang, e.g. of DDP ranks), every process
    of the group (DDP ranks, loader workers) is sent SIGABRT, which makes each print its Python stacks
    (``PYTHONFAULTHANDLER``), then killed; the test fails with those stacks, and no orphan is left to disturb the tests
    after it."""
    proc = popen_cli(args, cwd, new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        processes = subprocess.run(
            ["ps", "-s", str(proc.pid), "-o", "pid,ppid,stat,wchan:28,etime,args"], capture_output=True, text=True
        ).stdout
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        raise AssertionError(
            f"lm-tying {' '.join(args)} still running after {timeout:.0f} s; its processes:\n{processes}\n"
            f"their stacks at SIGABRT:\n{_without_module_lists(stderr)[-12000:]}\nstdout:\n{stdout[-2000:]}"
        ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
    if check and proc.returncode != 0:
        output = f"{stdout[-3000:]}\n{stderr[-6000:]}"
        raise AssertionError(f"lm-tying {' '.join(args)} -> {proc.returncode}\n{output}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _without_module_lists(text: str) -> str:
    """faulthandler's dump without the "Extension modules: ..." list it prints after each process's stacks."""
    listing = re.compile(r"(Extension modules:.*|[\w., ]*, [\w., ]*(\(total: \d+\))?)")
    return "\n".join(line for line in text.splitlines() if not listing.fullmatch(line.strip()))


def popen_cli(args: list[str], cwd: Path, new_session: bool = False) -> subprocess.Popen:
    """``lm-tying ARGS`` in the background; ``new_session``: in its own process group (as a job a scheduler or a
    terminal signals as a whole), so that signalling the group cannot reach pytest."""
    return subprocess.Popen(
        [sys.executable, "-m", "lm_tying.cli", *args],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def write_corpus(directory: Path, num_words: int = 6000, name: str = "corpus.txt", seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(zipf_text(num_words, seed=seed))
    return path


def tiny_config(model: str, corpus: Path, **trainer: Any) -> dict[str, Any]:
    """A config small enough for a few seconds on one CPU core; deterministic (seeded, no worker processes)."""
    if model in ("word2vec", "word2vec_sequential"):
        init_args = {"embedding_dim": 16, "num_sampled": 8, "evaluate": False, "average_loss_every": 0}
        if model == "word2vec_sequential":  # per-pair SGD in the compiled kernel (exact with one thread)
            init_args.update(num_sampled=6, loss="negative_sampling", unique=False, share_negatives=4,
                             output_bias=False, reduction="sum", lr=0.05, init="word2vec", update="sequential")  # fmt: skip
        model_cfg = {"class_path": "lm_tying.models.word2vec.Word2Vec", "init_args": init_args}
        data_args = {"mode": "skipgram", "batch_size": 256, "window": 2}
    elif model == "lm":
        model_cfg = {
            "class_path": "lm_tying.models.lstm_lm.LSTMLanguageModel",
            "init_args": {"embedding_dim": 16, "hidden_dim": 16, "num_layers": 1},
        }
        data_args = {"mode": "lm", "batch_size": 4, "bptt": 10, "eval_batch_size": 2}
    else:
        raise ValueError(model)
    trainer_cfg = {
        "max_steps": 12,
        "val_check_interval": 5,
        "limit_val_batches": 2,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }
    trainer_cfg.update(trainer)
    return {
        "seed_everything": 0,
        "model": model_cfg,
        "data": {
            "class_path": "lm_tying.data.Text8DataModule",
            "init_args": {"path": str(corpus), "data_dir": "data", "vocab_size": 100, "num_workers": 0, **data_args},
        },
        "trainer": trainer_cfg,
        "checkpoint": {"every_n_train_steps": 4},
        "projector": {"num_visualize": 50, "every_n_validations": 1},
    }


def write_config(directory: Path, model: str, corpus: Path, name: str | None = None, **trainer: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name or model}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(model, corpus, **trainer), sort_keys=False))
    return path


def callbacks_arg(*callbacks: tuple[str, dict[str, Any]]) -> list[str]:
    """``--trainer.callbacks`` for test-only callbacks of this module (class name, init args)."""
    value = [{"class_path": f"cli_support.{name}", "init_args": args} for name, args in callbacks]
    return ["--trainer.callbacks", json.dumps(value)]


def load_ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k].float() - b[k].float()).abs().max():.3g}"


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------- test-only callbacks
class SignalAtStep(Callback):
    """Sends ``signum`` to its own process after training step ``step``, as a user or scheduler would.

    With ``during_save`` the signal (meant for SIGKILL) arrives in the middle of the next checkpoint write
    instead: ``torch.save`` in the checkpoint plugin writes part of the bytes, then the process is killed.
    """

    def __init__(self, step: int, signum: int = int(signal.SIGTERM), during_save: bool = False, rank: int = 0) -> None:
        self.step, self.signum, self.during_save, self.rank = step, signum, during_save, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        if not self.during_save:
            os.kill(os.getpid(), self.signum)
            return
        import lm_tying.checkpoint as cio

        signum = self.signum

        def torn_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            import io

            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signum)

        cio.torch = _TorchProxy(torn_save)  # only the plugin's module sees it; torch.save itself stays intact


class SignalGroupAtStep(Callback):
    """After training step ``step`` (rank 0), has ``kill -SIG -- -PGID`` signal the whole process group (main process,
    data-loader workers, DDP ranks) from outside it, as a scheduler or a terminal's Ctrl-C do. From outside matters:
    torch's workers exit quietly on a SIGTERM sent by their parent, but die of one sent by anyone else. Run the CLI
    in its own session (``run_cli`` does)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 0:
            killer = f"import os; os.killpg({os.getpgid(0)}, {self.signum})"
            subprocess.run([sys.executable, "-c", killer], start_new_session=True, check=True)


class _TorchProxy:
    """``torch`` with ``save`` replaced (only inside ``lm_tying.checkpoint``)."""

    def __init__(self, save: Any) -> None:
        self.save = save

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class RecordBatches(Callback):
    """Writes, per rank, every training batch it saw (with its global step) and the final parameters to
    ``out_dir/rank<r>.pt`` at the end of fit (appending to what an earlier, interrupted fit recorded)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        a, b = (t.detach().cpu().clone() for t in batch)
        self.batches.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "a": a, "b": b})

    def _dump(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.pt"
        previous = torch.load(path, weights_only=True)["batches"] if path.exists() else []
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "batches": previous + self.batches,
                "params": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            },
            path,
        )

    def on_fit_end(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._dump(trainer, pl_module)


class CopyFileAtStep(Callback):
    """Copies ``src`` to ``dest`` (rank 0) when training step ``step + 1`` starts, i.e. once ``last.ckpt`` of step
    ``step`` is written: a checkpoint to resume from, taken out of an uninterrupted run."""

    def __init__(self, step: int, src: str, dest: str) -> None:
        self.step, self.src, self.dest = step, src, dest

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            import shutil

            shutil.copyfile(self.src, self.dest)


# ------------------------------------------------------------------------------------- word2vec's shipped configs
def shipped_config_args(name: str, corpus: Path, **trainer: Any) -> list[str]:
    """``fit`` arguments that run ``configs/<name>`` unchanged except for its size: a tiny corpus and
    vocabulary, small vectors and batches, a short run."""
    size = {
        "word2vec.yaml": ["--data.batch_size", "256", "--trainer.max_epochs", "2"],
        "word2vec_cs20.yaml": ["--data.batch_size", "1280", "--trainer.max_steps", "200"],  # 10 updates a batch
    }[name]
    args = ["fit", "--config", str(REPO / "configs" / name), "--data.path", str(corpus), "--data.vocab_size", "100",
            "--model.init_args.embedding_dim", "16", "--trainer.enable_progress_bar", "false",
            "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "0", *size]  # fmt: skip
    for key, value in trainer.items():
        args += [f"--trainer.{key}", str(value)]
    return args


class RecordLosses(Callback):
    """Writes the loss each training step returned, per rank, to ``out_dir/losses<rank>.json`` at the end of fit
    (appending to what an earlier, interrupted fit of the same run recorded), and the number of batches each
    validation ran to ``out_dir/val_batches<rank>.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.losses: list[float] = []
        self.val_batches: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.val_batches.append(0)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_batches[-1] += 1

    def _dump(self, trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, values in (("losses", self.losses), ("val_batches", self.val_batches)):
            path = self.out_dir / f"{name}{trainer.global_rank}.json"
            previous = json.loads(path.read_text()) if path.exists() else []
            path.write_text(json.dumps(previous + values))

    def on_fit_end(self, trainer, pl_module) -> None:
        self._dump(trainer)
