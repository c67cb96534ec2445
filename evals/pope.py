"""POPE: Polling-based Object Probing Evaluation (Li et al., EMNLP 2023) — building, parsing, scoring.

Sources, read and re-stated here in our own words (see ``specs/evals.md`` §1):

- official generator and scorer: AoiDragon/POPE @ 08d957b9 (``main.py``, ``utils.py``, ``evaluate.py``);
- LLaVA-1.5 ``llava/eval/eval_pope.py`` (HA-DPO's vendored copy): the official rule on the ``text`` field;
- OPERA: shikiw/OPERA @ 61426efe ``pope_eval.py`` (``recorder`` / ``print_acc``);
- VCD: DAMO-NLP-SG/VCD @ d6568ff8 ``experiments/eval/eval_pope.py``;
- lmms-eval @ 75571cfe ``lmms_eval/tasks/pope/utils.py``;
- VLMEvalKit @ e8e78f05 ``vlmeval/dataset/utils/yorn.py`` (``YOrN_Extraction``, ``POPE_rating``) and its
  ``process_punctuation``.

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

Parsers (answer text -> prediction) and their metrics
------------------------------------------------------
``pope-official`` (default; POPE ``evaluate.py`` == LLaVA ``eval_pope``): keep the text before the first
"." (this also cuts "2.5"), delete commas, split on the single space character; *no* if a token is
exactly ``No``, ``not`` or ``no``, else *yes* — so "NO", "No!", "no\\n", "Nope", "There isn't" and the
empty answer are all *yes*. Metrics: accuracy, precision, recall, F1 over TP/FP/TN/FN, and yes-ratio =
predicted yes / answers.

``opera``: delete every "." and ","; split on a single space; *no* if a token is one of ``No not no NO``
or ends with ``n't``. Same metrics as the official script.

``vcd``: lowercase + strip; a yes-question is TP iff the substring ``yes`` occurs ("eyes" counts), else
FN; a no-question is TN iff the substring ``no`` occurs ("not", "snow", "nothing" count), else FP. So the
per-item prediction depends on the label. Accuracy and yes-proportion ((TP+FP)/total) are divided by the
number of questions; ``unknown_ratio`` counts labels other than yes/no (always 0 here: we only accept
yes/no labels).

``lmms-eval``: prediction = lowercased, stripped answer; correct iff it equals the label exactly, so
"yes." is wrong. Precision counts only exact "yes" predictions, recall only exact "no" ones as misses.
Its ``yes_ratio`` is the share of *ground-truth* yes labels (their bug, kept under their name). Every
division is guarded (0 when the denominator is 0). ``other`` counts predictions that are neither
"yes" nor "no".

``vlmevalkit`` (exact-matching mode; no LLM judge, so Unknown stays Unknown): lowercase, then
``process_punctuation``, then split on whitespace; ``Yes`` iff the token yes is present and no is not,
``No`` the other way round, else ``Unknown``. ``process_punctuation``: for each of
``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``, delete it everywhere if it stands next to a space anywhere in
the *original* text or the text has a digit-comma-digit, else replace it with a space; then delete
periods not followed by a digit — at most 32, because ``re.UNICODE`` (=32) is passed as ``count``.
(Its period regex starts with ``(?!<=\\d)``, a lookahead typo that never fires.) Metrics: y_true = label
is yes, y_pred = extracted is Yes (Unknown counts as No); guarded P/R/F1; acc = share of extracted ==
answer (Unknown always wrong); VLMEvalKit reports percent, kept here as ``accuracy_pct``,
``precision_pct``, ``recall_pct``, ``f1_pct`` (its "Overall" = ``f1_pct``) next to our fractions.
``yes_ratio`` (share of Yes) and ``unknown`` are ours; VLMEvalKit does not report them.

``strict`` (ours, version 1): lowercase; strip whitespace, quotes and markdown marks from both ends; the
text must *start* with the word yes or no (whole word: "Nope", "Yesterday" do not count). It is unknown
instead when the text holds both the words yes and no ("Yes. No.", "yes and no"), or when the next word
is a hedge (but, however, although, though, maybe, perhaps, possibly, probably, unless): "yes, but…".
Everything else is unknown: "There is no dog", "I cannot tell", "2.5", "". Unknowns are counted apart
(``unknown``, ``unknown_ratio``) and can never help: accuracy = (TP+TN)/all, recall = TP/(yes labels)
so an unknown on a yes-question is a miss, precision = TP/(TP+FP), yes_ratio = predicted yes / all.

Undefined metrics: the official, OPERA and VCD scripts divide without a guard and crash when, e.g., a
model never says yes. We never crash: an undefined precision, recall or F1 is reported as ``None``
(JSON null) with a note saying why; the mean over splits of a metric that is null in any split is null.
lmms-eval and VLMEvalKit keep their own guards (0).

Alignment: answers are matched to questions by ``question_id`` within each split (POPE ids restart at 1
in every file), never by line position as the original scripts do.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.fileio import digest_json, read_json, read_json_or_jsonl, sha256_bytes

SPLITS = ("random", "popular", "adversarial")
DEFAULT_TEMPLATE = "Is there a {} in the image?"
DEFAULT_IMAGES_PER_SPLIT = 500
DEFAULT_SAMPLE_NUM = 3
DEFAULT_DATASET = "coco"

PARSERS = ("pope-official", "opera", "vcd", "lmms-eval", "vlmevalkit", "strict")
DEFAULT_PARSER = "pope-official"
# Bump when any parser or metric below changes; stored with every result.
PARSER_VERSION = 1

# Answer suffixes of the inference protocols (spec §1.3); the separator is part of the suffix.
ANSWER_SUFFIXES = {
    "none": "",  # official POPE and OPERA send the question as is
    "llava": "\nAnswer the question using a single word or phrase.",  # LLaVA-1.5 and lmms-eval
    "vcd": " Please answer this question with one word.",
}

# Rate metrics averaged over splits; counts are per split only.
_RATE_KEYS = (
    "accuracy", "precision", "recall", "f1", "yes_ratio", "unknown_ratio",
    "accuracy_pct", "precision_pct", "recall_pct", "f1_pct",
)
_VOWELS = ("a", "e", "i", "o", "u")  # lowercase only, as the official check ``Object[0] in [...]``
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ==================================================================================================
# Building question files


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


# ==================================================================================================
# Question and answer files


@dataclass(frozen=True)
class Question:
    """One POPE question; ``label`` is normalised to "yes" / "no"."""

    question_id: int | str
    image: str
    text: str
    label: str

    def to_dict(self) -> dict:
        return {"question_id": self.question_id, "image": self.image, "text": self.text, "label": self.label}


def _id_key(value: Any) -> str | None:
    """Ids match as strings, so 7 and "7" are the same question; other types are not ids."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def _records(path: Path, what: str) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs of a JSONL file or a JSON array (a lone object is one record)."""
    kind, value = read_json_or_jsonl(path)
    if kind == "jsonl":
        return [(f"{path}:{lineno}", rec) for lineno, rec in value]
    if isinstance(value, list):
        return [(f"{path}: record {i}", rec) for i, rec in enumerate(value, 1)]
    if isinstance(value, dict):
        return [(f"{path}:1", value)]
    raise HalluError(f"{path}: expected JSONL or a JSON array of {what}, got a JSON {type(value).__name__}")


