"""Side-by-side comparison of benchmark results (``hallu eval compare``).

Accepts results files or run folders (their ``results.json``) of any benchmark; runs of one benchmark
share a table, one column per run, and the settings that make numbers comparable (parser, mode, prompt,
model, question files) are shown under the metrics, so a difference in method is not mistaken for a
difference in model.
"""

from __future__ import annotations

import os
from pathlib import Path

from hallu.errors import HalluError
from hallu.records import EvalResult, read_eval_result

# Headline metrics per benchmark, in display order: (key, label, is a rate shown in %).
HEADLINES = {
    "pope": (("accuracy", "accuracy", True), ("precision", "precision", True), ("recall", "recall", True),
             ("f1", "F1", True), ("yes_ratio", "yes ratio", True)),
    "chair": (("chair_s", "CHAIR_s", True), ("chair_i", "CHAIR_i", True), ("recall", "recall", True),
              ("len", "len", True)),
    "shr": (("shr", "SHR", True), ("hal_words_ratio", "hallucinated words", True),
            ("sents_per_image", "sentences / image", False), ("words_per_image", "words / image", False)),
}
# Settings that decide whether two numbers are comparable.
SETTING_KEYS = ("parser", "mode", "answer_suffix", "prompt", "normaliser", "judge_model", "prompt_version",
                "model_fingerprint")


def load_result(path: str | os.PathLike) -> tuple[str, EvalResult]:
    """A result (validated as an :class:`~hallu.records.EvalResult`) and its display name: the run
    folder's name, or the file's stem."""
    p = Path(path)
    name = p.name if p.is_dir() else (p.parent.name if p.name == "results.json" else p.stem)
    result = read_eval_result(p)
    if result.benchmark not in HEADLINES:
        raise HalluError(f"{p}: benchmark {result.benchmark!r} is not one compare knows "
                         f"({', '.join(HEADLINES)})")
    return name, result


def rows(result: EvalResult) -> list[tuple[str, float | None, bool]]:
    """(label, value, is_rate) rows of one result: each split's headline metrics, then (with several
    splits) the mean over splits; a benchmark with one split shows its metrics unprefixed."""
    bench = result.benchmark
    blocks = [(split, entry["metrics"]) for split, entry in result.splits.items()]
    if len(blocks) > 1:
        blocks.append(("mean", result.metrics or result.mean or {}))
    elif bench != "pope" or not blocks:
        blocks = [("", result.metrics or (blocks[0][1] if blocks else {}))]
    out = []
    for split, metrics in blocks:
        short = split.rsplit("_", 1)[-1]
        for key, label, rate in HEADLINES[bench]:
            out.append((f"{short} {label}".strip(), metrics.get(key), rate))
    return out


def settings_summary(result: EvalResult) -> dict[str, str]:
    s = result.settings
    request = s.get("request") if isinstance(s.get("request"), dict) else {}
    found = {}
    for key in SETTING_KEYS:
        value = s.get(key, getattr(result, key, None))
        if value is None and key == "prompt":
            value = request.get("prompt") or (s.get("generation") or {}).get("prompt")
        if value is not None:
            text = str(value)
            found[key] = text[:19] if key == "model_fingerprint" else text
    return found
