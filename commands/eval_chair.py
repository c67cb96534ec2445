"""`hallu eval chair`: CHAIR_s / CHAIR_i (+ OPERA's recall and len) of generated captions.

Score mode: ``--captions FILE --coco-annotations DIR [--json OUT.json]``. The scoring lives in
:func:`hallu.evals.chair.evaluate`, which takes ``[{"image_id", "caption"}]`` records, so a generation
mode (``--model M --images DIR --out DIR``) only has to produce those records and call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import (
    AllowOutsideImagesOpt,
    AttnOpt,
    BatchOpt,
    ChatTemplateOpt,
    DeviceOpt,
    DtypeOpt,
    EvalOutOpt,
    GpusOpt,
    NprocOpt,
    TrustOpt,
    boundary,
    note,
    out_console,
    relaunch_if_asked,
    template_arg,
)


@boundary
def chair(
    ctx: typer.Context,
    captions: Annotated[
        Path | None,
        typer.Option(
            "--captions",
            help="Generated captions: JSON list or JSONL of {image_id, caption}, "
            'or the official {"imgToEval": {...}}.',
        ),
    ] = None,
    coco_annotations: Annotated[
        Path | None,
        typer.Option(
            "--coco-annotations",
            help="Folder with instances_{train,val}2014.json and captions_{train,val}2014.json.",
        ),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write metrics, counts, per-caption items and settings here."),
    ] = None,
    image_id_key: Annotated[
        str, typer.Option("--image-id-key", help="Record key holding the COCO image id.")
    ] = "image_id",
    caption_key: Annotated[
        str, typer.Option("--caption-key", help="Record key holding the caption.")
    ] = "caption",
    unknown_images: Annotated[
        str,
        typer.Option(
            "--unknown-images",
            help="An image id absent from the annotations: error (default), or empty (score it against no "
            "objects, as the official script does).",
        ),
    ] = "error",
    model: Annotated[Path | None, typer.Option("--model", help="Caption the images with this model first.")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Image folder (e.g. COCO val2014).")] = None,
    out: EvalOutOpt = None,
    n_images: Annotated[int, typer.Option("--n-images", min=1, help="Images drawn (seeded) from --images.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the image draw (OPERA uses 42).")] = 42,
    prompt: Annotated[str, typer.Option(help="The captioning request.")] = "Please describe this image in detail.",
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Longest caption, in tokens (64 for 'CHAIR short').")
    ] = 512,
    batch_size: BatchOpt = 16,
    rescore: Annotated[
        bool, typer.Option("--rescore", help="Re-score the captions stored in --out; no model needed.")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "sdpa",
    trust_remote_code: TrustOpt = False,
    allow_outside_images: AllowOutsideImagesOpt = False,
    chat_template: ChatTemplateOpt = None,
    nproc: NprocOpt = None,
    gpus: GpusOpt = None,
) -> None:
    """CHAIR (Rohrbach et al. 2018) exactly as the official script computes it: score captions made
    elsewhere (--captions), or caption seeded images with --model first (OPERA's protocol)."""
    relaunch_if_asked(ctx, nproc, gpus, with_model=model is not None)
    from hallu.errors import HalluError
    from hallu.evals import chair as bench
    from hallu.evals.generation import check_model_knobs

    # Every choice-valued option is checked first: a typo costs one line and writes nothing.
    bench.check_unknown_images(unknown_images)
    check_model_knobs(dict(device=device, dtype=dtype, attn=attn, chat_template=template_arg(chat_template)))
    if model is not None or rescore:
        if captions is not None:
            raise HalluError("--captions scores captions made elsewhere; it cannot be combined with --model/--rescore")
        knobs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, dtype=dtype, attn=attn,
                     trust_remote_code=trust_remote_code, chat_template=template_arg(chat_template),
                     allow_outside_images=allow_outside_images)
        result, path = bench.evaluate_model(model, images, coco_annotations, out, rescore, knobs, n_images=n_images,
                                            seed=seed, prompt=prompt, unknown_images=unknown_images)
        out_console.print(metrics_table(result))
        if json_out is not None:
            from hallu.fileio import atomic_write_json

            atomic_write_json(json_out, result)
        note("chair", f"results in {path}")
        return
    if captions is None:
        raise HalluError("--captions FILE is required (the captions to score)")
    if coco_annotations is None:
        raise HalluError("--coco-annotations DIR is required (COCO 2014 instances and captions files)")
    result = bench.evaluate_file(
        captions,
        coco_annotations,
        image_id_key=image_id_key,
        caption_key=caption_key,
        unknown_images=unknown_images,
    )
    if json_out is not None:
        from hallu.fileio import atomic_write_json

        atomic_write_json(json_out, result)
    out_console.print(metrics_table(result))
    if json_out is not None:
        note("chair", f"results in {json_out}")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def metrics_table(result: dict):
    """A rich table of a CHAIR result: metrics x100 (len x100 reads as mean words per caption)."""
    from rich.table import Table

    m, c = result["metrics"], result["counts"]
    table = Table(title="CHAIR", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("from", style="dim")
    hall_caps = c["captions_with_hallucination"]
    table.add_row("CHAIR_s", _pct(m["chair_s"]), f"{hall_caps}/{c['captions']} captions")
    table.add_row("CHAIR_i", _pct(m["chair_i"]), f"{c['hallucinated_mentions']}/{c['mentions']} mentions")
    table.add_row("Recall", _pct(m["recall"]), f"{c['recalled_objects']}/{c['gt_objects']} gt objects")
    table.add_row("Len", _pct(m["len"]), f"{c['words']} words / {c['captions']} captions")
    return table
