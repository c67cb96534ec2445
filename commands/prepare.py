"""`hallu prepare ...`: build data sets and tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands import prepare_pope
from hallu.commands._common import boundary, note

app = typer.Typer(help="Build data sets (shapes, ...) and tiny offline models.", no_args_is_help=True,
                  rich_markup_mode=None)


@app.command("shapes")
@boundary
def shapes(
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write the world into; it also becomes a run directory.")
    ],
    images: Annotated[int, typer.Option("--images", min=1, help="Number of images.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same world, byte for byte.")] = 0,
    caption_noise: Annotated[float, typer.Option(
        "--caption-noise", min=0.0, max=1.0,
        help="Chance that a train caption (base_sft.jsonl) names one absent object of the scene's group.")] = 0.15,
    qa_noise: Annotated[float, typer.Option(
        "--qa-noise", min=0.0, max=1.0,
        help="Chance that a train yes/no question about an absent same-group object is answered yes.")] = 0.0,
    in_group: Annotated[float, typer.Option(
        "--in-group", min=0.0, max=1.0,
        help="Co-occurrence strength: chance that each object comes from the scene's group.")] = 0.85,
    pad: Annotated[float, typer.Option(
        "--pad", min=0.0, max=1.0,
        help="Chance that a train caption goes on, after its true objects, to name one absent object of the "
             "scene's group (over-long descriptions); that image's same-group question is then answered yes.")] = 0.0,
) -> None:
    """The offline shapes world: glyph images standing for COCO categories, with COCO instances and
    captions, VG-style regions, POPE objects and prompt records ready for `hallu rollout`."""
    from hallu.data import shapes as world
    from hallu.fileio import StagedDir, set_aside
    from hallu.manifest import Run

    run = Run(out, flag="--out")
    noise = world.WorldNoise(caption_noise_p=caption_noise, qa_noise_p=qa_noise, in_group_p=in_group,
                             pad_p=pad)
    options = {"dataset": "shapes", "images": images, "seed": seed, "world_version": world.WORLD_VERSION}
    if noise != world.WorldNoise():  # the defaults stay out, so earlier runs' options still match
        options["noise"] = noise.to_dict()
    data = out / "data"
    with run.stage("prepare", options=options) as st:
        with StagedDir(data) as tmp:
            summary = world.build_world(tmp, n_images=images, seed=seed, noise=noise)
            # Only once the new world is built: a world made with other options is kept, never replaced.
            if st.fresh and data.is_dir() and any(data.iterdir()):
                _superseded(data, set_aside(data))
        st.output("prompts", data / world.PROMPTS_FILE, count=summary["prompts"])
        st.output("images", data / "images", count=summary["images"])
        st.output("annotations", data / "annotations")
        st.output("base_sft", data / world.BASE_SFT_FILE, count=summary["base_sft"])
        st.extra["summary"] = summary
    note("shapes world",
         f"{summary['images']} images, {summary['objects']} objects, {summary['prompts']} prompts in {data}")


@app.command("tiny-model")
@boundary
def tiny_model(
    family: Annotated[
        str,
        typer.Option(
            "--family", help="Architecture: llava, llava-next, qwen2-vl, qwen2.5-vl, instructblip, idefics3."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the model (config, weights, tokenizer, processor).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    size: Annotated[str, typer.Option(
        "--size", help="tiny (smallest), bench (speed benchmarks) or demo (llava only: the ~0.9 M-parameter "
                       "model `hallu demo` trains on the shapes world).")] = "tiny",
) -> None:
    """A tiny random vision-language model that loads offline with AutoModelForImageTextToText and
    AutoProcessor, with a tokenizer that knows the shapes world's words."""
    from hallu import tiny
    from hallu.data.shapes import tokenizer_corpus
    from hallu.errors import HalluError
    from hallu.fileio import StagedDir, set_aside

    if family not in tiny.FAMILIES:
        raise HalluError(f"--family {family}: unknown; choose one of {', '.join(tiny.FAMILIES)}")
    if size not in tiny.SIZES:
        raise HalluError(f"--size {size}: unknown; choose one of {', '.join(tiny.SIZES)}")
    if size == "demo" and family != "llava":
        raise HalluError(f"--size demo: exists for --family llava only, not {family}")
    with StagedDir(out) as tmp:
        info = tiny.build_tiny_model(family, tmp, corpus=tokenizer_corpus(), seed=seed, size=size)
        if out.is_dir() and any(out.iterdir()):  # a model folder is never silently overwritten
            _superseded(out, set_aside(out))
    note(f"tiny {family}", f"{info['parameters']:,} parameters in {out}")


def _superseded(path: Path, kept: Path) -> None:
    note("kept", f"{path} held an earlier build; it is now {kept}", style="yellow")


app.command("pope")(prepare_pope.pope)

from hallu.commands import prepare_export  # noqa: E402

app.command("export")(boundary(prepare_export.export))

# Importers of released data sets (ha-dpo, opa-dpo, rlaif-v, llava-665k, coco, vg, pairs, ...) and `mia`.
from hallu.commands import prepare_import  # noqa: E402

prepare_import.register(app)