def read_question_file(path: str | Path) -> list[Question]:
    """Read one POPE question file as shipped: JSONL (CRLF fine) or a JSON array of
    ``{"question_id", "image", "text", "label"}`` (extra keys ignored)."""
    path = Path(path)
    out: list[Question] = []
    seen: dict[str, str] = {}
    for where, rec in _records(path, "questions"):
        if not isinstance(rec, dict):
            raise HalluError(f"{where}: expected an object {{question_id, image, text, label}}, "
                             f"got a JSON {type(rec).__name__}")
        missing = [k for k in ("question_id", "image", "text", "label") if k not in rec]
        if missing:
            raise HalluError(f"{where}: not a POPE question (missing {', '.join(missing)})")
        key = _id_key(rec["question_id"])
        if key is None:
            raise HalluError(f"{where}: question_id must be an integer or a string, "
                             f"got {rec['question_id']!r}")
        if key in seen:
            raise HalluError(f"{where}: duplicate question_id {rec['question_id']!r} (first at {seen[key]})")
        seen[key] = where
        for k in ("image", "text", "label"):
            if not isinstance(rec[k], str):
                raise HalluError(f"{where}: '{k}' must be a string")
        # Shipped files use lowercase yes/no; we accept any case. (The official script would count a
        # capitalised "No" label as yes; no known file has one, so we do not reproduce that.)
        label = rec["label"].strip().lower()
        if label not in ("yes", "no"):
            raise HalluError(f"{where}: label must be 'yes' or 'no', got {rec['label']!r}")
        out.append(Question(rec["question_id"], rec["image"], rec["text"], label))
    if not out:
        raise HalluError(f"{path}: no questions in the file")
    return out


