"""`hallu dpo`: preference optimisation by method (dpo, ha-dpo, opa-dpo, clip-dpo, mia-dpo), resumable."""

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


def dpo(
    run: RunOpt,
    model: ModelOpt,
    method: Annotated[str, typer.Option("--method", help="dpo, ha-dpo, opa-dpo, clip-dpo or mia-dpo.")] = "dpo",
    pairs: Annotated[
        Path | None, typer.Option("--pairs", help="Preference pairs (JSONL); default: the run's revise output.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/dpo).")] = None,
    sft_data: Annotated[
        Path | None,
        typer.Option("--sft-data", help="SFT data for the auxiliary LM term (HA-DPO's gamma; pairs, prompts with "
                                        "references or SFT records); default: the run's prepared prompts."),
    ] = None,
    max_steps: MaxStepsOpt = None,
    lora: LoraOpt = True,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="A DPOConfig field (key=value, e.g. beta=0.2) or a method option "
                                   "(<method>.<option>=value, e.g. opa-dpo.position_wise=true); repeatable."),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option("--reference", help="precomputed (the frozen start, one pass before training) or "
                                         "adapter-off (LoRA only); default: the method's."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Pairs per device per step.")] = 4,
    grad_accum: GradAccumOpt = 1,
    save_steps: SaveStepsOpt = 200,
    logging_steps: LoggingStepsOpt = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order, LoRA init and dropout.")] = 0,
    dtype: DtypeOpt = "auto",
    chat_template: ChatTemplateOpt = None,
    report_to: ReportOpt = "none",
    gpus: TrainGpusOpt = None,
    nproc: TrainNprocOpt = None,
    accelerate_config: AccelOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Train a policy on preference pairs with the method's loss. Rerunning resumes from the last checkpoint."""
    from hallu.manifest import Run
    from hallu.methods import get_method
    from hallu.train.dpo import DpoOptions, run_dpo
    from hallu.train.launch import launch_if_requested

    check_report_to(report_to)
    get_method(method)  # a typo fails before any launch
    launch_if_requested(gpus, nproc, accelerate_config)
    opts = DpoOptions(method=method, lora=lora, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                      save_steps=save_steps, logging_steps=logging_steps, seed=seed, dtype=dtype,
                      reference=reference, report_to=report_to, trust_remote_code=trust_remote_code,
                      chat_template=template_arg(chat_template), set_items=list(set_ or []), sft_data=sft_data)
    result = run_dpo(Run(run), model, pairs, out, opts,
                     warn=lambda msg: err_console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True))
    from hallu.train.common import is_rank_zero

    if is_rank_zero():
        err_console.print(f"[green]dpo[/] ({method}): {result['steps']} steps on {result['pairs']} pairs, "
                          f"saved {result['final']}")
