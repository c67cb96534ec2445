"""`hallu prepare export`: a run's preference pairs as a TRL `datasets` folder or a LLaMA-Factory data set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import AllowOutsideImagesOpt, note


def export(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the exported data set into.")],
    run: Annotated[
        Path | None, typer.Option("--run", help="Run directory whose revise stage made the pairs.")
    ] = None,
    pairs: Annotated[
        Path | None, typer.Option("--pairs", help="Preference pairs (JSONL) instead of a run's.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="trl (datasets folder, images as Image features) or llama-factory.")
    ] = "trl",
    allow_outside_images: AllowOutsideImagesOpt = False,
) -> None:
    """Write preference pairs for another trainer: `--format trl` is a `datasets` folder stock TRL
    DPOTrainer trains on (load_from_disk); `--format llama-factory` is pairs.json + dataset_info.json."""
    from hallu.errors import HalluError
    from hallu.export import export_pairs
    from hallu.manifest import Run

    if (run is None) == (pairs is None):
        raise HalluError("prepare export: give exactly one of --run RUN or --pairs FILE")
    if pairs is None:
        r = Run(run)
        rec = r.stage_record("revise") or {}
        if rec.get("status") != "done" or "pairs" not in rec.get("outputs", {}):
            raise HalluError(f"--run {run}: no finished revise stage with pairs; run `hallu revise` first "
                             "or pass --pairs FILE")
        pairs = r.resolve(rec["outputs"]["pairs"]["path"])
    result = export_pairs(pairs, out, fmt, allow_outside_images=allow_outside_images)
    note("export", f"{result['pairs']} pairs as {result['format']} in {result['out']}")