def split_name(path: str | Path) -> str:
    """Score-only splits are named after the question file's stem (``coco_pope_random``)."""
    return Path(path).stem


def load_questions(paths: Sequence[str | Path]) -> dict[str, list[Question]]:
    """Read question files, one split each, named after the file stem, in the order given."""
    out: dict[str, list[Question]] = {}
    where: dict[str, Path] = {}
    for p in paths:
        name = split_name(p)
        if name in out:
            raise HalluError(f"{p}: a second question file named {name!r} (first: {where[name]}); "
                             "splits are named after file stems, so rename one")
        out[name] = read_question_file(p)
        where[name] = Path(p)
    if not out:
        raise HalluError("no question files given")
    return out


@dataclass(frozen=True)
class Answer:
    question_id: int | str
    text: str
    split: str | None
    where: str


def read_answers(path: str | Path, answer_key: str | None = None) -> list[Answer]:
    """Read an answers file (JSONL or JSON array): ``question_id`` plus the answer in ``text`` or
    ``answer`` (or the field ``answer_key`` names); an optional ``split`` names the question file stem.

    When both ``text`` and ``answer`` are present they must agree, unless ``answer_key`` picks one:
    some logs keep the ground truth in ``answer``.
    """
    path = Path(path)
    out: list[Answer] = []
    seen: dict[tuple[str | None, str], str] = {}
    for where, rec in _records(path, "answers"):
        if not isinstance(rec, dict):
            raise HalluError(f"{where}: expected an object with question_id and text, got a JSON "
                             f"{type(rec).__name__}")
        if "question_id" not in rec:
            raise HalluError(f"{where}: no question_id (answers are matched to questions by id, "
                             "never by line order)")
        key = _id_key(rec["question_id"])
        if key is None:
            raise HalluError(f"{where}: question_id must be an integer or a string, "
                             f"got {rec['question_id']!r}")
        if answer_key is not None:
            if answer_key not in rec:
                raise HalluError(f"{where}: no field {answer_key!r} (--answer-key)")
            text = rec[answer_key]
        elif "text" in rec and "answer" in rec and rec["text"] != rec["answer"]:
            raise HalluError(f"{where}: 'text' and 'answer' differ; say which holds the model's answer "
                             "(--answer-key text or --answer-key answer)")
        elif "text" in rec or "answer" in rec:
            text = rec["text"] if "text" in rec else rec["answer"]
        else:
            raise HalluError(f"{where}: no answer (expected a 'text' or 'answer' field)")
        if not isinstance(text, str):
            raise HalluError(f"{where}: the answer must be a string, got {text!r}")
        split = rec.get("split")
        if split is not None and not isinstance(split, str):
            raise HalluError(f"{where}: 'split' must be a string")
        if (split, key) in seen:
            raise HalluError(f"{where}: duplicate answer for question_id {rec['question_id']!r} "
                             f"(first at {seen[(split, key)]})")
        seen[(split, key)] = where
        out.append(Answer(rec["question_id"], text, split, where))
    if not out:
        raise HalluError(f"{path}: no answers in the file")
    return out


