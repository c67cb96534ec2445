"""POPE: Polling-based Object Probing Evaluation (Li et al., EMNLP 2023) — scoring answers, asking a model.

The benchmark is split by concern, and this module is its front door (the names below are the API):

- ``hallu.data.pope``: building question files (the official generator, draw for draw);
- ``hallu.evals.pope_files``: reading question and answer files, tying answers to questions;
- ``hallu.evals.pope_parsers``: the six named parsers in one registry (``PARSERS``);
- ``hallu.evals.pope_metrics``: each codebase's metrics;
- here: the request sent to a model, :func:`score` (answers -> an EvalResult), :func:`evaluate_model`.

Alignment: answers are matched to questions by ``question_id`` within each split (POPE ids restart at 1
in every file); POPE's own id-less answer files are aligned by position only after every question
text is checked (see ``pope_files``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.evals.generation import MODES
from hallu.evals.pope_files import (  # noqa: F401 - the benchmark's API, re-exported
    Answer,
    Question,
    _id_key,
    group_answers,
    load_questions,
    question_settings,
    read_answers,
    read_question_file,
    split_name,
)
from hallu.evals.pope_metrics import mean_over_splits, metrics
from hallu.evals.pope_parsers import (  # noqa: F401 - the benchmark's API, re-exported
    DEFAULT_PARSER,
    PARSER_VERSION,
    PARSERS,
    check_parser,
    parse_answer,
    vlmevalkit_process_punctuation,
)
from hallu.evals.result import file_input, finish

BENCHMARK = "pope"

# Answer suffixes of the inference protocols (spec §1.3); the separator is part of the suffix.
ANSWER_SUFFIXES = {
    "none": "",  # official POPE and OPERA send the question as is
    "llava": "\nAnswer the question using a single word or phrase.",  # LLaVA-1.5 and lmms-eval
    "vcd": " Please answer this question with one word.",
}


# ==================================================================================================
# The request sent to a model


def request_text(question: Question | str, suffix: str | None = None) -> str:
    """The user text of a POPE request: the question as is (official POPE, OPERA), plus an optional
    answer suffix such as ``ANSWER_SUFFIXES["llava"]``. The suffix carries its own separator. Store
    this exact string with the generation; the model's chat template wraps it."""
    text = question.text if isinstance(question, Question) else question
    return text + (suffix or "")


def request_messages(question: Question | str, suffix: str | None = None) -> list[dict]:
    """One user turn with the image first, then the text, as typed content parts for a chat template."""
    from hallu.records import user_messages

    return user_messages(request_text(question, suffix), 1)


# ==================================================================================================
# Scoring


def _examples(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def check_alignment(questions: Sequence[Question], answers: Mapping[str, str], split: str,
                    source: str | None = None) -> None:
    """Every question has exactly one answer and every answer a question; else say which ids differ."""
    qkeys = [_id_key(q.question_id) for q in questions]
    qset = set(qkeys)
    missing = [k for k in qkeys if k not in answers]
    extra = [k for k in answers if k not in qset]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(qkeys)} questions have no answer "
                         f"(ids {_examples(missing)})")
        if extra:
            parts.append(f"{len(extra)} answers match no question (ids {_examples(extra)})")
        src = f" ({source})" if source else ""
        raise HalluError(f"split {split}{src}: answers do not match the questions: {'; '.join(parts)}")


def score(
    questions_by_split: Mapping[str, Sequence[Question]],
    answers_by_split: Mapping[str, Mapping[Any, str]],
    parser: str = DEFAULT_PARSER,
    answer_sources: Mapping[str, str] | None = None,
) -> dict:
    """Score answers against questions, split by split, with one named parser.

    Args:
        questions_by_split: split name -> questions (``load_questions``).
        answers_by_split: split name -> {question_id: answer text}; ids match as strings.
        parser: one of ``PARSERS``.
        answer_sources: split -> where its answers came from, for error messages.

    Returns:
        An :class:`~hallu.records.EvalResult` dict: ``splits`` ({split: {"metrics", "count", "yes",
        "no", "notes"?}}), ``metrics`` and ``mean`` (the mean over splits), ``pooled`` (all items
        together, as VLMEvalKit's "Overall"; with several splits), ``parser``, ``items``, ``settings``
        (parser, its version, each split's question digest), ``notes``.

    Raises:
        HalluError: unknown parser, a split without answers, or ids that do not match.
    """
    check_parser(parser)
    if not questions_by_split:
        raise HalluError("no questions to score")
    extra_splits = [s for s in answers_by_split if s not in questions_by_split]
    if extra_splits:
        raise HalluError(f"answers for unknown splits: {', '.join(extra_splits)}")
    sources = answer_sources or {}
    splits: dict[str, dict] = {}
    items: list[dict] = []
    all_labels: list[str] = []
    all_preds: list[str] = []
    for split, questions in questions_by_split.items():
        if not questions:
            raise HalluError(f"split {split}: no questions")
        raw = answers_by_split.get(split)
        if not raw:
            raise HalluError(f"split {split}: no answers")
        answers = {}
        for k, v in raw.items():
            key = _id_key(k)
            if key is None:
                raise HalluError(f"split {split}: answer id {k!r} is not an integer or a string")
            if not isinstance(v, str):
                raise HalluError(f"split {split}: the answer to question {k!r} is not a string ({v!r})")
            answers[key] = v
        check_alignment(questions, answers, split, sources.get(split))
        labels, preds = [], []
        for q in questions:
            text = answers[_id_key(q.question_id)]
            pred = parse_answer(text, parser, q.label)
            labels.append(q.label)
            preds.append(pred)
            items.append({"split": split, "question_id": q.question_id, "label": q.label,
                          "answer": text, "pred": pred})
        m, notes = metrics(labels, preds, parser)
        entry = {"metrics": m, "count": len(questions), "yes": labels.count("yes"), "no": labels.count("no")}
        if notes:
            entry["notes"] = notes
        splits[split] = entry
        all_labels += labels
        all_preds += preds
    top_notes: list[str] = []
    mean = mean_over_splits([s["metrics"] for s in splits.values()], top_notes)
    result: dict[str, Any] = {"benchmark": BENCHMARK, "parser": parser, "metrics": mean, "splits": splits,
                              "mean": mean}
    if len(splits) > 1:
        pooled, pooled_notes = metrics(all_labels, all_preds, parser)
        result["pooled"] = pooled
        top_notes += [f"pooled: {n}" for n in pooled_notes]
    result["items"] = items
    result["settings"] = {
        "parser": parser,
        "parser_version": PARSER_VERSION,
        "questions": question_settings(questions_by_split),
    }
    result["notes"] = top_notes
    return finish(result)


