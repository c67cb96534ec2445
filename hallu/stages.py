"""The item-level stage loop shared by rollout and eval generation: fixed batches, resume, ranks, progress.

Items are cut into fixed batches *before* anything is skipped, and each batch gets its own seed, so a
batch computes the same records whether it runs in the first attempt or after a crash: a resumed
stage skips the batches it finished, recomputes a batch it had only partly written (writing just the
missing records), and finally rewrites its output in input order. The result is byte-identical to an
uninterrupted run.

Under N ranks (see :mod:`hallu.distributed`) the same batches are dealt out in turn: the batches
still to do, in order, go to rank 0, 1, ..., N-1, 0, 1, ... Each rank appends to its own shard
``<out>.rank<R>.jsonl``; when every rank is done, rank 0 merges the shards into ``<out>`` in input
order, so N ranks write the bytes one process writes. A launch that dies leaves its shards; the next
attempt (any N, or one process) first folds every leftover shard into ``<out>``, then resumes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.fileio import atomic_write_text
from hallu.manifest import StageRun
from hallu.shards import JsonlShard

_SHARD_PROGRESS_INTERVAL_S = 2.0


def batch_seed(seed: int, batch_index: int) -> int:
    return (seed * 1_000_003 + batch_index) % (2**63)


def run_batched(
    stage: StageRun,
    out_path: Path,
    items: Sequence[Any],
    *,
    batch_size: int,
    record_ids: Callable[[Any], list[str]],
    work: Callable[[list[Any], int], list[dict]],
    label: str,
    key: str = "id",
) -> int:
    """Run ``work(batch, batch_index)`` over fixed batches of ``items``; return the records written.

    ``record_ids(item)`` lists the ids of the records an item produces (e.g. one per sample), so a
    batch is known to be finished without running it. ``work`` returns records carrying those ids.

    Under several ranks every rank calls this with the same arguments; it returns on rank 0 only,
    after the merge. The other ranks leave through :class:`~hallu.distributed.WorkerDone` once their
    batches are written: what follows the loop (outputs, scoring, the manifest) is rank 0's.
    """
    from hallu import distributed as D

    out_path = Path(out_path)
    world, me = D.world_size(), D.rank()
    batches = [list(items[s : s + batch_size]) for s in range(0, len(items), batch_size)]
    batch_ids = [[rid for it in batch for rid in record_ids(it)] for batch in batches]
    expected = [rid for ids in batch_ids for rid in ids]
    total = len(expected)

    if me == 0:
        fold_leftover_shards(out_path, key)
        main = JsonlShard(out_path, key=key)
        done = set(main.open(fresh=stage.fresh))  # sets a superseded output aside, cuts a torn tail
        if world > 1:
            main.close()
    D.barrier(f"rank 0 to prepare {out_path.name}")
    if world == 1:
        shard = main
    else:
        done = set(complete_lines(out_path, key)) if out_path.exists() else set()
        shard = JsonlShard(rank_shard_path(out_path, me), key=key)
        shard.open()

    pending = [b for b, ids in enumerate(batch_ids) if not all(i in done for i in ids)]
    mine = pending[me::world]
    my_total = len(done & set(expected)) + sum(len(batch_ids[b]) for b in mine) if world > 1 else total
    shown = label if world == 1 else f"{label} (rank {me}/{world})"
    counted = _ShardCounter(out_path, world)
    try:
        with _progress(shown, my_total, len(done & set(expected))) as advance:
            for b in mine:
                records = [r for r in work(list(batches[b]), b) if r[key] not in done]
                shard.append(records)
                done.update(r[key] for r in records)
                advance(len(records))
                if me == 0:
                    stage.progress(len(done) + counted.others(), total)
    finally:
        shard.close()
    D.barrier("every rank to finish its batches")
    D.leave_if_worker()
    _merge_in_order(out_path, [rank_shard_path(out_path, r) for r in range(world)] if world > 1 else [],
                    expected, key)
    D.teardown()
    stage.progress(total, total, force=True)
    return total


def rank_shard_path(out_path: Path, rank: int) -> Path:
    """Where rank ``rank`` appends its records while a multi-rank stage runs."""
    return out_path.with_name(f"{out_path.stem}.rank{rank}{out_path.suffix}")


def leftover_shards(out_path: Path) -> list[Path]:
    """Rank shards an earlier launch left beside ``out_path`` (any number of ranks), in rank order."""
    pattern = re.compile(re.escape(out_path.stem) + r"\.rank(\d+)" + re.escape(out_path.suffix) + "$")
    found = [(int(m.group(1)), p) for p in out_path.parent.glob(f"{out_path.stem}.rank*{out_path.suffix}")
             if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def complete_lines(path: Path, key: str = "id") -> dict[str, str]:
    """``{id: line}`` of the whole records in a stage output or shard (first occurrence wins).

    Read-only: a torn last line (a killed writer) is ignored, not cut, so any rank may look.
    """
    data = path.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    lines: dict[str, str] = {}
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            rid = str(json.loads(line)[key])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise HalluError(f"{path}:{lineno}: corrupt line in a stage output (not a JSON record with "
                             f"'{key}'); delete the file to start the stage over") from None
        lines.setdefault(rid, line)
    return lines


def finished_ids(out_path: Path, key: str = "id") -> set[str]:
    """Ids already written to ``out_path`` or to rank shards beside it (read-only)."""
    out_path = Path(out_path)
    ids: set[str] = set()
    # Shards first: rank 0 folds them by replacing the output before deleting them, so a shard that
    # vanished meanwhile is already in the output read next.
    for p in [*leftover_shards(out_path), out_path]:
        try:
            ids.update(complete_lines(p, key))
        except FileNotFoundError:
            pass
    return ids


def fold_leftover_shards(out_path: Path, key: str = "id") -> None:
    """Rank 0, before work starts: move the records of an earlier launch's shards into ``out_path``.

    The output is replaced atomically before the shards are deleted, so a crash in between only
    leaves records twice (harmless: first occurrence wins), never loses one.
    """
    shards = leftover_shards(out_path)
    if not shards:
        return
    lines = complete_lines(out_path, key) if out_path.exists() else {}
    for p in shards:
        for rid, line in complete_lines(p, key).items():
            lines.setdefault(rid, line)
    atomic_write_text(out_path, "".join(line + "\n" for line in lines.values()))
    for p in shards:
        p.unlink(missing_ok=True)


def _merge_in_order(out_path: Path, shards: list[Path], expected: list[str], key: str) -> None:
    """Write the output and the ranks' shards as one file in input order (atomic), then drop the shards."""
    lines = complete_lines(out_path, key)
    for p in shards:
        for rid, line in complete_lines(p, key).items():
            lines.setdefault(rid, line)
    missing = [i for i in expected if i not in lines]
    if missing:  # a work function that dropped records is a bug, not a user error
        raise RuntimeError(f"{out_path}: {len(missing)} records were never written (first: {missing[0]})")
    atomic_write_text(out_path, "".join(lines[i] + "\n" for i in expected))
    for p in shards:
        p.unlink(missing_ok=True)


class _ShardCounter:
    """Rank 0's view of the other ranks' progress: lines in their shards, counted every few seconds."""

    def __init__(self, out_path: Path, world: int):
        self.paths = [rank_shard_path(out_path, r) for r in range(1, world)] if world > 1 else []
        self._last, self._count = 0.0, 0

    def others(self) -> int:
        if self.paths and time.monotonic() - self._last >= _SHARD_PROGRESS_INTERVAL_S:
            self._last = time.monotonic()
            self._count = sum(p.read_bytes().count(b"\n") for p in self.paths if p.exists())
        return self._count


class _progress:
    """A rich progress bar on stderr (quiet when stderr is not a terminal)."""

    def __init__(self, label: str, total: int, completed: int):
        self.label, self.total, self.completed = label, total, completed

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        # The label may hold user text (a file name): shown verbatim, not as rich markup.
        self._bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), console=console, disable=not console.is_terminal)
        self._bar.__enter__()
        task = self._bar.add_task(self.label, total=self.total, completed=self.completed)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc):
        self._bar.__exit__(*exc)
        return False
