"""Small file primitives every stage uses: atomic writes, digests, JSON/JSONL reading with locations.

Atomic means: write a temp file in the same directory, fsync it, ``os.replace`` it over the target,
then fsync the directory. A crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hallu.errors import HalluError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, with the permissions a plain ``open()`` would give.

    Any OS failure (read-only place, a file in the way of the folder, a folder at the path, a full
    disk) becomes one HalluError naming the path, and nothing is left behind.
    """
    path = Path(path)
    if path.is_dir():
        raise HalluError(f"{path}: is a folder; give a file path to write")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # mkstemp creates 0600; outputs on a shared machine should be as readable as any other file.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise HalluError(f"{path}: cannot write ({_reason(e, path)})") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _reason(e: OSError, path: Path | None = None) -> str:
    """Why an OS call failed, in words; for "not a directory", which file is in the folder's way."""
    if isinstance(e, FileExistsError | NotADirectoryError) and path is not None:
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    return f"{parent} is a file, not a folder"
                break
    return e.strerror or str(e) or type(e).__name__


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask alone must set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the replace is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def digest_json(obj: Any) -> str:
    """Digest of a JSON-able value in canonical form (sorted keys, no whitespace)."""
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return sha256_bytes(canon.encode("utf-8"))


def open_text(path: str | os.PathLike, expected: str = "JSON"):
    """Open a UTF-8 text file for reading; a missing, folder or unreadable path is one line naming it."""
    path = Path(path)
    try:
        return open(path, encoding="utf-8")
    except FileNotFoundError:
        raise HalluError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise HalluError(f"{path}: is a directory, expected a {expected} file") from None
    except OSError as e:
        raise HalluError(f"{path}: cannot read ({e.strerror})") from None


def read_text(path: str | os.PathLike, expected: str = "JSON") -> str:
    """The whole of a UTF-8 text file, with :func:`open_text`'s errors (and one for bytes that are not UTF-8)."""
    with open_text(path, expected) as f:
        try:
            return f.read()
        except UnicodeDecodeError:
            raise HalluError(f"{path}: not UTF-8 text") from None


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    text = read_text(path, "JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise HalluError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, value)`` for every non-blank line; a bad line raises with ``file:line``."""
    path = Path(path)
    with open_text(path, "JSONL") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):  # noqa: B007 - lineno is used after a decode error
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise HalluError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError:
            raise HalluError(f"{path}:{lineno + 1}: not UTF-8 text") from None


def read_json_or_jsonl(path: str | os.PathLike) -> tuple[str, Any]:
    """Read a file that is either one JSON document or JSON Lines; return ``(kind, value)``.

    ``kind`` is ``"json"`` (value: the document) or ``"jsonl"`` (value: list of ``(line, record)``).
    A file holding exactly one JSON value parses as a document, so a one-line JSONL file comes back as
    ``("json", record)``: callers that take records should accept a lone dict as one record.
    """
    path = Path(path)
    text = read_text(path, "JSON or JSONL")
    try:
        return "json", json.loads(text)
    except json.JSONDecodeError:
        pass
    if text.lstrip().startswith("["):
        read_json(path)  # raises with the JSON error's line
    return "jsonl", list(iter_jsonl(path))


def set_aside(path: str | os.PathLike) -> Path:
    """Move a superseded output out of the way, never over an older one; return where it went.

    ``responses.jsonl`` becomes ``responses.previous-1.jsonl``, then ``-2``, ...; a folder
    ``checkpoints`` becomes ``checkpoints.previous-1``. Nothing a user finished is ever deleted.
    """
    path = Path(path)
    stem, suffix = (path.name, "") if path.is_dir() else (path.stem, path.suffix)
    taken = [int(m.group(1)) for p in path.parent.glob(f"{glob.escape(stem)}.previous-*{glob.escape(suffix)}")
             if (m := re.fullmatch(re.escape(stem) + r"\.previous-(\d+)" + re.escape(suffix), p.name))]
    n = max(taken, default=0) + 1
    while True:
        dest = path.with_name(f"{stem}.previous-{n}{suffix}")
        if not dest.exists():
            try:
                os.rename(path, dest)
            except OSError as e:
                why = _reason(e, dest)
                raise HalluError(f"{path}: cannot set the old output aside as {dest.name} ({why})") from None
            return dest
        n += 1


class StagedDir:
    """Build a folder's new contents in a hidden sibling, then move them in only on success.

    Used by builders that write many files (a data set, a model): a crash or a bad input leaves the
    destination as it was, never half-written.
    """

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.tmp = self.final.parent / f".{self.final.name}.staging-{os.getpid()}"

    def __enter__(self) -> Path:
        import shutil

        if self.final.exists() and not self.final.is_dir():
            raise HalluError(f"{self.final}: is a file, expected a folder")
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            self.tmp.mkdir(parents=True)
        except OSError as e:
            raise HalluError(f"{self.final}: cannot write ({_reason(e, self.tmp)})") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        import shutil

        try:
            if exc is None:
                try:
                    self.final.mkdir(parents=True, exist_ok=True)
                    for entry in sorted(self.tmp.iterdir()):
                        dest = self.final / entry.name
                        if dest.is_dir() and not dest.is_symlink():
                            shutil.rmtree(dest)
                        elif dest.exists():
                            dest.unlink()
                        os.replace(entry, dest)
                except OSError as e:
                    raise HalluError(f"{self.final}: cannot write ({_reason(e, self.final)})") from None
                _fsync_dir(self.final)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False
