"""POPE question files (Li et al., EMNLP 2023): the data builder behind ``hallu prepare pope``.

Source, read and re-stated here in our own words (see ``specs/evals.md`` §1.2): the official
generator AoiDragon/POPE @ 08d957b9 (``main.py``, ``utils.py``). Scoring lives in ``hallu.evals.pope``.

Building the questions (official ``main.py`` + ``utils.pope``)
------------------------------------------------------------
Input: one record per image, ``{"image": name, "objects": [names...]}``. Images with at least
``sample_num`` (3) objects are eligible; ``random.sample`` draws ``img_num`` (500) of them from the
eligible list in file order. Over the *selected* images only: object frequencies (one count per listed
object, duplicates counted, first-seen order) and, for every ordered pair of distinct objects in one
image, a co-occurrence count. "Popular" order is frequencies sorted descending, co-occurrence partners
likewise; both sorts are stable, so ties keep first-seen order. For each selected image (in sample order)
and i = 0..sample_num-1: the positive is ``objects[i]`` (the first entries, not a random pick), followed
at once by one negative that is neither in the image's list nor asked before for this image:

- random: ``random.choice`` over the vocabulary (first-seen order) until a draw is valid;
- popular: the first valid object in frequency order;
- adversarial: the first valid object in the positive's co-occurrence order, else random draws.

Ids count from 1 through the whole file; labels are ``"yes"`` / ``"no"``. The official script never seeds
its RNG; with ``seed=S`` we reproduce exactly what it produces after ``random.seed(S)``: one
``sample`` call, then the random, popular and adversarial splits in that order on the same generator
(we use a private ``random.Random(S)``, which yields the same sequence as the seeded global one).
Where the official loop would never end (no valid negative exists: the popular fallback always, since
the frequency list already holds every object; random and adversarial when the vocabulary is exhausted)
we raise a HalluError naming the image instead of hanging.

Question text: the template with the name filled in; a name starting with a lowercase a/e/i/o/u uses
an "an" template. The official code builds that by replacing *every* letter "a" of the template with
"an" ("Is there an umbrella in the imange?"); the shipped files were hand-fixed to "image". We replace
only the article "a" right before ``{}`` (same text as the fixed files); ``an_template=`` overrides it,
e.g. ``template.replace("a", "an")`` for byte-for-byte official output. No other grammar handling
("Is there a skis in the image?"), as in the official code.

From COCO instances (``read_coco_instances``): images in the order of the file's ``images`` array; an
image's objects are the distinct category names of its annotations (crowd ones included) in the order
those annotations appear in ``annotations`` (pycocotools' ``imgToAnns`` order). Distinct, because one
name per instance would make "person" all three positives of a crowded image. The authors' own COCO
objects file is not public, so its order is unknown; the positives depend on this order.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.fileio import read_json, read_json_or_jsonl, sha256_bytes

SPLITS = ("random", "popular", "adversarial")
DEFAULT_TEMPLATE = "Is there a {} in the image?"
DEFAULT_IMAGES_PER_SPLIT = 500
DEFAULT_SAMPLE_NUM = 3
DEFAULT_DATASET = "coco"

_VOWELS = ("a", "e", "i", "o", "u")  # lowercase only, as the official check ``Object[0] in [...]``
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ImageObjects:
    """One image and its object names, in the order that decides the positives."""

    image: str
    objects: tuple[str, ...]


@dataclass
class PopeBuild:
    """Everything the official generator writes, plus how it was made.

    ``questions`` maps each split to its rows ``{"question_id", "image", "text", "label"}``;
    ``ground_truth_objects`` and ``co_occurrence`` are the official side files' contents.
    """

    questions: dict[str, list[dict]]
    images: list[str]
    ground_truth_objects: dict[str, int]
    co_occurrence: dict[str, list[str]]
    eligible: int
    settings: dict = field(default_factory=dict)


def _check_object_names(objects: Any, where: str) -> tuple[str, ...]:
    if not isinstance(objects, list):
        raise HalluError(f"{where}: 'objects' must be a list of object names")
    for o in objects:
        # The official code reads the name's first letter, so an empty name would crash it.
        if not isinstance(o, str) or not o:
            raise HalluError(f"{where}: object names must be non-empty strings, got {o!r}")
    return tuple(objects)


def read_objects_file(path: str | Path) -> list[ImageObjects]:
    """Read POPE's objects ("segmentation") file: JSONL ``{"image", "objects", ...}``, one image a line.

    A JSON array of the same records is accepted too. Extra keys are ignored.
    """
    path = Path(path)
    kind, value = read_json_or_jsonl(path)
    if kind == "json":
        if isinstance(value, dict):  # a one-line JSONL file parses as one document
            rows = [(f"{path}:1", value)]
        elif isinstance(value, list):
            rows = [(f"{path}: record {i}", v) for i, v in enumerate(value, 1)]
        else:
            raise HalluError(f"{path}: expected JSONL records {{\"image\", \"objects\"}}, got a JSON value")
    else:
        rows = [(f"{path}:{lineno}", v) for lineno, v in value]
    out = []
    for where, rec in rows:
        if not isinstance(rec, dict) or "image" not in rec or "objects" not in rec:
            raise HalluError(f"{where}: expected an object with 'image' and 'objects' (POPE objects format)")
        if not isinstance(rec["image"], str) or not rec["image"]:
            raise HalluError(f"{where}: 'image' must be a non-empty string")
        out.append(ImageObjects(rec["image"], _check_object_names(rec["objects"], where)))
    if not out:
        raise HalluError(f"{path}: no images in the objects file")
    return out


def read_coco_instances(path: str | Path) -> list[ImageObjects]:
    """Objects per image from a COCO instances file, through pycocotools.

    Images follow the ``images`` array; an image's objects are the distinct category names of its
    annotations in annotation order (see the module docstring for why distinct).
    """
    from pycocotools.coco import COCO

    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in
                                             ("images", "annotations", "categories")):
        raise HalluError(f"{path}: not a COCO instances file (needs 'images', 'annotations', 'categories')")
    for i, img in enumerate(data["images"], 1):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise HalluError(f"{path}: images[{i}] needs 'id' and 'file_name'")
    names: dict[Any, str] = {}
    for i, cat in enumerate(data["categories"], 1):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str) \
                or not cat["name"]:
            raise HalluError(f"{path}: categories[{i}] needs 'id' and a non-empty 'name'")
        names[cat["id"]] = cat["name"]
    for i, ann in enumerate(data["annotations"], 1):
        if not isinstance(ann, dict) or not all(k in ann for k in ("id", "image_id", "category_id")):
            raise HalluError(f"{path}: annotations[{i}] needs 'id', 'image_id' and 'category_id'")
        if ann["category_id"] not in names:
            raise HalluError(
                f"{path}: annotations[{i}] has category_id {ann['category_id']!r}, not in categories")
    coco = COCO()
    coco.dataset = data
    # pycocotools prints progress to stdout; library code stays silent.
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    out = []
    for img in data["images"]:
        objects: list[str] = []
        for ann in coco.imgToAnns.get(img["id"], []):
            name = names[ann["category_id"]]
            if name not in objects:
                objects.append(name)
        out.append(ImageObjects(img["file_name"], tuple(objects)))
    if not out:
        raise HalluError(f"{path}: no images in the COCO file")
    return out


def an_template_for(template: str) -> str:
    """The template for names starting with a vowel: the article right before ``{}`` becomes "an".

    The official code replaces every letter "a" instead ("imange"); see the module docstring.
    """
    return re.sub(r"\b([Aa])(\s+\{\})", r"\1n\2", template)


def _check_template(template: str, option: str) -> None:
    try:
        ok = "{}" in template and template.format("x") is not None
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise HalluError(f"{option} {template!r}: must hold exactly one '{{}}' for the object name")


def question_text(obj: str, template: str = DEFAULT_TEMPLATE, an_template: str | None = None) -> str:
    """The question for one object: the "an" template when the name starts with a lowercase vowel."""
    if an_template is None:
        an_template = an_template_for(template)
    return (an_template if obj[0] in _VOWELS else template).format(obj)


def _frequencies(selected: Sequence[ImageObjects]) -> dict[str, int]:
    freq: dict[str, int] = {}
    for entry in selected:
        for o in entry.objects:  # duplicates inside one list count, as in the official code
            freq[o] = freq.get(o, 0) + 1
    return freq


def _co_occurrence(selected: Sequence[ImageObjects]) -> dict[str, list[str]]:
    counts: dict[str, dict[str, int]] = {}
    for entry in selected:
        for o in entry.objects:
            partners = counts.setdefault(o, {})
            for p in entry.objects:
                if p != o:
                    partners[p] = partners.get(p, 0) + 1
    # sorted() is stable, so equal counts keep their first-seen order, exactly as the official sort.
    return {o: [p for p, _ in sorted(ps.items(), key=lambda kv: -kv[1])] for o, ps in counts.items()}


def build(
    entries: Sequence[ImageObjects],
    *,
    seed: int,
    images_per_split: int = DEFAULT_IMAGES_PER_SPLIT,
    sample_num: int = DEFAULT_SAMPLE_NUM,
    template: str = DEFAULT_TEMPLATE,
    an_template: str | None = None,
) -> PopeBuild:
    """Build the random, popular and adversarial splits exactly as the official generator would
    after ``random.seed(seed)`` (see the module docstring).

    Raises:
        HalluError: too few eligible images, a bad template, or an image with no possible negative.
    """
    if images_per_split < 1 or sample_num < 1:
        raise HalluError("images per split and sample_num must be at least 1")
    _check_template(template, "template")
    if an_template is None:
        an_template = an_template_for(template)
    _check_template(an_template, "an_template")

    rng = random.Random(seed)
    eligible = [e for e in entries if len(e.objects) >= sample_num]
    if len(eligible) < images_per_split:
        raise HalluError(
            f"only {len(eligible)} of {len(entries)} images have at least {sample_num} objects; "
            f"{images_per_split} images per split were asked for"
        )
    selected = rng.sample(eligible, images_per_split)
    freq = _frequencies(selected)
    vocabulary = list(freq)  # random.choice draws from the keys in first-seen order
    by_frequency = [o for o, _ in sorted(freq.items(), key=lambda kv: -kv[1])]
    co_occurrence = _co_occurrence(selected)

    def no_negative(entry: ImageObjects) -> HalluError:
        return HalluError(
            f"image {entry.image}: no object is left to ask about as a negative (the {len(vocabulary)} "
            "objects of the selected images are all in this image or already asked); the official "
            "generator would loop forever here; use more images or a smaller sample_num"
        )

    def draw(entry: ImageObjects, taken: set[str]) -> str:
        if all(o in taken for o in vocabulary):
            raise no_negative(entry)
        # Redraw until valid, one rng.choice per try: the official loop, draw for draw.
        while True:
            choice = rng.choice(vocabulary)
            if choice not in taken:
                return choice

    def first_valid(candidates: Iterable[str], taken: set[str]) -> str | None:
        return next((o for o in candidates if o not in taken), None)

    questions: dict[str, list[dict]] = {}
    # One generator through all three splits in this order, as the official main() calls them.
    for split in SPLITS:
        rows: list[dict] = []
        for entry in selected:
            taken = set(entry.objects)  # the image's objects plus this image's history
            for i in range(sample_num):
                positive = entry.objects[i]
                taken.add(positive)
                rows.append(_row(len(rows) + 1, entry.image, positive, "yes", template, an_template))
                if split == "random":
                    negative = draw(entry, taken)
                elif split == "popular":
                    # The frequency list holds every object, so the official random fallback could
                    # never succeed here: "none valid" means the official loop hangs.
                    negative = first_valid(by_frequency, taken)
                    if negative is None:
                        raise no_negative(entry)
                else:
                    negative = first_valid(co_occurrence.get(positive, []), taken)
                    if negative is None:
                        negative = draw(entry, taken)
                taken.add(negative)
                rows.append(_row(len(rows) + 1, entry.image, negative, "no", template, an_template))
        questions[split] = rows
    settings = {
        "seed": seed,
        "images_per_split": images_per_split,
        "sample_num": sample_num,
        "template": template,
        "an_template": an_template,
        "eligible_images": len(eligible),
        "input_images": len(entries),
    }
    return PopeBuild(questions, [e.image for e in selected], freq, co_occurrence, len(eligible), settings)


def _row(qid: int, image: str, obj: str, label: str, template: str, an_template: str) -> dict:
    # Key order of the official files.
    text = question_text(obj, template, an_template)
    return {"question_id": qid, "image": image, "text": text, "label": label}


def build_file_names(dataset: str = DEFAULT_DATASET) -> dict[str, str]:
    """Output file names of a build, keyed by split / "ground_truth_objects" / "co_occur" / "build"."""
    names = {split: f"{dataset}_pope_{split}.json" for split in SPLITS}
    names["ground_truth_objects"] = f"{dataset}_ground_truth_objects.json"
    names["co_occur"] = f"{dataset}_co_occur.json"
    names["build"] = f"{dataset}_build.json"  # ours: settings, seed, selected images, file digests
    return names


def render_build(result: PopeBuild, dataset: str = DEFAULT_DATASET,
                 source: dict | None = None) -> dict[str, bytes]:
    """The bytes of every output file, named as the official generator names them.

    Question files are JSONL with ``json.dumps`` defaults, the side files one JSON line without a
    newline, as the official code writes them; ``{dataset}_build.json`` records how they were made.
    """
    if not _SAFE_NAME.fullmatch(dataset):
        raise HalluError(f"--dataset {dataset!r}: use letters, digits, '.', '_' or '-' (it is a file prefix)")
    names = build_file_names(dataset)
    files: dict[str, bytes] = {}
    for split in SPLITS:
        text = "".join(json.dumps(q) + "\n" for q in result.questions[split])
        files[names[split]] = text.encode("utf-8")
    files[names["ground_truth_objects"]] = json.dumps(result.ground_truth_objects).encode("utf-8")
    files[names["co_occur"]] = json.dumps(result.co_occurrence).encode("utf-8")
    info = {
        "benchmark": "pope",
        "dataset": dataset,
        "settings": result.settings,
        "source": source or {},
        "images": result.images,
        "files": {name: {"sha256": sha256_bytes(data)} for name, data in files.items()},
        "questions_per_split": {split: len(result.questions[split]) for split in SPLITS},
    }
    files[names["build"]] = (json.dumps(info, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    return files


def write_build(result: PopeBuild, out_dir: str | Path, dataset: str = DEFAULT_DATASET,
                source: dict | None = None) -> dict[str, Path]:
    """Write all output files at once: staged in a sibling folder, moved in only when all are written."""
    from hallu.fileio import StagedDir

    files = render_build(result, dataset, source)
    out_dir = Path(out_dir)
    with StagedDir(out_dir) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return {name: out_dir / name for name in files}
