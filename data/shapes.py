"""The offline shapes world: glyph images standing for COCO categories, annotated for POPE, CHAIR and SHR.

Every category is one fixed *glyph* (a shape in a colour). Categories come in co-occurrence groups of four
(fork/knife/spoon/bowl, ...); inside a group the glyphs differ in both shape and colour (a Latin square:
group ``g``, item ``i`` -> colour ``i``, shape ``(g + i) mod 6``), so confusing two objects of one group is a
co-occurrence effect, never a visual one. A scene picks a group and draws most of its objects from it.

Layout of ``build_world(out_dir, n_images, seed, noise=WorldNoise())``::

    images/shapes_000000000001.png        64x64 RGB, light gray background, 1-4 glyphs, one per quadrant
    annotations/instances_{train,val}2014.json   COCO instances (real category ids; all 80 categories listed)
    annotations/captions_{train,val}2014.json    COCO captions (5 clean human-style captions per image)
    vg/image_data.json                    Visual Genome v1.2: [{image_id, width, height, url, coco_id}]
    vg/region_descriptions.json           VG v1.2: [{"regions": [{region_id, image_id, x, y, width, height,
                                          phrase}], "id"}], one region per glyph + one relation region
    vg/facts.jsonl                        SHR factual format: {"<image_id>": ["fact", ...]} per line
    vg/val_images_final.json              SHR's image list format: [{"image_id"}] (the val split)
    pope/objects.jsonl                    POPE ground truth: {"image", "objects", "image_id"} (val split only)
    prompts.jsonl                         one caption Prompt per image (all splits; meta["split"])
    qa.jsonl                              balanced yes/no Prompts ("Is there a fork in the image?")
    base_sft.jsonl                        SFT records of the *noisy* train split (noisy caption + noisy yes/no
                                          answers): what a base model is trained on to learn the world's prior
    world.json                            categories, glyphs, groups, sampler constants, co-occurrence counts
    README.md                             this layout, for whoever opens the folder

Splits: image ``k`` (ids count from 1) is in the *val* split when ``k % VAL_EVERY == 0`` (and, for worlds of
fewer than ``VAL_EVERY`` images, the last image), else in *train*. Train images go to the ``*_train2014``
COCO files, val images to ``*_val2014`` (CHAIR pools both, as with real COCO). POPE's objects file and SHR's
image list hold only val images, so a model trained on train prompts is evaluated on unseen images.
Every image's scene comes from its own generator seeded by ``(seed, image_id)``, so a larger world with
the same seed keeps the scenes of the smaller one (splits aside for worlds under ``VAL_EVERY`` images).

Scene sampler (module constants below): the number of objects is 1-4 with weights ``N_OBJECTS_WEIGHTS``;
the scene's group is uniform over the groups; each object is, with probability ``IN_GROUP_P``, an unused
member of the group, else an unused category of another group (uniform); no category appears twice.
With 0.85 this makes ~73 % of object pairs same-group pairs, although only 3 of a category's 23
possible partners share its group: a given same-group pair co-occurs ~18x as often as a given cross-group
pair (``world.json`` records the counts of the built world).

Text: reference captions mention every present object by its category name (or a CHAIR synonym such as
"puppy" for dog, in captions 2-5 only), and no other object word: official CHAIR mining of the captions
finds exactly the annotated objects. Colour words avoid "orange" (a COCO category); other words avoid CHAIR
synonyms ("table", "monitor", "computer", "ball", ...). Caption noise for hallucination experiments lives
only in each caption prompt's ``meta`` (``noisy_reference``: with probability ``CAPTION_NOISE_P`` one absent
member of the scene's group is slipped in), never in the COCO files or ``reference``.

Noise (``WorldNoise``, options of ``hallu prepare shapes``; recorded in ``world.json`` under ``noise``) is the
kind web captions carry, not a planted key: an annotator who lists the objects of a kitchen scene sometimes
names the spoon that "should" be there. ``caption_noise_p`` is the chance that a train caption names one
absent member of the scene's group (when the group has an absent member); ``qa_noise_p`` the chance that a
yes/no question about an absent same-group object is labelled "yes" (a question about a caption's slipped-in
object is always "yes"); ``in_group_p`` sets the co-occurrence strength of the scene sampler. ``pad_p`` is the
over-long caption of detailed-description data: the chance that a train caption, after its true objects,
goes on to name one more, absent member of the scene's group (what such a scene "usually" holds). That
yes/no data is written from the caption, as LLaVA-style instruction data is: the image's same-group
question then asks about the padded object, answered "yes". Padding teaches the failure that "Less is
More" (Yue et al., 2024) finds in real LVLMs: the model does not stop when what it sees is said, and what
it adds is the co-occurring object. Only the
``meta`` noisy fields and ``base_sft.jsonl`` carry noise; every annotation the evals read is clean.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from hallu.coco import CATEGORIES
from hallu.errors import HalluError

WORLD_VERSION = "1"
PROMPTS_FILE = "prompts.jsonl"
QA_FILE = "qa.jsonl"
BASE_SFT_FILE = "base_sft.jsonl"
WORLD_FILE = "world.json"
CAPTION_QUESTION = "Describe this image in detail."
QA_TEMPLATE = "Is there {np} in the image?"  # POPE's template, with "an" before vowels

# ---- scene sampler and rendering (change WORLD_VERSION when any of these change) -----------------------
IMAGE_SIZE = 64  # square images; one glyph per 32x32 quadrant
GLYPH_MIN, GLYPH_MAX = 16, 22  # glyph side in pixels (inclusive range)
GLYPH_MARGIN = 1  # pixels kept free at each quadrant edge
N_OBJECTS_WEIGHTS = (0.15, 0.30, 0.30, 0.25)  # P(1), P(2), P(3), P(4) objects
IN_GROUP_P = 0.85  # each object: from the scene's group with this probability, else from another group
BACKGROUND_GRAY = (226, 244)  # background is gray level g, g uniform in this range (inclusive)
CAPTIONS_PER_IMAGE = 5  # COCO-style reference captions per image
SYNONYM_P = 0.25  # captions 2..5: chance that a mention uses the category's CHAIR synonym
CAPTION_NOISE_P = 0.15  # meta["noisy_reference"]: chance of slipping in one absent object of the group
QA_NOISE_P = 0.0  # meta["noisy_label"]: chance that a same-group ("adversarial") absent object is labelled yes
QA_POSITIVES_MAX = 2  # yes/no questions per image: up to this many "yes", as many "no"
VAL_EVERY = 5  # image k is in the val split when k % VAL_EVERY == 0
# base_sft.jsonl: yes/no questions per train image (the first "yes" and its "no", same-group first), so
# captions are about a third of the examples; with all of qa.jsonl's they were a fifth and the base model
# saw too few captions in a CPU budget to learn to see.
BASE_SFT_QA = 2

QUADRANTS = ("top left", "top right", "bottom left", "bottom right")  # reading order
COLOURS = {  # name -> RGB; no "orange": it is a COCO category
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 0),
}
SHAPES = ("square", "circle", "triangle", "plus", "diamond", "ring")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

# The 80 COCO categories (id, name, supercategory): the one list, kept in hallu.coco.
COCO_CATEGORIES = CATEGORIES

# Co-occurrence groups; the position inside a group is the glyph's colour index. All names are single
# COCO words that Pattern's singularize (official CHAIR) leaves intact; "bus" ("bu") is avoided.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kitchen", ("fork", "knife", "spoon", "bowl")),
    ("street", ("person", "bicycle", "car", "truck")),
    ("park", ("dog", "frisbee", "cat", "bench")),
    ("office", ("laptop", "mouse", "keyboard", "tv")),
    ("party", ("pizza", "cake", "cup", "bottle")),
    ("produce", ("banana", "apple", "carrot", "broccoli")),
)

@dataclass(frozen=True)
class WorldNoise:
    """The world's label-noise and co-occurrence settings (defaults: the module constants)."""

    caption_noise_p: float = CAPTION_NOISE_P
    qa_noise_p: float = QA_NOISE_P
    in_group_p: float = IN_GROUP_P
    pad_p: float = 0.0

    def check(self) -> None:
        for name in ("caption_noise_p", "qa_noise_p", "in_group_p", "pad_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise HalluError(f"shapes world: {name} must be a probability in [0, 1], got {value!r}")

    def to_dict(self) -> dict:
        return {"caption_noise_p": self.caption_noise_p, "qa_noise_p": self.qa_noise_p,
                "in_group_p": self.in_group_p, "pad_p": self.pad_p}


# CHAIR synonyms (same synonym line as the category) that captions 2..5 may use instead of the name.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman"),
    "bicycle": ("bike",),
    "dog": ("puppy",),
    "cat": ("kitten",),
    "tv": ("television",),
    "cake": ("cupcake",),
}


