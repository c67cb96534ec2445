"""`hallu demo`: the pipeline, end to end, on the offline shapes world with a tiny model.

Today the loop is prepare -> tiny model -> rollout; each later stage joins the demo when it lands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import err_console


def demo(
    out: Annotated[Path, typer.Option("--out", help="Run directory for the demo.")] = Path("runs/demo"),
    images: Annotated[int, typer.Option("--images", min=1, help="Images in the shapes world.")] = 200,
    n: Annotated[int, typer.Option("--n", min=1, help="Rollout samples per prompt.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed for the world, the model and sampling.")] = 0,
) -> None:
    """Run the whole loop offline on the shapes world with a tiny random model (minutes on a laptop CPU)."""
    from hallu.commands import prepare, status
    from hallu.manifest import Run
    from hallu.rollout import RolloutOptions, rollout

    err_console.rule("[bold]hallu demo[/]: the shapes world")
    prepare.shapes(out=out, images=images, seed=seed)
    model = out / "models" / "tiny-llava"
    if not (model / "config.json").exists():
        prepare.tiny_model(family="llava", out=model, seed=seed)
    err_console.rule("rollout")
    result = rollout(Run(out), model, None, RolloutOptions(n=n, max_new_tokens=32, batch_size=16, seed=seed))
    err_console.print(f"[green]rollout[/]: {result['responses']} responses in {result['path']}")
    status.status(run=out)
