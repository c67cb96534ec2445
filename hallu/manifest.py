"""The run directory and its manifest: the one source of truth for a pipeline run.

``DIR/manifest.json`` records, per stage: its state (pending | running | done | failed | stale), the
resolved options and their digest, input and output artifacts with digests and item counts, progress,
attempts, the last error, start/end times and library versions. It is only ever written atomically
(tempfile + fsync + replace) while holding ``DIR/.locks/manifest.lock``; a second lock per stage
(``DIR/.locks/<stage>.lock``, an OS file lock that dies with its process) keeps two processes from
running one stage.

Staleness is derived, never stored: a done stage is stale when an input it read or an output it wrote
is no longer the file it recorded, or when an upstream stage it depends on is not done. Digests are
exact (every byte hashed); big files' digests are remembered across processes by file identity
(:mod:`hallu.digests`), so ``hallu status`` does not re-hash unchanged weights.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hallu import __version__
from hallu.digests import file_digest, tree_digest
from hallu.errors import HalluError
from hallu.fileio import atomic_write_json, digest_json, read_json

SCHEMA_VERSION = 1
STATES = ("pending", "running", "done", "failed", "stale")
# Display order of the pipeline in `hallu status`; stages not listed here (eval runs) follow.
PIPELINE = ("prepare", "rollout", "revise", "sft", "dpo", "merge-lora")
# Options that never change a stage's outputs: left out of the recorded options and their digest, so
# changing one resumes a stage instead of restarting it. The one list every stage uses.
OPERATIONAL_OPTIONS = frozenset({"debug", "progress", "quiet", "device", "allow_outside_images"})
_PROGRESS_WRITE_INTERVAL_S = 2.0


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide a stage's numbers, read without importing them."""
    from importlib import metadata

    out = {"hallu": __version__}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def is_main_process() -> bool:
    """Only rank 0 of a distributed launch writes the manifest."""
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------------------------------
# Artifacts: a file or a folder, identified by a digest


def dir_fingerprint(path: Path) -> str:
    """Digest of a folder (a model): the relative path and full sha256 of every file, in sorted order.

    Exact: a byte changed anywhere in any file changes it. Big files, and the folder as a whole, are
    hashed once and then come from the digest cache while their identity (inode, size, mtime, ctime) is
    unchanged (:mod:`hallu.digests`).
    """
    path = Path(path)
    return tree_digest(path, sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))


def artifact_digest(path: Path) -> str:
    return dir_fingerprint(path) if path.is_dir() else file_digest(path)


def _stat_key(path: Path) -> list[int]:
    """(size, newest mtime) of a file or folder, recorded with an artifact for people reading the
    manifest; never trusted as a digest (a rewrite can keep both)."""
    if path.is_dir():
        stats = [p.stat() for p in path.rglob("*") if p.is_file()]
        return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


@dataclass
class StageView:
    """What `hallu status` shows for one stage."""

    name: str
    status: str
    progress: tuple[int, int] | None = None
    reasons: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)