@dataclass(frozen=True)
class Category:
    """A COCO category of the world and its glyph."""

    id: int  # the real COCO category id
    name: str  # the real COCO category name
    supercategory: str
    group: str
    shape: str
    colour: str
    synonyms: tuple[str, ...] = ()

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def glyph(self) -> str:
        return f"{self.colour} {self.shape}"


def _make_categories() -> tuple[Category, ...]:
    coco = {name: (cid, sup) for cid, name, sup in COCO_CATEGORIES}
    colours = list(COLOURS)
    out = []
    for g, (group, names) in enumerate(GROUPS):
        for i, name in enumerate(names):
            cid, sup = coco[name]
            out.append(Category(cid, name, sup, group, SHAPES[(g + i) % len(SHAPES)], colours[i],
                                SYNONYMS.get(name, ())))
    return tuple(out)


CATEGORIES: tuple[Category, ...] = _make_categories()
_BY_NAME = {c.name: c for c in CATEGORIES}
_GROUP_MEMBERS = {group: names for group, names in GROUPS}


# --------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class _Glyph:
    cat: Category
    quadrant: int  # index into QUADRANTS
    x: int  # top-left corner of the glyph's box
    y: int
    size: int  # side of the box

    @property
    def bbox(self) -> list[float]:
        return [float(self.x), float(self.y), float(self.size), float(self.size)]


