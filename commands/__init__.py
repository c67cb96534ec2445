"""The `hallu` command line: a Typer app whose commands are thin modules in this package.

Every command imports torch/transformers inside its function body, so `hallu --help` never pays for
them. Only capabilities that exist are registered.
"""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperGroup

from hallu import __version__
from hallu.commands import demo as _demo
from hallu.commands import dpo as _dpo
from hallu.commands import eval as _eval
from hallu.commands import merge_lora as _merge_lora
from hallu.commands import prepare as _prepare
from hallu.commands import revise as _revise
from hallu.commands import rollout as _rollout
from hallu.commands import sft as _sft
from hallu.commands import status as _status
from hallu.commands._common import boundary, install_sigterm_handler, state


class _PipelineOrder(TyperGroup):
    """List commands in pipeline order in `hallu --help`, not registration order."""

    ORDER = ("prepare", "rollout", "revise", "sft", "dpo", "merge-lora", "eval", "status", "demo")

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: self.ORDER.index(n) if n in self.ORDER else len(self.ORDER))


app = typer.Typer(
    name="hallu",
    cls=_PipelineOrder,
    help="The VLM hallucination-reduction loop: prepare -> rollout -> revise -> sft -> dpo -> merge-lora -> eval.",
    no_args_is_help=True,
    add_completion=False,
    # Help is plain text: rich markup would eat bracketed words such as the "[flash]" extra.
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hallu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    state.debug = debug or state.debug_from_env()
    install_sigterm_handler()  # a scheduler's SIGTERM stops a stage resumably, like Ctrl-C


app.add_typer(_prepare.app, name="prepare")
app.add_typer(_eval.app, name="eval")
app.command("rollout")(boundary(_rollout.rollout))
app.command("revise")(boundary(_revise.revise))
app.command("sft")(boundary(_sft.sft))
app.command("dpo")(boundary(_dpo.dpo))
app.command("merge-lora")(boundary(_merge_lora.merge_lora))
app.command("status")(boundary(_status.status))
app.command("demo")(boundary(_demo.demo))


def main() -> None:
    app()
