"""Writing files so that a reader, or a run killed mid-write, only ever sees a complete file; and the lock that
keeps two processes from writing the same run."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Optional

TMP_MARKER = ".tmp-"


def temporary_name(path: Path) -> Path:
    """The hidden file beside ``path`` that a writer fills before renaming it (same filesystem: atomic).

    Named ``.<name>.tmp-<pid>-<random>``: unique to this writer, so no other writer (another process, or another
    save in this one) ever removes or overwrites it, and :func:`remove_stale_temporaries` can tell a dead writer's.
    """
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of writers of ``path`` that died mid-write (their process no longer exists).

    A live process's temporary file is never touched: it may be in the middle of its write."""
    for stale in path.parent.glob(f".{path.name}{TMP_MARKER}*"):
        pid = stale.name.rsplit(TMP_MARKER, 1)[-1].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
            continue  # a live writer (this process included) may be mid-write
        try:
            stale.unlink()
        except OSError:
            pass


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` only if the block completes, else it is removed."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError, NotADirectoryError):  # never written, or its directory could not be made
            tmp.unlink()


class RunLockedError(Exception):
    """Another live process holds the run's lock."""


class RunLock:
    """An exclusive lock on a run directory for as long as this process trains the run, held on ``.<name>.lock``
    beside it (inside, it would make Lightning warn that the checkpoint directory is not empty).

    ``flock`` locks belong to the open file and the kernel drops them when the process dies, however it dies, so a
    killed run never leaves a lock that blocks the next one (the ``.lock`` file itself may stay; it is harmless).
    The file records the holder's pid and host for the message the second process prints.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory.with_name(f".{self.directory.name}.lock")
        self._file: Optional[IO[str]] = None

    def acquire(self) -> None:
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLockedError(
                    f"run directory {str(self.directory)!r} is in use by {holder}: wait for it to finish, stop it, "
                    "or use another --run_name"
                ) from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