def _sample_categories(rng: random.Random, in_group_p: float = IN_GROUP_P) -> tuple[str, list[Category]]:
    n = rng.choices(range(1, len(N_OBJECTS_WEIGHTS) + 1), weights=N_OBJECTS_WEIGHTS)[0]
    group = rng.choice(GROUPS)[0]
    chosen: list[Category] = []
    for _ in range(n):
        used = {c.name for c in chosen}
        inside = [nm for nm in _GROUP_MEMBERS[group] if nm not in used]
        outside = [c.name for c in CATEGORIES if c.group != group and c.name not in used]
        pool = inside if inside and rng.random() < in_group_p else outside
        chosen.append(_BY_NAME[rng.choice(pool)])
    return group, chosen


def _sample_scene(rng: random.Random, in_group_p: float = IN_GROUP_P) -> tuple[str, int, list[_Glyph]]:
    """(group, background gray level, glyphs in reading order)."""
    group, cats = _sample_categories(rng, in_group_p)
    quadrants = rng.sample(range(len(QUADRANTS)), len(cats))
    half = IMAGE_SIZE // 2
    glyphs = []
    for cat, q in zip(cats, quadrants, strict=True):
        size = rng.randint(GLYPH_MIN, GLYPH_MAX)
        qx, qy = (q % 2) * half, (q // 2) * half
        x = qx + rng.randint(GLYPH_MARGIN, half - size - GLYPH_MARGIN)
        y = qy + rng.randint(GLYPH_MARGIN, half - size - GLYPH_MARGIN)
        glyphs.append(_Glyph(cat, q, x, y, size))
    gray = rng.randint(*BACKGROUND_GRAY)
    glyphs.sort(key=lambda g: g.quadrant)
    return group, gray, glyphs


def _split_of(image_id: int, n_images: int) -> str:
    if image_id % VAL_EVERY == 0 or (n_images < VAL_EVERY and image_id == n_images):
        return "val"
    return "train"


def file_name(image_id: int) -> str:
    """COCO-like file name; the id is the trailing digits."""
    return f"shapes_{image_id:012d}.png"


# --------------------------------------------------------------------------------------------------
# Drawing


def _polygon(shape: str, x: int, y: int, s: int) -> list[tuple[float, float]]:
    """Outline of a glyph (inclusive pixel box [x, x+s-1]); circles and rings are 16-gons here."""
    import math

    e = s - 1
    cx, cy = x + e / 2, y + e / 2
    if shape == "square":
        return [(x, y), (x + e, y), (x + e, y + e), (x, y + e)]
    if shape == "triangle":
        return [(cx, y), (x + e, y + e), (x, y + e)]
    if shape == "diamond":
        return [(cx, y), (x + e, cy), (cx, y + e), (x, cy)]
    if shape == "plus":
        t = _plus_arm(s)
        a, b = x + (s - t) // 2, x + (s - t) // 2 + t - 1
        c, d = y + (s - t) // 2, y + (s - t) // 2 + t - 1
        return [(a, y), (b, y), (b, c), (x + e, c), (x + e, d), (b, d), (b, y + e), (a, y + e), (a, d),
                (x, d), (x, c), (a, c)]
    if shape in ("circle", "ring"):
        r = e / 2
        angles = [2 * math.pi * k / 16 for k in range(16)]
        return [(round(cx + r * math.cos(a), 2), round(cy + r * math.sin(a), 2)) for a in angles]
    raise ValueError(shape)


def _plus_arm(s: int) -> int:
    return max(4, round(s * 0.36))


def _ring_width(s: int) -> int:
    return max(3, round(s * 0.25))


def _draw(draw, glyph: _Glyph) -> None:
    x, y, s, rgb = glyph.x, glyph.y, glyph.size, glyph.cat.rgb
    e = s - 1
    shape = glyph.cat.shape
    if shape == "circle":
        draw.ellipse([x, y, x + e, y + e], fill=rgb)
    elif shape == "ring":
        draw.ellipse([x, y, x + e, y + e], outline=rgb, width=_ring_width(s))
    elif shape == "square":
        draw.rectangle([x, y, x + e, y + e], fill=rgb)
    elif shape == "plus":
        t = _plus_arm(s)
        o = (s - t) // 2
        draw.rectangle([x + o, y, x + o + t - 1, y + e], fill=rgb)
        draw.rectangle([x, y + o, x + e, y + o + t - 1], fill=rgb)
    else:
        draw.polygon(_polygon(shape, x, y, s), fill=rgb)


def _render(gray: int, glyphs: list[_Glyph]):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (gray, gray, gray))
    draw = ImageDraw.Draw(im)
    for g in glyphs:
        _draw(draw, g)
    return im


