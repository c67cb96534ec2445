"""POPE question and answer files: reading, validating, and tying each answer to its question.

Question files as shipped (``{dataset}_pope_{split}.json``): JSONL ``{"question_id", "image", "text",
"label"}`` (CRLF fine), a JSON array of the same, or a stream of concatenated (pretty-printed) JSON
objects, which is how one released POPE file is laid out. Extra keys are ignored.

Answer files, in the same three layouts:

- ours and LLaVA's: ``{"question_id", "text" | "answer"[, "split"]}``, matched to questions by id
  within a split (POPE ids restart at 1 in every file), never by line position;
- POPE's own (``evaluate.py``): ``{"question", "answer"}`` without ids, one per question in question
  order. The official script zips the two files blindly; we align them by position *only* after
  checking that each answer's ``question`` equals its question's text (whitespace-normalised), and
  stop at the first mismatch naming the file, line and both texts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.fileio import digest_json, read_text


@dataclass(frozen=True)
class Question:
    """One POPE question; ``label`` is normalised to "yes" / "no"."""

    question_id: int | str
    image: str
    text: str
    label: str

    def to_dict(self) -> dict:
        return {"question_id": self.question_id, "image": self.image, "text": self.text, "label": self.label}


def _id_key(value: Any) -> str | None:
    """Ids match as strings, so 7 and "7" are the same question; other types are not ids."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def _read_text(path: Path) -> str:
    return read_text(path, "JSON or JSONL")


def _records(path: Path, what: str) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs of a JSON array, or of a stream of JSON values: JSONL, or objects
    written one after another (pretty-printed, or ``}{`` with nothing between). ``where`` names the
    file and the line each record starts on (``record N`` inside an array)."""
    text = _read_text(path)
    start = len(text) - len(text.lstrip())
    if text.startswith("[", start):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise HalluError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return [(f"{path}: record {i}", rec) for i, rec in enumerate(value, 1)]
    decoder = json.JSONDecoder()
    out: list[tuple[str, Any]] = []
    pos, line, counted = start, 1, 0
    while pos < len(text):
        line += text.count("\n", counted, pos)  # counted incrementally: big files stay linear
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise HalluError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        out.append((f"{path}:{line}", value))
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
    if len(out) == 1 and not isinstance(out[0][1], dict):
        raise HalluError(f"{path}: expected JSONL or a JSON array of {what}, "
                         f"got a JSON {type(out[0][1]).__name__}")
    return out


def read_question_file(path: str | Path) -> list[Question]:
    """Read one POPE question file as shipped: JSONL (CRLF fine) or a JSON array of
    ``{"question_id", "image", "text", "label"}`` (extra keys ignored)."""
    path = Path(path)
    out: list[Question] = []
    seen: dict[str, str] = {}
    for where, rec in _records(path, "questions"):
        if not isinstance(rec, dict):
            raise HalluError(f"{where}: expected an object {{question_id, image, text, label}}, "
                             f"got a JSON {type(rec).__name__}")
        missing = [k for k in ("question_id", "image", "text", "label") if k not in rec]
        if missing:
            raise HalluError(f"{where}: not a POPE question (missing {', '.join(missing)})")
        key = _id_key(rec["question_id"])
        if key is None:
            raise HalluError(f"{where}: question_id must be an integer or a string, "
                             f"got {rec['question_id']!r}")
        if key in seen:
            raise HalluError(f"{where}: duplicate question_id {rec['question_id']!r} (first at {seen[key]})")
        seen[key] = where
        for k in ("image", "text", "label"):
            if not isinstance(rec[k], str):
                raise HalluError(f"{where}: '{k}' must be a string")
        # Shipped files use lowercase yes/no; we accept any case. (The official script would count a
        # capitalised "No" label as yes; no known file has one, so we do not reproduce that.)
        label = rec["label"].strip().lower()
        if label not in ("yes", "no"):
            raise HalluError(f"{where}: label must be 'yes' or 'no', got {rec['label']!r}")
        out.append(Question(rec["question_id"], rec["image"], rec["text"], label))
    if not out:
        raise HalluError(f"{path}: no questions in the file")
    return out


def split_name(path: str | Path) -> str:
    """Score-only splits are named after the question file's stem (``coco_pope_random``)."""
    return Path(path).stem


def load_questions(paths: Sequence[str | Path]) -> dict[str, list[Question]]:
    """Read question files, one split each, named after the file stem, in the order given."""
    out: dict[str, list[Question]] = {}
    where: dict[str, Path] = {}
    for p in paths:
        name = split_name(p)
        if name in out:
            raise HalluError(f"{p}: a second question file named {name!r} (first: {where[name]}); "
                             "splits are named after file stems, so rename one")
        out[name] = read_question_file(p)
        where[name] = Path(p)
    if not out:
        raise HalluError("no question files given")
    return out


@dataclass(frozen=True)
class Answer:
    question_id: int | str
    text: str
    split: str | None
    where: str


def _same_question(a: str, b: str) -> bool:
    # Whitespace differences (CRLF files, trailing spaces, re-wrapped text) are not a different question.
    return " ".join(a.split()) == " ".join(b.split())


