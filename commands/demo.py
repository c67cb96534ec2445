"""`hallu demo`: the pipeline, end to end, on the offline shapes world with a tiny model.

Today the loop is prepare -> tiny model -> rollout -> eval (POPE, CHAIR); each later stage joins the
demo when it lands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import err_console, note, out_console


def demo(
    out: Annotated[Path, typer.Option("--out", help="Run directory for the demo.")] = Path("runs/demo"),
    images: Annotated[int, typer.Option("--images", min=1, help="Images in the shapes world.")] = 200,
    n: Annotated[int, typer.Option("--n", min=1, help="Rollout samples per prompt.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed for the world, the model and sampling.")] = 0,
) -> None:
    """Run the whole loop offline on the shapes world with a tiny random model (a minute on a laptop CPU)."""
    from hallu.commands import eval_chair, prepare, status
    from hallu.data import pope as pope_data
    from hallu.errors import HalluError
    from hallu.evals import chair, pope
    from hallu.manifest import Run
    from hallu.rollout import RolloutOptions, rollout

    err_console.rule("[bold]hallu demo[/]: the shapes world")
    prepare.shapes(out=out, images=images, seed=seed)
    data = out / "data"
    model = out / "models" / "tiny-llava"
    if not (model / "config.json").exists():
        prepare.tiny_model(family="llava", out=model, seed=seed)

    err_console.rule("rollout")
    opts = RolloutOptions(n=n, max_new_tokens=32, batch_size=16, seed=seed)
    result = rollout(Run(out, flag="--out"), model, None, opts)
    note("rollout", f"{result['responses']} responses in {result['path']}")
    status.status(run=out)

    err_console.rule("eval: POPE (held-out images) and CHAIR")
    knobs = dict(max_new_tokens=16, batch_size=32, device="auto", dtype="auto", attn="sdpa", trust_remote_code=False)
    entries = pope_data.read_objects_file(data / "pope" / "objects.jsonl")
    eligible = sum(len(e.objects) >= pope_data.DEFAULT_SAMPLE_NUM for e in entries)
    try:
        built = pope_data.build(entries, seed=seed, images_per_split=min(50, eligible)) if eligible else None
    except HalluError as e:  # a world too small to draw negatives from
        note("POPE skipped", str(e), style="yellow")
        built = None
    if built is not None:
        files = pope_data.write_build(built, out / "pope", dataset="shapes")
        questions = [files[f"shapes_pope_{s}.json"] for s in pope_data.SPLITS]
        res, path = pope.evaluate_model(questions, model, data / "images", out / "eval-pope", "pope-official",
                                        False, dict(knobs, mode="generate", answer_suffix="none"))
        mean = res["mean"] if len(res["splits"]) > 1 else next(iter(res["splits"].values()))["metrics"]
        note("POPE", f"(mean over splits) accuracy {mean['accuracy']:.3f}, "
                     f"F1 {mean['f1'] if mean['f1'] is None else round(mean['f1'], 3)} -> {path}")
    res, path = chair.evaluate_model(model, data / "images", data / "annotations", out / "eval-chair", False,
                                     knobs, n_images=min(50, images))
    out_console.print(eval_chair.metrics_table(res))
    note("CHAIR", f"-> {path}. A random model describes nothing; later stages train it.")
