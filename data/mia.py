"""MIA-DPO augmentation: multi-image prompts built from single-image ones (`hallu prepare mia`).

Three layouts, after MIA-DPO's data scripts (specs/methods.md §4.1-4.3):

- ``sequence``: 2-5 separate images, the source image at a random place among companions; the question
  becomes one ``Image{i}:<image>`` line per image and ``In Image{k}, <question>``. Later turns of a
  multi-turn prompt get ``In image{k}, ``. A subsample (one in ``refusal_every``) also gets the
  refusal variant, asking about ``Image{N+1}`` with the answer "You only provided N images, Image{N+1}
  does not exist.".
- ``grid``: 2, 3, 4, 6 or 9 images in one collage: each fitted into a white 448x448 cell (aspect kept,
  top-left), cells 40 px apart, every row 40 px lower for its label ``Image{k}`` (black, 36 px, 20 px
  right of and 40 px above the cell's corner); question ``In Image{k}, <question>``.
- ``pip``: the source image scaled to 70 % of an unrelated background's width or height (whichever
  binds) and pasted centred; question ``<a centre phrase>, <question>``.

Companions and backgrounds come from the same source bucket (``meta["bucket"]``, else the image
path's first component). Prompts whose text holds box coordinates (``[x, y, x, y]``) are kept out of
grid and pic-in-pic, where coordinates would not match the composite.

Rejected answers are induced on corrupted inputs; each grid / pic-in-pic prompt has its corrupted copy
on disk (``meta["mia"]["corrupted_image"]``): Gaussian noise sigma 225 on the target cell only
(grid), sigma 49 on the whole composite (pic-in-pic). The noise is added and clipped to 0..255; the
released pic-in-pic script cast the noise to uint8 first (negative values wrapped), which we do not
reproduce.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from pathlib import Path

from hallu.data._importing import DATA_DIR, PROMPTS_FILE, Tally, source_bucket, strip_image_tags
from hallu.errors import HalluError
from hallu.records import Prompt, load_image, read_records, resolve_image

FORMATS = ("sequence", "grid", "pip")
CELL = 448
MARGIN = 40
LABEL_OFFSET = (20, -40)  # from a cell's top-left corner
FONT_SIZE = 36
GRID_SHAPES = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}  # images -> (rows, cols)
# MIA-DPO assigns image counts by index ranges per source, about half of them 2; we draw with those shares.
SEQUENCE_COUNTS = {2: 3, 3: 1, 4: 1, 5: 1}
GRID_COUNTS = {2: 3, 3: 1, 4: 1, 6: 1, 9: 1}
PIP_SCALE = 0.7
GRID_NOISE_SIGMA = 225.0
PIP_NOISE_SIGMA = 49.0
# Our own phrasings of "the image in the centre" (the released list has about 95 such paraphrases).
CENTRE_PHRASES = (
    "For the image in the center",
    "Regarding the picture placed in the middle",
    "Looking at the central image",
    "About the image in the middle of the picture",
    "Focusing on the smaller picture in the center",
    "In the image placed at the center",
    "Considering the inset image in the middle",
    "For the picture that sits in the center",
)
_BOX = re.compile(r"\[\s*-?\d*\.?\d+\s*(?:,\s*-?\d*\.?\d+\s*){3}\]")


# --------------------------------------------------------------------------------------------------
# Layouts (pure functions over PIL images)


def grid_geometry(n: int) -> tuple[tuple[int, int], list[tuple[int, int]], list[tuple[int, int]]]:
    """Canvas size, cell corners and label positions (row-major) of an ``n``-image grid."""
    if n not in GRID_SHAPES:
        raise HalluError(f"grid collage: {n} images; a grid holds {', '.join(map(str, GRID_SHAPES))}")
    rows, cols = GRID_SHAPES[n]
    size = (cols * CELL + (cols - 1) * MARGIN, rows * (CELL + MARGIN))
    cells = [(c * (CELL + MARGIN), r * (CELL + MARGIN) + MARGIN) for r in range(rows) for c in range(cols)]
    labels = [(x + LABEL_OFFSET[0], y + LABEL_OFFSET[1]) for x, y in cells]
    return size, cells, labels


def fit_cell(im):
    """``im`` resized to fit a white CELL x CELL square, aspect kept, at its top-left."""
    from PIL import Image

    w, h = im.size
    if w / h > 1:
        nw, nh = CELL, max(1, int(CELL * h / w))
    else:
        nw, nh = max(1, int(CELL * w / h)), CELL
    cell = Image.new("RGB", (CELL, CELL), (255, 255, 255))
    cell.paste(im.convert("RGB").resize((nw, nh), Image.LANCZOS), (0, 0))
    return cell


def compose_grid(images: list):
    """The labelled collage of ``images`` and its cell boxes ``[x, y, w, h]`` in row-major order."""
    from PIL import Image, ImageDraw, ImageFont

    size, cells, labels = grid_geometry(len(images))
    canvas = Image.new("RGB", size, (255, 255, 255))
    for im, pos in zip(images, cells, strict=True):
        canvas.paste(fit_cell(im), pos)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)  # bundled with Pillow: the same pixels on every machine
    for k, pos in enumerate(labels, 1):
        draw.text(pos, f"Image{k}", fill=(0, 0, 0), font=font)
    return canvas, [[x, y, CELL, CELL] for x, y in cells]


def compose_pip(target, background):
    """``target`` at 70 % of ``background``'s binding side, pasted centred; the composite and its box."""
    from PIL import Image

    bg = background.convert("RGB").copy()
    bw, bh = bg.size
    tw, th = target.size
    scale = min(PIP_SCALE * bw / tw, PIP_SCALE * bh / th)
    nw, nh = max(1, int(tw * scale)), max(1, int(th * scale))
    x, y = (bw - nw) // 2, (bh - nh) // 2
    bg.paste(target.convert("RGB").resize((nw, nh), Image.LANCZOS), (x, y))
    return bg, [x, y, nw, nh]


