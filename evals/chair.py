"""CHAIR (Rohrbach, Hendricks et al., EMNLP 2018), scored exactly as the official code scores it.

Official code: LisaAnne/Hallucination@6e4d33c4 ``utils/chair.py``; the words of a caption come from
:mod:`hallu.objects` (nltk 3.2.5 tokens, Pattern 3.6 ``singularize``, double words, synonyms).

Ground truth of an image is the *union* of the node words of its instance annotations (COCO 2014
train + val pooled, category names taken from the *train* file as the official code does) and the
node words found in its reference captions by the same word machinery. So reference captions add
objects the masks lack ("two adults" puts ``person`` in), and an image with no annotations at all has
an empty ground truth: every mention is then hallucinated.

Metrics, as fractions (papers print them x100):

- ``chair_s``: captions with at least one hallucinated mention / all captions (captions without any
  mention count in the denominator);
- ``chair_i``: hallucinated mentions / mentions, summed over all captions (a micro average; a word
  mentioned twice counts twice). The official script divides by zero when nothing is mentioned; here
  the value is ``None``;
- ``recall`` (OPERA's addition): sum over captions of the number of *distinct* correctly mentioned
  objects / sum over captions of the ground-truth size (``None`` when every ground truth is empty);
- ``len`` (OPERA's addition): 0.01 x the mean number of words per caption after the pair merge
  (punctuation included), so that x100 it reads as the mean length.

Caption files: a JSON list or JSONL of ``{"image_id", "caption"}`` records (OPERA's format, keys
configurable), or the official ``{"imgToEval": {key: {"image_id", "caption", ...}}}``. The official
script also demands BLEU/METEOR/CIDEr/SPICE/ROUGE entries and copies them through; we neither need
nor report them. An image id missing from the annotations is an error by default (it is nearly
always a wrong id); ``unknown_images="empty"`` scores it against an empty ground truth instead, as
the official code silently does.

Generation protocol of OPERA and later papers (not part of the official code): 500 COCO val2014
images chosen by seeding ``random`` (seed 42 in OPERA's configs) and shuffling the directory listing,
prompt "Please describe this image in detail.", ``max_new_tokens`` 512. :func:`select_images` does
the selection; unlike OPERA it sorts the listing first, because ``os.listdir`` order depends on the
file system and would make the selection irreproducible.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.evals.result import file_input, finish, one_split

BENCHMARK = "chair"
PARSER = "chair-official"  # the official caption -> objects rule (hallu.objects) and CHAIR's formulas
ANNOTATION_FILES = (
    "instances_train2014.json",
    "instances_val2014.json",
    "captions_train2014.json",
    "captions_val2014.json",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
OPERA_SEED = 42
OPERA_PROMPT = "Please describe this image in detail."
UNKNOWN_IMAGE_POLICIES = ("error", "empty")


# --------------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------------


def _load_coco(path: Path, kind: str):
    """A pycocotools index over one annotation file; malformed files raise HalluError naming it."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    from hallu.fileio import read_json

    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise HalluError(f"{path}: not a COCO {kind} file (expected an object with an 'annotations' list)")
    need = ("image_id", "category_id") if kind == "instances" else ("image_id", "caption")
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise HalluError(f"{path}: annotations[{k}] is not an object")
        for key in need:
            if key not in ann:
                raise HalluError(f"{path}: annotations[{k}] has no {key!r}")
        if kind == "captions" and not isinstance(ann["caption"], str):
            raise HalluError(f"{path}: annotations[{k}]: 'caption' is not a string")
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise HalluError(f"{path}: not a COCO {kind} file ({type(e).__name__}: {e})") from None
    return coco


