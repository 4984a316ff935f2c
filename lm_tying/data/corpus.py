"""Getting text8 onto disk and reading it: download, verification, alphabet checks.

text8 is one line of lowercase ``a``-``z`` words separated by single spaces. Every problem a user can
hit (a truncated download, a corrupt zip, a file in the wrong format) becomes a ``CorpusError`` that
names the file and says what to do, instead of a traceback from deep inside ``zipfile``.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_ZIP_SIZE = 31_344_016
TEXT8_MEMBER = "text8"
READ_CHUNK_BYTES = 1 << 20  # small chunks bound the Python objects alive at once

_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[ord("a") : ord("z") + 1] = True
_ALLOWED[ord(" ")] = True


class CorpusError(ValueError):
    """A corpus file or download that cannot be used, with the reason and the fix in the message."""


def download(url: str, dest: Path, expected_size: int | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is already there.

    Bytes go to a temporary file that is renamed only once complete and of the expected size, so an
    interrupted download never leaves a file that looks valid.
    """
    dest = Path(dest)
    if dest.exists() and (expected_size is None or dest.stat().st_size == expected_size):
        return dest
    if dest.exists():
        raise CorpusError(
            f"{dest} has {dest.stat().st_size:,} bytes, expected {expected_size:,}: it is truncated or "
            f"not the file from {url}. Delete it to download it again."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            announced = response.headers.get("Content-Length")
            announced = int(announced) if announced else None
            if expected_size is not None and announced is not None and announced != expected_size:
                raise CorpusError(
                    f"{url} announces {announced:,} bytes, expected {expected_size:,}: the server does not "
                    f"serve text8.zip. Check --data.url, or pass a local copy with --data.path."
                )
            with open(partial, "wb") as out, tqdm(
                total=announced, unit="B", unit_scale=True, desc=f"downloading {dest.name}"
            ) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        partial.unlink(missing_ok=True)
        raise CorpusError(
            f"downloading {url} failed: HTTP {e.code} {e.reason}. Check --data.url, or download text8.zip "
            f"yourself and pass it with --data.path."
        ) from None
    except (urllib.error.URLError, OSError) as e:
        partial.unlink(missing_ok=True)
        if isinstance(e, CorpusError):
            raise
        reason = getattr(e, "reason", e)
        raise CorpusError(
            f"downloading {url} failed: {reason}. Check your network, or download text8.zip yourself and "
            f"pass it with --data.path."
        ) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    size = partial.stat().st_size
    expected_size = expected_size if expected_size is not None else announced
    if expected_size is not None and size != expected_size:
        partial.unlink()
        raise CorpusError(
            f"downloaded {size:,} bytes from {url}, expected {expected_size:,}: the download was cut short "
            f"or the file is not text8.zip. Run again to retry, or pass a local copy with --data.path."
        )
    os.replace(partial, dest)
    return dest


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
