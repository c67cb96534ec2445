"""Exact file digests, remembered across processes so unchanged weights are hashed only once.

A digest is always the sha256 of every byte of the file. Hashing a 14 GB checkpoint takes tens of
seconds, so the digest of a big file is remembered in a persistent cache keyed by the file's identity:
its real path, device, inode, size, mtime_ns and ctime_ns. Writing the file in place changes mtime and
ctime (the kernel sets ctime; no tool can restore it), replacing it changes the inode, so any change
to the bytes misses the cache and the file is hashed again.

A file modified within the same clock tick it was hashed in could keep its timestamps (git's "racy
clean" problem), so an entry is only trusted when the file's ctime is older than the moment hashing
started by more than :data:`RACY_WINDOW_NS` (well above the kernel's coarse timestamp tick);
otherwise the file is hashed again, and that fresh entry is trusted from then on.

A folder's digest (a model, an image folder) is remembered the same way, keyed by the identity of
every file in it, so ``hallu status`` on a run with 100k small images does not rehash them either.

The cache lives in ``$HALLU_CACHE_DIR/digests`` (default ``$XDG_CACHE_HOME/hallu/digests``, i.e.
``~/.cache/hallu/digests``): one small JSON file per real path, named by the path's sha256, in 256
subfolders. Each entry is written atomically (temp file + rename), so concurrent processes can only
race to write the same correct answer. A cache that cannot be read or written is skipped, never an
error: it only costs time. ``HALLU_DIGEST_CACHE=off`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from hallu import fileio
from hallu.errors import HalluError

# Below this size hashing is about as fast as reading a cache entry, so small files are just hashed.
CACHE_MIN_BYTES = 1 << 20
RACY_WINDOW_NS = 100_000_000
# This process's own entries (same rule as the disk cache): a stage, its engine and its results each
# ask for the model's fingerprint, and the disk cache may be off or unwritable.
_MEMO: dict[str, dict] = {}


def cache_dir() -> Path | None:
    """Where digests are remembered, or None when the cache is turned off."""
    if os.environ.get("HALLU_DIGEST_CACHE", "").lower() in ("0", "off", "false", "no"):
        return None
    root = os.environ.get("HALLU_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "hallu")
    return Path(root) / "digests"


def _identity(st: os.stat_result) -> dict[str, int]:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _entry_path(root: Path, key: str) -> Path:
    name = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return root / name[:2] / f"{name[2:]}.json"


def _read_entry(entry: Path) -> dict | None:
    try:
        return json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _trusted(rec: dict | None, key: str, ident: dict) -> str | None:
    """The entry's digest if it is for this very file (or folder), unchanged since it was hashed."""
    if not isinstance(rec, dict) or rec.get("path") != key or rec.get("identity") != ident:
        return None
    hashed_at = rec.get("hashed_at_ns")
    digest = rec.get("digest")
    if not isinstance(hashed_at, int) or not isinstance(digest, str):
        return None
    if ident["ctime_ns"] >= hashed_at - RACY_WINDOW_NS:  # changed too close to its hashing to tell
        return None
    return digest


def _remembered(key: str, ident: dict, compute: Callable[[], str], identity_now: Callable[[], dict]) -> str:
    """``compute()``, or what it gave last time for ``key`` while ``ident`` is unchanged (memo, then disk)."""
    cached = _trusted(_MEMO.get(key), key, ident)
    if cached is not None:
        return cached
    root = cache_dir()
    entry = _entry_path(root, key) if root is not None else None
    if entry is not None:
        rec = _read_entry(entry)
        cached = _trusted(rec, key, ident)
        if cached is not None:
            _MEMO[key] = rec
            return cached
    started = time.time_ns()
    digest = compute()
    if identity_now() == ident:  # nothing changed while it was read: worth remembering
        rec = {"path": key, "identity": ident, "hashed_at_ns": started, "digest": digest}
        _MEMO[key] = rec
        if entry is not None:
            try:
                fileio.atomic_write_text(entry, json.dumps(rec) + "\n")
            except HalluError:
                pass  # a read-only or full cache only costs a rehash next time
    return digest


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise HalluError(f"{path}: file not found") from None
    except OSError as e:
        raise HalluError(f"{path}: cannot read ({e.strerror})") from None


def file_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of the whole file; big files come from the persistent cache when unchanged."""
    path = Path(path)
    st = _stat(path)
    if st.st_size < CACHE_MIN_BYTES:
        return _hash(path)
    return _remembered(os.path.realpath(path), _identity(st), lambda: _hash(path),
                       lambda: _identity(_stat(path)))


def tree_digest(root: str | os.PathLike, files: list[Path]) -> str:
    """Digest of a folder from its ``files`` (sorted, under ``root``): sha256 over ``rel:sha256`` lines.

    Remembered like a big file, keyed by the identity of every file in it (so a folder of 100k small
    images is not rehashed by every ``hallu status``); any file added, removed or changed misses.
    """
    root = Path(root)

    def listing() -> dict:
        h = hashlib.sha256()
        newest = total = 0
        for f in files:
            st = _stat(f)
            i = _identity(st)
            h.update(f"{f.relative_to(root).as_posix()}\0{i['dev']}\0{i['ino']}\0{i['size']}\0{i['mtime_ns']}\0"
                     f"{i['ctime_ns']}\n".encode("utf-8", "surrogateescape"))
            newest = max(newest, st.st_ctime_ns)
            total += st.st_size
        return {"files": h.hexdigest(), "count": len(files), "size": total, "ctime_ns": newest}

    def compute() -> str:
        lines = "\n".join(f"{f.relative_to(root).as_posix()}:{file_digest(f)}" for f in files)
        return fileio.sha256_bytes(lines.encode())

    ident = listing()
    if ident["size"] < CACHE_MIN_BYTES:
        return compute()
    return _remembered("tree:" + os.path.realpath(root), ident, compute, listing)


def _hash(path: Path) -> str:
    try:
        return fileio.sha256_file(path)
    except FileNotFoundError:
        raise HalluError(f"{path}: file not found") from None
    except OSError as e:
        raise HalluError(f"{path}: cannot read ({e.strerror})") from None