class CocoGroundTruth:
    """The objects of each COCO 2014 image, as the official CHAIR builds them (computed lazily)."""

    def __init__(self, annotation_dir: str | os.PathLike, matcher=None):
        from hallu.fileio import sha256_file
        from hallu.objects import get_matcher

        self.dir = Path(annotation_dir)
        if not self.dir.is_dir():
            raise HalluError(f"{self.dir}: no such folder (expected the COCO 2014 annotations folder)")
        paths = {name: self.dir / name for name in ANNOTATION_FILES}
        for path in paths.values():
            if not path.is_file():
                raise HalluError(
                    f"{path}: missing; CHAIR needs {', '.join(ANNOTATION_FILES)} "
                    "(from annotations_trainval2014.zip) in one folder"
                )
        self.matcher = matcher or get_matcher()
        self.digests = {name: sha256_file(path) for name, path in paths.items()}
        inst_train = _load_coco(paths["instances_train2014.json"], "instances")
        inst_val = _load_coco(paths["instances_val2014.json"], "instances")
        caps_train = _load_coco(paths["captions_train2014.json"], "captions")
        caps_val = _load_coco(paths["captions_val2014.json"], "captions")
        self._instances = (inst_val, inst_train)
        self._captions = (caps_val, caps_train)
        # Official: one category table, the train file's, for the annotations of both splits.
        train_path = paths["instances_train2014.json"]
        self._node_of_category: dict[Any, str] = {}
        for cat_id, cat in inst_train.cats.items():
            name = cat.get("name") if isinstance(cat, dict) else None
            node = self.matcher.node_of(name) if isinstance(name, str) else None
            if node is None:
                raise HalluError(
                    f"{train_path}: category {cat_id} {name!r} is not a COCO category "
                    "of the CHAIR synonym table"
                )
            self._node_of_category[cat_id] = node
        for coco, fname in ((inst_val, "instances_val2014.json"), (inst_train, "instances_train2014.json")):
            for ann in coco.dataset["annotations"]:
                if ann["category_id"] not in self._node_of_category:
                    raise HalluError(
                        f"{paths[fname]}: annotation {ann.get('id')!r} "
                        f"has category_id {ann['category_id']!r}, "
                        f"which {train_path.name} does not define"
                    )
        self.file_names: dict[str, int] = {}
        for coco in (*self._instances, *self._captions):
            for img in coco.imgs.values():
                if isinstance(img, dict) and isinstance(img.get("file_name"), str):
                    self.file_names.setdefault(img["file_name"], img["id"])
        self._cache: dict[Any, frozenset[str]] = {}

    def has_image(self, image_id) -> bool:
        return any(image_id in c.imgs or image_id in c.imgToAnns for c in (*self._instances, *self._captions))

    def objects(self, image_id) -> frozenset[str]:
        """Node words of the image: its instance categories plus objects named in its reference captions."""
        hit = self._cache.get(image_id)
        if hit is not None:
            return hit
        found: set[str] = set()
        for coco in self._instances:
            for ann in coco.imgToAnns.get(image_id, ()):
                found.add(self._node_of_category[ann["category_id"]])
        for coco in self._captions:
            for ann in coco.imgToAnns.get(image_id, ()):
                found.update(self.matcher.caption_to_words(ann["caption"]).nodes)
        result = frozenset(found)
        self._cache[image_id] = result
        return result


# --------------------------------------------------------------------------------------------------
# Caption files
# --------------------------------------------------------------------------------------------------


def _image_id(value, where: str, key: str) -> int:
    # bool is an int subclass; True is no image id.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise HalluError(f"{where}: {key!r} is {value!r}, expected a COCO image id (an integer)")


def _record(obj, where: str, image_id_key: str, caption_key: str, key: str | None = None) -> dict:
    if not isinstance(obj, dict):
        raise HalluError(f"{where}: expected an object with {image_id_key!r} and {caption_key!r}")
    for k in (image_id_key, caption_key):
        if k not in obj:
            raise HalluError(f"{where}: record has no {k!r}")
    caption = obj[caption_key]
    if not isinstance(caption, str):
        raise HalluError(f"{where}: {caption_key!r} must be a string, got {type(caption).__name__}")
    rec = {"image_id": _image_id(obj[image_id_key], where, image_id_key), "caption": caption, "where": where}
    if key is not None:
        rec["key"] = key
    return rec


