"""`hallu sft`: LoRA (or full) supervised fine-tuning on answers, resumable, optionally distributed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import DtypeOpt, ModelOpt, RunOpt, TrustOpt, err_console

GpusOpt = Annotated[
    int | None, typer.Option("--gpus", help="Train on N GPUs: re-launches under accelerate with DeepSpeed ZeRO-3.")
]
NprocOpt = Annotated[int | None, typer.Option("--nproc", help="Train as N processes (on CPU: ZeRO-3 over gloo).")]
AccelOpt = Annotated[
    str | None,
    typer.Option(
        "--accelerate-config",
        help="zero2, zero3, zero3-offload (packaged DeepSpeed configs), a DeepSpeed .json or an accelerate .yaml.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Any SFTConfig field, key=value (repeatable), e.g. --set warmup_steps=10."),
]
ReportOpt = Annotated[str, typer.Option("--report-to", help="none, tensorboard or wandb.")]


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
    lora: Annotated[bool, typer.Option("--lora/--full", help="Train a LoRA adapter (default) or every weight.")] = True,
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
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop after N optimizer steps.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per device per step.")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Gradient accumulation steps.")] = 1,
    max_length: Annotated[
        int, typer.Option("--max-length", min=1, help="Longest sequence in tokens (image tokens count).")
    ] = 1024,
    save_steps: Annotated[
        int, typer.Option("--save-steps", min=1, help="Checkpoint every N steps (resume point).")
    ] = 200,
    logging_steps: Annotated[int, typer.Option("--logging-steps", min=1, help="Log every N steps.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of weights init, data order and dropout.")] = 0,
    dtype: DtypeOpt = "auto",
    chat_template: Annotated[
        str | None, typer.Option("--chat-template", help="A Jinja chat template file replacing the processor's.")
    ] = None,
    set_: SetOpt = None,
    report_to: ReportOpt = "none",
    gpus: GpusOpt = None,
    nproc: NprocOpt = None,
    accelerate_config: AccelOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Supervised fine-tuning on answers (loss on the answer tokens only). A rerun resumes from the last checkpoint."""
    from hallu.errors import HalluError
    from hallu.manifest import Run
    from hallu.train.launch import launch_if_requested
    from hallu.train.sft import SftOptions, load_examples, preset_for, run_sft

    if report_to not in ("none", "tensorboard", "wandb"):
        raise HalluError(f"--report-to {report_to}: choose none, tensorboard or wandb")
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
        chat_template=chat_template,
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
