"""The attention judge: MIA-DPO's attention-aware selection and post-selection (specs/methods.md §4.4-4.5).

It reads what ``hallu rollout --capture-attention`` recorded with each response (``meta["attention"]``:
per-image attention shares at one decoder layer, the single image's per-token map; and
``meta["perplexity"]``) and the prompt's MIA layout (``meta["mia"]`` from ``hallu prepare mia``). A
response is taken as the *rejected* answer, the prompt's reference (MIA's ground truth) as the chosen
one, when all hold:

- it answers the prompt's first turn (the reference's; MIA-DPO uses first turns only), is
  non-empty and differs from the reference; the reference is shorter than
  ``max_reference_chars`` (512, the released pre-filter);
- its attention on the image the question is about is low, ratio ``r`` below the layout's threshold:
  ``sequence``: the target image's mean per-token attention over the sum of every image's mean,
  ``r <= t`` (2-5 images: 0.8, 0.7, 0.6, 0.6); ``grid``: the map split into the collage's rows x cols
  blocks (uneven remainders to the first blocks), the target block's share, ``r < t`` (2, 3, 4, 6, 9
  images: 0.7, 0.6, 0.5, 0.4, 0.3); ``pip``: the share of the map's central 2/3 x 2/3 (16x16 of
  24x24), ``r < 0.8``. A refusal prompt (it asks about an image that is not there) has no target
  image: the attention rule does not apply;
- its perplexity is above ``min_perplexity`` (1.1; the model was unsure);
- post-selection (thresholds ours, the paper's are unpublished): the length ratio rejected/chosen, in
  words, within [``min_length_ratio``, ``max_length_ratio``] (0.2, 5), and the word-level edit distance
  between them, normalised by the longer, at least ``min_edit_distance`` (0.1: no near-duplicates).

A selected response's revision has ``meta.role == "rejected"``, ``meta.chosen == "reference"`` and the
reference as its text (what the pair prefers); the others keep their text and say in
``meta.dropped`` why they were not selected. Every number and threshold is in ``meta``.
:func:`drop_top_perplexity` is the data-set-wide filter ("drop the top x % by perplexity"), for the pair
builder: a judge sees one batch at a time.
"""

from __future__ import annotations

import math

from hallu.errors import HalluError

NAME = "attention"
VERSION = "attention-v1"
OPTIONS: dict = {
    "sequence_thresholds": "2:0.8,3:0.7,4:0.6,5:0.6",
    "grid_thresholds": "2:0.7,3:0.6,4:0.5,6:0.4,9:0.3",
    "pip_threshold": 0.8,
    "min_perplexity": 1.1,
    "max_reference_chars": 512,
    "min_length_ratio": 0.2,
    "max_length_ratio": 5.0,
    "min_edit_distance": 0.1,
    # The pair builder's data-set-wide post-selection: drop this fraction of the pairs, the highest
    # perplexities (the spec's "top x %", x unpublished: off by default).
    "drop_top_perplexity": 0.0,
}
GRID_SHAPES = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}  # as hallu.data.mia lays them out
PIP_CENTRE = 16 / 24  # MIA's central 16x16 of LLaVA's 24x24 map


def parse_thresholds(text: str, key: str) -> dict[int, float]:
    """``"2:0.8,3:0.7"`` -> {2: 0.8, 3: 0.7}; anything else names the option."""
    out: dict[int, float] = {}
    for item in str(text).split(","):
        n, colon, t = item.strip().partition(":")
        try:
            if not colon:
                raise ValueError
            out[int(n)] = float(t)
        except ValueError:
            raise HalluError(f"--option {key}={text}: expected IMAGES:THRESHOLD pairs, e.g. 2:0.8,3:0.7") from None
        if not 0 <= out[int(n)] <= 1 or int(n) < 1:
            raise HalluError(f"--option {key}={text}: a threshold is a ratio in [0, 1] for 1 or more images")
    return out


