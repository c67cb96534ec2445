"""`hallu prepare SOURCE --from PATH ... --out RUN`: released data sets into a run's records, and MIA-DPO
augmentation (`hallu prepare mia`).

Each importer lives in ``hallu.data.<source>``; this module only declares the options and hands over
to :func:`hallu.data._importing.run_import`, which writes ``RUN/data/prompts.jsonl`` (and
``pairs.jsonl``), inline images into ``RUN/data/images/``, and the ``prepare`` stage into the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import boundary, err_console, note

FromOpt = Annotated[
    list[Path], typer.Option("--from", help="A downloaded file or folder of the source (repeat for several).")
]
OutOpt = Annotated[Path, typer.Option("--out", help="Run directory to write the records into.")]
ImagesOpt = Annotated[
    Path | None, typer.Option("--images", help="Folder the records' image paths are relative to.")
]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="Stop at the first record whose image is missing (default: skip and count).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random draw (prompts, variants, subsets).")]

# command name -> (module in hallu.data, one-line help)
SOURCES = {
    "ha-dpo": ("ha_dpo", "HA-DPO desc_data.json / pope_data.json (images through --vg's image_data.json)."),
    "opa-dpo": ("opa_dpo", "OPA-DPO rollout JSON or saved `datasets` folder (report kept for token weights)."),
    "mia-dpo": ("mia_dpo", "MIA-DPO pairs: JSON list of {id, image, prompt, chosen, rejected, gt}."),
    "rlaif-v": ("rlaif_v", "RLAIF-V parquet shards from a local folder (--subset N: stratified draw)."),
    "llava-665k": ("llava_sft", "LLaVA-665k / ShareGPT `conversations` JSON as prompts (multi-turn kept)."),
    "coco": ("coco", "COCO instances and/or captions JSON as prompts with objects and captions."),
    "vg": ("vg", "Visual Genome image_data.json + region_descriptions.json as prompts with regions."),
    "pairs": ("pairs", "Existing preference pairs in TRL or LLaMA-Factory style."),
}


def _import(source: str, out: Path, sources: list[Path], images: Path | None, strict: bool, seed: int,
            **options) -> None:
    import importlib

    from rich.progress import Progress, SpinnerColumn, TextColumn

    from hallu.data._importing import run_import

    module = importlib.import_module(f"hallu.data.{SOURCES[source][0]}")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err_console, transient=True) as bar:
        task = bar.add_task(f"importing {source}", total=None)

        def progress(n: int) -> None:
            bar.update(task, description=f"{source}: {n:,} records")

        summary = run_import(source, module.read, out, sources, images=images, strict=strict, seed=seed,
                             options=options, progress=progress)
    _report(source, out, summary)


def _report(source: str, out: Path, s: dict) -> None:
    parts = [f"{s['prompts']:,} prompts"] + ([f"{s['pairs']:,} pairs"] if s["pairs"] else [])
    if s["images_written"] or s["images_reused"]:
        parts.append(f"{s['images_written']:,} images written")
    for label, key in (("skipped", "skipped"), ("filtered", "filtered")):
        if s[key]:
            parts.append(f"{label} " + ", ".join(f"{n:,} {why}" for why, n in s[key].items()))
    if s["renamed_duplicate_ids"]:
        parts.append(f"{s['renamed_duplicate_ids']:,} duplicate ids renamed")
    note(source, "; ".join(parts) + f" in {out / 'data'}")
    if s["skipped"]:
        note("first skip", next(iter(s["examples"].values())), style="yellow")
    if s.get("kept"):
        note("kept", f"{out / 'data'} held an earlier prepare; it is now {s['kept']}", style="yellow")


@boundary
def ha_dpo(
    out: OutOpt, sources: FromOpt, vg: Annotated[
        Path | None, typer.Option("--vg", help="Visual Genome folder with image_data.json and VG_100K*/.")] = None,
    sampling: Annotated[str, typer.Option(
        "--sampling", help="Style variants per image: offline (one pair, drawn), all (every pair), "
                           "online (one record with all variants).")] = "offline",
    images: ImagesOpt = None, strict: StrictOpt = False, seed: SeedOpt = 42,
) -> None:
    """HA-DPO description and POPE-style pairs, as HA-DPO's training code reads them."""
    from hallu.data.ha_dpo import SAMPLING
    from hallu.errors import HalluError

    if sampling not in SAMPLING:  # refused before the stage opens: a typo leaves no failed stage behind
        raise HalluError(f"--sampling {sampling}: unknown; choose one of {', '.join(SAMPLING)}")
    _import("ha-dpo", out, sources, images, strict, seed, vg=str(vg.resolve()) if vg else None, sampling=sampling)


