"""The openai revise judge: sentence-level correction by an OpenAI-compatible model (OPA-DPO, HA-DPO).

One chat call per response asks for OPA-DPO's report (specs/methods.md §5.2): per numbered sentence
``copied_content``, ``score`` 1-4, ``error_type``, ``object``, ``rewritten_content``, ``reason``, plus
``image_description`` and an optional ``Added``. hallu numbers the sentences itself
(:func:`hallu.objects.split_sentences`), so the reply is read against known numbers: entries for
numbers the response lacks are ignored, and a sentence without an entry counts as unchanged (no
score, weight 1). ``prompt``: ``opa`` sends the image (as a data URL) with the reference answer;
``ha-dpo`` sends the image's annotations as text (HA-DPO's detect-and-correct). With ``rewrites`` N,
HA-DPO's style-consistency step asks for N rewrites of the corrected and of the original answer.

Transport, retries, the reply cache (``RUN/revise/judge_cache.jsonl``: a rerun makes no calls), the
cost meter and ``max_cost`` are :class:`hallu.judges.openai.OpenAIJudge`'s. A reply that is not the
JSON asked for is re-asked (``reasks`` times, as new samples); one still unreadable is a failed
revision (kept as the original text, ``meta.failed``), which no pair is built from. A request that
exhausted its retries, or ``max_cost`` reached, stops the stage with one line: finished batches are
kept and every reply is cached, so the rerun resumes at no cost.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from hallu.errors import HalluError

NAME = "openai"
VERSION = "revise-openai-v1"
PROMPTS = {"opa": ("opa_correct_v1.txt", "opa-correct-v1"), "ha-dpo": ("hadpo_correct_v1.txt", "hadpo-correct-v1")}
REWRITE_PROMPT = ("hadpo_rewrite_v1.txt", "hadpo-rewrite-v1")
ERROR_TYPES = ("correct", "image_recognition_error", "language_comprehension_error")

OPTIONS: dict = {
    "model": "gpt-4o",
    "prompt": "opa",  # opa | ha-dpo
    "rewrites": 0,  # HA-DPO style-consistent rewrites per side (the paper: 3)
    "send_image": True,
    "temperature": 0.0,
    "max_tokens": 3000,
    "reasks": 2,  # re-asks of a reply that is not the JSON asked for
    "base_url": None,
    "api_key_env": "OPENAI_API_KEY",
    "concurrency": 8,
    "timeout_s": 120.0,
    "max_attempts": 6,
    "backoff_s": 1.0,
    "max_cost": None,
    "price": None,  # "IN,OUT" USD per million tokens for `model`
    "cache_path": None,  # None: RUN/revise/judge_cache.jsonl
}

_state: dict = {}  # the client of this process, reused across batches (its meter counts the stage)


def default_method(options: dict) -> str:
    return "ha-dpo" if options.get("prompt") == "ha-dpo" else "opa-dpo"


def _config(options: dict):
    from hallu.judges.openai import DEFAULT_PRICES, JudgeConfig, parse_price

    prices = dict(DEFAULT_PRICES)
    if options.get("price"):
        prices[options["model"]] = parse_price(str(options["price"]))
    return JudgeConfig(model=options["model"], base_url=options.get("base_url"),
                       api_key_env=options["api_key_env"], concurrency=int(options["concurrency"]),
                       timeout_s=float(options["timeout_s"]), max_attempts=int(options["max_attempts"]),
                       backoff_base_s=float(options["backoff_s"]), backoff_max_s=max(60.0, float(options["backoff_s"])),
                       max_cost=None if options.get("max_cost") is None else float(options["max_cost"]),
                       prices=prices)


def check(options: dict) -> None:
    """Every option, and the API key, before any record is read."""
    from hallu.judges.openai import OpenAIJudge

    opts = {**OPTIONS, **options}
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise HalluError(f"--judge openai: unknown option(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
    if opts["prompt"] not in PROMPTS:
        raise HalluError(f"--option prompt={opts['prompt']}: choose one of {', '.join(PROMPTS)}")
    for key in ("rewrites", "reasks"):
        if not isinstance(opts[key], int) or opts[key] < 0:
            raise HalluError(f"--option {key}={opts[key]}: must be a whole number, 0 or more")
    if opts["max_cost"] is not None and float(opts["max_cost"]) < 0:
        raise HalluError(f"--max-cost {opts['max_cost']}: must not be negative")
    OpenAIJudge(_config(opts), cache=None)  # a missing key or an unpriced --max-cost: one line, now


def reset() -> None:
    """A new stage begins: a fresh client, so its meter counts this stage's calls only."""
    _state.clear()


def usage() -> dict:
    judge = _state.get("judge")
    return judge.meter.to_dict() if judge is not None else {}


def _judge(options: dict):
    from hallu.judges.openai import OpenAIJudge

    config = _config(options)
    key = (config, options.get("cache_path"))
    if _state.get("key") != key:
        _state.update(key=key, judge=OpenAIJudge(config, cache=options.get("cache_path")))
    return _state["judge"]