def record_files(result: dict, question_files: Sequence[str | Path],
                 answer_files: Sequence[str | Path] = ()) -> dict:
    """Record where the questions (one file per split, in split order) and answers came from, with
    their digests: under ``settings.questions[split]`` and, for every benchmark alike, ``settings.inputs``."""
    settings = result["settings"]
    for split, path in zip(settings["questions"], question_files, strict=True):
        entry = file_input(path)
        settings["questions"][split].update({"file": entry["path"], "sha256": entry["sha256"]})
        settings["inputs"][f"questions:{split}"] = entry
    if answer_files:
        settings["answers"] = [{"file": e["path"], "sha256": e["sha256"]} for e in map(file_input, answer_files)]
        for i, a in enumerate(settings["answers"]):
            settings["inputs"][f"answers:{i}"] = {"path": a["file"], "sha256": a["sha256"]}
    return result


def check_options(parser: str, mode: str = "generate", answer_suffix: str = "none") -> None:
    """The choice-valued options, checked before anything loads or is written (one line each)."""
    if parser not in PARSERS:
        raise HalluError(f"--parser {parser}: unknown; choose one of {', '.join(PARSERS)}")
    if mode not in MODES:
        raise HalluError(f"--mode {mode}: unknown; choose one of {', '.join(MODES)}")
    if answer_suffix not in ANSWER_SUFFIXES:
        raise HalluError(f"--answer-suffix {answer_suffix}: unknown; choose one of {', '.join(ANSWER_SUFFIXES)}")


# ==================================================================================================
# Running a model on the questions

EVAL_STAGE = "eval-pope"


def evaluate_model(questions: list[Path] | None, model: Path | None, images: Path | None, out: Path | None,
                   parser: str, rescore: bool, knobs: dict) -> tuple[dict, Path]:
    """Generate (or reuse) a model's answers in the run folder ``out`` and score them with ``parser``.

    ``knobs``: answer_suffix plus :class:`~hallu.evals.generation.ModelOptions` fields (mode,
    max_new_tokens, batch_size, device, dtype, attn, trust_remote_code). With ``rescore`` everything but
    the parser comes from the earlier run recorded in ``out``. Returns the result and its path.
    """
    from hallu.evals import generation as G
    from hallu.records import EvalItem

    knobs = dict(knobs)
    suffix_name = knobs.pop("answer_suffix", "none")
    device = knobs.pop("device", "auto")
    # Typos are refused before the run folder is opened or a model is read.
    check_options(parser, knobs.get("mode", "generate"), suffix_name)
    G.check_model_knobs(knobs)
    if not rescore and not questions:
        raise HalluError("--questions is required: the POPE question file(s) to ask")
    ev = G.ModelEval(out, EVAL_STAGE, rescore)
    options = ev.options(model, images, knobs, questions=[str(Path(q).resolve()) for q in questions or []],
                         answer_suffix=suffix_name)
    questions = [Path(q) for q in options["questions"]]
    mopts = G.ModelOptions.from_recorded(options, device)
    by_split = load_questions(questions)
    suffix = ANSWER_SUFFIXES[options["answer_suffix"]]
    items_by_split = {split: [EvalItem(id=f"{split}/{q.question_id}", images=[q.image],
                                       question=request_text(q, suffix), label=q.label) for q in qs]
                      for split, qs in by_split.items()}
    items = [it for its in items_by_split.values() for it in its]
    ev.check_images(items, options, "pope")
    with ev.stage(options, inputs={f"questions_{i}": q for i, q in enumerate(questions)}) as st:
        gens, info = G.generate(st, items, mopts, Path(options["images"]), label="pope")
        answers = {split: {str(q.question_id): gens[G.prompt_key(it)]["text"]
                           for q, it in zip(qs, items_by_split[split], strict=True)}
                   for split, qs in by_split.items()}
        result = record_files(score(by_split, answers, parser), questions)
        decoding = {"do_sample": False, "num_beams": 1, "max_new_tokens": mopts.max_new_tokens}
        result["settings"].update(
            mode=mopts.mode, answer_suffix=options["answer_suffix"], request_suffix=suffix,
            decoding=decoding, **info,
        )
        result["settings"]["request"] = {"prompt": "{question}" + suffix, "mode": mopts.mode, "decoding": decoding,
                                         "chat_template_sha256": info.get("chat_template_sha256")}
        if mopts.mode == "choice":
            result["settings"]["choices"] = list(mopts.choices)
            result["settings"]["request"]["choices"] = list(mopts.choices)
            result["notes"].append(
                "mode=choice: each answer is the higher-logit of 'Yes'/'No' at the first answer token "
                "(one forward pass), not generated text")
        result = finish(result)
        results_path = G.write_results(st, result)
    return result, results_path
