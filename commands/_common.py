"""What every command shares: the error boundary, the console, and option types declared once."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hallu.errors import HalluError

# Messages and progress go to stderr; stdout carries only results (tables, JSON) so it can be piped.
err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


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
            err_console.print(f"[bold red]error:[/] {e}", soft_wrap=True, markup=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]; rerun the same command to resume")
            sys.exit(130)

    return wrapper


RunOpt = Annotated[
    Path, typer.Option("--run", help="Run directory (holds manifest.json and every stage's outputs).")
]
ModelOpt = Annotated[
    Path, typer.Option("--model", help="Local model folder (anything AutoModelForImageTextToText loads).")
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
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per forward pass.")]
EvalOutOpt = Annotated[
    Path | None, typer.Option("--out", help="Run folder for generations.jsonl and results.json (with --model).")
]
