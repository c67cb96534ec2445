"""SHR, the Sentence-level Hallucination Ratio of HA-DPO (Zhao et al. 2023), as the official code computes it.

Reference: opendatalab/HA-DPO@42f72c53, ``ha_dpo/shr_eval/json_eval.py`` (driver), ``shr_utils.py``
(``get_model_cap``, ``get_desc``, ``seg_cap``, ``post_process_no_revise``, ``get_metric``,
``cal_repetition``) and ``gpt_utils.py`` (prompt, decoding). Per image of Visual Genome:

1. **Regions**: one line ``[x1, y1, x2, y2]: phrase`` per region with a non-empty phrase; each
   coordinate (x/W, y/H, (x+w)/W, (y+h)/H) is formatted with 2 decimals, turned back into a float and
   the four are printed as a Python list (``[0.5, 0.08, 0.88, 0.75]``). Region entries are keyed by
   the ``image_id`` of their *first* region.
2. **Facts**: the SHR facts of the image, each followed by ``"\\n"``; ``""`` when it has none. With
   several fact files a later file wins for an image id; of each JSONL line only the first key counts.
3. **Numbered sentences** (``get_model_cap``): split the raw response on *every* ``"."`` (so "Mr." and
   "2.5" split too), strip each piece, drop empty pieces, exact repeats of a kept piece and pieces
   that are a substring of a kept piece, and emit ``"k. sentence\\n"``; ``is_repeated`` says whether
   anything was dropped as a repeat.
4. **Judge**: one user message with the prompt filled with the three blocks; GPT-4 with temperature
   0.7, top_p 1, n 1, max_tokens 800, stop ``"###"``, logit_bias ``{"50256": -100}``; one run.
5. **Parsing** (``post_process_no_revise``): the response is re-split with the same rules
   (``seg_cap``), which appends ``"."`` to every kept sentence (its ``!= '.' or != '?'`` test is always
   true, so "What?" becomes "What?."); the reply is split on ``"\\n"``, empty lines dropped, and the
   lines after the first line *containing* ``"Judgement:"`` are taken; from each the first
   space-separated token (the number) is dropped, the rest stripped, empty results dropped; the class
   is the text before the first ``":"``, lowercased. If the number of sentences and of judgement lines
   differ, every sentence of that image gets judgement and class ``None``.
6. **Metrics** (``get_metric``, each rounded to 3 decimals): words of a sentence are
   ``len(sentence.split(" "))`` on the sentence with its ``"."``; ``sents_per_image`` and
   ``words_per_image`` count every sentence (``None`` classes included); ``hal_sents_per_image`` and
   ``hal_words_per_image`` count sentences classed exactly ``hallucination``; the ratios count only
   sentences classed exactly ``hallucination``, ``correct`` or ``cannot judge`` (anything else, e.g.
   ``None`` or "partially correct", leaves numerator and denominator):
   ``hal_sents_ratio = #hallucination / #(those three)``, a micro average over all sentences;
   ``hal_words_ratio`` the same with words. SHR (``mean_hal_ratio``) is the mean of
   ``hal_sents_ratio`` over runs; with the one official run it equals ``hal_sents_ratio``, reported
   here as ``shr``. Papers print it ×100.
7. **Repetition** (``cal_repetition``, also the only output of ``--no-gpt-judge``): delete ``.``,
   ``:``, ``\\n``, ``?`` and ``,`` from the raw response (deleting ``\\n`` glues the words around a
   line break), split on whitespace, score(n) = distinct n-grams / all n-grams, averaged over images
   for n = 1..4 and rounded to 3 decimals.

Where hallu differs, and only where the official code loops forever or crashes:

- The official driver re-asks the judge *until* the reply contains "Judgement", and then crashes
  (IndexError) when no line contains "Judgement:". Here a reply without a line containing
  "Judgement:" is re-asked at most ``format_attempts`` times in all (each a new cached sample); after
  that the image is counted as a judge format failure and its sentences get class ``None``, exactly as
  a count mismatch would. A request that fails at the HTTP level after the client's bounded retries
  is treated the same way and counted apart (a rerun retries it; the cache keeps what succeeded).
- score(n) divides by zero for a response with fewer than n words: such an image is left out of the
  n-gram mean (and counted in ``counts["repetition_skipped"]``). The ratio metrics divide by zero
  when no sentence has one of the three classes: they are reported as ``None``.
- An empty response (no sentence) is not sent to the judge: whatever the judge said, the official
  parser gives it an empty judgement list. It is counted in ``counts["empty_responses"]``.
- Items are matched by image id, never by position; the judge prompt is hallu's own (same structure,
  see ``data/prompts/PROVENANCE.md``) and its version is recorded, with the judge model id the API
  returned, in every result.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.evals.result import finish, one_split
from hallu.fileio import iter_jsonl, read_json, read_json_or_jsonl, sha256_bytes

OFFICIAL = "opendatalab/HA-DPO@42f72c53 ha_dpo/shr_eval/json_eval.py"
PARSER = "shr-official"  # post_process_no_revise on the judge's reply, get_metric's formulas
BENCHMARK_VERSION = 1
PROMPT_VERSION = "shr-judge-v1"
_PROMPT_FILES = {"shr-judge-v1": "shr_judge_v1.txt"}
CLASSES = ("hallucination", "correct", "cannot judge")
NGRAMS = (1, 2, 3, 4)
# The official decoding (gpt_utils.py). logit_bias 50256 is <|endoftext|> in the GPT-2/GPT-3 vocabulary.
JUDGE_DECODING: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 1.0,
    "n": 1,
    "max_tokens": 800,
    "stop": ["###"],
    "logit_bias": {"50256": -100},
}
DEFAULT_FORMAT_ATTEMPTS = 3
# How HA-DPO generates the responses it scores (README): for a generation mode of `hallu eval shr`.
GENERATION_PROMPT = "Describe this image in detail."
GENERATION_KWARGS: dict[str, Any] = {"num_beams": 5, "do_sample": False, "temperature": 1.0}


# --- text rules (pure) ----------------------------------------------------------------------------


def numbered_sentences(response: str) -> tuple[str, bool]:
    """``get_model_cap``: the response as ``"k. sentence\\n"`` lines, and whether a repeat was dropped."""
    kept: list[str] = []
    out: list[str] = []
    repeated = False
    for piece in response.split("."):
        sentence = piece.strip()
        if not sentence:
            continue
        # An exact repeat, or a piece contained in an earlier kept piece, is dropped.
        if sentence in kept or any(sentence in k for k in kept):
            repeated = True
            continue
        kept.append(sentence)
        out.append(f"{len(kept)}. {sentence}\n")
    return "".join(out), repeated


def split_sentences(response: str) -> list[str]:
    """``seg_cap``: the kept sentences of :func:`numbered_sentences`, each with ``"."`` appended."""
    kept: list[str] = []
    for piece in response.split("."):
        sentence = piece.strip()
        # Official compares against the kept sentences *with* their "."; a piece never contains ".",
        # so this is the same dedup as numbered_sentences.
        if not sentence or any(sentence in k for k in kept):
            continue
        kept.append(sentence + ".")
    return kept


def word_count(sentence: str) -> int:
    """Words as ``get_metric`` counts them: pieces of a split on the single space character."""
    return len(sentence.split(" "))


def region_text(image: Mapping[str, Any], regions: Iterable[Mapping[str, Any]]) -> str:
    """``get_desc``: one ``[x1, y1, x2, y2]: phrase`` line per region with a phrase."""
    w, h = image["width"], image["height"]
    lines = []
    for r in regions:
        box = [r["x"] / w, r["y"] / h, (r["x"] + r["width"]) / w, (r["y"] + r["height"]) / h]
        # 2-decimal rounding through the string, then the Python list repr of floats ("[0.5, 0.08]").
        box = [float(f"{v:.2f}") for v in box]
        if r["phrase"]:
            lines.append(f"{box}: {r['phrase']}\n")
    return "".join(lines)


def facts_text(facts: Sequence[str] | None) -> str:
    return "".join(f"{f}\n" for f in facts or ())


def repetition(response: str, n: int) -> float | None:
    """``cal_repetition``: distinct n-grams / n-grams; None where the official code divides by zero."""
    for ch in (".", ":", "\n", "?", ","):
        response = response.replace(ch, "")
    words = response.split()
    grams = list(zip(*(words[i:] for i in range(n)), strict=False))  # shorter tails end the zip
    if not grams:
        return None
    return len(set(grams)) / len(grams)


def has_judgement(reply: str | None) -> bool:
    """Whether the official parser can find its anchor: a non-empty line containing ``"Judgement:"``."""
    return reply is not None and any("Judgement:" in line for line in reply.split("\n"))


def parse_judgement(reply: str, response: str) -> tuple[list[str | None], list[str | None], str]:
    """``post_process_no_revise``: per-sentence judgement text and class, and a status.

    Returns ``(judgements, classes, status)`` with one entry per :func:`split_sentences` sentence;
    status is ``"ok"``, ``"count_mismatch"`` (all ``None``, the official rule) or ``"no_judgement"``
    (no line contains ``"Judgement:"``; the official code raises IndexError here).
    """
    n = len(split_sentences(response))
    lines = [line for line in reply.split("\n") if len(line) > 0]
    anchor = next((i for i, line in enumerate(lines) if "Judgement:" in line), None)
    if anchor is None:
        return [None] * n, [None] * n, "no_judgement"
    texts = [" ".join(line.split(" ")[1:]).strip() for line in lines[anchor + 1 :]]
    texts = [t for t in texts if len(t) > 0]
    if len(texts) != n:
        return [None] * n, [None] * n, "count_mismatch"
    return list(texts), [t.split(":")[0].lower() for t in texts], "ok"


# --- judge prompt --------------------------------------------------------------------------------


def load_judge_prompt(version: str = PROMPT_VERSION) -> tuple[str, str]:
    """The shipped template for ``version`` and its sha256."""
    from importlib.resources import files

    if version not in _PROMPT_FILES:
        raise HalluError(f"SHR judge prompt {version!r}: unknown version (known: {', '.join(_PROMPT_FILES)})")
    text = (files("hallu.data") / "prompts" / _PROMPT_FILES[version]).read_text(encoding="utf-8")
    return text, sha256_bytes(text.encode("utf-8"))


def fill_prompt(template: str, regions: str, facts: str, sentences: str) -> str:
    """Fill the three blocks in one pass, so braces or placeholders inside the values stay as they are."""
    values = {"regions": regions, "facts": facts, "sentences": sentences}
    return re.sub(r"\{(regions|facts|sentences)\}", lambda m: values[m.group(1)], template)


# --- inputs ----------------------------------------------------------------------------------------


@dataclass
class VisualGenome:
    """What SHR reads from Visual Genome: image sizes and region lists, by integer image id."""

    images: dict[int, dict[str, Any]]
    regions: dict[int, list[dict[str, Any]]]

    def region_text(self, image_id: int) -> str:
        if image_id not in self.images:
            raise HalluError(f"Visual Genome image_data.json: no image {image_id}")
        if image_id not in self.regions:
            raise HalluError(f"Visual Genome region_descriptions.json: no regions for image {image_id}")
        try:
            return region_text(self.images[image_id], self.regions[image_id])
        except (KeyError, TypeError, ZeroDivisionError) as e:
            raise HalluError(f"Visual Genome: image {image_id}: bad size or region record ({e!r})") from None


def load_visual_genome(
    image_data: str | Path, region_descriptions: str | Path, keep: Iterable[int] | None = None
) -> VisualGenome:
    """Read ``image_data.json`` and ``region_descriptions.json``; with ``keep``, hold only those ids."""
    wanted = None if keep is None else set(keep)
    raw_images = read_json(image_data)
    if not isinstance(raw_images, list):
        raise HalluError(f"{image_data}: expected a list of images")
    images: dict[int, dict[str, Any]] = {}
    for i, rec in enumerate(raw_images):
        if not isinstance(rec, dict) or "image_id" not in rec:
            raise HalluError(f"{image_data}: entry {i} has no image_id")
        if wanted is None or rec["image_id"] in wanted:
            images[rec["image_id"]] = rec
    del raw_images
    raw_regions = read_json(region_descriptions)
    if not isinstance(raw_regions, list):
        raise HalluError(f"{region_descriptions}: expected a list of {{'regions': [...]}} entries")
    regions: dict[int, list[dict[str, Any]]] = {}
    for i, rec in enumerate(raw_regions):
        regs = rec.get("regions") if isinstance(rec, dict) else None
        if not isinstance(regs, list):
            raise HalluError(f"{region_descriptions}: entry {i} has no 'regions' list")
        if not regs:  # the official keying (first region's image_id) crashes on these; skip them
            continue
        image_id = regs[0].get("image_id") if isinstance(regs[0], dict) else None
        if image_id is None:
            raise HalluError(f"{region_descriptions}: entry {i}: first region has no image_id")
        if wanted is None or image_id in wanted:
            regions[image_id] = regs
    return VisualGenome(images, regions)


def load_facts(paths: Sequence[str | Path]) -> dict[str, list[str]]:
    """SHR factual JSONL files (``{"<image_id>": [facts]}`` per line); a later line or file wins."""
    facts: dict[str, list[str]] = {}
    for path in paths:
        for lineno, rec in iter_jsonl(path):
            if not isinstance(rec, dict) or not rec:
                raise HalluError(f"{path}:{lineno}: expected {{\"<image_id>\": [facts]}}")
            # The official loader keeps only the first key of a line.
            image_id, values = next(iter(rec.items()))
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise HalluError(f"{path}:{lineno}: facts of image {image_id} must be a list of strings")
            facts[str(image_id)] = values
    return facts


def load_responses(path: str | Path) -> dict[str, str]:
    """Model responses: the official ``{"<image_id>": "response"}``, or JSONL (or a JSON list) of
    ``{"image_id", "text"}`` records, one per image."""
    kind, data = read_json_or_jsonl(path)
    if kind == "json" and isinstance(data, dict) and not {"image_id", "text"} <= set(data):
        for k, v in data.items():
            if not isinstance(v, str):
                raise HalluError(f"{path}: response of image {k!r} is {type(v).__name__}, expected a string")
            _image_id(k, path)
        return data
    if kind == "jsonl":
        rows = [(f"{path}:{line}", rec) for line, rec in data]
    elif isinstance(data, list):
        rows = [(f"{path}: [{i}]", rec) for i, rec in enumerate(data)]
    elif isinstance(data, dict):  # a one-line JSONL file
        rows = [(f"{path}:1", data)]
    else:
        raise HalluError(f"{path}: expected {{\"<image_id>\": \"response\"}} or JSONL {{\"image_id\", \"text\"}}")
    out: dict[str, str] = {}
    first: dict[str, str] = {}
    for where, rec in rows:
        if not isinstance(rec, dict) or "image_id" not in rec or "text" not in rec:
            raise HalluError(f"{where}: expected a record {{\"image_id\", \"text\"}}")
        if not isinstance(rec["text"], str):
            raise HalluError(f"{where}: 'text' is {type(rec['text']).__name__}, expected a string")
        key = str(_image_id(rec["image_id"], where))
        if key in out:
            raise HalluError(f"{where}: a second response for image {key} (first at {first[key]})")
        out[key], first[key] = rec["text"], where
    if not out:
        raise HalluError(f"{path}: no responses")
    return out


def load_image_list(path: str | Path) -> list[int]:
    """SHR's ``val_images_final.json``: a list of ``{"image_id": ...}``, in evaluation order."""
    data = read_json(path)
    if not isinstance(data, list):
        raise HalluError(f"{path}: expected a list of {{\"image_id\": ...}}")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "image_id" not in rec:
            raise HalluError(f"{path}: entry {i} has no image_id")
        out.append(_image_id(rec["image_id"], path))
    return out