def load_captions(
    path: str | os.PathLike, *, image_id_key: str = "image_id", caption_key: str = "caption"
) -> list[dict]:
    """Read generated captions: JSON list, JSONL, a lone record, or ``{"imgToEval": {...}}``.

    Returns ``[{"image_id": int, "caption": str, "where": "file:line", ("key": imgToEval key)}]`` in file
    order. The official script iterates ``imgToEval`` in Python 2 dict order; the metrics do not
    depend on order.
    """
    from hallu.fileio import read_json_or_jsonl

    path = Path(path)
    kind, value = read_json_or_jsonl(path)
    if kind == "jsonl":
        recs = [_record(obj, f"{path}:{line}", image_id_key, caption_key) for line, obj in value]
    elif isinstance(value, list):
        recs = [_record(obj, f"{path}: [{i}]", image_id_key, caption_key) for i, obj in enumerate(value)]
    elif isinstance(value, dict) and "imgToEval" in value:
        table = value["imgToEval"]
        if not isinstance(table, dict):
            raise HalluError(f"{path}: 'imgToEval' must be an object of {{key: {{image_id, caption}}}}")
        recs = [
            _record(obj, f"{path}: imgToEval[{k!r}]", image_id_key, caption_key, key=str(k))
            for k, obj in table.items()
        ]
    elif isinstance(value, dict) and (image_id_key in value or caption_key in value):
        recs = [_record(value, f"{path}:1", image_id_key, caption_key)]  # a one-line JSONL file
    else:
        raise HalluError(
            f"{path}: expected a JSON list or JSONL of {{{image_id_key!r}, {caption_key!r}}} records, "
            'or {"imgToEval": {...}}'
        )
    if not recs:
        raise HalluError(f"{path}: no caption records")
    return recs


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def score_caption(caption: str, gt_objects: Iterable[str], matcher=None) -> dict:
    """Score one caption against a ground-truth object set (pure; no file access)."""
    from hallu.objects import get_matcher

    m = matcher or get_matcher()
    gt = frozenset(gt_objects)
    cw = m.caption_to_words(caption)
    hallucinated: list[list[str]] = []
    hall_idxs: list[int] = []
    recalled: set[str] = set()
    for word, node, idx in zip(cw.surface, cw.nodes, cw.idxs, strict=True):
        if node in gt:
            recalled.add(node)
        else:
            hallucinated.append([word, node])
            hall_idxs.append(idx)
    n = len(cw.nodes)
    return {
        "mentioned": list(cw.nodes),
        "hallucinated": hallucinated,
        "gt_objects": sorted(gt),
        "chair_s": int(bool(hallucinated)),
        "chair_i": len(hallucinated) / n if n else 0.0,
        # OPERA's per-caption recall: 0 when the ground truth is empty.
        "recall": len(recalled) / len(gt) if gt else 0.0,
        "recalled": sorted(recalled),
        "surface": list(cw.surface),
        "object_idxs": list(cw.idxs),
        "hallucination_idxs": hall_idxs,
        "words": list(cw.merged),
    }


def check_unknown_images(policy: str, option: str = "--unknown-images") -> None:
    if policy not in UNKNOWN_IMAGE_POLICIES:
        raise HalluError(f"{option} {policy}: unknown; choose one of {', '.join(UNKNOWN_IMAGE_POLICIES)}")


