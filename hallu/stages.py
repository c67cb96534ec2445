"""The item-level stage loop shared by rollout and eval generation: fixed batches, resume, progress.

Items are cut into fixed batches *before* anything is skipped, and each batch gets its own seed, so a
batch computes the same records whether it runs in the first attempt or after a crash: a resumed
stage skips the batches it finished, recomputes a batch it had only partly written (writing just the
missing records), and finally rewrites its output in input order. The result is byte-identical to an
uninterrupted run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hallu.fileio import atomic_write_text
from hallu.manifest import StageRun
from hallu.shards import JsonlShard


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
    """
    shard = JsonlShard(out_path, key=key)
    done = set(shard.open(fresh=stage.fresh))
    expected = [rid for it in items for rid in record_ids(it)]
    total = len(expected)
    try:
        with _progress(label, total, len(done & set(expected))) as advance:
            for b, start in enumerate(range(0, len(items), batch_size)):
                batch = items[start : start + batch_size]
                ids = [rid for it in batch for rid in record_ids(it)]
                if all(i in done for i in ids):
                    continue
                records = [r for r in work(list(batch), b) if r[key] not in done]
                shard.append(records)
                done.update(r[key] for r in records)
                advance(len(records))
                stage.progress(len(done), total)
    finally:
        shard.close()
    _rewrite_in_order(out_path, expected, key)
    stage.progress(total, total, force=True)
    return total


def _rewrite_in_order(path: Path, expected: list[str], key: str) -> None:
    """Rewrite the shard in input order, keeping only expected ids (atomic)."""
    lines = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        lines[str(json.loads(line)[key])] = line
    missing = [i for i in expected if i not in lines]
    if missing:  # a work function that dropped records is a bug, not a user error
        raise RuntimeError(f"{path}: {len(missing)} records were never written (first: {missing[0]})")
    atomic_write_text(path, "".join(lines[i] + "\n" for i in expected))


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