def _image_id(value: Any, where: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HalluError(f"{where}: image id {value!r} is not an integer Visual Genome id") from None


def vg_image_path(vg_root: str | Path, image: Mapping[str, Any]) -> Path:
    """Where the official driver looks for an image: ``<vg>/<url folder>/<url file>`` (VG_100K, VG_100K_2)."""
    parts = str(image["url"]).split("/")
    return Path(vg_root) / parts[-2] / parts[-1]


def generation_requests(
    image_ids: Iterable[int], vg: VisualGenome, vg_root: str | Path
) -> list[dict[str, Any]]:
    """What a generation mode feeds the model: per image its path, HA-DPO's prompt and decoding."""
    out = []
    for image_id in image_ids:
        if image_id not in vg.images:
            raise HalluError(f"Visual Genome image_data.json: no image {image_id}")
        out.append(
            {
                "image_id": image_id,
                "image": str(vg_image_path(vg_root, vg.images[image_id])),
                "prompt": GENERATION_PROMPT,
                "generation": dict(GENERATION_KWARGS),
            }
        )
    return out


# --- items, metrics --------------------------------------------------------------------------------


def new_item(image_id: int, response: str) -> dict[str, Any]:
    """An item before judging: the text rules applied, no judgement yet."""
    numbered, repeated = numbered_sentences(response)
    sentences = split_sentences(response)
    return {
        "image_id": image_id,
        "response": response,
        "numbered": numbered,
        "is_repeated": repeated,
        "sentences": sentences,
        "words": [word_count(s) for s in sentences],
        "judgements": [None] * len(sentences),
        "classes": [None] * len(sentences),
        "status": "empty" if not sentences else "pending",
        "raw_judgement": None,
        "judge_model": None,
        "judge_attempts": 0,
        "repetition": {str(n): repetition(response, n) for n in NGRAMS},
    }


def apply_reply(item: dict[str, Any], reply: str | None) -> None:
    """Parse a judge reply into ``item`` (``None``: no usable reply; the status says why)."""
    item["raw_judgement"] = reply
    if reply is None:
        return
    judgements, classes, status = parse_judgement(reply, item["response"])
    item["judgements"], item["classes"], item["status"] = judgements, classes, status


def compute_metrics(items: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``get_metric`` plus repetition over scored items; returns ``(metrics, counts)``."""
    num = len(items)
    if num == 0:
        raise HalluError("SHR: no images to score")
    sents = words = hal_sents = hal_words = valid_sents = valid_words = 0
    for it in items:
        for sentence, cls in zip(it["sentences"], it["classes"], strict=True):
            w = word_count(sentence)
            sents += 1
            words += w
            if cls not in CLASSES:
                continue
            valid_sents += 1
            valid_words += w
            if cls == "hallucination":
                hal_sents += 1
                hal_words += w
    ratio = round(hal_sents / valid_sents, 3) if valid_sents else None
    metrics: dict[str, Any] = {
        "shr": ratio,
        "hal_sents_ratio": ratio,
        "hal_words_ratio": round(hal_words / valid_words, 3) if valid_words else None,
        "sents_per_image": round(sents / num, 3),
        "words_per_image": round(words / num, 3),
        "hal_sents_per_image": round(hal_sents / num, 3),
        "hal_words_per_image": round(hal_words / num, 3),
    }
    skipped: dict[str, int] = {}
    for n in NGRAMS:
        scores = [it["repetition"][str(n)] for it in items]
        kept = [s for s in scores if s is not None]
        skipped[str(n)] = len(scores) - len(kept)
        # Summed in item order and divided once, as the official driver does.
        metrics[f"gram_{n}_repetition"] = round(sum(kept) / len(kept), 3) if kept else None
    statuses = [it["status"] for it in items]
    counts = {
        "images": num,
        "sentences": sents,
        "classified_sentences": valid_sents,
        "unclassified_sentences": sents - valid_sents,
        "hallucinated_sentences": hal_sents,
        "count_mismatch": statuses.count("count_mismatch"),
        "judge_format_failures": statuses.count("no_judgement"),
        "judge_api_failures": statuses.count("api_error"),
        "empty_responses": statuses.count("empty"),
        "repeated_responses": sum(1 for it in items if it["is_repeated"]),
        "repetition_skipped": skipped,
    }
    return metrics, counts


_JUDGED_METRICS = ("shr", "hal_sents_ratio", "hal_words_ratio", "hal_sents_per_image", "hal_words_per_image")


def _drop_judged_metrics(metrics: dict[str, Any]) -> None:
    # Without a judge only repetition and lengths mean something (the official --no-gpt-judge).
    for key in _JUDGED_METRICS:
        metrics[key] = None


# --- evaluation ------------------------------------------------------------------------------------


def evaluate(
    responses: Mapping[str, str],
    vg: VisualGenome,
    facts: Mapping[str, Sequence[str]],
    judge: Any | None,
    *,
    image_ids: Sequence[int] | None = None,
    format_attempts: int = DEFAULT_FORMAT_ATTEMPTS,
    decoding: Mapping[str, Any] | None = None,
    prompt_version: str = PROMPT_VERSION,
    inputs: Mapping[str, Any] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score model responses with SHR.

    Args:
        responses: ``{"<image_id>": response}``.
        vg: Visual Genome sizes and regions (:func:`load_visual_genome`).
        facts: SHR facts by image id string (:func:`load_facts`).
        judge: an :class:`hallu.judges.openai.OpenAIJudge`, or None for repetition only (the
            official ``--no-gpt-judge``).
        image_ids: images to score, in order (SHR's ``val_images_final.json``); default: every
            response. Each must have a response.
        format_attempts: judge requests per image in all while a reply has no ``Judgement:`` line.
        decoding: judge decoding parameters; default the official ones (:data:`JUDGE_DECODING`).
        inputs: file digests etc. to record under ``settings.inputs``.
        on_progress: called with ``(done, total)`` as judge replies arrive.

    Returns:
        ``{"benchmark", "metrics", "counts", "usage", "items", "settings"}``.

    Raises:
        HalluError: a missing response/image, or the judge's ``max_cost`` was reached.
    """
    from hallu import __version__
    from hallu.judges.openai import ChatRequest

    if format_attempts < 1:
        raise HalluError("SHR: format attempts must be at least 1")
    if image_ids is None:
        order = [(_image_id(k, "responses"), v) for k, v in responses.items()]
    else:
        order = []
        for image_id in image_ids:
            if str(image_id) not in responses:
                raise HalluError(f"responses: no response for image {image_id} (listed in the image list)")
            order.append((image_id, responses[str(image_id)]))
    items = [new_item(image_id, response) for image_id, response in order]
    decoding = dict(JUDGE_DECODING if decoding is None else decoding)
    template, template_digest = load_judge_prompt(prompt_version)
    settings: dict[str, Any] = {
        "parser": PARSER,
        "official": OFFICIAL,
        "benchmark_version": BENCHMARK_VERSION,
        "hallu_version": __version__,
        "judged": judge is not None,
        "prompt_version": prompt_version,
        "prompt_sha256": template_digest,
        "decoding": decoding,
        "format_attempts": format_attempts,
        "runs": 1,
    }
    usage: dict[str, Any] = {}
    if judge is not None:
        prompts = {}
        for it in items:
            if it["sentences"]:
                f = facts.get(str(it["image_id"]))
                prompts[it["image_id"]] = fill_prompt(
                    template, vg.region_text(it["image_id"]), facts_text(f), it["numbered"]
                )
        pending = [it for it in items if it["sentences"]]
        total, done = len(pending), 0
        for attempt in range(format_attempts):
            if not pending:
                break
            requests = [
                ChatRequest(
                    messages=[{"role": "user", "content": prompts[it["image_id"]]}],
                    params=decoding,
                    prompt_version=prompt_version,
                    sample=attempt,
                    tag=f"image {it['image_id']}",
                )
                for it in pending
            ]

            def progress(res, _last=attempt == format_attempts - 1):
                nonlocal done
                # An image is done when its outcome is final: a verdict, an API failure, or no tries left.
                if _last or not res.ok or has_judgement(res.text):
                    done += 1
                    if on_progress is not None:
                        on_progress(done, total)

            results = judge.chat_many(requests, on_result=progress)
            budget_hit = False
            still = []
            for it, res in zip(pending, results, strict=True):
                it["judge_attempts"] += 1
                if not res.ok:
                    budget_hit |= res.error_kind == "max_cost"
                    it["status"], it["judge_error"] = "api_error", res.error
                    continue
                it["judge_model"] = res.model
                apply_reply(it, res.text)
                if it["status"] == "no_judgement":
                    still.append(it)
            if budget_hit:
                spent = judge.meter.priced_usd
                raise HalluError(
                    f"SHR: judge max cost reached ({spent:.4f} USD spent); replies so far are cached"
                    + (f" in {judge.cache.path}" if judge.cache is not None else "")
                    + ": rerun with a higher --max-cost to finish"
                )
            pending = still
        judged = [it for it in items if it["sentences"]]
        if judged and all(it["status"] == "api_error" for it in judged):
            # Nothing was judged (endpoint down, wrong URL): no metric to write, say why instead.
            raise HalluError(
                f"SHR: the judge failed for all {len(judged)} images; first error: {judged[0].get('judge_error')}"
            )
        returned = sorted({it["judge_model"] for it in items if it["judge_model"]})
        settings.update(judge.settings())
        settings["judge_model"] = returned[0] if len(returned) == 1 else (returned or judge.config.model)
        settings["judge_model_source"] = "api" if returned else "requested"
        usage = judge.meter.to_dict()
    else:
        for it in items:
            if it["sentences"]:
                it["status"] = "not_judged"
    if inputs:
        settings["inputs"] = dict(inputs)
    metrics, counts = compute_metrics(items)
    if judge is None:
        _drop_judged_metrics(metrics)
    return finish({
        "benchmark": "shr",
        "metrics": metrics,
        "splits": one_split(metrics, len(items)),
        "counts": counts,
        "usage": usage,
        "items": items,
        "settings": settings,
    })


def rescore(stored: Mapping[str, Any]) -> dict[str, Any]:
    """Recompute items and metrics from stored judge replies, with no judge calls.

    ``stored`` is a result written by :func:`evaluate`, or HA-DPO's own ``judgement.json``
    (``{"run1": {"<image_id>": {"raw_judgement", "mode_response", ...}}}``).
    """
    if "items" in stored and isinstance(stored["items"], list):
        pairs = []
        for i, it in enumerate(stored["items"]):
            try:
                pairs.append((it["image_id"], it["response"], it.get("raw_judgement"), it.get("status"), it))
            except (KeyError, TypeError):
                raise HalluError(f"stored SHR result: item {i} lacks image_id or response") from None
        settings = dict(stored.get("settings") or {})
    elif isinstance(stored.get("run1"), dict):
        pairs = []
        for k, rec in stored["run1"].items():
            if not isinstance(rec, dict) or "mode_response" not in rec:
                raise HalluError(f"HA-DPO judgement.json: image {k} lacks mode_response")
            image_id = _image_id(k, "judgement.json")
            pairs.append((image_id, rec["mode_response"], rec.get("raw_judgement"), None, rec))
        settings = {"official": OFFICIAL, "source": "HA-DPO judgement.json"}
    else:
        raise HalluError(
            "stored SHR result: expected a hallu SHR result (with 'items') or HA-DPO's judgement.json"
        )
    items = []
    for image_id, response, reply, status, old in pairs:
        it = new_item(image_id, response)
        for key in ("judge_model", "judge_attempts", "judge_error"):
            if key in old:
                it[key] = old[key]
        if status in ("api_error", "not_judged") and it["sentences"]:
            # No verdict was obtained; a reply kept from an earlier format-failed try is not one.
            it["status"], it["raw_judgement"] = status, reply
        elif reply is not None:
            apply_reply(it, reply)
        elif it["sentences"]:
            it["status"] = "api_error"  # a judged item without a stored reply: nothing to parse
        items.append(it)
    metrics, counts = compute_metrics(items)
    if not settings.get("judged", True):
        _drop_judged_metrics(metrics)
    settings["rescored"] = True
    settings.setdefault("parser", PARSER)
    return finish({
        "benchmark": "shr",
        "metrics": metrics,
        "splits": one_split(metrics, len(items)),
        "counts": counts,
        "usage": {},
        "items": items,
        "settings": settings,
    })


# --- running a model: responses for the SHR images, then the judge ----------------------------------

EVAL_STAGE = "eval-shr"
GENERATION_MAX_NEW_TOKENS = 512


def image_file(images: Path, vg_image: Mapping[str, Any]) -> str:
    """An image's path relative to ``images``: ``VG_100K/x.jpg`` under a VG root, or ``x.jpg`` in a flat folder."""
    parts = str(vg_image["url"]).split("/")
    nested = f"{parts[-2]}/{parts[-1]}" if len(parts) > 1 else parts[-1]
    return nested if (Path(images) / nested).is_file() else parts[-1]


def evaluate_model(model: Path | None, images: Path | None, vg_dir: Path, facts: Sequence[Path],
                   image_ids: Sequence[int] | None, out: Path | None, knobs: dict, judge: Any | None, *,
                   format_attempts: int = DEFAULT_FORMAT_ATTEMPTS, inputs: Mapping[str, Any] | None = None,
                   on_progress: Callable[[int, int], None] | None = None) -> tuple[dict, Path]:
    """Describe each SHR image with ``model`` (HA-DPO's protocol: beam 5, no sampling), then judge.

    Responses go to ``out/generations.jsonl`` (resumable; the judge's replies are cached beside them, so a
    rerun after a crash makes no new calls), the result to ``out/results.json``. ``image_ids`` default to
    the images that have facts, in file order.
    """
    from hallu.evals import generation as G
    from hallu.evals.result import file_input
    from hallu.records import EvalItem

    knobs = {"num_beams": GENERATION_KWARGS["num_beams"], "max_new_tokens": GENERATION_MAX_NEW_TOKENS, **knobs}
    device = knobs.pop("device", "auto")
    G.check_model_knobs(knobs)  # typos are refused before the run folder is opened or a model is read
    ev = G.ModelEval(out, EVAL_STAGE, rescore=False)
    fact_map = load_facts(facts)
    ids = list(image_ids) if image_ids is not None else [_image_id(k, "facts") for k in fact_map]
    if not ids:
        raise HalluError("SHR: no images to describe (give --image-list, or facts files with images)")
    vg = load_visual_genome(Path(vg_dir) / "image_data.json", Path(vg_dir) / "region_descriptions.json", keep=ids)
    missing = [i for i in ids if i not in vg.images]
    if missing:
        raise HalluError(f"{vg_dir}/image_data.json: no image {missing[0]} ({len(missing)} of the SHR images missing)")
    files = {i: image_file(images, vg.images[i]) for i in ids} if images is not None else {}
    options = ev.options(model, images, knobs, image_ids=ids, image_files=[files.get(i) for i in ids],
                         prompt=GENERATION_PROMPT)
    mopts = G.ModelOptions.from_recorded(options, device)
    items = [EvalItem(id=str(i), images=[f], question=options["prompt"])
             for i, f in zip(ids, options["image_files"], strict=True)]
    stage_inputs = {"image_data": Path(vg_dir) / "image_data.json",
                    **{f"facts_{k}": Path(p) for k, p in enumerate(facts)}}
    ev.check_images(items, options, "shr: describe")
    with ev.stage(options, inputs=stage_inputs) as st:
        gens, info = G.generate(st, items, mopts, Path(options["images"]), label="shr: describe")
        responses = {it.id: gens[G.prompt_key(it)]["text"] for it in items}
        result = evaluate(responses, vg, fact_map, judge, image_ids=ids, format_attempts=format_attempts,
                          inputs=inputs, on_progress=on_progress)
        decoding = {"do_sample": False, "num_beams": mopts.num_beams, "max_new_tokens": mopts.max_new_tokens}
        result["settings"]["generation"] = {"prompt": options["prompt"], "decoding": decoding, **info}
        result["settings"]["request"] = {"prompt": options["prompt"], "decoding": decoding,
                                         "chat_template_sha256": info.get("chat_template_sha256")}
        result["settings"]["model_fingerprint"] = info.get("model_fingerprint")
        if not inputs:
            result["settings"]["inputs"] = {k: file_input(p) for k, p in stage_inputs.items()}
        result = finish(result)
        path = G.write_results(st, result)
    return result, path