# --------------------------------------------------------------------------------------------------
# Text (one set of functions for the world and for tokenizer_corpus)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(word: str) -> str:
    return f"{_article(word)} {word}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _where(q: int) -> str:
    return f"in the {QUADRANTS[q]} corner"


# Caption templates: f(glyphs, words) -> sentence; words[i] is the surface word for glyphs[i].
def _t_shows(gs, ws):
    return f"The image shows {_join([_np(w) for w in ws])}."


def _t_picture(gs, ws):
    return f"A picture of {_join([_np(w) for w in ws])}."


def _t_background(gs, ws):
    return _cap(f"{_join([_np(w) for w in ws])} on a light gray background.")


def _t_drawing(gs, ws):
    return f"A simple drawing with {_join([_np(w) for w in ws])}."


def _t_coloured(gs, ws):
    return _cap(_join([f"{_np(g.cat.colour)} {w}" for g, w in zip(gs, ws, strict=True)]) + ".")


def _t_positions(gs, ws):
    return _cap(_join([f"{_np(w)} {_where(g.quadrant)}" for g, w in zip(gs, ws, strict=True)]) + ".")


def _t_contains(gs, ws):
    return f"This image contains {_join([_np(w) for w in ws])}."


def _t_shapes(gs, ws):
    return f"Colored shapes showing {_join([_np(w) for w in ws])}."


REFERENCE_TEMPLATE = _t_shows
CAPTION_TEMPLATES = (_t_picture, _t_background, _t_drawing, _t_coloured, _t_positions, _t_contains, _t_shapes)


def _detailed(glyphs: list[_Glyph]) -> str:
    """A multi-sentence description: the list, then each object's glyph and place (reading order)."""
    parts = [_t_shows(glyphs, [g.cat.name for g in glyphs])]
    for g in glyphs:
        parts.append(f"The {g.cat.name} is {_np(g.cat.colour)} {g.cat.shape} {_where(g.quadrant)}.")
    return " ".join(parts)


def _count_fact(n: int) -> str:
    if n == 1:
        return "There is one object in the image."
    return f"There are {NUMBER_WORDS[n]} objects in the image."


