"""`hallu sft`: LoRA (or full) supervised fine-tuning on answers, resumable, optionally distributed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import (
    AccelOpt,
    ChatTemplateOpt,
    DtypeOpt,
    GradAccumOpt,
    LoggingStepsOpt,
    LoraOpt,
    MaxStepsOpt,
    ModelOpt,
    ReportOpt,
    RunOpt,
    SaveStepsOpt,
    TrainGpusOpt,
    TrainNprocOpt,
    TrustOpt,
    check_report_to,
    err_console,
    template_arg,
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Any SFTConfig field, key=value (repeatable), e.g. --set warmup_steps=10."),
]


def sft(
    run: RunOpt,
    model: ModelOpt,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Pairs, prompts with references, or SFT records (JSONL); default: the run's "
            "revised pairs, else its prepared prompts (held-out splits skipped).",
        ),
    ] = None,
    lora: LoraOpt = True,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/sft).")] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="Preset: sft (generic) or a DPO method; opa-dpo = OPA's r256/a512 "
            "LoRA on every linear layer incl. the vision tower, GT + revised.",
        ),
    ] = "sft",
    lora_r: Annotated[int | None, typer.Option("--lora-r", min=1, help="LoRA rank (default: the method's).")] = None,
    lora_alpha: Annotated[
        float | None, typer.Option("--lora-alpha", help="LoRA alpha (default: the method's).")
    ] = None,
    lora_dropout: Annotated[float | None, typer.Option("--lora-dropout", min=0.0, max=1.0)] = None,
    lora_target: Annotated[
        str | None, typer.Option("--lora-target", help="language, all-linear, or a regex over module names.")
    ] = None,
    lora_vision: Annotated[
        bool | None, typer.Option("--lora-vision/--no-lora-vision", help="Adapt the vision tower and projector too.")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="Learning rate (default: the method's).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", min=0.0, help="Passes over the data.")] = None,
    max_steps: MaxStepsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per device per step.")] = 4,
    grad_accum: GradAccumOpt = 1,
    max_length: Annotated[
        int, typer.Option("--max-length", min=1, help="Longest sequence in tokens (image tokens count).")
    ] = 1024,
    save_steps: SaveStepsOpt = 200,
    logging_steps: LoggingStepsOpt = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of weights init, data order and dropout.")] = 0,
    dtype: DtypeOpt = "auto",
    chat_template: ChatTemplateOpt = None,
    set_: SetOpt = None,
    report_to: ReportOpt = "none",
    gpus: TrainGpusOpt = None,
    nproc: TrainNprocOpt = None,
    accelerate_config: AccelOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Supervised fine-tuning on answers (loss on the answer tokens only). A rerun resumes from the last checkpoint."""
    from hallu.manifest import Run
    from hallu.train.launch import launch_if_requested
    from hallu.train.sft import SftOptions, load_examples, preset_for, run_sft

    check_report_to(report_to)
    preset = preset_for(method)
    from trl import SFTConfig

    from hallu.train.common import parse_set

    overrides = parse_set(set_ or [], SFTConfig)
    the_run = Run(run)
    if data is not None:
        load_examples(data, with_gt=preset.with_gt)  # bad data fails here, before any launch
    launch_if_requested(gpus, nproc, accelerate_config)
    opts = SftOptions(
        method=method,
        lora=lora,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_target=lora_target,
        lora_vision=lora_vision,
        learning_rate=lr,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        save_steps=save_steps,
        logging_steps=logging_steps,
        seed=seed,
        dtype=dtype,
        report_to=report_to,
        trust_remote_code=trust_remote_code,
        chat_template=template_arg(chat_template),
        overrides=overrides,
    )
    result = run_sft(the_run, model, data, out, opts)
    from hallu.train.common import is_rank_zero

    if is_rank_zero():
        resumed = f", resumed from {result['resumed_from']}" if result.get("resumed_from") else ""
        err_console.print(
            f"[green]sft[/]: {result['steps']} steps on {result['examples']} examples "
            f"(world size {result['world_size']}){resumed}; saved {result['final']}"
        )