def group_answers(files: Sequence[Sequence[Answer]], splits: Sequence[str],
                  names: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
    """Answers per split, keyed by question id.

    POPE ids restart at 1 in every split, so answers cannot be pooled by id alone. Either one answers
    file per question file, paired in order (any ``split`` field is then ignored), or a single file
    whose records all carry ``split`` = the question file's stem.
    """
    names = list(names) if names is not None else [f"answers file {i + 1}" for i in range(len(files))]
    out: dict[str, dict[str, str]] = {s: {} for s in splits}
    if len(files) == len(splits):
        for split, answers in zip(splits, files, strict=True):
            for a in answers:
                _put_answer(out[split], a)
        return out
    if len(files) != 1:
        raise HalluError(f"{len(files)} answers files for {len(splits)} question files: give one answers "
                         "file per question file (same order), or one file whose records carry 'split'")
    for a in files[0]:
        if a.split is None:
            raise HalluError(f"{a.where}: no 'split' field; with one answers file for {len(splits)} question "
                             "files every answer must name its question file's stem in 'split' "
                             "(or give one --answers per --questions, in the same order)")
        if a.split not in out:
            raise HalluError(f"{a.where}: split {a.split!r} is not one of the question files "
                             f"({', '.join(splits)})")
        _put_answer(out[a.split], a)
    return out


def _put_answer(into: dict[str, str], a: Answer) -> None:
    key = _id_key(a.question_id)
    if key in into:
        raise HalluError(f"{a.where}: a second answer for question_id {a.question_id!r} in the same split")
    into[key] = a.text


def question_settings(questions_by_split: Mapping[str, Sequence[Question]]) -> dict:
    """Content digest and count of each split's questions (independent of file formatting)."""
    return {
        split: {"count": len(qs), "digest": digest_json([q.to_dict() for q in qs])}
        for split, qs in questions_by_split.items()
    }


# ==================================================================================================
# The request sent to a model


def request_text(question: Question | str, suffix: str | None = None) -> str:
    """The user text of a POPE request: the question as is (official POPE, OPERA), plus an optional
    answer suffix such as ``ANSWER_SUFFIXES["llava"]``. The suffix carries its own separator. Store
    this exact string with the generation; the model's chat template wraps it."""
    text = question.text if isinstance(question, Question) else question
    return text + (suffix or "")


def request_messages(question: Question | str, suffix: str | None = None) -> list[dict]:
    """One user turn with the image first, then the text, as typed content parts for a chat template."""
    from hallu.records import user_messages

    return user_messages(request_text(question, suffix), 1)


# ==================================================================================================
# Parsers


def _parse_official(text: str) -> str:
    if "." in text:  # "first sentence" — also cuts "2.5" to "2"
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")  # the space character only: "no\n" stays one token
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


_OPERA_NEG = ("No", "not", "no", "NO")


def _parse_opera(text: str) -> str:
    words = text.replace(".", "").replace(",", "").split(" ")
    return "no" if any(w in _OPERA_NEG or w.endswith("n't") for w in words) else "yes"


def _parse_vcd(text: str, label: str) -> str:
    # VCD only asks whether the answer "contains" the label word, so its verdict depends on the label.
    a = text.lower().strip()
    if label == "yes":
        return "yes" if "yes" in a else "no"
    return "no" if "no" in a else "yes"


def _parse_lmms(text: str) -> str:
    return text.lower().strip()


_VLM_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
              ",", "?", "!")
_VLM_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_VLM_PERIOD = re.compile(r"\.(?!\d)")  # the original's leading "(?!<=\d)" is a lookahead that never fires
_VLM_PERIOD_LIMIT = 32  # re.UNICODE passed positionally as re.sub's count


def vlmevalkit_process_punctuation(text: str) -> str:
    """VLMEvalKit's ``process_punctuation``, quirks included (see the module docstring)."""
    out = text
    digit_comma = _VLM_DIGIT_COMMA.search(text) is not None
    for p in _VLM_PUNCT:
        # The test looks at the original text, the replacement works on the running result.
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VLM_PERIOD.sub("", out, count=_VLM_PERIOD_LIMIT)


