"""What every command shares: the error boundary, the console, and option types declared once."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from hallu.distributed import WorkerDone
from hallu.errors import HalluError, Terminated

# Messages and progress go to stderr; stdout carries only results (tables, JSON) so it can be piped.
err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


def note(label: str, message: str, style: str = "green") -> None:
    """``label: message`` on stderr, the label styled; ``message`` (paths, user text) is printed
    verbatim, never read as rich markup (a path like ``runs/[a]`` would vanish or crash the printer)."""
    err_console.print(Text.assemble((label, style), ": ", str(message)), soft_wrap=True)


def plain(text: str) -> str:
    """User text made safe to embed in a rich markup string."""
    return escape(str(text))


class _State:
    @staticmethod
    def debug_from_env() -> bool:
        return os.environ.get("HALLU_DEBUG", "") not in ("", "0")

    debug = debug_from_env()


state = _State()


def boundary(fn):
    """Turn a HalluError into one red line and exit code 2 (a traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HalluError as e:
            if state.debug:
                raise
            # The message is user text (paths, values): never markup, so "[x]" neither vanishes nor crashes.
            err_console.print(Text.assemble(("error:", "bold red"), " ", str(e)), soft_wrap=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            err_console.print(Text.assemble(("interrupted", "yellow"), "; rerun the same command to resume"))
            sys.exit(e.exit_code if isinstance(e, Terminated) else 130)
        except WorkerDone:  # a rank other than 0 whose share is merged: the rest is rank 0's
            sys.exit(0)

    return wrapper


def install_sigterm_handler() -> None:
    """Make SIGTERM stop a command the way Ctrl-C does (resumable, one line, exit 143)."""
    import signal

    def _terminate(signum, frame):
        raise Terminated()

    try:
        signal.signal(signal.SIGTERM, _terminate)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGTERM on this platform
        pass


RunOpt = Annotated[
    Path, typer.Option("--run", help="Run directory (holds manifest.json and every stage's outputs).")
]
ModelOpt = Annotated[
    Path,
    typer.Option("--model", help="Model folder, Hub id (org/name, from the Hugging Face cache) or PEFT adapter "
                                 "folder (anything AutoModelForImageTextToText loads)."),
]
DeviceOpt = Annotated[str, typer.Option(help="Device: auto (cuda if present, else cpu), cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[
    str, typer.Option(help="Weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
]
AttnOpt = Annotated[
    str,
    typer.Option(
        "--attn", help="Attention kernel: sdpa, eager, or flash_attention_2 (needs CUDA and the [flash] extra)."
    ),
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow the model folder's own Python code to run (off by default).")
]
ChatTemplateOpt = Annotated[
    Path | None,
    typer.Option("--chat-template", help="Jinja chat template file replacing the model's (default: the model's, "
                                         "else hallu's packaged one for its family)."),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per forward pass.")]
AllowOutsideImagesOpt = Annotated[
    bool,
    typer.Option("--allow-outside-images",
                 help="Let image paths climb out of the data folder with '..' (refused by default, so a downloaded "
                      "data file cannot make hallu open files elsewhere)."),
]
EvalOutOpt = Annotated[
    Path | None, typer.Option("--out", help="Run folder for generations.jsonl and results.json (with --model).")
]


def template_arg(chat_template: Path | None) -> str | None:
    """--chat-template as LoadOptions holds it (a path string, recorded in manifests as given)."""
    return str(chat_template) if chat_template else None


def load_options(device: str, dtype: str, attn: str, trust_remote_code: bool, chat_template: Path | None):
    """The model flags as one checked LoadOptions: typos fail here, before any file is read or written."""
    from hallu.models import LoadOptions

    return LoadOptions(device=device, dtype=dtype, attn=attn, trust_remote_code=trust_remote_code,
                       chat_template=template_arg(chat_template)).validate()


NprocOpt = Annotated[
    int | None,
    typer.Option("--nproc", min=1, help="Run as N processes on this machine (CPU ranks over gloo; one GPU each "
                                        "on a CUDA machine): hallu relaunches itself under accelerate launch."),
]
GpusOpt = Annotated[
    int | None,
    typer.Option("--gpus", min=1, help="Run as N processes, one per CUDA GPU (cuda:LOCAL_RANK, nccl), under "
                                       "accelerate launch."),
]


def relaunch_if_asked(ctx: typer.Context, nproc: int | None, gpus: int | None, with_model: bool = True) -> None:
    """With ``--nproc N`` / ``--gpus N`` (N > 1): run this same command as N ranks and exit with its code.

    Returns (doing nothing) without them, or for N = 1, which runs in this process. The ranks get the
    command line the user typed, rebuilt from the parsed options, minus --nproc/--gpus. ``with_model``:
    False for an eval that only scores stored answers, which has nothing to share out.
    """
    if nproc is None and gpus is None:
        return
    if not with_model:
        raise HalluError("--nproc/--gpus: only with --model (scoring stored answers runs in one process)")
    if (nproc or 1) <= 1 and (gpus or 1) <= 1 and not (nproc is not None and gpus is not None):
        return
    from hallu import distributed

    env = {"HALLU_DEBUG": "1"} if state.debug else {}
    sys.exit(distributed.relaunch(command_argv(ctx, drop=("nproc", "gpus")), nproc=nproc, gpus=gpus, env=env))


def command_argv(ctx, drop: tuple[str, ...] = ()) -> list[str]:
    """The command line of the running command (subcommand path + the options the user gave)."""
    path: list[str] = []
    c = ctx
    while c.parent is not None:
        path.insert(0, c.info_name)
        c = c.parent
    args: list[str] = []
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name)
        if p.name in drop or source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        value = ctx.params.get(p.name)
        if p.param_type_name != "option":
            args += [str(v) for v in (value if isinstance(value, list | tuple) else [value])]
            continue
        if p.is_flag and isinstance(value, bool):
            flag = p.opts[0] if value else (p.secondary_opts[0] if p.secondary_opts else None)
            args += [flag] if flag else []
        elif value is None:
            continue
        elif p.multiple:
            for v in value:
                args += [p.opts[0], _arg(v)]
        else:
            args += [p.opts[0], _arg(value)]
    return path + args


def _arg(value) -> str:
    return str(getattr(value, "value", value))


# -- training (sft, dpo): one declaration each -------------------------------------------------------------

TrainGpusOpt = Annotated[
    int | None, typer.Option("--gpus", help="Train on N GPUs: re-launches under accelerate with DeepSpeed ZeRO-3.")
]
TrainNprocOpt = Annotated[
    int | None, typer.Option("--nproc", help="Train as N processes (on CPU: ZeRO-3 over gloo).")
]
AccelOpt = Annotated[
    str | None,
    typer.Option(
        "--accelerate-config",
        help="zero2, zero3, zero3-offload (packaged DeepSpeed configs), a DeepSpeed .json or an accelerate .yaml.",
    ),
]
REPORT_TO = ("none", "tensorboard", "wandb")
ReportOpt = Annotated[str, typer.Option("--report-to", help="none, tensorboard or wandb.")]
LoraOpt = Annotated[bool, typer.Option("--lora/--full", help="Train a LoRA adapter (default) or every weight.")]
MaxStepsOpt = Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop after N optimizer steps.")]
GradAccumOpt = Annotated[int, typer.Option("--grad-accum", min=1, help="Gradient accumulation steps.")]
SaveStepsOpt = Annotated[int, typer.Option("--save-steps", min=1, help="Checkpoint every N steps (resume point).")]
LoggingStepsOpt = Annotated[int, typer.Option("--logging-steps", min=1, help="Log every N steps.")]


def check_report_to(report_to: str) -> None:
    if report_to not in REPORT_TO:
        raise HalluError(f"--report-to {report_to}: choose one of {', '.join(REPORT_TO)}")
