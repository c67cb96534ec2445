"""`hallu rollout`: the policy's answers to every prompt, n samples each, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import (
    AllowOutsideImagesOpt,
    AttnOpt,
    ChatTemplateOpt,
    DeviceOpt,
    DtypeOpt,
    GpusOpt,
    ModelOpt,
    NprocOpt,
    RunOpt,
    TrustOpt,
    load_options,
    note,
    relaunch_if_asked,
)


def rollout(
    ctx: typer.Context,
    run: RunOpt,
    model: ModelOpt,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="Prompt records (JSONL); default: the run's prepared prompts.")
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Samples per prompt.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    greedy: Annotated[
        bool, typer.Option("--greedy", help="Greedy decoding instead of sampling (n must be 1).")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch (each with its n samples).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed; each batch derives its own, so resumed runs match.")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N prompts.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "sdpa",
    trust_remote_code: TrustOpt = False,
    allow_outside_images: AllowOutsideImagesOpt = False,
    chat_template: ChatTemplateOpt = None,
    nproc: NprocOpt = None,
    gpus: GpusOpt = None,
) -> None:
    """Sample the policy's answers (RUN/rollout/responses.jsonl). Rerunning resumes where it stopped."""
    relaunch_if_asked(ctx, nproc, gpus)
    from hallu.manifest import Run
    from hallu.rollout import RolloutOptions
    from hallu.rollout import rollout as run_rollout

    load = load_options(device, dtype, attn, trust_remote_code, chat_template)
    opts = RolloutOptions(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          greedy=greedy, batch_size=batch_size, seed=seed, limit=limit, load=load)
    opts.allow_outside_images = allow_outside_images
    result = run_rollout(Run(run), model, prompts, opts)
    note("rollout", f"{result['responses']} responses in {result['path']}")
