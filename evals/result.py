"""Every benchmark's results leave through here: checked against :class:`hallu.records.EvalResult`.

A benchmark builds its result as a plain dict (its own keys included); :func:`finish` fills the
settings every result carries and returns the dict in the one shape, so a benchmark that forgot a key
fails in its own tests rather than in ``hallu eval compare``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ALL = "all"  # the split name of benchmarks without splits (CHAIR, SHR)


def one_split(metrics: dict, count: int) -> dict:
    """``splits`` of a benchmark that has none: one split, ``all``, holding the headline metrics."""
    return {ALL: {"metrics": dict(metrics), "count": count}}


def file_input(path: str | Path) -> dict:
    """An input's entry under ``settings.inputs``: where it was and its content digest."""
    from hallu.fileio import sha256_file

    return {"path": str(path), "sha256": sha256_file(path)}


def finish(result: dict[str, Any]) -> dict[str, Any]:
    """Fill the settings every result carries (null when they do not apply) and validate the shape."""
    from hallu.records import EvalResult

    settings = result.setdefault("settings", {})
    for key in ("parser", "request", "model_fingerprint"):
        settings.setdefault(key, None)
    settings.setdefault("inputs", {})
    return EvalResult.from_dict(result, f"{result.get('benchmark', 'eval')} result").to_dict()
