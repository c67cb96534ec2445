"""POPE metrics, one function per codebase, keyed by the parser names of ``hallu.evals.pope_parsers``.

Each codebase's formulas are described with its parser there. Undefined metrics: the official, OPERA
and VCD scripts divide without a guard and crash when, e.g., a model never says yes. We never crash:
an undefined precision, recall or F1 is reported as ``None`` (JSON null) with a note saying why; the
mean over splits of a metric that is null in any split is null. lmms-eval and VLMEvalKit keep their own
guards (0).
"""

from __future__ import annotations

from collections.abc import Sequence

from hallu.errors import HalluError
from hallu.evals.pope_parsers import DEFAULT_PARSER, PARSERS, check_parser

# Rate metrics averaged over splits; counts are per split only.
_RATE_KEYS = (
    "accuracy", "precision", "recall", "f1", "yes_ratio", "unknown_ratio",
    "accuracy_pct", "precision_pct", "recall_pct", "f1_pct",
)


def _confusion(labels: Sequence[str], preds: Sequence[str], yes: str = "yes", no: str = "no") -> dict:
    c = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for label, pred in zip(labels, preds, strict=True):
        if pred == yes:
            c["tp" if label == "yes" else "fp"] += 1
        elif pred == no:
            c["tn" if label == "no" else "fn"] += 1
    return c


def _undefined(num: int | float, den: int | float, name: str, why: str, notes: list[str]) -> float | None:
    """An unguarded original division: None plus a note instead of a ZeroDivisionError."""
    if den == 0:
        notes.append(f"{name} undefined ({why} = 0); the original script divides by zero here, "
                     "reported as null")
        return None
    return num / den


def _f1_unguarded(p: float | None, r: float | None, notes: list[str]) -> float | None:
    if p is None or r is None:
        notes.append("f1 undefined (precision or recall undefined), reported as null")
        return None
    if p + r == 0:
        notes.append("f1 undefined (precision + recall = 0); the original script divides by zero here, "
                     "reported as null")
        return None
    return 2 * p * r / (p + r)


def _metrics_official(labels: Sequence[str], preds: Sequence[str], notes: list[str]) -> dict:
    # POPE evaluate.py, LLaVA eval_pope and OPERA print_acc compute the same numbers.
    c = _confusion(labels, preds)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    precision = _undefined(tp, tp + fp, "precision", "TP+FP", notes)
    recall = _undefined(tp, tp + fn, "recall", "TP+FN", notes)
    return {
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": _f1_unguarded(precision, recall, notes),
        "yes_ratio": preds.count("yes") / len(preds),
        **c,
    }


def _metrics_vcd(labels: Sequence[str], preds: Sequence[str], notes: list[str]) -> dict:
    c = _confusion(labels, preds)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    total = len(labels)  # VCD divides accuracy and yes-proportion by the number of questions
    precision = _undefined(tp, tp + fp, "precision", "TP+FP", notes)
    recall = _undefined(tp, tp + fn, "recall", "TP+FN", notes)
    return {
        "accuracy": (tp + tn) / total,
        "precision": precision,
        "recall": recall,
        "f1": _f1_unguarded(precision, recall, notes),
        "yes_ratio": (tp + fp) / total,
        **c,
        "unknown_ratio": 0 / total,  # labels other than yes/no; ours are always yes/no
    }


def _metrics_lmms(labels: Sequence[str], preds: Sequence[str], notes: list[str]) -> dict:
    c = _confusion(labels, preds)  # exact "yes" / "no" only
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    total = 0.0
    for label, pred in zip(labels, preds, strict=True):
        total += 1.0 if pred == label else 0.0
    precision = tp / (tp + fp) if (tp + fp) > 0 else 0.0
    recall = tp / (tp + fn) if (tp + fn) > 0 else 0.0
    yes, no = labels.count("yes"), labels.count("no")
    return {
        "accuracy": total / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": 2 * (precision * recall) / (precision + recall) if (precision + recall) > 0 else 0.0,
        # lmms-eval's "yes_ratio" is the share of ground-truth yes labels, not of predictions.
        "yes_ratio": yes / (yes + no) if (yes + no) > 0 else 0.0,
        **c,
        "other": len(preds) - sum(c.values()),
    }


