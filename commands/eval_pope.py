"""`hallu eval pope`: score POPE answers with a named parser (score-only mode).

Question ids restart at 1 in every POPE file, so answers are tied to a question file either by giving
one ``--answers`` per ``--questions`` in the same order, or by one answers file whose records carry
``"split": <question file stem>``. Splits are named after the question file stems.

Generation (``--model M --images DIR --out DIR --mode generate|choice``) will plug in beside
``_score_only``: it produces the same ``answers_by_split`` mapping and calls the same ``_report``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import boundary, err_console, out_console

_TABLE_RATES = (("accuracy", "acc"), ("precision", "prec"), ("recall", "rec"), ("f1", "f1"),
                ("yes_ratio", "yes"))


@boundary
def pope(
    questions: Annotated[
        list[Path],
        typer.Option("--questions", help="POPE question file (JSONL or JSON array); repeat for several splits."),
    ],
    answers: Annotated[
        list[Path] | None,
        typer.Option("--answers", help="Answers JSONL {question_id, text|answer}: one per --questions in the "
                                       "same order, or one file whose records carry 'split'."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result (metrics, items) here.")] = None,
    parser: Annotated[
        str,
        typer.Option("--parser", help="pope-official (default), opera, vcd, lmms-eval, vlmevalkit or strict."),
    ] = "pope-official",
    answer_key: Annotated[
        str | None,
        typer.Option("--answer-key", help="Field holding the model's answer (default: 'text' or 'answer')."),
    ] = None,
) -> None:
    """Score POPE answers against question files: accuracy, precision, recall, F1 and yes-ratio per split
    and averaged over splits, under the chosen codebase's parsing rule."""
    from hallu.errors import HalluError
    from hallu.evals import pope as P

    if parser not in P.PARSERS:
        raise HalluError(f"--parser {parser}: unknown; choose one of {', '.join(P.PARSERS)}")
    if not answers:
        raise HalluError("--answers is required (score-only mode): the model's answers to the questions")
    result = _score_only(questions, answers, parser, answer_key)
    _report(result, json_out)


def _score_only(questions: list[Path], answers: list[Path], parser: str, answer_key: str | None) -> dict:
    from hallu.evals import pope as P
    from hallu.fileio import sha256_file

    by_split = P.load_questions(questions)
    splits = list(by_split)
    answer_files = [P.read_answers(a, answer_key) for a in answers]
    grouped = P.group_answers(answer_files, splits, [str(a) for a in answers])
    if len(answers) == len(splits):
        sources = {s: str(a) for s, a in zip(splits, answers, strict=True)}
    else:
        sources = {s: str(answers[0]) for s in splits}
    result = P.score(by_split, grouped, parser, answer_sources=sources)
    qset = result["settings"]["questions"]
    for split, path in zip(splits, questions, strict=True):
        qset[split].update({"file": str(path), "sha256": sha256_file(path)})
    result["settings"]["answers"] = [{"file": str(a), "sha256": sha256_file(a)} for a in answers]
    if answer_key:
        result["settings"]["answer_key"] = answer_key
    return result


def _fmt(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _report(result: dict, json_out: Path | None) -> None:
    from rich.table import Table

    from hallu.fileio import atomic_write_json

    splits = result["splits"]
    first = next(iter(splits.values()))["metrics"]
    has_unknown = "unknown" in first
    has_other = "other" in first
    table = Table(title=f"POPE ({result['parser']} parser), values in %", title_justify="left")
    table.add_column("split")
    table.add_column("n", justify="right")
    for _, head in _TABLE_RATES:
        table.add_column(head, justify="right")
    if has_unknown:
        table.add_column("unknown", justify="right")  # as a share, like the rates
    if has_other:
        table.add_column("other", justify="right")
    for head in ("tp", "fp", "tn", "fn"):
        table.add_column(head, justify="right")

    def add(name: str, m: dict, n: str, counts: bool) -> None:
        row = [name, n] + [_fmt(m.get(k)) for k, _ in _TABLE_RATES]
        if has_unknown:
            row.append(_fmt(m.get("unknown_ratio")))
        if has_other:
            row.append(str(m["other"]) if counts else "")
        row += [str(m[k]) if counts else "" for k in ("tp", "fp", "tn", "fn")]
        table.add_row(*row)

    for split, entry in splits.items():
        add(split, entry["metrics"], str(entry["count"]), True)
    if len(splits) > 1:
        table.add_section()
        add("mean", result["mean"], "", False)
        add("pooled", result["pooled"], str(sum(e["count"] for e in splits.values())), True)
    out_console.print(table)
    if result["parser"] == "lmms-eval":
        err_console.print("[yellow]note[/]: lmms-eval's yes column is its yes_ratio, the share of "
                          "ground-truth yes labels (not of predictions)")
    for split, entry in splits.items():
        for note in entry.get("notes", []):
            err_console.print(f"[yellow]note[/] ({split}): {note}")
    for note in result.get("notes", []):
        err_console.print(f"[yellow]note[/]: {note}")
    if json_out is not None:
        atomic_write_json(json_out, result)
        err_console.print(f"results written to {json_out}")