def evaluate(
    records: Iterable[Mapping],
    ground_truth: CocoGroundTruth,
    *,
    unknown_images: str = "error",
    settings: Mapping | None = None,
) -> dict:
    """CHAIR over ``[{"image_id", "caption"}, ...]``; returns the result dict (see module docstring).

    Records may carry ``where`` (used in error messages) and ``key`` (kept in the item).
    """
    from hallu.objects import NORMALISER, TOKENIZER

    check_unknown_images(unknown_images, "unknown_images")
    matcher = ground_truth.matcher
    items: list[dict] = []
    mentions = hallucinated = hall_caps = with_mentions = gt_total = recalled_total = words = 0
    for i, rec in enumerate(records):
        where = rec.get("where") or f"record {i}"
        for key in ("image_id", "caption"):
            if key not in rec:
                raise HalluError(f"{where}: record has no {key!r}")
        if not isinstance(rec["caption"], str):
            raise HalluError(f"{where}: 'caption' must be a string, got {type(rec['caption']).__name__}")
        image_id = _image_id(rec["image_id"], where, "image_id")
        if not ground_truth.has_image(image_id):
            if unknown_images == "error":
                raise HalluError(
                    f"{where}: image_id {image_id} is not in the COCO annotations in {ground_truth.dir} "
                    "(--unknown-images empty scores it against no objects, as the official script does)"
                )
        gt = ground_truth.objects(image_id)
        scored = score_caption(rec["caption"], gt, matcher)
        item = {"image_id": image_id, "caption": rec["caption"]}
        if "key" in rec:
            item["key"] = rec["key"]
        item.update(scored)
        items.append(item)
        mentions += len(item["mentioned"])
        hallucinated += len(item["hallucinated"])
        hall_caps += item["chair_s"]
        with_mentions += bool(item["mentioned"])
        gt_total += len(gt)
        recalled_total += len(item["recalled"])
        words += len(item["words"])
    if not items:
        raise HalluError("no captions to score")
    n = len(items)
    metrics = {
        "chair_s": hall_caps / n,
        "chair_i": hallucinated / mentions if mentions else None,
        "recall": recalled_total / gt_total if gt_total else None,
        "len": 0.01 * words / n,
    }
    counts = {
        "captions": n,
        "images": len({it["image_id"] for it in items}),
        "captions_with_mentions": with_mentions,
        "captions_with_hallucination": hall_caps,
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
        "gt_objects": gt_total,
        "recalled_objects": recalled_total,
        "words": words,
    }
    out_settings = {
        "parser": PARSER,
        "normaliser": NORMALISER,
        "tokenizer": TOKENIZER,
        "synonyms": matcher.digest,
        "annotations": dict(ground_truth.digests),
        "unknown_images": unknown_images,
        "inputs": {f"annotations:{name}": {"path": str(ground_truth.dir / name), "sha256": digest}
                   for name, digest in ground_truth.digests.items()},
    }
    for key, value in (settings or {}).items():
        if key == "inputs":
            out_settings["inputs"].update(value)
        else:
            out_settings[key] = value
    return finish({
        "benchmark": BENCHMARK,
        "metrics": metrics,
        "splits": one_split(metrics, n),
        "counts": counts,
        "items": items,
        "settings": out_settings,
    })


def evaluate_file(
    captions: str | os.PathLike,
    annotation_dir: str | os.PathLike,
    *,
    image_id_key: str = "image_id",
    caption_key: str = "caption",
    unknown_images: str = "error",
    ground_truth: CocoGroundTruth | None = None,
) -> dict:
    """Score a captions file (any supported format) against a COCO 2014 annotations folder."""
    records = load_captions(captions, image_id_key=image_id_key, caption_key=caption_key)
    gt = ground_truth or CocoGroundTruth(annotation_dir)
    entry = file_input(captions)
    settings = {"captions_file": {"path": entry["path"], "digest": entry["sha256"]}, "inputs": {"captions": entry}}
    return evaluate(records, gt, unknown_images=unknown_images, settings=settings)


# --------------------------------------------------------------------------------------------------
# Image selection for the generation protocol
# --------------------------------------------------------------------------------------------------