def check(options: dict) -> None:
    opts = {**OPTIONS, **options}
    parse_thresholds(opts["sequence_thresholds"], "sequence_thresholds")
    parse_thresholds(opts["grid_thresholds"], "grid_thresholds")
    for key in ("pip_threshold", "min_edit_distance"):
        if not _number(opts[key]) or not 0 <= opts[key] <= 1:
            raise HalluError(f"--option {key}={opts[key]}: expected a number in [0, 1]")
    for key in ("min_perplexity", "min_length_ratio", "max_length_ratio"):
        if not _number(opts[key]) or opts[key] < 0:
            raise HalluError(f"--option {key}={opts[key]}: expected a non-negative number")
    if not _number(opts["drop_top_perplexity"]) or not 0 <= opts["drop_top_perplexity"] < 1:
        raise HalluError(f"--option drop_top_perplexity={opts['drop_top_perplexity']}: expected a fraction in [0, 1)")
    if opts["min_length_ratio"] > opts["max_length_ratio"]:
        raise HalluError(f"--option min_length_ratio={opts['min_length_ratio']} is above max_length_ratio="
                         f"{opts['max_length_ratio']}")
    if not isinstance(opts["max_reference_chars"], int) or opts["max_reference_chars"] < 1:
        raise HalluError(f"--option max_reference_chars={opts['max_reference_chars']}: expected a positive integer")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------------------------------
# The ratios (pure)


def sequence_ratio(image_shares: list[float], image_tokens: list[int], target: int) -> float:
    """The target image's (1-based) mean per-token attention over the sum of every image's mean."""
    means = [s / n for s, n in zip(image_shares, image_tokens, strict=True)]
    total = sum(means)
    return means[target - 1] / total if total > 0 else 0.0


def _square(attention_map: list[float]) -> int:
    side = math.isqrt(len(attention_map))
    if side * side != len(attention_map) or side == 0:
        raise ValueError(f"an attention map of {len(attention_map)} tokens is not square")
    return side


