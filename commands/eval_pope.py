"""`hallu eval pope`: score POPE answers with a named parser (score-only mode).

Question ids restart at 1 in every POPE file, so answers are tied to a question file either by giving
one ``--answers`` per ``--questions`` in the same order, or by one answers file whose records carry
``"split": <question file stem>``. Splits are named after the question file stems.

With ``--model M --images DIR --out DIR`` the model answers first (the official protocol: greedy, the
question inside the model's chat template, an optional answer suffix), through the shared engine, into
``OUT/generations.jsonl`` (resumable; identical questions across splits are asked once), and the
results go to ``OUT/results.json``. ``--mode choice`` compares the first-token logits of "Yes" and "No"
in one forward instead of generating. ``--rescore --out DIR`` re-parses the stored answers (with any
``--parser``) without loading the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import (
    AllowOutsideImagesOpt,
    AttnOpt,
    BatchOpt,
    ChatTemplateOpt,
    DeviceOpt,
    DtypeOpt,
    EvalOutOpt,
    GpusOpt,
    NprocOpt,
    TrustOpt,
    boundary,
    err_console,
    out_console,
    plain,
    relaunch_if_asked,
    template_arg,
)

# Rows of the terminal table: (metric key, label, is a rate shown in %).
_ROWS = (
    ("accuracy", "accuracy", True), ("precision", "precision", True), ("recall", "recall", True),
    ("f1", "f1", True), ("yes_ratio", "yes ratio", True), ("unknown_ratio", "unknown", True),
    ("tp", "tp", False), ("fp", "fp", False), ("tn", "tn", False), ("fn", "fn", False),
    ("other", "other", False),
)


@boundary
def pope(
    ctx: typer.Context,
    questions: Annotated[
        list[Path] | None,
        typer.Option("--questions",
                     help="POPE question file (JSONL or JSON array); repeat for several splits."),
    ] = None,
    answers: Annotated[
        list[Path] | None,
        typer.Option("--answers", help="Answers {question_id, text|answer} (JSONL, JSON array or concatenated "
                                       "objects): one per --questions in the same order, or one file whose "
                                       "records carry 'split'. POPE's own {question, answer} files (no ids) "
                                       "align by position, each question text checked."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the full result (metrics, items) here.")
    ] = None,
    parser: Annotated[
        str,
        typer.Option("--parser",
                     help="pope-official (default), opera, vcd, lmms-eval, vlmevalkit or strict."),
    ] = "pope-official",
    answer_key: Annotated[
        str | None,
        typer.Option("--answer-key", help="Field holding the model's answer (default: 'text' or 'answer')."),
    ] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Generate the answers with this model.")] = None,
    images: Annotated[
        Path | None, typer.Option("--images", help="Folder holding the question files' images.")
    ] = None,
    out: EvalOutOpt = None,
    mode: Annotated[
        str, typer.Option("--mode", help="generate (the official protocol) or choice (Yes/No logits, one forward).")
    ] = "generate",
    answer_suffix: Annotated[
        str, typer.Option("--answer-suffix", help="none (official POPE, OPERA), llava, or vcd.")
    ] = "none",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest generated answer, in tokens.")] = 128,
    batch_size: BatchOpt = 32,
    rescore: Annotated[
        bool, typer.Option("--rescore", help="Re-parse the answers stored in --out; no model needed.")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "sdpa",
    trust_remote_code: TrustOpt = False,
    allow_outside_images: AllowOutsideImagesOpt = False,
    chat_template: ChatTemplateOpt = None,
    nproc: NprocOpt = None,
    gpus: GpusOpt = None,
) -> None:
    """Score POPE answers against question files: accuracy, precision, recall, F1 and yes-ratio per split
    and averaged over splits, under the chosen codebase's parsing rule."""
    relaunch_if_asked(ctx, nproc, gpus, with_model=model is not None)
    from hallu.errors import HalluError
    from hallu.evals import pope as P
    from hallu.evals.generation import check_model_knobs

    # Every choice-valued option is checked first: a typo costs one line and writes nothing.
    P.check_options(parser, mode, answer_suffix)
    check_model_knobs(dict(mode=mode, device=device, dtype=dtype, attn=attn,
                           chat_template=template_arg(chat_template)))
    if model is not None or rescore:
        if answers:
            raise HalluError("--answers scores answers made elsewhere; it cannot be combined with --model/--rescore")
        from hallu.evals.pope import evaluate_model

        result, results_path = evaluate_model(
            questions, model, images, out, parser, rescore,
            dict(mode=mode, answer_suffix=answer_suffix, max_new_tokens=max_new_tokens, batch_size=batch_size,
                 device=device, dtype=dtype, attn=attn, trust_remote_code=trust_remote_code,
                 chat_template=template_arg(chat_template), allow_outside_images=allow_outside_images),
        )
        _report(result, json_out)
        err_console.print(f"results written to {results_path}", markup=False)
        return
    if not questions:
        raise HalluError("--questions is required: the POPE question file(s) to score against")
    if not answers:
        raise HalluError("--answers is required (score-only mode): the model's answers to the questions")
    result = _score_only(questions, answers, parser, answer_key)
    _report(result, json_out)


