"""Preference pairs from a judge's revisions, one builder per method (what ``hallu dpo`` trains on).

- ``dpo`` / ``ha-dpo``: the revised answer ≻ the model's original. HA-DPO's style-consistent
  rewrites ride along as ``meta.chosen_variants`` / ``meta.rejected_variants`` when the judge made
  them (:func:`hallu.methods.ha_dpo.expand_variants` picks from them at training time).
- ``opa-dpo``: chosen = the ground-truth answer (the prompt's reference; the revised answer when
  there is none), rejected = the original, ``meta.revised`` = the revised answer, ``meta.gt``, and
  the judge's per-sentence report as ``meta.sentences_original`` / ``meta.sentences_revised``
  (``{text, score, error_type}``), from which OPA-DPO's token weights come.
- ``clip-dpo`` / ``mia-dpo``: the judge ranked the K samples of a prompt; the response it marked
  ``meta.role == "chosen"`` ≻ the one marked ``"rejected"``, with the judge's scores and thresholds
  copied into the pair.

A response the judge found nothing wrong with gives no revised≻original pair (the two sides would be
equal); an empty revision neither. Those are counted in the returned ``skipped`` reasons.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from hallu.errors import HalluError
from hallu.records import PreferencePair, Prompt, Response, Revision

METHODS = ("dpo", "ha-dpo", "opa-dpo", "clip-dpo", "mia-dpo")
RANKED = ("clip-dpo", "mia-dpo")
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
            pairs.append(_pair(pid, prompt, images, c_rev.text or c_resp.text, r_resp.text, meta))
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
            gt = (prompt.reference or "").strip() or None
            meta.update(revised=revised, gt=gt, original=resp.text,
                        sentences_original=_sentence_weights(rev.meta.get("sentences_original"), rev.sentences,
                                                             "text"),
                        sentences_revised=_sentence_weights(rev.meta.get("sentences_revised"), rev.sentences,
                                                            "revised"))
            pairs.append(_pair(resp.id, prompt, images, gt or revised, resp.text, meta))
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
        pairs.append(_pair(resp.id, prompt, images, revised, resp.text, meta))
    return pairs, skipped


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
          meta: dict) -> PreferencePair:
    return PreferencePair(id=pid, images=list(images.get(prompt.id, prompt.images)), prompt=prompt.question,
                          chosen=chosen, rejected=rejected, meta=meta)


def absolute_images(prompt: Prompt, base: Path) -> list[str]:
    """A prompt's image paths made absolute (what pairs files hold)."""
    return [str(p if Path(p).is_absolute() else (Path(base) / p).resolve()) for p in prompt.images]
