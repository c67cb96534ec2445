"""`hallu eval ...`: the benchmarks (one module each) and `compare`."""

from __future__ import annotations

import typer

from hallu.commands import eval_chair, eval_compare, eval_pope, eval_shr

app = typer.Typer(help="Evaluate hallucination: POPE, CHAIR, SHR; compare results side by side.",
                  no_args_is_help=True, rich_markup_mode=None)
app.command("pope")(eval_pope.pope)
app.command("chair")(eval_chair.chair)
app.command("shr")(eval_shr.shr)
app.command("compare")(eval_compare.compare)
