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
from pathlib import Path

from hallu import fileio
from hallu.errors import HalluError

# Below this size hashing is about as fast as reading a cache entry, so small files are just hashed.
CACHE_MIN_BYTES = 1 << 20
RACY_WINDOW_NS = 100_000_000
_IDENTITY = ("dev", "ino", "size", "mtime_ns", "ctime_ns")
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


def _entry_path(root: Path, real: str) -> Path:
    name = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()
    return root / name[:2] / f"{name[2:]}.json"


def _read_entry(entry: Path) -> dict | None:
    try:
        return json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _trusted(rec: dict | None, real: str, ident: dict[str, int]) -> str | None:
    """The entry's digest if it is for this very file, unchanged since it was hashed."""
    if not isinstance(rec, dict) or rec.get("path") != real or any(rec.get(k) != ident[k] for k in _IDENTITY):
        return None
    hashed_at = rec.get("hashed_at_ns")
    digest = rec.get("digest")
    if not isinstance(hashed_at, int) or not isinstance(digest, str):
        return None
    if ident["ctime_ns"] >= hashed_at - RACY_WINDOW_NS:  # changed too close to its hashing to tell
        return None
    return digest


def file_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of the whole file; big files come from the persistent cache when unchanged."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise HalluError(f"{path}: file not found") from None
    except OSError as e:
        raise HalluError(f"{path}: cannot read ({e.strerror})") from None
    if st.st_size < CACHE_MIN_BYTES:
        return _hash(path)
    real = os.path.realpath(path)
    ident = _identity(st)
    cached = _trusted(_MEMO.get(real), real, ident)
    if cached is not None:
        return cached
    root = cache_dir()
    entry = _entry_path(root, real) if root is not None else None
    if entry is not None:
        rec = _read_entry(entry)
        cached = _trusted(rec, real, ident)
        if cached is not None:
            _MEMO[real] = rec
            return cached
    started = time.time_ns()
    digest = _hash(path)
    if _identity(path.stat()) == ident:  # the file did not change while it was read: worth remembering
        rec = {"path": real, **ident, "hashed_at_ns": started, "digest": digest}
        _MEMO[real] = rec
        if entry is not None:
            try:
                fileio.atomic_write_text(entry, json.dumps(rec) + "\n")
            except HalluError:
                pass  # a read-only or full cache only costs a rehash next time
    return digest


def _hash(path: Path) -> str:
    try:
        return fileio.sha256_file(path)
    except FileNotFoundError:
        raise HalluError(f"{path}: file not found") from None
    except OSError as e:
        raise HalluError(f"{path}: cannot read ({e.strerror})") from None
