"""`hallu eval compare`: results of several runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import boundary, out_console


@boundary
def compare(
    results: Annotated[list[Path], typer.Argument(help="results.json files or eval run folders.")],
) -> None:
    """Print benchmark results side by side (one table per benchmark, one column per run), with the
    settings that make them comparable: parser, mode, prompt, judge, model."""
    from rich.table import Table

    from hallu.evals.compare import load_result, rows, settings_summary
    from hallu.records import EvalResult

    loaded = [load_result(p) for p in results]
    by_bench: dict[str, list[tuple[str, EvalResult]]] = {}
    for name, result in loaded:
        by_bench.setdefault(result.benchmark, []).append((name, result))
    for bench, runs in by_bench.items():
        table = Table(title=f"{bench.upper()} (rates in %)", title_justify="left")
        table.add_column("metric")
        for name, _ in runs:
            table.add_column(name, justify="right")
        per_run = [dict((label, (v, rate)) for label, v, rate in rows(r)) for _, r in runs]
        labels = list(dict.fromkeys(label for rr in per_run for label in rr))
        for label in labels:
            cells = []
            for rr in per_run:
                v, rate = rr.get(label, (None, False))
                cells.append("n/a" if v is None else (f"{100 * v:.2f}" if rate else f"{v:.3f}"))
            table.add_row(label, *cells)
        summaries = [settings_summary(r) for _, r in runs]
        keys = list(dict.fromkeys(k for s in summaries for k in s))
        if keys:
            table.add_section()
        for key in keys:
            values = [s.get(key, "") for s in summaries]
            style = "yellow" if len(set(values)) > 1 else "dim"
            table.add_row(f"[{style}]{key}[/]", *[f"[{style}]{v}[/]" for v in values])
        out_console.print(table)