class Run:
    """A run directory. Creating one does not write anything until a stage starts."""

    def __init__(self, directory: str | os.PathLike, flag: str = "--run"):
        self.dir = Path(directory)
        self.flag = flag  # the option that named the folder (--run, or --out for prepare and evals), for errors
        if self.dir.exists() and not self.dir.is_dir():
            raise HalluError(f"{flag} {self.dir}: is a file, not a run directory")
        self.path = self.dir / "manifest.json"
        self.lock_dir = self.dir / ".locks"
        if self.path.exists():
            self.read()  # fail early on a corrupt or too-new manifest

    # -- reading and writing ------------------------------------------------------------------------

    def read(self) -> dict:
        if not self.path.exists():
            return {"schema": SCHEMA_VERSION, "hallu_version": __version__, "created": now_iso(), "stages": {}}
        m = read_json(self.path)
        if not isinstance(m, dict) or not isinstance(m.get("stages"), dict):
            raise HalluError(f"{self.path}: not a hallu manifest (no 'stages' object)")
        schema = m.get("schema")
        if not isinstance(schema, int):
            raise HalluError(f"{self.path}: not a hallu manifest ('schema' missing or not an integer)")
        if schema > SCHEMA_VERSION:
            raise HalluError(
                f"{self.path}: written by a newer hallu ({m.get('hallu_version', '?')}, manifest schema "
                f"{schema}; this hallu {__version__} reads schema {SCHEMA_VERSION}); upgrade hallu"
            )
        return m

    def update(self, change: Callable[[dict], None]) -> dict:
        """Read-modify-write the manifest under the manifest lock; rank 0 only."""
        if not is_main_process():
            return self.read()
        from filelock import FileLock

        self._mkdirs()
        with FileLock(str(self.lock_dir / "manifest.lock")):
            m = self.read()
            change(m)
            m["hallu_version"] = __version__
            m["updated"] = now_iso()
            atomic_write_json(self.path, m)
        return m

    def _mkdirs(self) -> None:
        try:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise HalluError(f"{self.flag} {self.dir}: a file is in the way of the run directory") from None
        except OSError as e:
            raise HalluError(f"{self.flag} {self.dir}: cannot create the run directory ({e.strerror})") from None
        # A read-only run folder would fail inside the lock library with a traceback; say it plainly.
        if not os.access(self.lock_dir, os.W_OK | os.X_OK):
            raise HalluError(f"{self.flag} {self.dir}: cannot write to the run directory (read-only or no permission)")

    # -- artifacts ------------------------------------------------------------------------------------

    def rel(self, path: str | os.PathLike) -> str:
        """Paths inside the run directory are stored relative to it, so a run can be moved."""
        p = Path(path).resolve()
        try:
            return p.relative_to(self.dir.resolve()).as_posix()
        except ValueError:
            return str(p)

    def resolve(self, stored: str) -> Path:
        p = Path(stored)
        return p if p.is_absolute() else self.dir / p

    def artifact(self, path: str | os.PathLike, count: int | None = None, **extra: Any) -> dict:
        p = Path(path)
        if not p.exists():
            raise HalluError(f"{p}: not found")
        rec = {"path": self.rel(p), "digest": artifact_digest(p), "stat": _stat_key(p)}
        if count is not None:
            rec["count"] = count
        rec.update(extra)
        return rec

    def current_digest(self, rec: dict) -> str | None:
        """The digest the artifact has now (exact; big files come from the digest cache), or None if gone."""
        p = self.resolve(rec["path"])
        if not p.exists():
            return None
        return artifact_digest(p)

    # -- stages ---------------------------------------------------------------------------------------

    def stage(self, name: str, *, options: dict, inputs: dict[str, str | os.PathLike] | None = None,
              after: tuple[str, ...] = ()) -> StageRun:
        """Open a stage for running (a context manager). ``after`` names upstream stages it reads."""
        return StageRun(self, name, options, inputs or {}, after)

    def stage_record(self, name: str) -> dict | None:
        return self.read()["stages"].get(name)

    def views(self) -> list[StageView]:
        """Every pipeline stage with its state, progress and, when stale, the reasons."""
        m = self.read()
        stages = m["stages"]
        # A folder holding only eval runs does not pretend to be a pipeline with pending stages.
        pipeline = list(PIPELINE) if any(n in stages for n in PIPELINE) or not stages else []
        names = pipeline + sorted(n for n in stages if n not in PIPELINE)
        views: dict[str, StageView] = {}
        for name in names:
            rec = stages.get(name)
            if rec is None:
                views[name] = StageView(name, "pending")
                continue
            status = rec.get("status", "pending")
            reasons: list[str] = []
            if status == "running":
                alive, why = stage_owner_alive(rec)
                if not alive:
                    status = "failed"
                    reasons.append("the process running it died (rerun to resume)")
                elif why:
                    reasons.append(why)
            elif status == "failed" and rec.get("error"):
                reasons.append(rec["error"])
            if status == "done":
                reasons = self._stale_reasons(rec, views)
                if reasons:
                    status = "stale"
            prog = rec.get("progress")
            progress = (prog["done"], prog["total"]) if prog else None
            views[name] = StageView(name, status, progress, reasons, rec)
        return list(views.values())

    def _stale_reasons(self, rec: dict, earlier: dict[str, StageView]) -> list[str]:
        reasons = []
        for up in rec.get("after", []):
            v = earlier.get(up)
            if v is not None and v.status != "done":
                reasons.append(f"upstream stage '{up}' is {v.status}")
        for kind in ("inputs", "outputs"):
            for key, art in rec.get(kind, {}).items():
                now = self.current_digest(art)
                if now is None:
                    reasons.append(f"{kind[:-1]} '{key}' ({art['path']}) is missing")
                elif now != art["digest"]:
                    verb = "changed since the stage ran" if kind == "inputs" else "was modified after the stage"
                    reasons.append(f"{kind[:-1]} '{key}' ({art['path']}) {verb}")
        return reasons



# --------------------------------------------------------------------------------------------------
# Is a running stage's process still there? Looked up, never by taking its lock: a `hallu status`
# that grabbed the stage lock for a moment could make a stage starting at that instant fail as
# "already running".


def process_start_token(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot, /proc/PID/stat field 22), or None.

    Recorded with the pid so a pid reused by an unrelated process after a crash is not taken for the
    stage's process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    return fields[19] if len(fields) > 19 else None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is just someone else's
        return True
    except OSError:
        return False
    return True


def stage_owner_alive(rec: dict) -> tuple[bool, str | None]:
    """Whether the process recorded as running a stage (rank 0 of a launch) still runs; with a note
    when that cannot be checked from here (another host)."""
    pid = rec.get("pid")
    if not isinstance(pid, int):
        return False, None
    host = rec.get("host")
    if host and host != socket.gethostname():
        return True, f"running on host {host} (pid {pid}); not checked from here"
    if not _pid_exists(pid):
        return False, None
    started = rec.get("pid_started")
    if started is not None:
        now = process_start_token(pid)
        if now is not None and now != started:
            return False, None  # the pid was reused by another process
    return True, None


