"""POPE answer parsers: answer text -> prediction, one named rule per codebase, in ONE registry.

Sources, read and re-stated here in our own words (see ``specs/evals.md`` §1):

- official generator and scorer: AoiDragon/POPE @ 08d957b9 (``main.py``, ``utils.py``, ``evaluate.py``);
- LLaVA-1.5 ``llava/eval/eval_pope.py`` (HA-DPO's vendored copy): the official rule on the ``text`` field;
- OPERA: shikiw/OPERA @ 61426efe ``pope_eval.py`` (``recorder`` / ``print_acc``);
- VCD: DAMO-NLP-SG/VCD @ d6568ff8 ``experiments/eval/eval_pope.py``;
- lmms-eval @ 75571cfe ``lmms_eval/tasks/pope/utils.py``;
- VLMEvalKit @ e8e78f05 ``vlmeval/dataset/utils/yorn.py`` (``YOrN_Extraction``, ``POPE_rating``) and its
  ``process_punctuation``.

Parsers (answer text -> prediction) and their metrics
------------------------------------------------------
``pope-official`` (default; POPE ``evaluate.py`` == LLaVA ``eval_pope``): keep the text before the first
"." (this also cuts "2.5"), delete commas, split on the single space character; *no* if a token is
exactly ``No``, ``not`` or ``no``, else *yes* — so "NO", "No!", "no\\n", "Nope", "There isn't" and the
empty answer are all *yes*. Metrics: accuracy, precision, recall, F1 over TP/FP/TN/FN, and yes-ratio =
predicted yes / answers.

``opera``: delete every "." and ","; split on a single space; *no* if a token is one of ``No not no NO``
or ends with ``n't``. Same metrics as the official script.

``vcd``: lowercase + strip; a yes-question is TP iff the substring ``yes`` occurs ("eyes" counts), else
FN; a no-question is TN iff the substring ``no`` occurs ("not", "snow", "nothing" count), else FP. So the
per-item prediction depends on the label. Accuracy and yes-proportion ((TP+FP)/total) are divided by the
number of questions; ``unknown_ratio`` counts labels other than yes/no (always 0 here: we only accept
yes/no labels).

``lmms-eval``: prediction = lowercased, stripped answer; correct iff it equals the label exactly, so
"yes." is wrong. Precision counts only exact "yes" predictions, recall only exact "no" ones as misses.
Its ``yes_ratio`` is the share of *ground-truth* yes labels (their bug, kept under their name). Every
division is guarded (0 when the denominator is 0). ``other`` counts predictions that are neither
"yes" nor "no".

``vlmevalkit`` (exact-matching mode; no LLM judge, so Unknown stays Unknown): lowercase, then
``process_punctuation``, then split on whitespace; ``Yes`` iff the token yes is present and no is not,
``No`` the other way round, else ``Unknown``. ``process_punctuation``: for each of
``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``, delete it everywhere if it stands next to a space anywhere in
the *original* text or the text has a digit-comma-digit, else replace it with a space; then delete
periods not followed by a digit — at most 32, because ``re.UNICODE`` (=32) is passed as ``count``.
(Its period regex starts with ``(?!<=\\d)``, a lookahead typo that never fires.) Metrics: y_true = label
is yes, y_pred = extracted is Yes (Unknown counts as No); guarded P/R/F1; acc = share of extracted ==
answer (Unknown always wrong); VLMEvalKit reports percent, kept here as ``accuracy_pct``,
``precision_pct``, ``recall_pct``, ``f1_pct`` (its "Overall" = ``f1_pct``) next to our fractions.
``yes_ratio`` (share of Yes) and ``unknown`` are ours; VLMEvalKit does not report them.

``strict`` (ours, version 1): lowercase; strip whitespace, quotes and markdown marks from both ends; the
text must *start* with the word yes or no (whole word: "Nope", "Yesterday" do not count). It is unknown
instead when the text holds both the words yes and no ("Yes. No.", "yes and no"), or when the next word
is a hedge (but, however, although, though, maybe, perhaps, possibly, probably, unless): "yes, but…".
Everything else is unknown: "There is no dog", "I cannot tell", "2.5", "". Unknowns are counted apart
(``unknown``, ``unknown_ratio``) and can never help: accuracy = (TP+TN)/all, recall = TP/(yes labels)
so an unknown on a yes-question is a miss, precision = TP/(TP+FP), yes_ratio = predicted yes / all.

Undefined metrics: the official, OPERA and VCD scripts divide without a guard and crash when, e.g., a

The metrics each parser's codebase computes live in ``hallu.evals.pope_metrics``, keyed by the same names.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from hallu.errors import HalluError

DEFAULT_PARSER = "pope-official"
# Bump when any parser or metric changes; stored with every result.
PARSER_VERSION = 1


def _parse_official(text: str) -> str:
    if "." in text:  # "first sentence" — also cuts "2.5" to "2"
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")  # the space character only: "no\n" stays one token
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


_OPERA_NEG = ("No", "not", "no", "NO")


def _parse_opera(text: str) -> str:
    words = text.replace(".", "").replace(",", "").split(" ")
    return "no" if any(w in _OPERA_NEG or w.endswith("n't") for w in words) else "yes"


def _parse_vcd(text: str, label: str) -> str:
    # VCD only asks whether the answer "contains" the label word, so its verdict depends on the label.
    a = text.lower().strip()
    if label == "yes":
        return "yes" if "yes" in a else "no"
    return "no" if "no" in a else "yes"


def _parse_lmms(text: str) -> str:
    return text.lower().strip()


_VLM_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
              ",", "?", "!")
_VLM_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_VLM_PERIOD = re.compile(r"\.(?!\d)")  # the original's leading "(?!<=\d)" is a lookahead that never fires
_VLM_PERIOD_LIMIT = 32  # re.UNICODE passed positionally as re.sub's count


def vlmevalkit_process_punctuation(text: str) -> str:
    """VLMEvalKit's ``process_punctuation``, quirks included (see the module docstring)."""
    out = text
    digit_comma = _VLM_DIGIT_COMMA.search(text) is not None
    for p in _VLM_PUNCT:
        # The test looks at the original text, the replacement works on the running result.
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VLM_PERIOD.sub("", out, count=_VLM_PERIOD_LIMIT)