def _parse_vlmevalkit(text: str) -> str:
    words = vlmevalkit_process_punctuation(text.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


_STRICT_EDGES = " \t\r\n\f\v\"'`*_“”‘’«»"
_STRICT_START = re.compile(r"(yes|no)(?![a-z0-9])")
_STRICT_HEDGES = frozenset({"but", "however", "although", "though", "maybe", "perhaps", "possibly",
                            "probably", "unless"})


def _parse_strict(text: str) -> str:
    t = text.lower().strip(_STRICT_EDGES)
    m = _STRICT_START.match(t)
    if m is None:
        return "unknown"
    words = re.findall(r"[a-z]+", t)
    if "yes" in words and "no" in words:
        return "unknown"  # contradictory: "Yes. No.", "yes and no"
    if len(words) > 1 and words[1] in _STRICT_HEDGES:
        return "unknown"  # hedged: "yes, but..."
    return m.group(1)


def parse_answer(text: str, parser: str = DEFAULT_PARSER, label: str | None = None) -> str:
    """One answer's prediction under a named parser.

    Returns "yes"/"no" (pope-official, opera, vcd), "yes"/"no"/"unknown" (strict), "Yes"/"No"/"Unknown"
    (vlmevalkit), or the normalised answer string (lmms-eval). ``vcd`` needs the question's label.
    """
    if parser == "pope-official":
        return _parse_official(text)
    if parser == "opera":
        return _parse_opera(text)
    if parser == "vcd":
        if label not in ("yes", "no"):
            raise HalluError("the vcd parser needs the question's label (yes or no)")
        return _parse_vcd(text, label)
    if parser == "lmms-eval":
        return _parse_lmms(text)
    if parser == "vlmevalkit":
        return _parse_vlmevalkit(text)
    if parser == "strict":
        return _parse_strict(text)
    raise HalluError(f"unknown POPE parser {parser!r}; choose one of {', '.join(PARSERS)}")


# ==================================================================================================
# Metrics, one function per codebase


def _confusion(labels: Sequence[str], preds: Sequence[str], yes: str = "yes", no: str = "no") -> dict:
    c = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for label, pred in zip(labels, preds, strict=True):
        if pred == yes:
            c["tp" if label == "yes" else "fp"] += 1
        elif pred == no:
            c["tn" if label == "no" else "fn"] += 1
    return c


def _undefined(num: int | float, den: int | float, name: str, why: str, notes: list[str]) -> float | None:
    """An unguarded original division: None plus a note instead of a ZeroDivisionError."""
    if den == 0:
        notes.append(f"{name} undefined ({why} = 0); the original script divides by zero here, "
                     "reported as null")
        return None
    return num / den


def _f1_unguarded(p: float | None, r: float | None, notes: list[str]) -> float | None:
    if p is None or r is None:
        notes.append("f1 undefined (precision or recall undefined), reported as null")
        return None
    if p + r == 0:
        notes.append("f1 undefined (precision + recall = 0); the original script divides by zero here, "
                     "reported as null")
        return None
    return 2 * p * r / (p + r)


def _metrics_official(labels: Sequence[str], preds: Sequence[str], notes: list[str]) -> dict:
    # POPE evaluate.py, LLaVA eval_pope and OPERA print_acc compute the same numbers.
    c = _confusion(labels, preds)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    precision = _undefined(tp, tp + fp, "precision", "TP+FP", notes)
    recall = _undefined(tp, tp + fn, "recall", "TP+FN", notes)
    return {
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": _f1_unguarded(precision, recall, notes),
        "yes_ratio": preds.count("yes") / len(preds),
        **c,
    }


def _metrics_vcd(labels: Sequence[str], preds: Sequence[str], notes: list[str]) -> dict:
    c = _confusion(labels, preds)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    total = len(labels)  # VCD divides accuracy and yes-proportion by the number of questions
    precision = _undefined(tp, tp + fp, "precision", "TP+FP", notes)
    recall = _undefined(tp, tp + fn, "recall", "TP+FN", notes)
    return {
        "accuracy": (tp + tn) / total,
        "precision": precision,
        "recall": recall,
        "f1": _f1_unguarded(precision, recall, notes),
        "yes_ratio": (tp + fp) / total,
        **c,
        "unknown_ratio": 0 / total,  # labels other than yes/no; ours are always yes/no
    }


def _metrics_lmms(labels: Sequence[str], preds: Sequence[str], notes: list[str]) -> dict:
    c = _confusion(labels, preds)  # exact "yes" / "no" only
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    total = 0.0
    for label, pred in zip(labels, preds, strict=True):
        total += 1.0 if pred == label else 0.0
    precision = tp / (tp + fp) if (tp + fp) > 0 else 0.0
    recall = tp / (tp + fn) if (tp + fn) > 0 else 0.0
    yes, no = labels.count("yes"), labels.count("no")
    return {
        "accuracy": total / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": 2 * (precision * recall) / (precision + recall) if (precision + recall) > 0 else 0.0,
        # lmms-eval's "yes_ratio" is the share of ground-truth yes labels, not of predictions.
        "yes_ratio": yes / (yes + no) if (yes + no) > 0 else 0.0,
        **c,
        "other": len(preds) - sum(c.values()),
    }


def _metrics_vlmevalkit(labels: Sequence[str], preds: Sequence[str], notes: list[str]) -> dict:
    y_true = [label == "yes" for label in labels]
    y_pred = [p == "Yes" for p in preds]  # Unknown counts as No
    tp = sum(t and p for t, p in zip(y_true, y_pred, strict=True))
    fp = sum((not t) and p for t, p in zip(y_true, y_pred, strict=True))
    fn = sum(t and (not p) for t, p in zip(y_true, y_pred, strict=True))
    tn = len(labels) - tp - fp - fn
    precision = tp / (tp + fp) if (tp + fp) != 0 else 0.0
    recall = tp / (tp + fn) if (tp + fn) != 0 else 0.0
    f1 = 2 * (precision * recall) / (precision + recall) if (precision + recall) != 0 else 0.0
    correct = sum(p == ("Yes" if label == "yes" else "No") for label, p in zip(labels, preds, strict=True))
    accuracy = correct / len(labels)
    unknown = preds.count("Unknown")
    return {
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": preds.count("Yes") / len(preds),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "unknown": unknown,
        "unknown_ratio": unknown / len(preds),
        # VLMEvalKit's own numbers: percent, "Overall" being f1_pct.
        "accuracy_pct": accuracy * 100,
        "precision_pct": precision * 100,
        "recall_pct": recall * 100,
        "f1_pct": f1 * 100,
    }


def _metrics_strict(labels: Sequence[str], preds: Sequence[str], notes: list[str]) -> dict:
    c = _confusion(labels, preds)
    tp, fp, tn = c["tp"], c["fp"], c["tn"]
    n = len(labels)
    unknown = preds.count("unknown")
    precision = tp / (tp + fp) if tp + fp else None
    if precision is None:
        notes.append("precision undefined (no yes predictions), reported as null")
    positives = labels.count("yes")  # an unknown on a yes-question is a miss
    recall = tp / positives if positives else None
    if recall is None:
        notes.append("recall undefined (no yes labels), reported as null")
    if precision is None or recall is None or precision + recall == 0:
        f1 = None
        notes.append("f1 undefined, reported as null")
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
        **c,
        "unknown": unknown,
        "unknown_ratio": unknown / n,
    }