def read_answers(path: str | Path, answer_key: str | None = None,
                 questions: Sequence[Question] | None = None, questions_source: str | None = None) -> list[Answer]:
    """Read an answers file (JSONL, JSON array, or a stream of JSON objects).

    Each record holds the answer in ``text`` or ``answer`` (or the field ``answer_key`` names), and
    either a ``question_id`` (plus an optional ``split``, the question file's stem), or, as POPE's own
    answer files, no id but the ``question`` text. Records without ids are aligned with ``questions``
    (the one question file they answer, named ``questions_source`` in errors) by position, after
    checking every question text; without ``questions`` they are an error. One file is all ids or all
    positions.

    When both ``text`` and ``answer`` are present they must agree, unless ``answer_key`` picks one:
    some logs keep the ground truth in ``answer``.
    """
    path = Path(path)
    source = questions_source or "the question file"
    out: list[Answer] = []
    seen: dict[tuple[str | None, str], str] = {}
    by_position: bool | None = None  # decided by the first record
    for where, rec in _records(path, "answers"):
        if not isinstance(rec, dict):
            raise HalluError(f"{where}: expected an object with question_id and text, got a JSON "
                             f"{type(rec).__name__}")
        positional = "question_id" not in rec
        if positional and ("question" not in rec or questions is None):
            raise HalluError(f"{where}: no question_id (answers are matched to questions by id, never by line "
                             "order alone; POPE's own {\"question\", \"answer\"} files are aligned by position "
                             "only when given one per question file, each question text checked)")
        if by_position is None:
            by_position = positional
        elif positional != by_position:
            raise HalluError(f"{where}: {'no' if positional else 'a'} question_id, unlike the records before it; "
                             "a file either gives every answer's question_id or none")
        text = _answer_text(rec, where, answer_key)
        if positional:
            k = len(out)
            if k >= len(questions):
                raise HalluError(f"{where}: answer {k + 1}, but {source} has only {len(questions)} questions "
                                 "(answers without question_id are aligned by position)")
            q = questions[k]
            if not isinstance(rec["question"], str) or not _same_question(rec["question"], q.text):
                raise HalluError(f"{where}: answer {k + 1} is to {rec['question']!r}, but question {k + 1} of "
                                 f"{source} (question_id {q.question_id!r}) is {q.text!r}; answers without "
                                 "question_id must follow the question file's order")
            out.append(Answer(q.question_id, text, None, where))
            continue
        key = _id_key(rec["question_id"])
        if key is None:
            raise HalluError(f"{where}: question_id must be an integer or a string, "
                             f"got {rec['question_id']!r}")
        split = rec.get("split")
        if split is not None and not isinstance(split, str):
            raise HalluError(f"{where}: 'split' must be a string")
        if (split, key) in seen:
            raise HalluError(f"{where}: duplicate answer for question_id {rec['question_id']!r} "
                             f"(first at {seen[(split, key)]})")
        seen[(split, key)] = where
        out.append(Answer(rec["question_id"], text, split, where))
    if not out:
        raise HalluError(f"{path}: no answers in the file")
    if by_position and len(out) < len(questions):
        raise HalluError(f"{path}: {len(out)} answers for the {len(questions)} questions of {source} (answers "
                         f"without question_id are aligned by position: question {len(out) + 1} has none)")
    return out


def _answer_text(rec: dict, where: str, answer_key: str | None) -> str:
    if answer_key is not None:
        if answer_key not in rec:
            raise HalluError(f"{where}: no field {answer_key!r} (--answer-key)")
        text = rec[answer_key]
    elif "text" in rec and "answer" in rec and rec["text"] != rec["answer"]:
        raise HalluError(f"{where}: 'text' and 'answer' differ; say which holds the model's answer "
                         "(--answer-key text or --answer-key answer)")
    elif "text" in rec or "answer" in rec:
        text = rec["text"] if "text" in rec else rec["answer"]
    else:
        raise HalluError(f"{where}: no answer (expected a 'text' or 'answer' field)")
    if not isinstance(text, str):
        raise HalluError(f"{where}: the answer must be a string, got {text!r}")
    return text


def group_answers(files: Sequence[Sequence[Answer]], splits: Sequence[str],
                  names: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
    """Answers per split, keyed by question id.

    POPE ids restart at 1 in every split, so answers cannot be pooled by id alone. Either one answers
    file per question file, paired in order (any ``split`` field is then ignored), or a single file
    whose records all carry ``split`` = the question file's stem.
    """
    names = list(names) if names is not None else [f"answers file {i + 1}" for i in range(len(files))]
    out: dict[str, dict[str, str]] = {s: {} for s in splits}
    if len(files) == len(splits):
        for split, answers in zip(splits, files, strict=True):
            for a in answers:
                _put_answer(out[split], a)
        return out
    if len(files) != 1:
        raise HalluError(f"{len(files)} answers files for {len(splits)} question files: give one answers "
                         "file per question file (same order), or one file whose records carry 'split'")
    for a in files[0]:
        if a.split is None:
            raise HalluError(f"{a.where}: no 'split' field; with one answers file for {len(splits)} question "
                             "files every answer must name its question file's stem in 'split' "
                             "(or give one --answers per --questions, in the same order)")
        if a.split not in out:
            raise HalluError(f"{a.where}: split {a.split!r} is not one of the question files "
                             f"({', '.join(splits)})")
        _put_answer(out[a.split], a)
    return out


def _put_answer(into: dict[str, str], a: Answer) -> None:
    key = _id_key(a.question_id)
    if key in into:
        raise HalluError(f"{a.where}: a second answer for question_id {a.question_id!r} in the same split")
    into[key] = a.text


def question_settings(questions_by_split: Mapping[str, Sequence[Question]]) -> dict:
    """Content digest and count of each split's questions (independent of file formatting)."""
    return {
        split: {"count": len(qs), "digest": digest_json([q.to_dict() for q in qs])}
        for split, qs in questions_by_split.items()
    }
