"""Preference pairs from a judge's revisions, one builder per method (what ``hallu dpo`` trains on).

- ``dpo`` / ``ha-dpo``: the revised answer ≻ the model's original. HA-DPO's style-consistent
  rewrites ride along as ``meta.chosen_variants`` / ``meta.rejected_variants`` when the judge made
  them (:func:`hallu.methods.ha_dpo.expand_variants` picks from them at training time).
- ``opa-dpo``: chosen = the ground-truth answer (the prompt's reference; the revised answer when
  there is none), rejected = the original, ``meta.revised`` = the revised answer, ``meta.gt``, and
  the judge's per-sentence report as ``meta.sentences_original`` / ``meta.sentences_revised``
  (``{text, score, error_type}``), from which OPA-DPO's token weights come.
- ``clip-dpo``: the judge ranked the K samples of a prompt; the response it marked
  ``meta.role == "chosen"`` ≻ the one marked ``"rejected"``, with the judge's scores and thresholds
  copied into the pair.
- ``mia-dpo``: the attention judge marks the responses it selects ``meta.role == "rejected"``,
  ``meta.chosen == "reference"``: chosen = the prompt's reference (MIA's ground truth), rejected = the
  response. One pair per prompt, as MIA-DPO's generator makes one answer per prompt: of several
  selected samples the judge's top-ranked (``meta.rank``). Then the data-set-wide post-selection the
  judge cannot do batch by batch: the ``drop_top_perplexity`` fraction of the pairs with the highest
  perplexity go (specs/methods.md §4.5). The ratio, threshold, perplexity and layout ride in ``meta``.

A response to a later turn of a multi-turn prompt (``meta.turn`` > 0) gives a pair whose ``prompt``
is that turn, the turns before it in ``meta.history`` (``[{role, text}]``) and its index in
``meta.turn``; the prompt's reference answers the first turn, so it is no ground truth for such a pair.

A response the judge found nothing wrong with gives no revised≻original pair (the two sides would be
equal); an empty revision neither. Those are counted in the returned ``skipped`` reasons. A yes/no
answer the judge found right is the exception: its pair is the answer ≻ its opposite
(``meta.counterfactual``), for every method here, so yes/no pairs come in the proportion of the
questions' true answers, not of the model's mistakes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from hallu.errors import HalluError
from hallu.records import PreferencePair, Prompt, Response, Revision

METHODS = ("dpo", "ha-dpo", "opa-dpo", "clip-dpo", "mia-dpo")
RANKED = ("clip-dpo", "mia-dpo")  # pairs from a judge's ranking of the K samples
# The method a judge's output is meant for, when --method is not given.
DEFAULT_METHOD = {"annotations": "dpo", "openai": "opa-dpo", "clip": "clip-dpo", "attention": "mia-dpo"}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise HalluError(f"--method {method}: unknown (choose from {', '.join(METHODS)})")


def build_pairs(method: str, prompts: dict[str, Prompt], responses: list[Response], revisions: list[Revision],
                options: dict | None = None, *, image_paths: dict[str, list[str]] | None = None
                ) -> tuple[list[PreferencePair], Counter]:
    """(pairs, skipped reasons) for ``method``.

    ``prompts``: by id. ``image_paths``: prompt id -> the image paths to write into pairs (resolved,
    absolute: a pairs file must not depend on where the prompts file was); default the prompt's own.
    """
    check_method(method)
    options = options or {}
    by_response = {r.id: r for r in responses}
    images = image_paths or {}
    skipped: Counter = Counter()
    pairs: list[PreferencePair] = []
    if method == "mia-dpo":
        return _mia_pairs(prompts, responses, revisions, by_response, images, options)
    if method in RANKED:
        groups: dict[str, dict[str, list[tuple[Revision, Response]]]] = {}
        for rev in revisions:
            resp = by_response.get(rev.response_id)
            if resp is None:
                raise HalluError(f"revision {rev.id!r}: response {rev.response_id!r} is not in the responses")
            role = rev.meta.get("role")
            if role in ("chosen", "rejected"):
                groups.setdefault(resp.prompt_id, {}).setdefault(role, []).append((rev, resp))
        for pid in dict.fromkeys(r.prompt_id for r in responses):
            g = groups.get(pid, {})
            if not g.get("chosen") or not g.get("rejected"):
                skipped["no chosen/rejected pair passed the judge's filters"] += 1
                continue
            (c_rev, c_resp), (r_rev, r_resp) = _best(g["chosen"]), _best(g["rejected"])
            prompt = prompts[pid]
            meta = {"method": method, "judge": c_rev.judge, "prompt_id": pid,
                    "chosen_response": c_resp.id, "rejected_response": r_resp.id,
                    "chosen_judge": _public(c_rev.meta), "rejected_judge": _public(r_rev.meta)}
            pairs.append(_pair(pid, prompt, images, c_rev.text or c_resp.text, r_resp.text, meta, r_resp))
        return pairs, skipped

    for rev in revisions:
        resp = by_response.get(rev.response_id)
        if resp is None:
            raise HalluError(f"revision {rev.id!r}: response {rev.response_id!r} is not in the responses")
        prompt = prompts[resp.prompt_id]
        if rev.meta.get("failed"):
            skipped[f"judge failed ({rev.meta['failed']})"] += 1
            continue
        revised = rev.text.strip()
        if not revised:
            skipped["revision is empty (every sentence was wrong)"] += 1
            continue
        meta = {"method": method, "judge": rev.judge, "prompt_version": rev.prompt_version,
                "prompt_id": prompt.id, "response_id": resp.id, "model": resp.model}
        if method == "opa-dpo":
            # The reference answers the first turn: no ground truth for a later turn's answer.
            gt = None if _turn(resp) else (prompt.reference or "").strip() or None
            meta.update(revised=revised, gt=gt, original=resp.text,
                        sentences_original=_sentence_weights(rev.meta.get("sentences_original"), rev.sentences,
                                                             "text"),
                        sentences_revised=_sentence_weights(rev.meta.get("sentences_revised"), rev.sentences,
                                                            "revised"))
            rejected, opposite = resp.text, _opposite_answer(rev)
            if opposite is not None:  # a right yes/no answer: against its opposite (see below)
                rejected = opposite
                wrong = {"text": opposite, "score": 2, "error_type": "image_recognition_error"}
                meta.update(original=opposite, counterfactual=True, sentences_original=[wrong])
            pairs.append(_pair(resp.id, prompt, images, gt or revised, rejected, meta, resp))
            continue
        opposite = _opposite_answer(rev)
        if opposite is not None:
            meta["counterfactual"] = True
            pairs.append(_pair(resp.id, prompt, images, resp.text, opposite, meta, resp))
            continue
        if revised == resp.text.strip():
            skipped["judge found nothing to correct"] += 1
            continue
        if method == "ha-dpo":
            for key in ("chosen_variants", "rejected_variants"):
                if rev.meta.get(key):
                    meta[key] = list(rev.meta[key])
        for key in ("hallucinated", "removed_objects"):
            if key in rev.meta:
                meta[key] = rev.meta[key]
        pairs.append(_pair(resp.id, prompt, images, revised, resp.text, meta, resp))
    return pairs, skipped


def _opposite_answer(rev: Revision) -> str | None:
    """For a yes/no answer the judge found right, the other answer (in its casing), else None.

    Why: a closed question has exactly one wrong answer, so a right one still makes a pair (right ≻
    opposite). Pairs from mistakes alone hold only the base's own error direction (a base that says
    "yes" too often gives only "no" ≻ "yes"), and training on them tips the answer to the other side
    (measured on the shapes world: POPE yes-ratio 96 % -> 0-7 %)."""
    answer = rev.meta.get("answer")
    if not isinstance(answer, dict) or rev.meta.get("changed") or answer.get("said") != answer.get("truth"):
        return None
    said = (rev.text or "").strip()
    other = "No" if answer["said"] == "yes" else "Yes"
    return other if said[:1].isupper() else other.lower()


def _mia_pairs(prompts: dict[str, Prompt], responses: list[Response], revisions: list[Revision],
               by_response: dict[str, Response], images: dict[str, list[str]], options: dict
               ) -> tuple[list[PreferencePair], Counter]:
    from hallu.judges.attention import drop_top_perplexity

    fraction = options.get("drop_top_perplexity", 0.0)
    skipped: Counter = Counter()
    selected: dict[str, list[tuple[Revision, Response]]] = {}
    for rev in revisions:
        resp = by_response.get(rev.response_id)
        if resp is None:
            raise HalluError(f"revision {rev.id!r}: response {rev.response_id!r} is not in the responses")
        if rev.meta.get("role") == "rejected" and rev.meta.get("chosen") == "reference":
            selected.setdefault(resp.prompt_id, []).append((rev, resp))
    kept: list[tuple[Revision, Response]] = []
    for pid in dict.fromkeys(r.prompt_id for r in responses):
        if pid not in selected:
            skipped["the attention judge selected no response of the prompt"] += 1
            continue
        kept.append(_best(selected[pid]))
        skipped["a lower-ranked selected sample of the same prompt"] += len(selected[pid]) - 1
    dropped = drop_top_perplexity([rev for rev, _ in kept], fraction)
    pairs = []
    for rev, resp in kept:
        if rev.id in dropped:
            skipped[f"perplexity in the top {fraction:g} of the pairs (drop_top_perplexity)"] += 1
            continue
        prompt = prompts[resp.prompt_id]
        gt = (prompt.reference or "").strip() or rev.text.strip()
        meta = {"method": "mia-dpo", "judge": rev.judge, "prompt_version": rev.prompt_version,
                "prompt_id": prompt.id, "response_id": resp.id, "model": resp.model, "gt": gt,
                **{k: rev.meta[k] for k in MIA_META if k in rev.meta}}
        pairs.append(_pair(prompt.id, prompt, images, gt, resp.text, meta, resp))
    return pairs, +skipped  # + drops zero counts


# What of the attention judge's verdict a MIA-DPO pair keeps (auditable: the numbers and the rules).
MIA_META = ("format", "ratio", "threshold", "rule", "layer", "perplexity", "length_ratio", "edit_distance", "rank")


def _turn(resp: Response) -> int:
    turn = resp.meta.get("turn") or 0
    return turn if isinstance(turn, int) and not isinstance(turn, bool) else 0


def _question(prompt: Prompt, resp: Response | None) -> tuple[str, list[dict]]:
    """(the user turn ``resp`` answered, the turns before it): a later turn's (``meta.turn``, the index of
    the user turn, as rollout records it) from ``prompt.meta.turns``, else the prompt's question."""
    turn = _turn(resp) if resp is not None else 0
    if not turn:
        return prompt.question, []
    turns = prompt.meta.get("turns") or []
    users = [i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("role") == "user"]
    if turn >= len(users):
        raise HalluError(f"response {resp.id!r}: answers user turn {turn}, but prompt {prompt.id!r} has "
                         f"{len(users)} user turns in meta.turns")
    at = users[turn]
    history = [{"role": t["role"], "text": str(t.get("text", ""))} for t in turns[:at]]
    return str(turns[at].get("text", "")), history


