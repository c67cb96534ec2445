"""`hallu prepare pope`: build POPE's random / popular / adversarial question files.

Reproduces the official generator (AoiDragon/POPE @ 08d957b9) draw for draw after ``random.seed(S)``;
see ``hallu.data.pope``. Without ``--seed`` a fresh seed is drawn, printed and recorded in
``{dataset}_build.json``, so any build can be made again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import boundary, err_console


@boundary
def pope(
    out: Annotated[Path, typer.Option("--out", help="Folder for the question files (created if missing).")],
    objects: Annotated[
        Path | None,
        typer.Option("--objects", help="POPE objects file: JSONL {\"image\", \"objects\": [...]} per image."),
    ] = None,
    coco_instances: Annotated[
        Path | None,
        typer.Option("--coco-instances", help="COCO instances JSON; objects = distinct category names of "
                                              "each image's annotations, in annotation order."),
    ] = None,
    images_per_split: Annotated[
        int, typer.Option("--images-per-split", min=1,
                          help="Images drawn; each gives 2 x sample-num questions.")
    ] = 500,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Same output as the official generator after random.seed(SEED). "
                                    "Default: a fresh seed, printed and recorded."),
    ] = None,
    dataset: Annotated[
        str, typer.Option("--dataset", help="File name prefix: {dataset}_pope_random.json ...")
    ] = "coco",
    sample_num: Annotated[
        int, typer.Option("--sample-num", min=1, help="Positives (and negatives) per image; images need at "
                                                      "least this many objects.")
    ] = 3,
    template: Annotated[
        str, typer.Option("--template", help="Question template with one {} for the object.")
    ] = "Is there a {} in the image?",
    an_template: Annotated[
        str | None,
        typer.Option("--an-template", help="Template for names starting with a vowel. Default: the article "
                                           "'a' before {} becomes 'an'."),
    ] = None,
) -> None:
    """POPE question files from object annotations, exactly as the official generator builds them:
    {dataset}_pope_{random,popular,adversarial}.json, {dataset}_ground_truth_objects.json,
    {dataset}_co_occur.json, and {dataset}_build.json (seed, settings, digests)."""
    import secrets

    from hallu.data import pope as P
    from hallu.errors import HalluError
    from hallu.fileio import sha256_file

    if (objects is None) == (coco_instances is None):
        raise HalluError("give exactly one of --objects FILE or --coco-instances FILE")
    if objects is not None:
        entries = P.read_objects_file(objects)
        source = {"objects": str(objects), "sha256": sha256_file(objects)}
    else:
        entries = P.read_coco_instances(coco_instances)
        source = {"coco_instances": str(coco_instances), "sha256": sha256_file(coco_instances)}
    seed_given = seed is not None
    if seed is None:
        seed = secrets.randbits(32)
    # Everything is computed before anything is written: an error leaves --out untouched.
    result = P.build(entries, seed=seed, images_per_split=images_per_split, sample_num=sample_num,
                     template=template, an_template=an_template)
    result.settings["seed_given"] = seed_given
    P.write_build(result, out, dataset=dataset, source=source)
    n = len(result.questions[P.SPLITS[0]])
    err_console.print(
        f"[green]POPE[/]: 3 splits x {n} questions ({images_per_split} of {result.eligible} eligible images, "
        f"seed {seed}{'' if seed_given else ', drawn'}) in {out}"
    )