def _parse_vlmevalkit(text: str) -> str:
    words = vlmevalkit_process_punctuation(text.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


_STRICT_EDGES = " \t\r\n\f\v\"'`*_“”‘’«»"
_STRICT_START = re.compile(r"(yes|no)(?![a-z0-9])")
_STRICT_HEDGES = frozenset({"but", "however", "although", "though", "maybe", "perhaps", "possibly",
                            "probably", "unless"})


def _parse_strict(text: str) -> str:
    t = text.lower().strip(_STRICT_EDGES)
    m = _STRICT_START.match(t)
    if m is None:
        return "unknown"
    words = re.findall(r"[a-z]+", t)
    if "yes" in words and "no" in words:
        return "unknown"  # contradictory: "Yes. No.", "yes and no"
    if len(words) > 1 and words[1] in _STRICT_HEDGES:
        return "unknown"  # hedged: "yes, but..."
    return m.group(1)



def _needs_label(parse: Callable[[str, str], str]) -> Callable[[str, str | None], str]:
    def checked(text: str, label: str | None) -> str:
        if label not in ("yes", "no"):
            raise HalluError("the vcd parser needs the question's label (yes or no)")
        return parse(text, label)

    return checked


# The registry: name -> parse(text, label). Only vcd looks at the label (its verdict depends on it).
PARSERS: dict[str, Callable[[str, str | None], str]] = {
    "pope-official": lambda text, label: _parse_official(text),
    "opera": lambda text, label: _parse_opera(text),
    "vcd": _needs_label(_parse_vcd),
    "lmms-eval": lambda text, label: _parse_lmms(text),
    "vlmevalkit": lambda text, label: _parse_vlmevalkit(text),
    "strict": lambda text, label: _parse_strict(text),
}


def check_parser(parser: str, option: str = "POPE parser") -> None:
    """One line naming the bad parser and the choices."""
    if parser not in PARSERS:
        raise HalluError(f"unknown {option} {parser!r}; choose one of {', '.join(PARSERS)}")


def parse_answer(text: str, parser: str = DEFAULT_PARSER, label: str | None = None) -> str:
    """One answer's prediction under a named parser.

    Returns "yes"/"no" (pope-official, opera, vcd), "yes"/"no"/"unknown" (strict), "Yes"/"No"/"Unknown"
    (vlmevalkit), or the normalised answer string (lmms-eval). ``vcd`` needs the question's label.
    """
    check_parser(parser)
    return PARSERS[parser](text, label)