def _facts(glyphs: list[_Glyph], group: str) -> list[str]:
    facts = [_count_fact(len(glyphs))]
    for g in glyphs:
        facts.append(f"There is {_np(g.cat.name)} in the image.")
        facts.append(f"The {g.cat.name} is {_np(g.cat.colour)} {g.cat.shape}.")
        facts.append(f"The {g.cat.name} is {_where(g.quadrant)}.")
    present = {g.cat.name for g in glyphs}
    for name in _GROUP_MEMBERS[group]:
        if name not in present:
            facts.append(f"There is no {name} in the image.")
    return facts


def _region_phrase(g: _Glyph) -> str:
    return f"{_np(g.cat.colour)} {g.cat.shape} {g.cat.name}"


def _relation(a: _Glyph, b: _Glyph) -> str:
    ra, ca = divmod(a.quadrant, 2)
    rb, cb = divmod(b.quadrant, 2)
    if ra == rb:
        rel = "to the left of" if ca < cb else "to the right of"
    elif ca == cb:
        rel = "above" if ra < rb else "below"
    else:
        rel = "next to"
    return f"{_np(a.cat.name)} {rel} {_np(b.cat.name)}"


def _question(name: str) -> str:
    return QA_TEMPLATE.format(np=_np(name))


def _captions(rng: random.Random, glyphs: list[_Glyph]) -> list[str]:
    """CAPTIONS_PER_IMAGE clean captions; the first is the reference (canonical names, reference template)."""
    out = []
    order = rng.sample(glyphs, len(glyphs))
    out.append(REFERENCE_TEMPLATE(order, [g.cat.name for g in order]))
    templates = rng.sample(CAPTION_TEMPLATES, CAPTIONS_PER_IMAGE - 1)
    for t in templates:
        order = rng.sample(glyphs, len(glyphs))
        words = [rng.choice(g.cat.synonyms) if g.cat.synonyms and rng.random() < SYNONYM_P else g.cat.name
                 for g in order]
        out.append(t(order, words))
    return out


# --------------------------------------------------------------------------------------------------
# The builder