_METRICS = {
    "pope-official": _metrics_official,
    "opera": _metrics_official,
    "vcd": _metrics_vcd,
    "lmms-eval": _metrics_lmms,
    "vlmevalkit": _metrics_vlmevalkit,
    "strict": _metrics_strict,
}


def metrics(labels: Sequence[str], preds: Sequence[str],
            parser: str = DEFAULT_PARSER) -> tuple[dict, list[str]]:
    """Metrics of one split from labels and parsed predictions; returns ``(metrics, notes)``."""
    if parser not in _METRICS:
        raise HalluError(f"unknown POPE parser {parser!r}; choose one of {', '.join(PARSERS)}")
    if not labels:
        raise HalluError("no questions to score")
    notes: list[str] = []
    return _METRICS[parser](list(labels), list(preds), notes), notes


# ==================================================================================================
# Scoring


def _examples(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def check_alignment(questions: Sequence[Question], answers: Mapping[str, str], split: str,
                    source: str | None = None) -> None:
    """Every question has exactly one answer and every answer a question; else say which ids differ."""
    qkeys = [_id_key(q.question_id) for q in questions]
    qset = set(qkeys)
    missing = [k for k in qkeys if k not in answers]
    extra = [k for k in answers if k not in qset]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(qkeys)} questions have no answer "
                         f"(ids {_examples(missing)})")
        if extra:
            parts.append(f"{len(extra)} answers match no question (ids {_examples(extra)})")
        src = f" ({source})" if source else ""
        raise HalluError(f"split {split}{src}: answers do not match the questions: {'; '.join(parts)}")


