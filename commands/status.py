"""`hallu status`: every stage of a run, its state, its progress, and why it is stale."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import RunOpt, out_console

_STYLE = {"done": "green", "running": "cyan", "failed": "red", "stale": "yellow", "pending": "dim"}


def status(
    run: RunOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stages as JSON instead of a table.")] = False,
) -> None:
    """Show every stage of a run: state, progress, outputs, and why a stage is stale."""
    from rich.table import Table
    from rich.text import Text

    from hallu.errors import HalluError
    from hallu.manifest import Run

    if not Path(run).exists():
        raise HalluError(f"--run {run}: no such run directory")
    r = Run(run)
    if not r.path.exists():
        raise HalluError(f"--run {run}: no manifest.json here (no stage has run in this directory)")
    views = r.views()
    if as_json:
        rows = [{"stage": v.name, "status": v.status, "progress": list(v.progress) if v.progress else None,
                 "reasons": v.reasons} for v in views]
        out_console.print_json(json.dumps(rows))
        return
    # Every cell is Text: stage names, paths and reasons are user text, never rich markup.
    table = Table(title=Text(f"run {run}"), title_justify="left")
    for col in ("stage", "state", "progress", "details"):
        table.add_column(col)
    for v in views:
        prog = f"{v.progress[0]}/{v.progress[1]}" if v.progress else ""
        details = "; ".join(v.reasons)
        if not details and v.status == "done":
            outs = v.record.get("outputs", {})
            details = ", ".join(
                f"{k}: {o['count']} items" if o.get("count") is not None else k for k, o in outs.items()
            )
            if v.record.get("seconds") is not None:
                details += f" ({v.record['seconds']:.1f} s)"
        table.add_row(Text(v.name), Text(v.status, style=_STYLE[v.status]), prog, Text(details))
    out_console.print(table)