def _metrics_vlmevalkit(labels: Sequence[str], preds: Sequence[str], notes: list[str]) -> dict:
    y_true = [label == "yes" for label in labels]
    y_pred = [p == "Yes" for p in preds]  # Unknown counts as No
    tp = sum(t and p for t, p in zip(y_true, y_pred, strict=True))
    fp = sum((not t) and p for t, p in zip(y_true, y_pred, strict=True))
    fn = sum(t and (not p) for t, p in zip(y_true, y_pred, strict=True))
    tn = len(labels) - tp - fp - fn
    precision = tp / (tp + fp) if (tp + fp) != 0 else 0.0
    recall = tp / (tp + fn) if (tp + fn) != 0 else 0.0
    f1 = 2 * (precision * recall) / (precision + recall) if (precision + recall) != 0 else 0.0
    correct = sum(p == ("Yes" if label == "yes" else "No") for label, p in zip(labels, preds, strict=True))
    accuracy = correct / len(labels)
    unknown = preds.count("Unknown")
    return {
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": preds.count("Yes") / len(preds),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "unknown": unknown,
        "unknown_ratio": unknown / len(preds),
        # VLMEvalKit's own numbers: percent, "Overall" being f1_pct.
        "accuracy_pct": accuracy * 100,
        "precision_pct": precision * 100,
        "recall_pct": recall * 100,
        "f1_pct": f1 * 100,
    }


def _metrics_strict(labels: Sequence[str], preds: Sequence[str], notes: list[str]) -> dict:
    c = _confusion(labels, preds)
    tp, fp, tn = c["tp"], c["fp"], c["tn"]
    n = len(labels)
    unknown = preds.count("unknown")
    precision = tp / (tp + fp) if tp + fp else None
    if precision is None:
        notes.append("precision undefined (no yes predictions), reported as null")
    positives = labels.count("yes")  # an unknown on a yes-question is a miss
    recall = tp / positives if positives else None
    if recall is None:
        notes.append("recall undefined (no yes labels), reported as null")
    if precision is None or recall is None or precision + recall == 0:
        f1 = None
        notes.append("f1 undefined, reported as null")
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
        **c,
        "unknown": unknown,
        "unknown_ratio": unknown / n,
    }


METRICS = {
    "pope-official": _metrics_official,
    "opera": _metrics_official,
    "vcd": _metrics_vcd,
    "lmms-eval": _metrics_lmms,
    "vlmevalkit": _metrics_vlmevalkit,
    "strict": _metrics_strict,
}


# Every parser has its metrics, and nothing else does.
assert set(METRICS) == set(PARSERS), "pope_metrics.METRICS and pope_parsers.PARSERS name different parsers"


def metrics(labels: Sequence[str], preds: Sequence[str],
            parser: str = DEFAULT_PARSER) -> tuple[dict, list[str]]:
    """Metrics of one split from labels and parsed predictions; returns ``(metrics, notes)``."""
    check_parser(parser)
    if not labels:
        raise HalluError("no questions to score")
    notes: list[str] = []
    return METRICS[parser](list(labels), list(preds), notes), notes


def mean_over_splits(per_split: Sequence[dict], notes: list[str]) -> dict:
    """The mean of each rate over splits (what papers quote); null where any split's is null."""
    out: dict[str, float | None] = {}
    for key in _RATE_KEYS:
        values = [m[key] for m in per_split if key in m]
        if len(values) != len(per_split) or not values:
            continue
        if any(v is None for v in values):
            out[key] = None
            notes.append(f"mean {key} undefined: null in at least one split")
        else:
            out[key] = sum(values) / len(values)
    return out

