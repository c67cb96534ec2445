"""The offline judge: objects a response mentions that the image's annotations lack are hallucinated.

Object mentions are found with CHAIR's word machinery (:mod:`hallu.objects`), so "knives", "a dining
table" and "motorbike" count as the COCO categories knife, dining table and motorcycle. The ground
truth of a prompt is, as in CHAIR, its annotated objects (COCO instances, the shapes world's glyphs)
plus the objects its reference caption and its VG region phrases mention (``use_reference``).

Each sentence that names an object outside the ground truth is, by ``mode``:

- ``remove``: dropped;
- ``rewrite``: its hallucinated object words are replaced by annotated objects the answer has not
  mentioned yet (OPA-DPO's ``wrong -> right``); a sentence that cannot be repaired so is dropped.

The revised text is checked again with the same machinery: nothing hallucinated survives. Every
sentence also gets an OPA-DPO style report entry (score 4 / ``correct`` when clean, 2 /
``image_recognition_error`` when it named a missing object), so the OPA token weights work without an
API.
"""

from __future__ import annotations

import re

from hallu.errors import HalluError

NAME = "annotations"
VERSION = "annotations-v1"
MODES = ("remove", "rewrite")
OPTIONS: dict = {"mode": "remove", "use_reference": True}

CLEAN_SCORE, WRONG_SCORE = 4, 2  # OPA's rubric: 4 fully correct, 2 wrong object


def check(options: dict) -> None:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise HalluError(f"--judge annotations: unknown option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(OPTIONS)})")
    if options.get("mode", OPTIONS["mode"]) not in MODES:
        raise HalluError(f"--mode {options.get('mode')!r}: the annotations judge knows {', '.join(MODES)}")


def ground_truth(prompt, use_reference: bool = True) -> set[str]:
    """COCO category names the prompt's annotations say are in its image(s)."""
    from hallu.objects import get_matcher

    matcher = get_matcher()
    truth: set[str] = set()
    for name in prompt.objects:
        node = matcher.node_of(name.lower())
        if node is None:
            # A name outside the synonym table (a VG object): whatever category words it holds.
            truth.update(matcher.node_words(name))
        else:
            truth.add(node)
    for region in prompt.regions:
        phrase = region.get("phrase")
        if isinstance(phrase, str):
            truth.update(matcher.node_words(phrase))
    if use_reference and prompt.reference:
        truth.update(matcher.node_words(prompt.reference))
    return truth


def judge_groups(groups, options: dict, *, progress=None) -> list[dict]:
    from hallu.objects import get_matcher, split_sentences

    opts = {**OPTIONS, **options}
    check(opts)
    matcher = get_matcher()
    out: list[dict] = []
    for group in groups:
        truth = ground_truth(group.prompt, opts["use_reference"])
        for resp in group.responses:
            out.append(_revise(resp, truth, opts["mode"], matcher, split_sentences))
        if progress is not None:
            progress(len(group.responses))
    return out


def _revise(resp, truth: set[str], mode: str, matcher, split_sentences) -> dict:
    sentences = split_sentences(resp.text)
    mentioned = set(matcher.node_words(resp.text))
    # Annotated objects the answer never names: what a rewrite may put in place of a wrong one.
    unused = sorted(truth - mentioned)
    report, original, revised_parts, revised_report, removed, replaced = [], [], [], [], [], []
    for sent in sentences:
        wrong = [n for n in dict.fromkeys(matcher.node_words(sent)) if n not in truth]
        if not wrong:
            report.append({"text": sent, "label": "correct", "score": CLEAN_SCORE, "error_type": "correct",
                           "objects": [], "revised": sent})
            original.append({"text": sent, "score": CLEAN_SCORE, "error_type": "correct"})
            revised_parts.append(sent)
            revised_report.append({"text": sent, "score": CLEAN_SCORE, "error_type": "correct"})
            continue
        new = _rewrite(sent, wrong, unused, matcher, truth) if mode == "rewrite" else None
        swaps = [] if new is None else new[1]
        report.append({"text": sent, "label": "hallucinated", "score": WRONG_SCORE,
                       "error_type": "image_recognition_error",
                       "objects": [f"{w} -> {dict(swaps)[w]}" if w in dict(swaps) else w for w in wrong],
                       "revised": "" if new is None else new[0]})
        original.append({"text": sent, "score": WRONG_SCORE, "error_type": "image_recognition_error"})
        if new is None:
            removed.extend(wrong)
        else:
            revised_parts.append(new[0])
            revised_report.append({"text": new[0], "score": WRONG_SCORE, "error_type": "image_recognition_error"})
            replaced.extend(swaps)
            unused = [u for u in unused if u not in {right for _, right in swaps}]  # each true object once
    text = " ".join(revised_parts)
    if any(n not in truth for n in matcher.node_words(text)):
        # Joined sentences can tokenize differently from single ones (a double word across a
        # boundary); a revision must never keep a hallucination, so drop what still names one.
        keep = [i for i, p in enumerate(revised_parts) if all(n in truth for n in matcher.node_words(p))]
        revised_parts = [revised_parts[i] for i in keep]
        revised_report = [revised_report[i] for i in keep]
        text = " ".join(revised_parts)
    return {
        "id": resp.id,
        "response_id": resp.id,
        "text": text,
        "sentences": report,
        "judge": NAME,
        "prompt_version": VERSION,
        "meta": {
            "mode": mode,
            "hallucinated": sorted({w for s in report for w in _wrong_of(s)}),
            "removed_objects": sorted(set(removed)),
            "replaced_objects": [list(p) for p in replaced],
            "sentences_original": original,
            "sentences_revised": revised_report,
            "changed": text != " ".join(sentences),
        },
    }


def _wrong_of(entry: dict) -> list[str]:
    return [o.split(" -> ")[0] for o in entry["objects"]]


_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _rewrite(sent: str, wrong: list[str], unused: list[str], matcher, truth: set[str]):
    """(sentence with each wrong object's words swapped for an unused true object, [(wrong, right)]),
    or None when there are not enough unused objects or the swap does not come out clean."""
    from hallu.objects import singularize

    if len(unused) < len(wrong):
        return None
    swap = dict(zip(wrong, unused, strict=False))  # unused may be longer
    words = [(m.start(), m.end(), m.group(0)) for m in _WORD.finditer(sent)]
    pieces, at, i = [], 0, 0
    while i < len(words):
        start, end, word = words[i]
        single = singularize(word.lower())
        hit, span_end, plural = None, end, single != word.lower()
        if i + 1 < len(words):  # double words first ("hot dog", "wine glass"), as CHAIR merges them
            nxt = singularize(words[i + 1][2].lower())
            merged = matcher.double_words.get(f"{single} {nxt}")
            node = matcher.node_of(merged) if merged else None
            if node in swap:
                hit, span_end, plural = node, words[i + 1][1], nxt != words[i + 1][2].lower()
                i += 1
        if hit is None:
            node = matcher.node_of(single)
            hit = node if node in swap else None
        if hit is not None:
            pieces.append(sent[at:start])
            pieces.append(_plural(swap[hit]) if plural else swap[hit])
            at = span_end
        i += 1
    pieces.append(sent[at:])
    new = "".join(pieces)
    if any(n not in truth for n in matcher.node_words(new)):
        return None
    return new, list(swap.items())


def _plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    elif last.endswith("fe"):
        last = last[:-2] + "ves"
    else:
        last += "s"
    return f"{head} {last}".strip()