class StageRun:
    """One attempt at a stage: holds the stage lock and keeps the manifest's record current.

    ``fresh`` tells the stage whether outputs left by an earlier attempt may be resumed (same options,
    same inputs) or must be discarded.
    """

    def __init__(self, run: Run, name: str, options: dict, inputs: dict, after: tuple[str, ...]):
        self.run = run
        self.name = name
        self.options = {k: v for k, v in options.items() if k not in OPERATIONAL_OPTIONS}
        self.options_digest = digest_json(self.options)
        self.input_paths = {k: Path(v) for k, v in inputs.items()}
        self.after = list(after)
        self.outputs: dict[str, dict] = {}
        self.fresh = True
        self.previous: dict = {}  # the record of the last attempt, as it was before this one started
        self.extra: dict[str, Any] = {}
        self._lock = None
        self._last_progress_write = 0.0
        self._t0 = 0.0

    @property
    def dir(self) -> Path:
        """The stage's own folder inside the run directory."""
        return self.run.dir / self.name

    def __enter__(self) -> StageRun:
        from hallu import distributed as D

        if D.is_distributed():
            D.init()
        if not D.is_main():
            # One stage, not N: rank 0 takes the lock and decides; the other ranks follow its word.
            started = D.share(None, what=f"rank 0 to start stage '{self.name}'")
            if started.get("error"):
                raise HalluError(started["error"])
            self.fresh, self.previous, self._t0 = started["fresh"], started["previous"], time.time()
            return self
        try:
            self._start()
        except BaseException as e:
            D.share({"error": str(e) if isinstance(e, HalluError) else
                     f"rank 0 could not start stage '{self.name}' ({type(e).__name__}: {e})"})
            raise
        D.share({"error": None, "fresh": self.fresh, "previous": self.previous})
        return self

    def _start(self) -> None:
        """Rank 0: take the stage lock, decide whether earlier output resumes, mark the stage running."""
        from filelock import FileLock, Timeout

        from hallu import distributed as D

        self.run._mkdirs()
        self._lock = FileLock(str(self.run.lock_dir / f"{self.name}.lock"))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise HalluError(
                f"stage '{self.name}' in {self.run.dir} is already running in another process; "
                "wait for it or stop it first"
            ) from None
        try:
            inputs = {k: self.run.artifact(p) for k, p in self.input_paths.items()}
            prev = self.run.stage_record(self.name) or {}
            self.previous = prev
            self.fresh = not (
                prev.get("options_digest") == self.options_digest
                and {k: a["digest"] for k, a in prev.get("inputs", {}).items()}
                == {k: a["digest"] for k, a in inputs.items()}
            )
            self._t0 = time.time()

            def start(m: dict) -> None:
                m["stages"][self.name] = {
                    "status": "running",
                    "options": self.options,
                    "options_digest": self.options_digest,
                    "inputs": inputs,
                    "outputs": {},
                    "after": self.after,
                    "progress": prev.get("progress") if not self.fresh else None,
                    "attempts": prev.get("attempts", 0) + 1,
                    "error": None,
                    "started": now_iso(),
                    "ended": None,
                    "seconds": None,
                    "versions": library_versions(),
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "pid_started": process_start_token(os.getpid()),
                    "ranks": D.world_size(),
                }

            self.run.update(start)
        except BaseException:
            self._lock.release()
            raise

    def progress(self, done: int, total: int, force: bool = False) -> None:
        """Record progress; throttled, because item-level truth lives in the shards, not here."""
        if not is_main_process():
            return
        t = time.time()
        if not force and t - self._last_progress_write < _PROGRESS_WRITE_INTERVAL_S:
            return
        self._last_progress_write = t

        def change(m: dict) -> None:
            m["stages"][self.name]["progress"] = {"done": done, "total": total}

        self.run.update(change)

    def output(self, key: str, path: str | os.PathLike, count: int | None = None, **extra: Any) -> None:
        """Register an output artifact; its digest is taken when the stage finishes."""
        self.outputs[key] = {"path": Path(path), "count": count, **extra}

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not is_main_process():
            return False  # the record is rank 0's to finish
        try:
            ended = now_iso()
            seconds = round(time.time() - self._t0, 3)
            if exc is None:
                outs = {k: self.run.artifact(o.pop("path"), **o) for k, o in self.outputs.items()}

                def finish(m: dict) -> None:
                    rec = m["stages"][self.name]
                    rec.update(status="done", outputs=outs, ended=ended, seconds=seconds, **self.extra)
                    for key in ("pid", "host", "pid_started"):
                        rec.pop(key, None)
            else:
                if isinstance(exc, KeyboardInterrupt):
                    msg = "interrupted (Ctrl-C); rerun to resume"
                elif isinstance(exc, HalluError):
                    msg = str(exc)
                else:
                    msg = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"

                def finish(m: dict) -> None:
                    rec = m["stages"][self.name]
                    rec.update(status="failed", error=msg, ended=ended, seconds=seconds, **self.extra)
                    for key in ("pid", "host", "pid_started"):
                        rec.pop(key, None)

            self.run.update(finish)
        finally:
            self._lock.release()
        return False
