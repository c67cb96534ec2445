"""`hallu demo`: the whole loop on the offline shapes world, with a report of what it changed.

The orchestration lives in :mod:`hallu.demo` (stages, sub-runs, resume) and the report in
:mod:`hallu.report`; this module parses the flags and prints the tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import err_console, note, out_console


def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo (a rerun resumes it).")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed for the world, the model, training and sampling.")] = 0,
    quick: Annotated[bool, typer.Option(
        "--quick", help="120 DPO steps instead of 200 (the test suite's variant, ~11 min).")]
    = False,
    images: Annotated[int | None, typer.Option("--images", min=30, help="Images in the shapes world "
                                                "(default: the config's).")] = None,
) -> None:
    """Train a tiny LLaVA on the shapes world, run OPA-DPO and HA-DPO (and their SFT-only controls) from it,
    evaluate POPE and CHAIR on held-out images before and after, write DIR/report.{json,md,png}."""
    import dataclasses
    import time

    from hallu.demo import DemoConfig, run_demo

    config = DemoConfig.quick() if quick else DemoConfig()
    if images is not None:
        config = dataclasses.replace(config, images=images)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        err_console.rule(f"[bold]demo[/] {msg}", style="dim")

    report = run_demo(out, config, seed=seed, say=say)
    out_console.print((out / "report.md").read_text(encoding="utf-8"), markup=False, highlight=False)
    met = [name for name, m in report["methods"].items() if m["targets"]["all"]]
    note("demo", f"{time.perf_counter() - t0:.0f} s in this process; targets met by "
                 f"{', '.join(met) or 'no method'}; report in {out / 'report.json'}")
