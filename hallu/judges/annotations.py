"""The offline judge: objects a response mentions that the image's annotations lack are hallucinated.

Object mentions are found with CHAIR's word machinery (:mod:`hallu.objects`), so "knives", "a dining
table" and "motorbike" count as the COCO categories knife, dining table and motorcycle. The ground
truth of a prompt is, as in CHAIR, its annotated objects (COCO instances, the shapes world's glyphs)
plus the objects its reference caption and its VG region phrases mention (``use_reference``).

Each sentence that names an object outside the ground truth is, by ``mode``:

- ``remove``: dropped;
- ``rewrite``: its hallucinated object words are replaced by annotated objects the answer has not
  mentioned yet (OPA-DPO's ``wrong -> right``); when too few are left, the wrong items are deleted from
  the sentence's list ("a fork, a spoon and a knife" -> "a fork and a spoon"); a sentence that cannot be
  repaired either way is dropped.

A yes/no question about one object ("Is there a knife in the image?", POPE's form) is judged by its
answer instead: "yes" about an object the ground truth lacks is that object hallucinated, "no" about one
it holds is a miss; either is revised to the true answer, in the response's own casing.

The revised text is checked again with the same machinery: nothing hallucinated survives. Every
sentence also gets an OPA-DPO style report entry (score 4 / ``correct`` when clean, 2 /
``image_recognition_error`` when it named a missing object), so the OPA token weights work without an
API.
"""

from __future__ import annotations

import re

from hallu.errors import HalluError

NAME = "annotations"
VERSION = "annotations-v2"  # v2: yes/no questions are judged by their answer
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
        asked = asked_object(group.prompt.question, matcher)
        for resp in group.responses:
            verdict = _revise_answer(resp, asked, truth, opts["mode"]) if asked else None
            out.append(verdict or _revise(resp, truth, opts["mode"], matcher, split_sentences))
        if progress is not None:
            progress(len(group.responses))
    return out


_YES_NO_QUESTION = re.compile(r"^\s*(is|are) there\b", re.IGNORECASE)
_ANSWER = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def asked_object(question: str | None, matcher) -> str | None:
    """The one COCO category a yes/no "Is there ...?" question asks about, else None."""
    if not question or not _YES_NO_QUESTION.match(question):
        return None
    objects = list(dict.fromkeys(matcher.node_words(question)))
    return objects[0] if len(objects) == 1 else None


def _revise_answer(resp, asked: str, truth: set[str], mode: str) -> dict | None:
    """The verdict on a yes/no answer about ``asked``; None when the response answers neither yes nor no
    (it is then judged as free text)."""
    m = _ANSWER.match(resp.text)
    if m is None:
        return None
    said_yes = m.group(1).lower() == "yes"
    present = asked in truth
    wrong = said_yes != present
    word = "Yes" if present else "No"
    revised = (word if m.group(1)[0].isupper() else word.lower()) if wrong else resp.text
    entry = {"text": resp.text, "score": WRONG_SCORE if wrong else CLEAN_SCORE,
             "error_type": "image_recognition_error" if wrong else "correct"}
    hallucinated = [asked] if wrong and said_yes else []
    return {
        "id": resp.id,
        "response_id": resp.id,
        "text": revised,
        "sentences": [{"text": resp.text, "label": "hallucinated" if wrong else "correct", "score": entry["score"],
                       "error_type": entry["error_type"], "objects": hallucinated, "revised": revised}],
        "judge": NAME,
        "prompt_version": VERSION,
        "meta": {
            "mode": mode,
            "hallucinated": hallucinated,
            "removed_objects": [],
            "replaced_objects": [],
            "sentences_original": [entry],
            "sentences_revised": [{"text": revised, "score": CLEAN_SCORE, "error_type": "correct"}],
            "changed": wrong,
            "answer": {"object": asked, "said": "yes" if said_yes else "no", "truth": "yes" if present else "no"},
        },
    }


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
        if new is None and mode == "rewrite":
            new = _drop_from_list(sent, wrong, matcher, truth)
            if new is not None:
                removed.extend(wrong)
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


_LIST_SEP = re.compile(r",\s*(?:and\s+)?|\s+and\s+")
_DETERMINER = re.compile(r"\b(?:a|an|the|some|one|two|three|four|five|several|many)\s", re.IGNORECASE)


def _drop_from_list(sent: str, wrong: list[str], matcher, truth: set[str]):
    """(the sentence with each item naming a wrong object taken out of its enumeration, []) or None.

    The sentence is read as ``HEAD ITEM, ITEM and ITEM.``: the first item is the determiner nearest before
    the first part's last word and what follows it. None when some item holds both a wrong and a right
    object, nothing would be left, or the result is not clean."""
    core, end = sent.rstrip(), ""
    if core[-1:] in (".", "!", "?"):
        core, end = core[:-1], core[-1]
    items = _LIST_SEP.split(core)
    if len(items) < 2:
        return None
    # The head ends at the determiner nearest before the first item's first word (`The image shows | a knife`).
    starts = [m.start() for m in _DETERMINER.finditer(items[0])]
    last_word = items[0].split()[-1] if items[0].split() else ""
    cut = max((i for i in starts if i < items[0].rfind(last_word)), default=None) if last_word else None
    if cut is None or cut == 0:
        return None
    head, items[0] = items[0][:cut], items[0][cut:]
    keep = []
    for item in items:
        named = set(matcher.node_words(item))
        bad = named & set(wrong)
        if bad and named - bad:
            return None
        if not bad:
            keep.append(item)
    if not keep or len(keep) == len(items):
        return None
    joined = keep[0] if len(keep) == 1 else ", ".join(keep[:-1]) + " and " + keep[-1]
    new = head + joined + end
    if any(n not in truth for n in matcher.node_words(new)):
        return None
    return new, []


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