def _mean(per_split: Sequence[dict], notes: list[str]) -> dict:
    out: dict[str, float | None] = {}
    for key in _RATE_KEYS:
        values = [m[key] for m in per_split if key in m]
        if len(values) != len(per_split) or not values:
            continue
        if any(v is None for v in values):
            out[key] = None
            notes.append(f"mean {key} undefined: null in at least one split")
        else:
            out[key] = sum(values) / len(values)
    return out


def score(
    questions_by_split: Mapping[str, Sequence[Question]],
    answers_by_split: Mapping[str, Mapping[Any, str]],
    parser: str = DEFAULT_PARSER,
    answer_sources: Mapping[str, str] | None = None,
) -> dict:
    """Score answers against questions, split by split, with one named parser.

    Args:
        questions_by_split: split name -> questions (``load_questions``).
        answers_by_split: split name -> {question_id: answer text}; ids match as strings.
        parser: one of ``PARSERS``.
        answer_sources: split -> where its answers came from, for error messages.

    Returns:
        ``{"benchmark", "parser", "splits": {split: {"metrics", "count", "yes", "no", "notes"?}},
        "mean", "pooled"? (all items together, as VLMEvalKit's "Overall"), "items", "settings",
        "notes"?}``.

    Raises:
        HalluError: unknown parser, a split without answers, or ids that do not match.
    """
    if parser not in _METRICS:
        raise HalluError(f"unknown POPE parser {parser!r}; choose one of {', '.join(PARSERS)}")
    if not questions_by_split:
        raise HalluError("no questions to score")
    extra_splits = [s for s in answers_by_split if s not in questions_by_split]
    if extra_splits:
        raise HalluError(f"answers for unknown splits: {', '.join(extra_splits)}")
    sources = answer_sources or {}
    splits: dict[str, dict] = {}
    items: list[dict] = []
    all_labels: list[str] = []
    all_preds: list[str] = []
    for split, questions in questions_by_split.items():
        if not questions:
            raise HalluError(f"split {split}: no questions")
        raw = answers_by_split.get(split)
        if not raw:
            raise HalluError(f"split {split}: no answers")
        answers = {}
        for k, v in raw.items():
            key = _id_key(k)
            if key is None:
                raise HalluError(f"split {split}: answer id {k!r} is not an integer or a string")
            if not isinstance(v, str):
                raise HalluError(f"split {split}: the answer to question {k!r} is not a string ({v!r})")
            answers[key] = v
        check_alignment(questions, answers, split, sources.get(split))
        labels, preds = [], []
        for q in questions:
            text = answers[_id_key(q.question_id)]
            pred = parse_answer(text, parser, q.label)
            labels.append(q.label)
            preds.append(pred)
            items.append({"split": split, "question_id": q.question_id, "label": q.label,
                          "answer": text, "pred": pred})
        m, notes = metrics(labels, preds, parser)
        entry = {"metrics": m, "count": len(questions), "yes": labels.count("yes"), "no": labels.count("no")}
        if notes:
            entry["notes"] = notes
        splits[split] = entry
        all_labels += labels
        all_preds += preds
    result: dict[str, Any] = {"benchmark": "pope", "parser": parser, "splits": splits}
    top_notes: list[str] = []
    result["mean"] = _mean([s["metrics"] for s in splits.values()], top_notes)
    if len(splits) > 1:
        pooled, pooled_notes = metrics(all_labels, all_preds, parser)
        result["pooled"] = pooled
        top_notes += [f"pooled: {n}" for n in pooled_notes]
    result["items"] = items
    result["settings"] = {
        "parser": parser,
        "parser_version": PARSER_VERSION,
        "questions": question_settings(questions_by_split),
    }
    if top_notes:
        result["notes"] = top_notes
    return result


