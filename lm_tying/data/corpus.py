"""Getting text8 onto disk and reading it: download, verification, alphabet checks.

text8 is one line of lowercase ``a``-``z`` words separated by single spaces. Every problem a user can
hit (a truncated download, a corrupt zip, a file in the wrong format) becomes a ``CorpusError`` that
names the file and says what to do, instead of a traceback from deep inside ``zipfile``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lm_tying.atomic import atomic_path

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_ZIP_SIZE = 31_344_016
TEXT8_ZIP_SHA256 = "a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232"
TEXT8_MEMBER = "text8"
READ_CHUNK_BYTES = 1 << 20  # small chunks bound the Python objects alive at once

_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[ord("a") : ord("z") + 1] = True
_ALLOWED[ord(" ")] = True


class CorpusError(ValueError):
    """A corpus file or download that cannot be used, with the reason and the fix in the message."""


def download(
    url: str,
    dest: Path,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy from that same URL is already there.

    Bytes go to a temporary file renamed only once complete and verified (the expected size, else the
    announced Content-Length; the sha256 when known), so an interrupted download never leaves a file that
    looks valid. A record beside it (``<dest>.source.json``: URL, size, sha256) ties the file to its URL:
    a later run reuses it only for the same URL and only while it still matches the record.
    """
    dest = Path(dest)
    if dest.exists():
        _check_download(url, dest, expected_size, expected_sha256)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    def check_announced(announced: int | None) -> None:
        if expected_size is not None and announced is not None and announced != expected_size:
            raise CorpusError(
                f"{url} announces {announced:,} bytes, expected {expected_size:,}: the server does "
                f"not serve text8.zip. Check --data.url, or pass a local copy with --data.path."
            )

    with atomic_path(dest) as partial:
        try:
            announced, sha256 = fetch(url, partial, dest.name, timeout, check_announced)
        except urllib.error.HTTPError as e:
            raise CorpusError(
                f"downloading {url} failed: HTTP {e.code} {e.reason}. Check --data.url, or download "
                f"text8.zip yourself and pass it with --data.path."
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CorpusError(
                f"downloading {url} failed: {reason}. Check your network, or download text8.zip yourself "
                f"and pass it with --data.path."
            ) from None
        size = partial.stat().st_size
        expected_size = expected_size if expected_size is not None else announced
        if expected_size is not None and size != expected_size:
            raise CorpusError(
                f"downloaded {size:,} bytes from {url}, expected {expected_size:,}: the download was cut "
                f"short or the file is not text8.zip. Run again to retry, or pass a local copy with --data.path."
            )
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise CorpusError(
                f"the file downloaded from {url} has sha256 {sha256}, expected {expected_sha256}: "
                f"it is not text8.zip or was corrupted on the way. Run again to retry, or check --data.url."
            )
        # The record first (the block's end renames the file): a run killed between the two writes leaves no file
        # to reuse, only a record.
        write_json(_record_path(dest), _record(url, partial, sha256))
    return dest


def fetch(
    url: str, partial: Path, name: str, timeout: float, check_announced=lambda announced: None
) -> tuple[int | None, str]:
    """Stream ``url`` into ``partial`` with a progress bar (``downloading <name>``); returns the announced size
    (Content-Length, or None) and the sha256 of what arrived. ``check_announced`` may refuse the announced size
    before anything is read. Raises urllib's and the OS's errors: the callers name the file and the fix."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        announced = response.headers.get("Content-Length")
        announced = int(announced) if announced else None
        check_announced(announced)
        with open(partial, "wb") as out, tqdm(
            total=announced, unit="B", unit_scale=True, desc=f"downloading {name}"
        ) as bar:
            while block := response.read(1 << 20):
                out.write(block)
                digest.update(block)
                bar.update(len(block))
    return announced, digest.hexdigest()


def _record_path(dest: Path) -> Path:
    return dest.with_name(f"{dest.name}.source.json")


def _read_record(dest: Path) -> dict | None:
    """The record of where ``dest`` came from, or None when there is none or it is damaged."""
    record = read_json(_record_path(dest))
    fields = {"url": str, "size": int, "mtime_ns": int, "sha256": str}
    if record is None or not all(isinstance(record.get(k), t) for k, t in fields.items()):
        return None
    return record


def _record(url: str, path: Path, sha256: str) -> dict:
    stat = path.stat()
    return {"url": url, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def _check_download(url: str, dest: Path, expected_size: int | None, expected_sha256: str | None) -> None:
    """Raise unless ``dest`` was downloaded from ``url`` and still is what was downloaded.

    The sha256 is recomputed only when the file's mtime differs from the record's (the file was written
    since), so reusing it costs a ``stat`` per run. A file without a record (from an older version) is
    adopted only when a known size and hash vouch for it.
    """
    record = _read_record(dest)
    if record is None:
        if expected_size is None and expected_sha256 is None:
            raise CorpusError(
                f"{dest} has no readable record of the URL it was downloaded from: delete it to download "
                f"{url}, or pass it with --data.path to use it as it is."
            )
        record = {"url": url, "size": expected_size, "mtime_ns": None, "sha256": expected_sha256}
    elif record["url"] != url:
        raise CorpusError(
            f"{dest} was downloaded from {record['url']}, not from {url} (--data.url): delete it to "
            f"download from {url}, or set another --data.data_dir."
        )
    stat = dest.stat()
    for expected in (expected_size, record.get("size")):
        if expected is not None and stat.st_size != expected:
            raise CorpusError(
                f"{dest} has {stat.st_size:,} bytes, expected {expected:,}: it is truncated or not the file "
                f"from {url}. Delete it to download it again."
            )
    if stat.st_mtime_ns == record.get("mtime_ns"):
        return
    sha256 = file_sha256(dest)
    for expected in (expected_sha256, record.get("sha256")):
        if expected is not None and sha256 != expected:
            raise CorpusError(
                f"{dest} has sha256 {sha256}, expected {expected}: it was changed or corrupted since it was "
                f"downloaded from {url}. Delete it to download it again."
            )
    write_json(_record_path(dest), _record(url, dest, sha256))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, hashed straight from a memory map (no Python loop, no copy)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return hashlib.sha256(view).hexdigest()


def read_json(path: Path) -> dict | None:
    """The object in a JSON file, or None when it is missing or unreadable (never trusted half-written)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def iter_text8_chunks(path: Path, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """Yield a text8-format file (plain, or a zip holding member ``text8``) in chunks cut at spaces.

    Streaming keeps preprocessing memory independent of the corpus size; each chunk is checked
    against text8's alphabet so a wrong file fails with the position of the first bad character.
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus file {path} does not exist. Pass a text8-format file with --data.path.")
    with _open_text8(path) as stream:
        carry = b""
        offset = 0
        try:
            while block := stream.read(chunk_bytes):
                data = carry + block
                cut = data.rfind(b" ") + 1
                if cut == 0:  # a single word longer than a chunk: keep reading
                    carry = data
                    continue
                chunk, carry = data[:cut], data[cut:]
                _check_alphabet(chunk, path, offset)
                offset += len(chunk)
                yield chunk
        except (zipfile.BadZipFile, zlib.error) as e:
            raise CorpusError(
                f"{path} is a corrupt zip ({e}). Delete it and download it again, or pass another copy "
                f"with --data.path."
            ) from None
        except EOFError:
            raise CorpusError(
                f"{path} ends before its zip member is complete: the file is truncated. Delete it and "
                f"download it again."
            ) from None
        if carry.endswith(b"\n"):  # tolerate the newline an editor adds at the end
            carry = carry[:-1]
        if carry:
            _check_alphabet(carry, path, offset)
            offset += len(carry)
            yield carry
    if offset == 0:
        raise CorpusError(f"corpus {path} is empty: it holds no words. Pass a text8-format file with --data.path.")


def _open_text8(path: Path):
    if not zipfile.is_zipfile(path):
        if path.suffix == ".zip":
            raise CorpusError(
                f"{path} is not a valid zip file (truncated or corrupt). Delete it and download it again, "
                f"or pass the plain text file with --data.path."
            )
        return open(path, "rb")
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
        if TEXT8_MEMBER not in names:
            raise CorpusError(
                f"{path} has no member named '{TEXT8_MEMBER}' (it holds {names[:5]}). text8.zip holds a "
                f"single file 'text8'; pass the right zip or the plain text file with --data.path."
            )
        return archive.open(TEXT8_MEMBER)
    except zipfile.BadZipFile as e:
        raise CorpusError(f"{path} is a corrupt zip ({e}). Delete it and download it again.") from None


def _check_alphabet(chunk: bytes, path: Path, offset: int) -> None:
    codes = np.frombuffer(chunk, dtype=np.uint8)
    bad = np.flatnonzero(~_ALLOWED[codes])
    if bad.size:
        pos = int(bad[0])
        context = chunk[max(0, pos - 20) : pos + 20].decode("latin-1")
        raise CorpusError(
            f"{path} is not in text8 format: character {chr(codes[pos])!r} at byte {offset + pos:,} "
            f"(near {context!r}); text8 holds only lowercase a-z and single spaces. Normalise the text "
            f"first (lowercase, letters only), or pass the real text8 file."
        )
