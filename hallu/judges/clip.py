"""The clip judge: CLIP-DPO's ranking of a prompt's K samples by image-text similarity (specs/methods.md §3).

Each sample is scored against its image(s) with a local CLIP (``transformers.CLIPModel``): CLIPScore =
100 · max(cos, 0) (§3.3), the mean over the prompt's images when it has several. Rule filters drop a
candidate that is empty, longer than ``max_tokens`` CLIP tokens (CLIP reads 77: a longer text would be
scored truncated, i.e. as a different text) or scored below ``min_score``. Of the survivors the best
becomes ``chosen`` and the worst ``rejected`` when their scores differ by at least ``gap`` (Δ, 2.0 on
the CLIPScore scale). Every revision records its score, rank, role and why it was dropped, and the
thresholds and CLIP model, so a pair says how it was made. The defaults are ours: no code was released.

Not done: the paper's text-in-image filter (needs OCR) and its QA question stripping.
"""

from __future__ import annotations

import functools
from pathlib import Path

from hallu.errors import HalluError

NAME = "clip"
VERSION = "clip-v1"
OPTIONS: dict = {"clip_model": None, "min_score": 0.0, "gap": 2.0, "max_tokens": 77, "device": "cpu",
                 "batch_size": 32}


def check(options: dict) -> None:
    """Everything that can be wrong with the options, before CLIP loads."""
    model = options.get("clip_model")
    if not model:
        raise HalluError("--judge clip: no CLIP model given; pass --option clip_model=DIR (a local CLIPModel "
                         "folder)")
    config = Path(str(model)) / "config.json"
    if not config.is_file():
        raise HalluError(f"--option clip_model={model}: not a model folder (no config.json)")
    from hallu.fileio import read_json

    cfg = read_json(config)
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type != "clip":
        raise HalluError(f"--option clip_model={model}: model_type is {model_type!r}, the clip judge needs a CLIP "
                         "model (model_type 'clip')")
    for key in ("min_score", "gap"):
        value = options.get(key, OPTIONS[key])
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
            raise HalluError(f"--option {key}={value}: expected a number on the CLIPScore scale (0-100)")
    for key in ("max_tokens", "batch_size"):
        value = options.get(key, OPTIONS[key])
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HalluError(f"--option {key}={value}: expected a positive integer")


@functools.lru_cache(maxsize=1)
def _load(path: str, device: str):
    """CLIP and its processor, loaded once per process (the stage calls the judge batch by batch)."""
    from transformers import AutoProcessor, CLIPModel

    from hallu.manifest import dir_fingerprint

    model = CLIPModel.from_pretrained(path).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor, dir_fingerprint(Path(path))


def clip_scores(texts: list[str], images: list, options: dict) -> list[float]:
    """CLIPScore of each text against ``images`` (PIL), averaged over the images."""
    import torch

    model, processor, _ = _load(str(options["clip_model"]), options.get("device", "cpu"))
    step = int(options.get("batch_size", OPTIONS["batch_size"]))
    with torch.inference_mode():
        pixel = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device)
        img = model.get_image_features(pixel_values=pixel).pooler_output
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        out: list[float] = []
        for s in range(0, len(texts), step):
            enc = processor.tokenizer(texts[s : s + step], padding=True, return_tensors="pt").to(model.device)
            txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            txt = torch.nn.functional.normalize(txt.pooler_output.float(), dim=-1)
            cos = (txt @ img.T).mean(-1)  # mean cosine over the prompt's images
            out += (100 * cos.clamp(min=0)).tolist()
    return out


def text_tokens(texts: list[str], options: dict) -> list[int]:
    """How many CLIP tokens each text takes (with its start and end tokens)."""
    _, processor, _ = _load(str(options["clip_model"]), options.get("device", "cpu"))
    return [len(ids) for ids in processor.tokenizer(texts, verbose=False)["input_ids"]]


def select(scores: list[float | None], gap: float) -> tuple[int | None, int | None, str | None]:
    """(chosen index, rejected index, why no pair) among the candidates with a score (None: dropped).

    Best vs worst; a tie for best goes to the earlier sample, for worst to the later one, so the
    choice is deterministic and two candidates never collapse into one.
    """
    kept = [i for i, s in enumerate(scores) if s is not None]
    if len(kept) < 2:
        return None, None, f"{len(kept)} candidate(s) passed the filters, a pair needs 2"
    best = max(kept, key=lambda i: (scores[i], -i))
    worst = min(kept, key=lambda i: (scores[i], -i))
    if scores[best] - scores[worst] < gap:
        return None, None, f"score gap {scores[best] - scores[worst]:.3f} < {gap}"
    return best, worst, None


def judge_groups(groups: list, options: dict, *, progress=None) -> list[dict]:
    from hallu.records import load_image

    opts = {**OPTIONS, **options}
    _, _, digest = _load(str(opts["clip_model"]), opts.get("device", "cpu"))
    settings = {"model": str(opts["clip_model"]), "model_digest": digest, "min_score": opts["min_score"],
                "gap": opts["gap"], "max_tokens": opts["max_tokens"], "score": "100*max(cos,0)"}
    out: list[dict] = []
    for group in groups:
        texts = [r.text.strip() for r in group.responses]
        lengths = text_tokens([t or " " for t in texts], opts)
        dropped: list[str | None] = []
        for text, n in zip(texts, lengths, strict=True):
            if not text:
                dropped.append("empty")
            elif n > opts["max_tokens"]:
                dropped.append(f"{n} CLIP tokens > max_tokens {opts['max_tokens']}")
            else:
                dropped.append(None)
        live = [i for i, d in enumerate(dropped) if d is None]
        images = [load_image(p, where=f"prompt {group.prompt.id!r}") for p in group.images]
        scored = dict(zip(live, clip_scores([texts[i] for i in live], images, opts), strict=True)) if live else {}
        scores: list[float | None] = []
        for i in range(len(texts)):
            s = scored.get(i)
            if s is not None and s < opts["min_score"]:
                dropped[i] = f"score {s:.3f} < min_score {opts['min_score']}"
            scores.append(s if dropped[i] is None else None)
        chosen, rejected, why = select(scores, opts["gap"])
        order = sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: (-scores[i], i))
        rank = {i: k + 1 for k, i in enumerate(order)}
        for i, resp in enumerate(group.responses):
            role = "chosen" if i == chosen else "rejected" if i == rejected else None
            meta = {"score": scored.get(i), "tokens": lengths[i], "rank": rank.get(i), "role": role,
                    "dropped": dropped[i], "no_pair": why, "clip": settings}
            if role is not None:
                meta["gap"] = scores[chosen] - scores[rejected]
            out.append({"id": resp.id, "response_id": resp.id, "text": resp.text, "sentences": [],
                        "judge": NAME, "prompt_version": VERSION, "meta": meta})
        if progress:
            progress(len(group.responses))
    return out
