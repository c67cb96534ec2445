"""OPA-DPO's released rollouts as preference pairs with the GPT-4V report kept for token weights.

Two shapes are read:

- a rollout JSON (``rollouts/step{k}_rank{r}.json``, or several merged): a list of ``{"query",
  "image_id", "standard_response", "original_generate_response", "AI_pseudo_response",
  "AI_json_report", "image_bytes"}`` with the image as base64 and the report as a dict;
- a folder saved by ``datasets`` (``opadpo_training_data-7B``): columns ``queries, image_bytes,
  standard_response, AI_pseudo_response, original_generate_response, AI_json_report`` with the
  report as a JSON string.

Each record gives one pair: chosen = the GPT-4V-revised answer (``AI_pseudo_response``), rejected =
the policy's own answer (``original_generate_response``); ``meta["gt"]`` is the standard (ground
truth) answer, the second preferred response of OPA-DPO's loss. ``meta["opa"]["sentences"]`` holds
the report per sentence with its score and error type normalised (scores given as strings, error
types in another case) and the token weights they imply. The dataset build's own filters are applied:
empty report, degenerate original (last sentence repeated, or last word more than 30 times), empty
revision.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from hallu.data._importing import ImportContext, iter_records, require_keys, strip_image_tags, text_field
from hallu.errors import HalluError
from hallu.records import PreferencePair

SOURCE = "opa-dpo"
# Per-sentence weights from the report: score 1..4 (4 = fully correct) and the error's relation to the image.
SCORE_WEIGHT = {1: 2.5, 2: 2.0, 3: 1.5, 4: 1.0}
IMAGE_WEIGHT = {"image_recognition_error": 3.0, "correct": 1.0, "language_comprehension_error": 1.0}
DEGENERATE_WORD_REPEATS = 30
ADDED_KEY = "Added"
_ROLLOUT_KEYS = ("query", "standard_response", "original_generate_response", "AI_pseudo_response",
                 "AI_json_report", "image_bytes")


def normalise_score(v) -> int | None:
    """GPT-4V returns scores as 3 or "3" (sometimes "3.0"); anything else is unknown."""
    if isinstance(v, bool):
        return None
    try:
        s = int(float(v))
    except (TypeError, ValueError):
        return None
    return s if s in SCORE_WEIGHT else None


def normalise_error_type(v) -> str | None:
    return v.strip().lower().replace(" ", "_") if isinstance(v, str) and v.strip() else None


def report_sentences(report: dict) -> list[dict]:
    """The report's numbered entries in order (then "Added"), each with normalised labels and weights."""
    numbered = sorted((k for k in report if k.isdigit()), key=int)
    out = []
    for key in numbered + ([ADDED_KEY] if ADDED_KEY in report else []):
        e = report[key]
        if not isinstance(e, dict):
            continue
        added = key == ADDED_KEY
        score = None if added else normalise_score(e.get("score"))
        err = None if added else normalise_error_type(e.get("error_type"))
        out.append({
            "key": key,
            "original": e.get("copied_content", "") if not added else "",
            "revised": e.get("rewritten_content", "") or "",
            "score": score,
            "error_type": err,
            "objects": e.get("object", []) if isinstance(e.get("object"), list) else [],
            # Added text and unknown labels weigh 1, as in the released collator.
            "score_weight": SCORE_WEIGHT.get(score, 1.0),
            "image_weight": IMAGE_WEIGHT.get(err, 1.0),
        })
    return out


def is_degenerate(text: str) -> bool:
    """The dataset build drops originals that loop: the last '.'-sentence seen before, or a runaway word."""
    sentences = [s.strip() for s in text.split(".") if s.strip()]
    if len(sentences) > 1 and sentences[-1] in sentences[:-1]:
        return True
    words = text.split()
    return bool(words) and words.count(words[-1]) > DEGENERATE_WORD_REPEATS


def _rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) from a rollout JSON file or a saved `datasets` folder."""
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                or (path / "dataset_dict.json").exists()):
            hint = "; it holds .parquet files: RLAIF-V shards go to `hallu prepare rlaif-v`" if any(
                path.glob("*.parquet")) else ""
            raise HalluError(f"{path}: not a folder saved by `datasets` (no dataset_info.json / state.json){hint}")
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises many types for a broken folder
            raise HalluError(f"{path}: cannot load the saved dataset ({type(e).__name__}: {e})") from None
        splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [("", ds)]
        for split, part in splits:
            for i, row in enumerate(part):
                yield f"{path}{'/' + split if split else ''}: row {i}", dict(row)
    else:
        for line, row in iter_records(path):
            yield f"{path}:{line}", row


def _report(v, where: str) -> dict | None:
    if v in (None, "", {}):
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise HalluError(f"{where}: 'AI_json_report' is not valid JSON ({e.msg})") from None
    if not isinstance(v, dict):
        raise HalluError(f"{where}: 'AI_json_report' must be an object, got {type(v).__name__}")
    return v


def read(ctx: ImportContext) -> Iterator[PreferencePair]:
    for path in ctx.sources:
        for n, (where, row) in enumerate(_rows(path)):
            if "queries" in row and "query" not in row:  # the saved dataset's column name
                row["query"] = row["queries"]
            require_keys(row, _ROLLOUT_KEYS, where, "OPA-DPO rollout")
            query, gt, original, revised = (text_field(row, k, where) for k in
                                            ("query", "standard_response", "original_generate_response",
                                             "AI_pseudo_response"))
            report = _report(row["AI_json_report"], where)
            if report is None:
                ctx.tally.filter("empty report")
                continue
            if is_degenerate(original):
                ctx.tally.filter("degenerate original")
                continue
            if not revised.strip():
                ctx.tally.filter("empty revision")
                continue
            image = ctx.store.put_base64(row["image_bytes"], where)
            stem = path.stem if path.is_file() else path.name
            image_id = row.get("image_id")
            yield PreferencePair(
                id=f"opadpo-{stem}-{n}", images=[image], prompt=strip_image_tags(query), chosen=revised,
                rejected=original,
                meta={"source": SOURCE, "gt": gt, "image_id": image_id if isinstance(image_id, str) else None,
                      "opa": {"gt": gt, "original": original, "revised": revised,
                              "image_description": report.get("image_description"),
                              "sentences": report_sentences(report), "report": report}})