@boundary
def rlaif_v(
    out: OutOpt, sources: FromOpt,
    subset: Annotated[int | None, typer.Option(
        "--subset", min=1, help="Draw N records stratified by origin_dataset (OPA-DPO's data step).")] = None,
    strict: StrictOpt = False, seed: SeedOpt = 42,
) -> None:
    """RLAIF-V preference pairs from its parquet shards; images written once by content digest."""
    _import("rlaif-v", out, sources, None, strict, seed, subset=subset)


@boundary
def llava_665k(
    out: OutOpt, sources: FromOpt, images: ImagesOpt = None,
    turns: Annotated[str, typer.Option(
        "--turns", help="first: ask the first question (conversation kept in meta); all: ask the last one "
                        "after the earlier turns (meta.turns, as rollout answers multi-turn prompts).")] = "first",
    strict: StrictOpt = False, seed: SeedOpt = 0,
) -> None:
    """LLaVA-665k / ShareGPT `conversations` JSON as prompts (streamed; multi-turn kept)."""
    from hallu.data.llava_sft import TURNS
    from hallu.errors import HalluError

    if turns not in TURNS:
        raise HalluError(f"--turns {turns}: unknown; choose one of {', '.join(TURNS)}")
    _import("llava-665k", out, sources, images, strict, seed, turns=turns)


def _plain(source: str, default_seed: int = 0):
    @boundary
    def command(out: OutOpt, sources: FromOpt, images: ImagesOpt = None, strict: StrictOpt = False,
                seed: SeedOpt = default_seed) -> None:
        _import(source, out, sources, images, strict, seed)

    command.__doc__ = SOURCES[source][1]
    return command


@boundary
def mia(
    prompts: Annotated[Path, typer.Option("--prompts", help="Single-image prompt records (JSONL).")],
    out: OutOpt,
    formats: Annotated[str, typer.Option(
        "--formats", help="Comma-separated layouts: sequence, grid, pip.")] = "sequence,grid,pip",
    refusal_every: Annotated[int, typer.Option(
        "--refusal-every", min=0, help="One sequence prompt in N also gets the refusal variant (0: none).")] = 50,
    strict: StrictOpt = False, seed: SeedOpt = 0,
) -> None:
    """MIA-DPO multi-image prompts from single-image ones: sequences, labelled grid collages and pic-in-pic
    composites (with the corrupted copies used to induce rejected answers)."""
    from hallu.data import mia as M

    summary = M.run_augment(prompts, out, formats=formats, refusal_every=refusal_every, strict=strict, seed=seed)
    by = ", ".join(f"{n:,} {f}" for f, n in summary["by_format"].items())
    note("mia", f"{summary['prompts']:,} prompts ({by}) in {out / 'data'}")
    if summary.get("kept"):
        note("kept", f"{out / 'data'} held an earlier prepare; it is now {summary['kept']}", style="yellow")


def register(app: typer.Typer) -> None:
    """Add the importers and `mia` to the `prepare` app."""
    app.command("ha-dpo")(ha_dpo)
    app.command("rlaif-v")(rlaif_v)
    app.command("llava-665k")(llava_665k)
    for name in ("opa-dpo", "mia-dpo", "coco", "vg", "pairs"):
        app.command(name, help=SOURCES[name][1])(_plain(name))
    app.command("mia")(mia)