# ==================================================================================================
# Running a model on the questions

EVAL_STAGE = "eval-pope"


def evaluate_model(questions: list[Path] | None, model: Path | None, images: Path | None, out: Path | None,
                   parser: str, rescore: bool, knobs: dict) -> tuple[dict, Path]:
    """Generate (or reuse) a model's answers in the run folder ``out`` and score them with ``parser``.

    ``knobs``: answer_suffix plus :class:`~hallu.evals.generation.ModelOptions` fields (mode,
    max_new_tokens, batch_size, device, dtype, attn, trust_remote_code). With ``rescore`` everything but
    the parser comes from the earlier run recorded in ``out``. Returns the result and its path.
    """
    from hallu.evals import generation as G
    from hallu.fileio import sha256_file
    from hallu.records import EvalItem

    knobs = dict(knobs)
    suffix_name = knobs.pop("answer_suffix", "none")
    device = knobs.pop("device", "auto")
    ev = G.ModelEval(out, EVAL_STAGE, rescore)
    if not rescore:
        if not questions:
            raise HalluError("--questions is required: the POPE question file(s) to ask")
        if suffix_name not in ANSWER_SUFFIXES:
            raise HalluError(f"--answer-suffix {suffix_name}: choose one of {', '.join(ANSWER_SUFFIXES)}")
    options = ev.options(model, images, knobs, questions=[str(Path(q).resolve()) for q in questions or []],
                         answer_suffix=suffix_name)
    questions = [Path(q) for q in options["questions"]]
    mopts = G.ModelOptions.from_recorded(options, device)
    by_split = load_questions(questions)
    suffix = ANSWER_SUFFIXES[options["answer_suffix"]]
    items_by_split = {split: [EvalItem(id=f"{split}/{q.question_id}", images=[q.image],
                                       question=request_text(q, suffix), label=q.label) for q in qs]
                      for split, qs in by_split.items()}
    items = [it for its in items_by_split.values() for it in its]
    with ev.stage(options, inputs={f"questions_{i}": q for i, q in enumerate(questions)}) as st:
        gens, info = G.generate(st, items, mopts, Path(options["images"]), label="pope")
        answers = {split: {str(q.question_id): gens[G.prompt_key(it)]["text"]
                           for q, it in zip(qs, items_by_split[split], strict=True)}
                   for split, qs in by_split.items()}
        result = score(by_split, answers, parser)
        for split, path in zip(by_split, questions, strict=True):
            result["settings"]["questions"][split].update({"file": str(path), "sha256": sha256_file(path)})
        result["settings"].update(
            mode=mopts.mode, answer_suffix=options["answer_suffix"], request_suffix=suffix,
            decoding={"do_sample": False, "num_beams": 1, "max_new_tokens": mopts.max_new_tokens}, **info,
        )
        if mopts.mode == "choice":
            result["settings"]["choices"] = list(mopts.choices)
            result.setdefault("notes", []).append(
                "mode=choice: each answer is the higher-logit of 'Yes'/'No' at the first answer token "
                "(one forward pass), not generated text")
        results_path = G.write_results(st, result)
    return result, results_path
