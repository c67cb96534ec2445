"""`hallu merge-lora`: fold a LoRA adapter into its base, verified on logits before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import TrustOpt, err_console


def merge_lora(
    adapter: Annotated[Path, typer.Option("--adapter", help="LoRA adapter folder (adapter_config.json + weights).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged model and its processor.")],
    base: Annotated[
        Path | None, typer.Option("--base", help="Base model folder (default: the one the adapter config names).")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Merge in float32 (exact), bfloat16 or float16.")] = "float32",
    atol: Annotated[
        float | None,
        typer.Option("--atol", min=0.0, help="Largest accepted logit difference (default 1e-4 in float32)."),
    ] = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Merge an adapter into its base; refuses to write when merged logits differ from base+adapter."""
    from hallu.train.merge import merge_lora as do_merge

    report = do_merge(adapter, out, base, dtype=dtype, atol=atol, trust_remote_code=trust_remote_code)
    err_console.print(
        f"[green]merge-lora[/]: {out} (max |logit diff| {report['max_abs_diff']:.2e} merged, "
        f"{report['max_abs_diff_reloaded']:.2e} reloaded; tolerance {report['atol']:g})"
    )