def _score_only(questions: list[Path], answers: list[Path], parser: str, answer_key: str | None) -> dict:
    from hallu.evals import pope as P
    from hallu.evals.result import finish

    by_split = P.load_questions(questions)
    splits = list(by_split)
    if len(answers) == len(splits):
        # Paired in order: POPE's own id-less answer files can then be aligned with their questions.
        answer_files = [P.read_answers(a, answer_key, questions=by_split[s], questions_source=str(q))
                        for a, s, q in zip(answers, splits, questions, strict=True)]
        sources = {s: str(a) for s, a in zip(splits, answers, strict=True)}
    else:
        answer_files = [P.read_answers(a, answer_key) for a in answers]
        sources = {s: str(answers[0]) for s in splits}
    grouped = P.group_answers(answer_files, splits, [str(a) for a in answers])
    result = P.record_files(P.score(by_split, grouped, parser, answer_sources=sources), questions, answers)
    if answer_key:
        result["settings"]["answer_key"] = answer_key
    return finish(result)


def _fmt(value, rate: bool) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}" if rate else str(value)


def _short_names(splits: list[str]) -> tuple[str, list[str]]:
    """Drop the prefix all split names share ("coco_pope_"), so the table fits a terminal."""
    if len(splits) < 2:
        return "", splits
    prefix = splits[0]
    for s in splits[1:]:
        while not s.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix[: prefix.rfind("_") + 1] if "_" in prefix else ""
    if not prefix or any(len(s) == len(prefix) for s in splits):
        return "", splits
    return prefix, [s[len(prefix):] for s in splits]


def _report(result: dict, json_out: Path | None) -> None:
    from rich.table import Table

    from hallu.fileio import atomic_write_json

    splits = result["splits"]
    names = list(splits)
    prefix, heads = _short_names(names)
    title = " ".join(filter(None, ["POPE", prefix.rstrip("_"), f"({result['parser']} parser), rates in %"]))
    table = Table(title=plain(title), title_justify="left")  # split names come from file names
    table.add_column("metric")
    columns = [splits[n]["metrics"] for n in names]
    for head in heads:
        table.add_column(plain(head), justify="right")
    if len(names) > 1:
        # The mean over splits is what most papers quote; pooled is VLMEvalKit's "Overall".
        table.add_column("mean", justify="right")
        table.add_column("pooled", justify="right")
        columns += [result["mean"], result["pooled"]]
    table.add_row("questions", *[str(splits[n]["count"]) for n in names],
                  *(["", str(sum(e["count"] for e in splits.values()))] if len(names) > 1 else []))
    for key, label, rate in _ROWS:
        if key not in columns[0]:
            continue
        if key == "yes_ratio" and result["parser"] == "lmms-eval":
            label = "yes ratio*"
        table.add_row(label, *[_fmt(c[key], rate) if key in c else "" for c in columns])
    out_console.print(table)
    if result["parser"] == "lmms-eval":
        err_console.print("[yellow]note[/]: * lmms-eval's yes_ratio is the share of ground-truth yes labels, "
                          "not of predictions")
    for split, entry in splits.items():
        for note in entry.get("notes", []):
            err_console.print(f"[yellow]note[/] ({plain(split)}): {plain(note)}", soft_wrap=True)
    for note in result.get("notes", []):
        err_console.print(f"[yellow]note[/]: {plain(note)}", soft_wrap=True)
    if json_out is not None:
        atomic_write_json(json_out, result)
        err_console.print(f"results written to {json_out}", markup=False)