def _template(name: str) -> str:
    from importlib.resources import files

    return (files("hallu.data") / "prompts" / name).read_text(encoding="utf-8")


def _data_url(path: Path) -> str:
    mime = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp", ".gif": "gif"}.get(
        Path(path).suffix.lower(), "png")
    return f"data:image/{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _annotations(prompt) -> dict:
    out: dict = {}
    if prompt.objects:
        out["objects"] = list(prompt.objects)
    regions = [r for r in prompt.regions if isinstance(r.get("phrase"), str)]
    if regions:
        out["regions"] = [{"box": [r.get("x"), r.get("y"), r.get("width"), r.get("height")], "phrase": r["phrase"]}
                          for r in regions]
    captions = prompt.meta.get("captions") if isinstance(prompt.meta.get("captions"), list) else None
    if captions or prompt.reference:
        out["captions"] = captions or [prompt.reference]
    return out


def correction_request(group, resp, sentences: list[str], options: dict, sample: int = 0):
    from hallu.judges.openai import ChatRequest

    file, version = PROMPTS[options["prompt"]]
    payload = {"question": group.prompt.question, "sentences": {str(i): s for i, s in enumerate(sentences)}}
    if options["prompt"] == "opa":
        payload["reference"] = group.prompt.reference or ""
    ann = _annotations(group.prompt)
    if ann:
        payload["annotations"] = ann
    user: list[dict] = [{"type": "text", "text": json.dumps(payload, ensure_ascii=False)}]
    if options["send_image"] and options["prompt"] == "opa":
        user += [{"type": "image_url", "image_url": {"url": _data_url(p)}} for p in group.images]
    return ChatRequest(messages=[{"role": "system", "content": _template(file)}, {"role": "user", "content": user}],
                       params={"temperature": options["temperature"], "max_tokens": options["max_tokens"]},
                       prompt_version=version, sample=sample, tag=f"{resp.id} (correction)")


def rewrite_request(text: str, n: int, options: dict, tag: str, sample: int = 0):
    from hallu.judges.openai import ChatRequest

    file, version = REWRITE_PROMPT
    values = {"n": str(n), "text": text}
    body = re.sub(r"\{(n|text)\}", lambda m: values[m.group(1)], _template(file))
    return ChatRequest(messages=[{"role": "user", "content": body}],
                       params={"temperature": 0.7, "max_tokens": options["max_tokens"]},
                       prompt_version=version, sample=sample, tag=tag)


# --------------------------------------------------------------------------------------------------
# Tolerant parsing


def parse_json_object(text: str) -> dict | None:
    """The JSON object in a reply: fenced or bare, with prose around it, trailing commas forgiven."""
    if not isinstance(text, str):
        return None
    s = re.sub(r"```(?:json|JSON)?", "", text).strip()
    start, end = s.find("{"), s.rfind("}")
    if start < 0 or end <= start:
        return None
    body = s[start : end + 1]
    for candidate in (body, re.sub(r",\s*([}\]])", r"\1", body)):
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        return obj if isinstance(obj, dict) else None
    return None


def _score(value) -> int | None:
    try:
        score = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return score if 1 <= score <= 4 else None


def _error_type(value) -> str | None:
    v = str(value or "").strip().lower().replace(" ", "_")
    return v if v in ERROR_TYPES else None


def read_report(report: dict, sentences: list[str]) -> dict | None:
    """Revision fields from an OPA report over ``sentences``; None when it judges none of them."""
    entries: dict[int, dict] = {}
    for key, value in report.items():
        if isinstance(value, dict) and str(key).strip().isdigit():
            k = int(str(key).strip())
            if k < len(sentences):  # numbers the response lacks are ignored
                entries[k] = value
    if sentences and not entries:
        return None
    labels, original, revised_parts, revised = [], [], [], []
    for k, sent in enumerate(sentences):
        e = entries.get(k)
        if e is None:  # not judged: kept as it was, no weight of its own
            labels.append({"text": sent, "label": "unjudged", "score": None, "error_type": None, "revised": sent,
                           "objects": []})
            original.append({"text": sent, "score": None, "error_type": None})
            revised_parts.append(sent)
            revised.append({"text": sent, "score": None, "error_type": None})
            continue
        score, etype = _score(e.get("score")), _error_type(e.get("error_type"))
        new = e.get("rewritten_content")
        new = sent if not isinstance(new, str) else new.strip()
        objects = e.get("object") if isinstance(e.get("object"), list) else []
        label = "correct" if (score == 4 or (score is None and etype == "correct")) and new == sent else "hallucinated"
        labels.append({"text": sent, "label": label, "score": score, "error_type": etype, "revised": new,
                       "objects": [str(o) for o in objects], "reason": str(e.get("reason", ""))})
        original.append({"text": sent, "score": score, "error_type": etype})
        if new:
            revised_parts.append(new)
            revised.append({"text": new, "score": score, "error_type": etype})
    added = report.get("Added")
    added_text = added.get("rewritten_content") if isinstance(added, dict) else added
    if isinstance(added_text, str) and added_text.strip():
        revised_parts.append(added_text.strip())
        revised.append({"text": added_text.strip(), "score": None, "error_type": None})
    desc = report.get("image_description")
    return {"text": " ".join(revised_parts), "sentences": labels, "sentences_original": original,
            "sentences_revised": revised, "image_description": desc if isinstance(desc, str) else None,
            "added": added_text.strip() if isinstance(added_text, str) and added_text.strip() else None}