def _splits(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of ``parts`` near-equal pieces of ``range(n)``, the larger ones first (numpy's array_split)."""
    size, extra = divmod(n, parts)
    bounds, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def grid_ratio(attention_map: list[float], rows: int, cols: int, target: int) -> float:
    """Share of the target cell's block (1-based, row-major) in the square map split rows x cols."""
    side = _square(attention_map)
    grid = [attention_map[r * side : (r + 1) * side] for r in range(side)]
    total = sum(attention_map)
    row_spans, col_spans = _splits(side, rows), _splits(side, cols)
    (r0, r1), (c0, c1) = row_spans[(target - 1) // cols], col_spans[(target - 1) % cols]
    block = sum(grid[r][c] for r in range(r0, r1) for c in range(c0, c1))
    return block / total if total > 0 else 0.0


def pip_ratio(attention_map: list[float]) -> float:
    """Share of the map's central square (2/3 of the side: 16 of 24)."""
    side = _square(attention_map)
    c = round(side * PIP_CENTRE)
    lo = (side - c) // 2
    total = sum(attention_map)
    centre = sum(attention_map[r * side + k] for r in range(lo, lo + c) for k in range(lo, lo + c))
    return centre / total if total > 0 else 0.0


def word_edit_distance(a: str, b: str) -> float:
    """Levenshtein distance between the word sequences of ``a`` and ``b``, over the longer's length."""
    x, y = a.split(), b.split()
    if not x and not y:
        return 0.0
    prev = list(range(len(y) + 1))
    for i, wx in enumerate(x, 1):
        cur = [i]
        for j, wy in enumerate(y, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wx != wy)))
        prev = cur
    return prev[-1] / max(len(x), len(y))


# --------------------------------------------------------------------------------------------------
# Selection


def _ratio(prompt, attention: dict, opts: dict) -> tuple[float, float, str]:
    """(r, threshold, rule) for this prompt's layout; ValueError says why there is none."""
    mia = prompt.meta["mia"]
    fmt = mia.get("format")
    if fmt == "sequence":
        n, target = len(attention["image_shares"]), int(mia["target"])
        table = parse_thresholds(opts["sequence_thresholds"], "sequence_thresholds")
        if n not in table:
            raise ValueError(f"no sequence threshold for {n} images")
        return sequence_ratio(attention["image_shares"], attention["image_tokens"], target), table[n], "<="
    if "map" not in attention:
        raise ValueError("the rollout recorded no attention map (a single-image prompt has one)")
    if fmt == "grid":
        n = int(mia["n_images"])
        table = parse_thresholds(opts["grid_thresholds"], "grid_thresholds")
        if n not in table or n not in GRID_SHAPES:
            raise ValueError(f"no grid threshold for {n} images")
        rows, cols = GRID_SHAPES[n]
        return grid_ratio(attention["map"], rows, cols, int(mia["target"])), table[n], "<"
    if fmt == "pip":
        return pip_ratio(attention["map"]), float(opts["pip_threshold"]), "<"
    raise ValueError(f"unknown MIA layout {fmt!r}")


def judge_response(prompt, response, opts: dict) -> dict:
    """The revision dict of one response (see the module docstring)."""
    meta: dict = {"role": None, "dropped": None}
    gt = (prompt.reference or "").strip()
    text = response.text.strip()
    mia = prompt.meta.get("mia") if isinstance(prompt.meta.get("mia"), dict) else None

    def verdict(reason: str | None) -> dict:
        meta["dropped"] = reason
        if reason is None:
            meta.update(role="rejected", chosen="reference")
        return {"id": response.id, "response_id": response.id, "text": gt if reason is None else response.text,
                "sentences": [], "judge": NAME, "prompt_version": VERSION, "meta": meta}

    if mia is None:
        return verdict("not a MIA-DPO prompt (no meta.mia layout; see `hallu prepare mia`)")
    meta["format"] = mia.get("format")
    if not gt:
        return verdict("the prompt has no reference answer")
    if len(gt) >= opts["max_reference_chars"]:
        return verdict(f"reference of {len(gt)} chars >= max_reference_chars {opts['max_reference_chars']}")
    if response.meta.get("turn"):
        return verdict(f"the response answers user turn {response.meta['turn']}, the reference the first "
                       "(run `hallu rollout --turn first`)")
    if not text:
        return verdict("empty response")
    if text == gt:
        return verdict("response equals the reference")
    attention, ppl = response.meta.get("attention"), response.meta.get("perplexity")
    if not isinstance(attention, dict) or not _number(ppl):
        raise HalluError(f"response {response.id!r}: no attention statistics (meta.attention, meta.perplexity); "
                         "run `hallu rollout --capture-attention` for the attention judge")
    meta["perplexity"] = ppl
    if mia.get("refusal"):
        meta["rule"] = "refusal: no target image, attention not used"
    else:
        try:
            r, threshold, rule = _ratio(prompt, attention, opts)
        except (ValueError, KeyError, TypeError) as e:
            return verdict(f"no attention ratio: {e}")
        meta.update(ratio=r, threshold=threshold, rule=f"r {rule} {threshold}", layer=attention.get("layer"))
        if not (r <= threshold if rule == "<=" else r < threshold):
            return verdict(f"attention ratio {r:.4f} not {rule} {threshold} (the model looked at the right image)")
    if not ppl > opts["min_perplexity"]:
        return verdict(f"perplexity {ppl:.4f} <= min_perplexity {opts['min_perplexity']}")
    length_ratio = len(text.split()) / max(len(gt.split()), 1)
    distance = word_edit_distance(gt, text)
    meta.update(length_ratio=length_ratio, edit_distance=distance)
    if not opts["min_length_ratio"] <= length_ratio <= opts["max_length_ratio"]:
        return verdict(f"length ratio {length_ratio:.3f} outside [{opts['min_length_ratio']}, "
                       f"{opts['max_length_ratio']}]")
    if distance < opts["min_edit_distance"]:
        return verdict(f"edit distance {distance:.3f} < min_edit_distance {opts['min_edit_distance']}")
    return verdict(None)


def judge_groups(groups: list, options: dict, *, progress=None) -> list[dict]:
    opts = {**OPTIONS, **options}
    out: list[dict] = []
    for group in groups:
        revs = [judge_response(group.prompt, r, opts) for r in group.responses]
        # Several selected samples of one prompt: the one that looked least at the right image ranks first.
        selected = sorted((k for k, r in enumerate(revs) if r["meta"]["role"]),
                          key=lambda k: (revs[k]["meta"].get("ratio", 0.0), k))
        for rank, k in enumerate(selected, 1):
            revs[k]["meta"]["rank"] = rank
        out += revs
        if progress:
            progress(len(group.responses))
    return out


def drop_top_perplexity(revisions: list, fraction: float) -> set[str]:
    """Ids of the selected revisions whose perplexity is in the top ``fraction`` of all selected ones
    (MIA-DPO's data-set-wide post-selection, proposed default off)."""
    if not 0 <= fraction < 1:
        raise HalluError(f"perplexity fraction {fraction}: expected a number in [0, 1)")
    chosen = [r for r in revisions if _meta(r).get("role") == "rejected" and _number(_meta(r).get("perplexity"))]
    k = math.floor(len(chosen) * fraction)
    ranked = sorted(chosen, key=lambda r: -_meta(r)["perplexity"])
    return {_id(r) for r in ranked[:k]}


def _meta(r) -> dict:
    return r["meta"] if isinstance(r, dict) else r.meta


def _id(r) -> str:
    return r["id"] if isinstance(r, dict) else r.id