def _best(entries: list[tuple[Revision, Response]]) -> tuple[Revision, Response]:
    """The top-ranked of several candidates for one role (lowest ``meta.rank``; then sample order)."""
    return min(entries, key=lambda e: (e[0].meta.get("rank", 0), e[1].sample))


def _public(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "role"}


def _sentence_weights(given, sentences: list[dict], text_key: str) -> list[dict]:
    """OPA's ``[{text, score, error_type}]``: the judge's own list, else read off Revision.sentences."""
    if isinstance(given, list):
        return [{"text": s.get("text", ""), "score": s.get("score"), "error_type": s.get("error_type")}
                for s in given if isinstance(s, dict) and s.get("text")]
    out = []
    for s in sentences:
        text = s.get(text_key) if text_key != "text" else s.get("text")
        if isinstance(text, str) and text.strip():
            out.append({"text": text, "score": s.get("score"), "error_type": s.get("error_type")})
    return out


def _pair(pid: str, prompt: Prompt, images: dict[str, list[str]], chosen: str, rejected: str,
          meta: dict, resp: Response | None = None) -> PreferencePair:
    """A pair asking the turn ``resp`` answered (its rejected side's response)."""
    question, history = _question(prompt, resp)
    if history:
        meta = {**meta, "turn": _turn(resp), "history": history}
    if prompt.meta.get("split") is not None:  # the training stages skip held-out splits (hallu.records.is_held_out)
        meta = {**meta, "split": prompt.meta["split"]}
    return PreferencePair(id=pid, images=list(images.get(prompt.id, prompt.images)), prompt=question,
                          chosen=chosen, rejected=rejected, meta=meta)


def absolute_images(prompt: Prompt, base: Path) -> list[str]:
    """A prompt's image paths made absolute (what pairs files hold)."""
    return [str(p if Path(p).is_absolute() else (Path(base) / p).resolve()) for p in prompt.images]
