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
    num_beams: Annotated[
        int, typer.Option("--num-beams", min=1, help="Beam search with this many beams (> 1; n must be 1).")
    ] = 1,
    logprobs: Annotated[
        bool, typer.Option("--logprobs", help="Record each generated token's log-prob (raw logits) per response.")
    ] = False,
    capture_attention: Annotated[
        bool,
        typer.Option("--capture-attention",
                     help="MIA-DPO: record where each answer looks (per-image attention shares, the map of a "
                          "single image) and its perplexity, for `hallu revise --judge attention`."),
    ] = False,
    attention_layer: Annotated[
        int | None,
        typer.Option("--attention-layer", help="Decoder layer --capture-attention reads (0-based, negative from "
                                               "the end; default the middle one, 16 of 32 as MIA-DPO)."),
    ] = None,
    corrupted_images: Annotated[
        bool,
        typer.Option("--corrupted-images",
                     help="MIA-DPO: answer grid / pic-in-pic prompts from their noisy copy "
                          "(meta.mia.corrupted_image)."),
    ] = False,
    turn: Annotated[
        str, typer.Option("--turn", help="Multi-turn prompts: answer the last user turn (after the earlier ones) "
                                         "or the first question (its reference's turn; MIA-DPO).")
    ] = "last",
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
    opts.num_beams, opts.logprobs, opts.corrupted_images = num_beams, logprobs, corrupted_images
    opts.capture_attention, opts.attention_layer = capture_attention, attention_layer
    opts.turn = turn
    result = run_rollout(Run(run), model, prompts, opts)
    note("rollout", f"{result['responses']} responses in {result['path']}")