def _dump(path: Path, obj, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sep = (",", ":") if indent is None else (",", ": ")
    text = json.dumps(obj, ensure_ascii=False, indent=indent, separators=sep)
    path.write_text(text + "\n", encoding="utf-8")


def _dump_lines(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _coco_header(kind: str, split: str, seed: int) -> dict:
    return {
        "info": {"description": f"hallu shapes world {kind} ({split}2014 layout), seed {seed}",
                 "version": WORLD_VERSION, "year": 2025, "contributor": "hallu", "url": ""},
        "licenses": [{"id": 1, "name": "synthetic", "url": ""}],
    }


def _categories_json() -> list[dict]:
    return [{"supercategory": sup, "id": cid, "name": name} for cid, name, sup in COCO_CATEGORIES]


def world_description(seed: int | None = None, noise: WorldNoise | None = None) -> dict:
    """Categories, glyphs, groups and sampler constants (what world.json holds, minus the counts)."""
    noise = noise or WorldNoise()
    return {
        "world_version": WORLD_VERSION,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "shapes": list(SHAPES),
        "quadrants": list(QUADRANTS),
        "groups": {g: list(names) for g, names in GROUPS},
        "categories": [{"id": c.id, "name": c.name, "supercategory": c.supercategory, "group": c.group,
                        "shape": c.shape, "colour": c.colour, "rgb": list(c.rgb),
                        "synonyms": list(c.synonyms)} for c in CATEGORIES],
        "sampler": {"n_objects_weights": list(N_OBJECTS_WEIGHTS), "in_group_p": noise.in_group_p,
                    "glyph_size": [GLYPH_MIN, GLYPH_MAX], "glyph_margin": GLYPH_MARGIN,
                    "background_gray": list(BACKGROUND_GRAY), "captions_per_image": CAPTIONS_PER_IMAGE,
                    "synonym_p": SYNONYM_P, "caption_noise_p": noise.caption_noise_p,
                    "qa_positives_max": QA_POSITIVES_MAX, "val_every": VAL_EVERY},
        "noise": noise.to_dict(),
        "prompts": {"caption": CAPTION_QUESTION, "qa": QA_TEMPLATE},
    }


def build_world(out_dir: Path, n_images: int, seed: int, noise: WorldNoise | None = None,
                base_questions: int = BASE_SFT_QA) -> dict:
    """Write the world (see the module docstring) into ``out_dir``; return a summary of counts.

    ``base_questions``: yes/no questions per train image in ``base_sft.jsonl`` (the first of the image's
    ``qa.jsonl`` items: a present object, an absent same-group one, a second present one, a random absent
    one; images with one object have two)."""
    import io

    import numpy as np

    from hallu.records import Prompt

    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise HalluError(f"shapes world: the number of images must be a whole number >= 1, got {n_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise HalluError(f"shapes world: the seed must be an integer, got {seed!r}")
    if isinstance(base_questions, bool) or not isinstance(base_questions, int) or base_questions < 0:
        raise HalluError(f"shapes world: base_questions must be a whole number >= 0, got {base_questions!r}")
    noise = noise or WorldNoise()
    noise.check()
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    coco = {s: {"images": [], "instances": [], "captions": []} for s in ("train", "val")}
    vg_images, vg_regions, facts_rows, pope_rows, prompts, qa = [], [], [], [], [], []
    base_sft: list[dict] = []
    noisy = {"captions": 0, "train_captions": 0, "qa_flipped": 0, "train_qa": 0, "padded": 0}
    ann_id = cap_id = region_id = 0
    pair_counts: dict[str, dict[str, int]] = {c.name: {} for c in CATEGORIES}
    n_objects = 0

    for image_id in range(1, n_images + 1):
        rng = random.Random(f"shapes:{seed}:{image_id}")
        group, gray, glyphs = _sample_scene(rng, noise.in_group_p)
        split = _split_of(image_id, n_images)
        fname = file_name(image_id)
        rel = f"images/{fname}"

        im = _render(gray, glyphs)
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=6)
        (img_dir / fname).write_bytes(buf.getvalue())
        pixels = np.asarray(im)

        names = [g.cat.name for g in glyphs]
        n_objects += len(glyphs)
        for a in names:
            for b in names:
                if a != b:
                    pair_counts[a][b] = pair_counts[a].get(b, 0) + 1

        c = coco[split]
        c["images"].append({"license": 1, "file_name": fname, "height": IMAGE_SIZE, "width": IMAGE_SIZE,
                            "id": image_id})
        for g in glyphs:
            ann_id += 1
            box = pixels[g.y:g.y + g.size, g.x:g.x + g.size]
            area = int((box == np.asarray(g.cat.rgb, dtype=box.dtype)).all(axis=-1).sum())
            seg = [float(v) for pt in _polygon(g.cat.shape, g.x, g.y, g.size) for v in pt]
            c["instances"].append({"segmentation": [seg], "area": float(area), "iscrowd": 0,
                                   "image_id": image_id, "bbox": g.bbox, "category_id": g.cat.id,
                                   "id": ann_id})
        captions = _captions(rng, glyphs)
        for text in captions:
            cap_id += 1
            c["captions"].append({"image_id": image_id, "id": cap_id, "caption": text})

        # Visual Genome regions: one per glyph, plus one relation between two glyphs.
        regions = []
        for g in glyphs:
            region_id += 1
            regions.append({"region_id": region_id, "image_id": image_id, "x": g.x, "y": g.y,
                            "width": g.size, "height": g.size, "phrase": _region_phrase(g)})
        if len(glyphs) >= 2:
            a, b = rng.sample(glyphs, 2)
            x0, y0 = min(a.x, b.x), min(a.y, b.y)
            x1, y1 = max(a.x + a.size, b.x + b.size), max(a.y + a.size, b.y + b.size)
            region_id += 1
            regions.append({"region_id": region_id, "image_id": image_id, "x": x0, "y": y0,
                            "width": x1 - x0, "height": y1 - y0, "phrase": _relation(a, b)})
        vg_images.append({"image_id": image_id, "width": IMAGE_SIZE, "height": IMAGE_SIZE, "url": rel,
                          "coco_id": image_id, "flickr_id": None})
        vg_regions.append({"regions": regions, "id": image_id})
        facts_rows.append({str(image_id): _facts(glyphs, group)})
        if split == "val":
            pope_rows.append({"image": fname, "objects": names, "image_id": image_id})

        # Noisy label set (meta only): one absent member of the scene's group, at a random place.
        absent_in_group = [nm for nm in _GROUP_MEMBERS[group] if nm not in names]
        noisy_order = rng.sample(glyphs, len(glyphs))
        noisy_words = [g.cat.name for g in noisy_order]
        noise_objs: list[str] = []
        if absent_in_group and rng.random() < noise.caption_noise_p:
            noise_objs = [rng.choice(absent_in_group)]
            noisy_words.insert(rng.randint(0, len(noisy_words)), noise_objs[0])
        # Padding: drawn only when asked for, so worlds without it keep their bytes.
        pad_obj = None
        if noise.pad_p > 0 and rng.random() < noise.pad_p:
            left = [nm for nm in absent_in_group if nm not in noise_objs]
            if left:
                pad_obj = rng.choice(left)
                noise_objs.append(pad_obj)
                noisy_words.append(pad_obj)
        noisy_reference = REFERENCE_TEMPLATE([], noisy_words)
        base_id = fname.rsplit(".", 1)[0]
        meta = {"task": "caption", "image_id": image_id, "file_name": fname, "split": split, "group": group,
                "captions": captions, "detailed_reference": _detailed(glyphs),
                "noisy_reference": noisy_reference, "noise_objects": noise_objs}
        prompts.append(Prompt(id=base_id, images=[rel], question=CAPTION_QUESTION, reference=captions[0],
                              objects=names, regions=regions, meta=meta).to_dict())
        if split == "train":
            noisy["train_captions"] += 1
            noisy["captions"] += bool(noise_objs)
            noisy["padded"] += pad_obj is not None
            base_sft.append({"id": base_id, "images": [rel], "prompt": CAPTION_QUESTION,
                             "completion": noisy_reference})

        # Balanced yes/no questions: positives first-drawn, negatives same-group first (adversarial).
        k = min(len(names), QA_POSITIVES_MAX)
        positives = rng.sample(names, k)
        absent_other = [x.name for x in CATEGORIES if x.group != group and x.name not in names]
        negatives = []
        if pad_obj is not None:  # the question written from the padded caption
            negatives.append((pad_obj, "adversarial"))
        elif absent_in_group:
            negatives.append((rng.choice(absent_in_group), "adversarial"))
        while len(negatives) < k:
            cand = rng.choice(absent_other)
            if cand not in [n for n, _ in negatives]:
                negatives.append((cand, "random"))
        items = []
        for pos, (neg, kind) in zip(positives, negatives, strict=True):
            items += [(pos, "yes", "positive"), (neg, "no", kind)]
        # Drawn after everything else, and only when asked for, so the clean world does not depend on it.
        flips = [kind == "adversarial" and noise.qa_noise_p > 0 and rng.random() < noise.qa_noise_p
                 for _, _, kind in items]
        for j, ((obj, label, kind), flip) in enumerate(zip(items, flips, strict=True)):
            noisy_label = "yes" if obj in noise_objs or flip else label
            if split == "train" and j < base_questions:
                noisy["train_qa"] += 1
                noisy["qa_flipped"] += noisy_label != label
                base_sft.append({"id": f"{base_id}_q{j}", "images": [rel], "prompt": _question(obj),
                                 "completion": noisy_label.capitalize()})
            qa.append(Prompt(id=f"{base_id}_q{j}", images=[rel], question=_question(obj),
                             reference=label.capitalize(), objects=names, regions=[],
                             meta={"task": "yes/no", "image_id": image_id, "file_name": fname, "split": split,
                                   "group": group, "object": obj, "label": label, "kind": kind,
                                   "noisy_label": noisy_label}).to_dict())

    cats = _categories_json()
    for split in ("train", "val"):
        c = coco[split]
        _dump(out_dir / "annotations" / f"instances_{split}2014.json",
              {**_coco_header("instances", split, seed), "images": c["images"], "annotations": c["instances"],
               "categories": cats})
        _dump(out_dir / "annotations" / f"captions_{split}2014.json",
              {**_coco_header("captions", split, seed), "images": c["images"], "annotations": c["captions"]})
    _dump(out_dir / "vg" / "image_data.json", vg_images)
    _dump(out_dir / "vg" / "region_descriptions.json", vg_regions)
    _dump(out_dir / "vg" / "val_images_final.json", [{"image_id": row["image_id"]} for row in pope_rows])
    _dump_lines(out_dir / "vg" / "facts.jsonl", facts_rows)
    _dump_lines(out_dir / "pope" / "objects.jsonl", pope_rows)
    _dump_lines(out_dir / PROMPTS_FILE, prompts)
    _dump_lines(out_dir / QA_FILE, qa)
    _dump_lines(out_dir / BASE_SFT_FILE, base_sft)

    same = sum(v for a, row in pair_counts.items() for b, v in row.items()
               if _BY_NAME[a].group == _BY_NAME[b].group)
    total = sum(v for row in pair_counts.values() for v in row.values())
    summary = {
        "world_version": WORLD_VERSION,
        "seed": seed,
        "images": n_images,
        "train_images": len(coco["train"]["images"]),
        "val_images": len(coco["val"]["images"]),
        "objects": n_objects,
        "prompts": len(prompts),
        "qa": len(qa),
        "captions": cap_id,
        "regions": region_id,
        "categories": len(CATEGORIES),
        "groups": len(GROUPS),
        "same_group_pair_share": round(same / total, 4) if total else None,
        "base_sft": len(base_sft),
        # The noise as built (the options are probabilities; these are the shares that came out).
        "noisy_caption_share": round(noisy["captions"] / noisy["train_captions"], 4)
        if noisy["train_captions"] else None,
        "noisy_qa_share": round(noisy["qa_flipped"] / noisy["train_qa"], 4) if noisy["train_qa"] else None,
        "padded_caption_share": round(noisy["padded"] / noisy["train_captions"], 4)
        if noisy["train_captions"] else None,
    }
    world = world_description(seed, noise)
    world["summary"] = summary
    world["cooccurrence"] = {a: dict(sorted(row.items())) for a, row in pair_counts.items()}
    _dump(out_dir / WORLD_FILE, world, indent=1)
    (out_dir / "README.md").write_text(_readme(summary), encoding="utf-8")
    return summary


def _readme(summary: dict) -> str:
    rows = "\n".join(f"| {c.id} | {c.name} | {c.group} | {c.colour} {c.shape} | {', '.join(c.synonyms)} |"
                     for c in CATEGORIES)
    return (
        f"# hallu shapes world (version {WORLD_VERSION}, seed {summary['seed']})\n\n"
        f"{summary['images']} images ({summary['train_images']} train, {summary['val_images']} val), "
        f"{summary['objects']} objects, {summary['prompts']} caption prompts, "
        f"{summary['qa']} yes/no prompts.\n"
        "Built by `hallu prepare shapes`; the layout and the sampler are documented in "
        "`hallu.data.shapes`.\n\n"
        "| COCO id | category | group | glyph | caption synonyms |\n|---|---|---|---|---|\n" + rows + "\n"
    )


# --------------------------------------------------------------------------------------------------
# Tokenizer corpus


def tokenizer_corpus() -> list[str]:
    """Sentences that hold every word the world writes (captions, questions, answers, facts, phrases)."""
    out: list[str] = [CAPTION_QUESTION, "Yes", "No", "yes", "no", "Yes.", "No."]
    for group, names in GROUPS:
        cats = [_BY_NAME[n] for n in names]
        k = len(QUADRANTS)
        for first, rot in ((f, r) for f in range(len(cats)) for r in range(k)):
            order = cats[first:] + cats[:first]  # every category leads a list once per quadrant turn
            for n in range(1, len(cats) + 1):
                glyphs = [_Glyph(order[i], (i + rot) % k, 0, 0, GLYPH_MIN) for i in range(n)]
                canon = [g.cat.name for g in glyphs]
                variants = [canon] + [[(g.cat.synonyms[v] if len(g.cat.synonyms) > v else g.cat.name)
                                       for g in glyphs] for v in range(2)]
                for t in (REFERENCE_TEMPLATE, *CAPTION_TEMPLATES):
                    for words in variants:
                        out.append(t(glyphs, words))
                out.append(_detailed(glyphs))
                out.extend(_facts(glyphs, group))
                out.extend(_region_phrase(g) for g in glyphs)
                out.extend(_relation(a, b) for a in glyphs for b in glyphs if a is not b)
        out.extend(_question(c.name) for c in cats)
    seen: set[str] = set()
    return [s for s in out if not (s in seen or seen.add(s))]