def add_noise(im, sigma: float, seed: int, box: list[int] | None = None):
    """Gaussian noise of ``sigma`` (pixel units) on ``box`` (default: everywhere), clipped to 0..255."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(im.convert("RGB"), dtype=np.float32).copy()
    x, y, w, h = box if box is not None else (0, 0, arr.shape[1], arr.shape[0])
    region = arr[y:y + h, x:x + w]
    region += np.random.default_rng(seed).normal(0.0, sigma, size=region.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


# --------------------------------------------------------------------------------------------------
# Questions


def lower_first(text: str) -> str:
    """'What is ...' -> 'what is ...' after "In Image2, "; acronyms ('TV ...') stay as they are."""
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        return text[0].lower() + text[1:]
    return text


def sequence_question(question: str, n: int, k: int) -> str:
    lines = [f"Image{i}:<image>" for i in range(1, n + 1)]
    return "\n".join(lines) + f"\nIn Image{k}, {lower_first(strip_image_tags(question))}"


def refusal_answer(n: int) -> str:
    return f"You only provided {n} images, Image{n + 1} does not exist."


def has_box_coordinates(p: Prompt) -> bool:
    turns = [t for key in ("turns", "conversation") for t in (p.meta.get(key) or []) if isinstance(t, dict)]
    texts = [p.question, p.reference or ""] + [t.get("text", "") for t in turns]
    return any(_BOX.search(t) for t in texts if isinstance(t, str))


def _draw_count(rng: random.Random, weights: dict[int, int], available: int) -> int:
    counts = [c for c in weights if c <= available]
    if not counts:
        return 0
    return rng.choices(counts, weights=[weights[c] for c in counts])[0]


def _companions(rng: random.Random, pool: list[str], target: str, k: int) -> list[str]:
    """``k`` distinct images of the pool other than ``target`` (sampling k+1 and dropping it is O(k))."""
    drawn = rng.sample(pool, min(len(pool), k + 1))
    return [p for p in drawn if p != target][:k]


def sequence_turns(turns: list, question: str, k: int) -> list:
    """A multi-turn prompt's turns for a sequence: the first question rewritten, later user turns
    prefixed ``In image{k}, `` (lower-case, as the released data has it) to say which image they mean."""
    out, first_user = [], True
    for t in turns:
        if isinstance(t, dict) and t.get("role") == "user":
            text = question if first_user else f"In image{k}, {lower_first(str(t.get('text', '')))}"
            t, first_user = {**t, "text": text}, False
        out.append(t)
    return out


def _file_stem(pid: str) -> str:
    safe = re.sub(r"[^\w.-]+", "_", pid)[:60]
    return f"{safe}-{hashlib.sha1(pid.encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------------------------------------
# The augmentation


def augment(prompts: list[Prompt], base: Path, data_dir: Path, formats: list[str], seed: int,
            refusal_every: int, tally: Tally) -> tuple[list[Prompt], Counter]:
    """Multi-image prompts from single-image ``prompts`` (images relative to ``base``); composites are
    written to ``data_dir/images``. Returns the prompts and a count per layout."""
    singles: list[tuple[Prompt, str, str]] = []  # (prompt, absolute image, bucket)
    for p in prompts:
        if len(p.images) != 1:
            tally.filter("not single-image")
            continue
        path = resolve_image(p.images[0], base)
        if not path.is_file():
            tally.skip(f"prompt {p.id}", "missing image", f"image {path} not found")
            continue
        bucket = p.meta.get("bucket") if isinstance(p.meta.get("bucket"), str) else source_bucket(p.images[0])
        singles.append((p, str(path.resolve()), bucket))
    distinct: dict[str, dict[str, None]] = {}  # bucket -> its distinct images, in first-seen order
    for _, img, bucket in singles:
        distinct.setdefault(bucket, {})[img] = None
    pools = {b: list(v) for b, v in distinct.items()}

    img_dir = data_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    out: list[Prompt] = []
    counts: Counter = Counter()
    for p, img, bucket in singles:
        pool = pools[bucket]
        for fmt in formats:
            rng = random.Random(f"{seed}:mia:{fmt}:{p.id}")
            where = f"prompt {p.id}"
            # A conversation's later turns only make sense for a sequence, which rewrites them below.
            base_meta = {k: v for k, v in p.meta.items() if k not in ("turns", "conversation")}
            mia = {"format": fmt, "source_prompt": p.id, "bucket": bucket}
            if fmt != "sequence" and has_box_coordinates(p):
                tally.filter(f"box coordinates ({fmt})")
                continue
            if fmt == "sequence":
                n = _draw_count(rng, SEQUENCE_COUNTS, len(pool))
                if not n:
                    tally.filter("bucket too small (sequence)")
                    continue
                images = _companions(rng, pool, img, n - 1)
                k = rng.randrange(n) + 1
                images.insert(k - 1, img)
                question = sequence_question(p.question, n, k)
                meta = {**base_meta, "mia": {**mia, "target": k, "n_images": n, "refusal": False}}
                for key in ("conversation", "turns"):  # the image lines go in front of the first question
                    turns = p.meta.get(key)
                    users = [t for t in turns if isinstance(t, dict) and t.get("role") == "user"] \
                        if isinstance(turns, list) else []
                    if users:
                        first = sequence_question(str(users[0].get("text", "")), n, k)
                        meta[key] = sequence_turns(turns, first, k)
                        if key == "turns":  # the prompt asks its last user turn (what rollout answers)
                            question = [t for t in meta[key] if t.get("role") == "user"][-1]["text"]
                out.append(Prompt(id=f"{p.id}.seq", images=images, question=question, reference=p.reference,
                                  objects=p.objects, meta=meta))
                counts[fmt] += 1
                if refusal_every and rng.randrange(refusal_every) == 0:
                    q = lower_first(strip_image_tags(p.question))
                    lines = "\n".join(f"Image{i}:<image>" for i in range(1, n + 1))
                    out.append(Prompt(id=f"{p.id}.seq-refusal", images=images,
                                      question=f"{lines}\nIn Image{n + 1}, {q}", reference=refusal_answer(n),
                                      meta={**base_meta, "mia": {**mia, "target": n + 1, "n_images": n,
                                                                 "refusal": True}}))
                    counts["sequence refusal"] += 1
            elif fmt == "grid":
                n = _draw_count(rng, GRID_COUNTS, len(pool))
                if not n:
                    tally.filter("bucket too small (grid)")
                    continue
                paths = _companions(rng, pool, img, n - 1)
                k = rng.randrange(n) + 1
                paths.insert(k - 1, img)
                canvas, cells = compose_grid([load_image(x, where) for x in paths])
                stem = _file_stem(p.id)
                canvas.save(img_dir / f"{stem}.grid.png")
                noisy = add_noise(canvas, GRID_NOISE_SIGMA, rng.randrange(2**32), box=cells[k - 1])
                noisy.save(img_dir / f"{stem}.grid.noisy.png")
                meta = {**base_meta, "mia": {**mia, "target": k, "n_images": n, "cells": cells, "members": paths,
                                             "corrupted_image": f"images/{stem}.grid.noisy.png",
                                             "corruption": {"sigma": GRID_NOISE_SIGMA, "region": "target cell"}}}
                out.append(Prompt(id=f"{p.id}.grid", images=[f"images/{stem}.grid.png"],
                                  question=f"In Image{k}, {lower_first(strip_image_tags(p.question))}",
                                  reference=p.reference, objects=p.objects, meta=meta))
                counts[fmt] += 1
            else:  # pip
                others = _companions(rng, pool, img, 1)
                if not others:
                    tally.filter("bucket too small (pip)")
                    continue
                canvas, box = compose_pip(load_image(img, where), load_image(others[0], where))
                stem = _file_stem(p.id)
                canvas.save(img_dir / f"{stem}.pip.png")
                add_noise(canvas, PIP_NOISE_SIGMA, rng.randrange(2**32)).save(img_dir / f"{stem}.pip.noisy.png")
                phrase = rng.choice(CENTRE_PHRASES)
                meta = {**base_meta, "mia": {**mia, "box": box, "background": others[0],
                                             "corrupted_image": f"images/{stem}.pip.noisy.png",
                                             "corruption": {"sigma": PIP_NOISE_SIGMA, "region": "whole"}}}
                out.append(Prompt(id=f"{p.id}.pip", images=[f"images/{stem}.pip.png"],
                                  question=f"{phrase}, {lower_first(strip_image_tags(p.question))}",
                                  reference=p.reference, objects=p.objects, meta=meta))
                counts[fmt] += 1
    return out, counts


def parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise HalluError(f"--formats {text}: unknown layout {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def run_augment(prompts_path: Path, out: Path, formats: str = "sequence,grid,pip", refusal_every: int = 50,
                strict: bool = False, seed: int = 0) -> dict:
    """`hallu prepare mia` as the ``prepare`` stage of the run at ``out``."""
    from hallu.fileio import StagedDir, atomic_write_jsonl, set_aside
    from hallu.manifest import Run

    fmts = parse_formats(formats)
    prompts_path = Path(prompts_path)
    data = Path(out) / DATA_DIR
    if prompts_path.resolve().is_relative_to(data.resolve()):
        # The new data replaces RUN/data, where these prompts and the images they name live.
        raise HalluError(f"--prompts {prompts_path} lies inside --out {out}'s data folder, which mia would "
                         "replace; write the multi-image prompts to another --out")
    prompts = read_records(prompts_path, Prompt)
    if not prompts:
        raise HalluError(f"{prompts_path}: no prompts in the file")
    run = Run(out, flag="--out")
    options = {"dataset": "mia", "prompts": str(prompts_path.resolve()), "formats": fmts, "seed": seed,
               "refusal_every": refusal_every, "strict": strict}
    with run.stage("prepare", options=options, inputs={"prompts": prompts_path}) as st:
        tally = Tally(strict=strict)
        kept = None
        with StagedDir(data) as tmp:
            records, counts = augment(prompts, prompts_path.parent, tmp, fmts, seed, refusal_every, tally)
            if not records:
                raise HalluError(f"{prompts_path}: no multi-image prompt could be built ({tally.summary()})")
            atomic_write_jsonl(tmp / PROMPTS_FILE, [r.to_dict() for r in records])
            if st.fresh and data.is_dir() and any(data.iterdir()):
                kept = set_aside(data)  # what another prepare made is kept, never replaced
        st.output("prompts", data / PROMPTS_FILE, count=len(records))
        st.output("images", data / "images")
        summary = {"prompts": len(records), "by_format": dict(counts), **tally.summary()}
        st.extra["summary"] = summary
    return {**summary, "kept": str(kept) if kept else None}