def select_images(image_dir: str | os.PathLike, n: int = 500, seed: int = OPERA_SEED) -> list[Path]:
    """OPERA's selection: shuffle the image files of ``image_dir`` with ``random`` seeded, keep the first n.

    The listing is sorted by name before the shuffle (OPERA shuffles raw ``os.listdir`` order, which
    depends on the file system). Fewer than ``n`` images gives them all.
    """
    import random

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise HalluError(f"{image_dir}: no such image folder")
    if n < 1:
        raise HalluError(f"n={n}: must be at least 1")
    names = sorted(p.name for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise HalluError(f"{image_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    random.Random(seed).shuffle(names)  # same permutation as random.seed(seed); random.shuffle(names)
    return [image_dir / name for name in names[:n]]


_DIGITS = re.compile(r"\d+")


def image_id_for_file(path: str | os.PathLike, file_names: Mapping[str, int] | None = None) -> int:
    """COCO image id of an image file: its ``file_name`` entry in the annotations if listed, else the
    last run of digits in the file stem ("COCO_val2014_000000391895.jpg" -> 391895)."""
    p = Path(path)
    if file_names and p.name in file_names:
        return int(file_names[p.name])
    runs = _DIGITS.findall(p.stem)
    if not runs:
        raise HalluError(
            f"{p}: cannot tell its COCO image id (not in the annotations, no digits in the name)"
        )
    return int(runs[-1])


# --------------------------------------------------------------------------------------------------
# Running a model: captions for seeded images, then CHAIR
# --------------------------------------------------------------------------------------------------

EVAL_STAGE = "eval-chair"


def evaluate_model(model: Path | None, images: Path | None, annotation_dir: Path | None, out: Path | None,
                   rescore: bool, knobs: dict, *, n_images: int = 500, seed: int = OPERA_SEED,
                   prompt: str = OPERA_PROMPT, unknown_images: str = "error") -> tuple[dict, Path]:
    """Caption ``n_images`` seeded images of ``images`` with ``model`` (OPERA's protocol), then score CHAIR.

    The captions go to ``out/generations.jsonl`` (resumable) and the result to ``out/results.json``;
    ``rescore`` re-scores the stored captions (e.g. after fixing the annotations folder) without the model.
    ``knobs``: :class:`~hallu.evals.generation.ModelOptions` fields (max_new_tokens, batch_size, ...).
    """
    from hallu.evals import generation as G
    from hallu.records import EvalItem

    knobs = dict(knobs)
    device = knobs.pop("device", "auto")
    # Typos are refused before the run folder is opened or a model is read.
    check_unknown_images(unknown_images)
    G.check_model_knobs(knobs)
    ev = G.ModelEval(out, EVAL_STAGE, rescore)
    if not rescore and annotation_dir is None:
        raise HalluError("--coco-annotations DIR is required (COCO 2014 instances and captions files)")
    if not rescore and images is not None and Path(images).is_dir():
        chosen = [p.name for p in select_images(images, n_images, seed)]
    else:
        chosen = []
    options = ev.options(model, images, knobs, annotations=str(Path(annotation_dir or ".").resolve()),
                         n_images=n_images, seed=seed, prompt=prompt, image_files=chosen)
    mopts = G.ModelOptions.from_recorded(options, device)
    gt = CocoGroundTruth(options["annotations"])
    items = [EvalItem(id=name, images=[name], question=options["prompt"]) for name in options["image_files"]]
    ev.check_images(items, options, "chair")
    with ev.stage(options, inputs={}) as st:
        gens, info = G.generate(st, items, mopts, Path(options["images"]), label="chair")
        records = [{"image_id": image_id_for_file(it.id, gt.file_names), "caption": gens[G.prompt_key(it)]["text"],
                    "key": it.id, "where": f"{G.GENERATIONS}: image {it.id}"} for it in items]
        decoding = {"do_sample": False, "num_beams": mopts.num_beams, "max_new_tokens": mopts.max_new_tokens}
        settings = {"images": {"folder": options["images"], "n": options["n_images"], "seed": options["seed"],
                               "files": options["image_files"]},
                    "prompt": options["prompt"], "decoding": decoding,
                    "request": {"prompt": options["prompt"], "decoding": decoding,
                                "chat_template_sha256": info.get("chat_template_sha256")}, **info}
        result = evaluate(records, gt, unknown_images=unknown_images, settings=settings)
        results_path = G.write_results(st, result)  # evaluate() returned the finished shape
    return result, results_path