def _rewrites_of(text: str | None, n: int) -> list[str] | None:
    obj = parse_json_object(text or "")
    items = obj.get("rewrites") if obj else None
    if not isinstance(items, list):
        return None
    out = [s.strip() for s in items if isinstance(s, str) and s.strip()]
    return out[:n] if len(out) >= n else None


# --------------------------------------------------------------------------------------------------


def judge_groups(groups, options: dict, *, progress=None) -> list[dict]:
    from hallu.objects import split_sentences

    opts = {**OPTIONS, **options}
    judge = _judge(opts)
    items = [(g, r, split_sentences(r.text)) for g in groups for r in g.responses]
    parsed: dict[str, dict | None] = {}
    attempts = {r.id: 0 for _, r, _ in items}
    pending = list(items)
    for sample in range(opts["reasks"] + 1):
        if not pending:
            break
        results = _ask(judge, [correction_request(g, r, s, opts, sample) for g, r, s in pending])
        retry = []
        for (g, r, s), res in zip(pending, results, strict=True):
            attempts[r.id] += 1
            if not res.ok:
                parsed[r.id] = {"failed": res.error_kind or "failed", "error": res.error}
                continue
            obj = parse_json_object(res.text)
            report = read_report(obj, s) if obj is not None else None
            if report is None:
                parsed[r.id] = {"failed": "unparseable", "error": "reply is not the JSON report asked for"}
                retry.append((g, r, s))
            else:
                parsed[r.id] = report
        pending = retry

    variants: dict[str, dict] = {}
    if opts["rewrites"]:
        variants = _rewrite_all(judge, [(r, parsed[r.id]) for _, r, _ in items], opts)

    out = []
    for _group, r, s in items:
        rep = parsed[r.id]
        meta = {"prompt": opts["prompt"], "model": opts["model"], "attempts": attempts[r.id]}
        if "failed" in rep:
            meta.update(failed=rep["failed"], error=rep["error"])
            out.append({"id": r.id, "response_id": r.id, "text": r.text, "sentences": [], "judge": NAME,
                        "prompt_version": PROMPTS[opts["prompt"]][1], "meta": meta})
            continue
        meta.update(sentences_original=rep["sentences_original"], sentences_revised=rep["sentences_revised"],
                    image_description=rep["image_description"], added=rep["added"],
                    changed=rep["text"] != " ".join(s))
        meta.update(variants.get(r.id, {}))
        out.append({"id": r.id, "response_id": r.id, "text": rep["text"], "sentences": rep["sentences"],
                    "judge": NAME, "prompt_version": PROMPTS[opts["prompt"]][1], "meta": meta})
    if progress is not None:
        progress(len(out))
    return out


def _rewrite_all(judge, done: list, opts: dict) -> dict[str, dict]:
    """meta.chosen_variants / meta.rejected_variants for each corrected response that changed."""
    n = opts["rewrites"]
    jobs = []  # (response id, side, text)
    for r, rep in done:
        if "failed" not in rep and rep["text"].strip() and rep["text"] != r.text:
            jobs += [(r.id, "chosen_variants", rep["text"]), (r.id, "rejected_variants", r.text)]
    got: dict[tuple[str, str], list[str]] = {}
    pending = list(jobs)
    for sample in range(opts["reasks"] + 1):
        if not pending:
            break
        results = _ask(judge, [rewrite_request(t, n, opts, f"{rid} ({side})", sample) for rid, side, t in pending])
        retry = []
        for job, res in zip(pending, results, strict=True):
            items = _rewrites_of(res.text, n) if res.ok else None
            if items is None and res.ok:
                retry.append(job)
            elif items is not None:
                got[job[:2]] = items
        pending = retry
    out: dict[str, dict] = {}
    for rid, side, _ in jobs:
        if (rid, side) in got:
            out.setdefault(rid, {})[side] = got[(rid, side)]
        else:
            out.setdefault(rid, {})["rewrites_failed"] = True
    return out


def _ask(judge, requests):
    """Run the requests; stop the batch (kept replies cached) on max_cost or exhausted retries."""
    results = judge.chat_many(requests)
    budget = [r for r in results if r.error_kind == "max_cost"]
    if budget:
        raise HalluError(f"judge: {budget[0].error}; finished batches are kept and replies cached: rerun with a "
                         "higher --max-cost to go on")
    exhausted = [r for r in results if r.error_kind == "retries_exhausted"]
    if exhausted:
        raise HalluError(f"judge: {len(exhausted)} of {len(results)} requests failed after every retry (first: "
                         f"{exhausted[0].tag}: {exhausted[0].error}); finished batches are kept, rerun to resume")
    return results
