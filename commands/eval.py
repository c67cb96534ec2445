"""`hallu eval ...`: the benchmarks (one module each) and `compare`."""

from __future__ import annotations

import typer

from hallu.commands import eval_pope

app = typer.Typer(help="Evaluate hallucination: POPE, CHAIR, SHR; compare results side by side.",
                  no_args_is_help=True)
app.command("pope")(eval_pope.pope)
