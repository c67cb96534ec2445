"""Every persisted record shape, validated on read (file and line in every error), JSONL io.

Records are plain dataclasses. Images are paths (relative paths resolve against the folder of the
file that holds the record), never inline bytes. A prompt's text may place its images with explicit
``<image>`` tags (one per image, for interleaved multi-image prompts); without tags the images come
first. Messages for a model are always built here as typed content parts and rendered by the
processor's chat template, never by hand-written ``USER: <image>`` strings.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from hallu.errors import HalluError
from hallu.fileio import atomic_write_jsonl, iter_jsonl

IMAGE_TAG = "<image>"

# Field kinds the validator knows. "?" suffix: may be null.
_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[dict]": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    "list[float]": lambda v: isinstance(v, list)
    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
}
_KIND_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "dict": "an object", "list": "a list", "list[str]": "a list of strings",
               "list[dict]": "a list of objects", "list[float]": "a list of numbers"}


def _field(kind: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    meta = {"kind": kind}
    if default is dataclasses.MISSING:
        return field(metadata=meta, **kw)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


R = TypeVar("R", bound="Record")


class Record:
    """Base of all records: validation from a dict, and back to a JSON-able dict."""

    kind: ClassVar[str] = "record"

    @classmethod
    def from_dict(cls: type[R], d: Any, where: str) -> R:
        if not isinstance(d, dict):
            raise HalluError(f"{where}: expected a JSON object for a {cls.kind} record, got {type(d).__name__}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            kind = f.metadata["kind"]
            optional = kind.endswith("?")
            kind = kind.rstrip("?")
            if f.name not in d:
                required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                if required:
                    raise HalluError(f"{where}: {cls.kind} record is missing the field '{f.name}'")
                continue
            v = d[f.name]
            if v is None and optional:
                kwargs[f.name] = None
                continue
            if not _CHECKS[kind](v):
                raise HalluError(
                    f"{where}: field '{f.name}' must be {_KIND_WORDS[kind]}, got {type(v).__name__}"
                )
            kwargs[f.name] = v
        rec = cls(**kwargs)
        rec.validate(where)
        return rec

    def validate(self, where: str) -> None:
        """Cross-field checks; subclasses add theirs."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_image_tags(text: str, images: list[str], where: str, what: str) -> None:
    tags = text.count(IMAGE_TAG)
    if tags and tags != len(images):
        raise HalluError(f"{where}: {what} has {tags} {IMAGE_TAG} tags but {len(images)} images")


@dataclass
class Prompt(Record):
    """A question about one or more images, with whatever ground truth the data set has."""

    kind: ClassVar[str] = "prompt"
    id: str = _field("str")
    images: list[str] = _field("list[str]")
    question: str = _field("str")
    reference: str | None = _field("str?", None)  # a reference answer (e.g. a ground-truth caption)
    objects: list[str] = _field("list[str]", [])  # annotated objects (COCO category names)
    regions: list[dict] = _field("list[dict]", [])  # VG-style {x, y, width, height, phrase}
    meta: dict = _field("dict", {})

    def validate(self, where: str) -> None:
        if not self.id:
            raise HalluError(f"{where}: prompt 'id' is empty")
        _check_image_tags(self.question, self.images, where, "question")


@dataclass
class Response(Record):
    """One sampled answer of a model to a prompt."""

    kind: ClassVar[str] = "response"
    id: str = _field("str")  # "<prompt_id>#<sample>"
    prompt_id: str = _field("str")
    sample: int = _field("int")
    text: str = _field("str")
    model: str = _field("str")  # the model's fingerprint
    logprobs: list[float] | None = _field("list[float]?", None)
    meta: dict = _field("dict", {})

    @staticmethod
    def make_id(prompt_id: str, sample: int) -> str:
        return f"{prompt_id}#{sample}"


@dataclass
class Revision(Record):
    """A judge's verdict on a response: per-sentence labels and a corrected text."""

    kind: ClassVar[str] = "revision"
    id: str = _field("str")
    response_id: str = _field("str")
    text: str = _field("str")  # the revised (hallucination-free) answer
    sentences: list[dict] = _field("list[dict]", [])  # {"text", "label", "score"?}
    judge: str = _field("str", "")
    prompt_version: str | None = _field("str?", None)
    meta: dict = _field("dict", {})


@dataclass
class PreferencePair(Record):
    """A chosen and a rejected answer to one prompt."""

    kind: ClassVar[str] = "preference pair"
    id: str = _field("str")
    images: list[str] = _field("list[str]")
    prompt: str = _field("str")
    chosen: str = _field("str")
    rejected: str = _field("str")
    meta: dict = _field("dict", {})

    def validate(self, where: str) -> None:
        # A later turn's pair: the images may be tagged in the earlier turns (meta.history) instead.
        _check_image_tags(" ".join([*history_user_texts(self.meta), self.prompt]), self.images, where, "prompt")


@dataclass
class EvalItem(Record):
    """One benchmark question: what to ask, and the label to score against."""

    kind: ClassVar[str] = "eval item"
    id: str = _field("str")
    images: list[str] = _field("list[str]")
    question: str = _field("str")
    label: str | None = _field("str?", None)
    meta: dict = _field("dict", {})


@dataclass
class EvalResult(Record):
    """A benchmark's results file (``results.json``, ``--json``): the one shape every benchmark writes,
    in answer-file and in model mode, and the only one ``hallu eval compare`` reads.

    - ``metrics``: the headline numbers (POPE: the mean over splits; CHAIR, SHR: their only split);
    - ``splits``: split name -> ``{"metrics", "count", ...}`` (CHAIR and SHR have one split, ``all``);
    - ``items``: one record per question / caption / image, with the answer and its score;
    - ``settings``: always ``parser`` (the scoring rule), ``request`` (what the model was asked:
      ``{"prompt", "decoding", ...}``, null when the answers came from a file), ``model_fingerprint``
      (null likewise) and ``inputs`` (name -> ``{"path", "sha256"}``, or a list of those); plus each
      benchmark's own keys;
    - ``counts``, ``usage`` (judge tokens and cost), ``notes`` (why a metric is null, ...);
    - POPE keeps ``parser``, ``mean`` (= ``metrics``) and ``pooled`` at the top, where users read them.
    """

    kind: ClassVar[str] = "eval result"
    SCHEMA: ClassVar[int] = 1
    REQUIRED_SETTINGS: ClassVar[tuple[str, ...]] = ("parser", "request", "model_fingerprint", "inputs")
    benchmark: str = _field("str")
    metrics: dict = _field("dict", {})
    splits: dict = _field("dict", {})
    items: list[dict] = _field("list[dict]", [])
    settings: dict = _field("dict", {})  # parser, request (prompt, decoding), model fingerprint, input digests
    schema: int = _field("int", 1)
    counts: dict = _field("dict", {})
    usage: dict = _field("dict", {})
    notes: list[str] = _field("list[str]", [])
    parser: str | None = _field("str?", None)
    mean: dict | None = _field("dict?", None)
    pooled: dict | None = _field("dict?", None)

    def validate(self, where: str) -> None:
        if not self.benchmark:
            raise HalluError(f"{where}: 'benchmark' is empty")
        if self.schema > self.SCHEMA:
            raise HalluError(f"{where}: results schema {self.schema} is newer than this hallu reads "
                             f"({self.SCHEMA}); upgrade hallu")
        _check_metrics(self.metrics, f"{where}: metrics")
        for name, split in self.splits.items():
            if not isinstance(split, dict) or not isinstance(split.get("metrics"), dict):
                raise HalluError(f"{where}: splits[{name!r}] must be an object with 'metrics'")
            count = split.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise HalluError(f"{where}: splits[{name!r}].count must be a non-negative integer")
            _check_metrics(split["metrics"], f"{where}: splits[{name!r}].metrics")
        for key in ("mean", "pooled"):
            if getattr(self, key) is not None:
                _check_metrics(getattr(self, key), f"{where}: {key}")

    def missing_settings(self) -> list[str]:
        return [k for k in self.REQUIRED_SETTINGS if k not in self.settings]

    def to_dict(self) -> dict:
        # Small things first and the (long) items last, so the file reads from the top.
        d = dataclasses.asdict(self)
        order = ("schema", "benchmark", "parser", "metrics", "splits", "mean", "pooled", "counts", "usage",
                 "notes", "settings", "items")
        return {k: d[k] for k in order if d[k] is not None}


def _check_metrics(metrics: dict, where: str) -> None:
    for key, value in metrics.items():
        if value is not None and not _CHECKS["float"](value):
            raise HalluError(f"{where}.{key} must be a number or null, got {type(value).__name__}")


def read_eval_result(path: str | os.PathLike) -> EvalResult:
    """Load a results file (or a run folder's ``results.json``) as an EvalResult, with one clear line
    for anything else."""
    from hallu.fileio import read_json

    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
        if not p.exists():
            raise HalluError(f"{path}: a folder without results.json (not an eval run)")
    d = read_json(p)
    if not isinstance(d, dict) or not isinstance(d.get("benchmark"), str):
        raise HalluError(f"{p}: not a hallu results file (an eval result has 'benchmark', 'metrics', "
                         "'splits', 'items' and 'settings')")
    return EvalResult.from_dict(d, str(p))


# --------------------------------------------------------------------------------------------------
# JSONL io


def read_records(path: str | os.PathLike, cls: type[R], unique_ids: bool = True) -> list[R]:
    """Read and validate a JSONL file of records; duplicate ids are an error (items align by id)."""
    path = Path(path)
    out: list[R] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        rec = cls.from_dict(obj, f"{path}:{lineno}")
        rid = getattr(rec, "id", None)
        if unique_ids and rid is not None:
            if rid in seen:
                raise HalluError(f"{path}:{lineno}: duplicate id {rid!r} (first on line {seen[rid]})")
            seen[rid] = lineno
        out.append(rec)
    return out


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> int:
    rows = [r.to_dict() for r in records]
    atomic_write_jsonl(path, rows)
    return len(rows)


OUTSIDE_FLAG = "--allow-outside-images"


def resolve_image(image: str, base: str | os.PathLike, *, allow_outside: bool = False, where: str = "") -> Path:
    """The file an image path from a record names: the one definition every stage uses.

    Relative paths resolve against ``base``, the data root (the folder of the file that lists them, or
    ``--images DIR``), and must stay inside it: a downloaded data file must not make hallu open
    ``../../etc/passwd``; such ``..`` escapes are refused unless ``allow_outside``
    (``--allow-outside-images``). Absolute paths are taken as written: they are an explicit choice,
    and hallu's own importers write them for the image folder the user named with ``--images``. The
    check is on the path as written, so symlinks inside the data root (``images -> /datasets/coco``)
    are followed.
    """
    prefix = f"{where}: " if where else ""
    p = Path(image)
    if not allow_outside and not p.is_absolute():
        norm = os.path.normpath(image)
        if norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise HalluError(f"{prefix}image {image!r} points outside the data folder {base} "
                             f"(pass {OUTSIDE_FLAG} to allow it)")
    return p if p.is_absolute() else Path(base) / p


def check_images(records: Iterable[Any], base: str | os.PathLike, where: str, *, allow_outside: bool = False,
                 what: str = "prompt") -> None:
    """Before any model loads, fail in a second, not after an hour: every image path of ``records``
    (anything with ``id`` and ``images``) is allowed and names a file, and the first one is an image."""
    first = None
    for rec in records:
        for img in rec.images:
            here = f"{where}: {what} {rec.id!r}"
            path = resolve_image(img, base, allow_outside=allow_outside, where=here)
            if not path.is_file():
                raise HalluError(f"{here}: image {path} not found")
            if first is None:
                first = (here, path)
    if first is not None:
        verify_image(first[1], where=first[0])


def verify_image(path: str | os.PathLike, where: str = "") -> None:
    """Check that a file is a readable image (PIL's verify: headers and structure, no full decode)."""
    from PIL import Image, UnidentifiedImageError

    prefix = f"{where}: " if where else ""
    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        raise HalluError(f"{prefix}image {path} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise HalluError(f"{prefix}image {path} cannot be read ({type(e).__name__}: not an image file "
                         "or a damaged one)") from None


def load_image(path: str | os.PathLike, where: str = ""):
    """Open an image as RGB, with one clear error for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    prefix = f"{where}: " if where else ""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise HalluError(f"{prefix}image {path} not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise HalluError(f"{prefix}image {path} cannot be read ({type(e).__name__})") from None


# --------------------------------------------------------------------------------------------------
# Conversational messages and the TRL preference format


def user_content(text: str, n_images: int) -> list[dict]:
    """Typed content parts for a user turn: images where ``<image>`` tags stand, else first."""
    if IMAGE_TAG not in text:
        return [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    parts: list[dict] = []
    pieces = text.split(IMAGE_TAG)
    for i, piece in enumerate(pieces):
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
        if i < len(pieces) - 1:
            parts.append({"type": "image"})
    return parts


def is_held_out(meta: dict) -> bool:
    """Whether a record belongs to an evaluation split (``meta.split`` other than ``train``).

    The one rule for every training stage: prompts, pairs and SFT records of a held-out split are never
    trained on, because POPE and CHAIR score those images. Records without a split (imported data) train.
    """
    return meta.get("split") not in (None, "train")


def user_messages(text: str, n_images: int) -> list[dict]:
    return [{"role": "user", "content": user_content(text, n_images)}]


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def history_user_texts(meta: dict) -> list[str]:
    """The user turns' texts of a pair's ``meta.history`` (the turns before the one answered)."""
    history = meta.get("history") if isinstance(meta, dict) else None
    return [str(t.get("text", "")) for t in history or [] if isinstance(t, dict) and t.get("role") == "user"]


def conversation_messages(history: Iterable[dict], text: str, n_images: int, where: str = "") -> list[dict]:
    """Earlier turns ({role, text}) then the user turn ``text``, as typed messages. Images sit at the
    ``<image>`` tags of the user turns, else all in the first user turn (as rollout asked them)."""
    turns = [*history, {"role": "user", "text": text}]
    tagged = sum(t["text"].count(IMAGE_TAG) for t in turns if t["role"] == "user")
    if tagged and tagged != n_images:
        raise HalluError(f"{where}: {tagged} {IMAGE_TAG} tags over the user turns but {n_images} images")
    out, first_user = [], True
    for t in turns:
        if t["role"] == "user":
            out.append({"role": "user", "content": user_content(t["text"], n_images if first_user and not tagged
                                                                 else 0)})
            first_user = False
        else:
            out.append(assistant_message(t["text"]))
    return out


def pair_to_trl(pair: PreferencePair, base: str | os.PathLike = ".") -> dict:
    """A pair in TRL's conversational vision-preference format (images as resolved paths); a later
    turn's pair (``meta.history``) has the earlier turns in its prompt messages."""
    return {
        "id": pair.id,
        "images": [str(resolve_image(i, base)) for i in pair.images],
        "prompt": conversation_messages(pair.meta.get("history") or [], pair.prompt, len(pair.images),
                                        f"pair {pair.id!r}"),
        "chosen": [assistant_message(pair.chosen)],
        "rejected": [assistant_message(pair.rejected)],
    }


def export_pairs_trl(pairs_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    pairs_path = Path(pairs_path)
    pairs = read_records(pairs_path, PreferencePair)
    atomic_write_jsonl(out_path, [pair_to_trl(p, pairs_path.parent) for p in pairs])
    return len(pairs)


def _turn_text(turn: Any, where: str, what: str) -> str:
    """Text of a ShareGPT turn ({"from", "value"}), an OpenAI-style message, or a bare string."""
    if isinstance(turn, str):
        return turn
    if isinstance(turn, dict):
        if isinstance(turn.get("value"), str):
            return turn["value"]
        content = turn.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise HalluError(f"{where}: cannot read the {what} turn (expected a string or a {{'from','value'}} object)")


def pair_from_external(d: Any, where: str, index: int) -> PreferencePair:
    """Import one pair written in the LLaVA/ShareGPT or LLaMA-Factory style.

    Accepted shapes: ``{"image"|"images", "conversations": [human turn, ...], "chosen", "rejected"}``
    (LLaMA-Factory: chosen/rejected are ``{"from": "gpt", "value"}`` turns; LLaVA-style DPO files:
    strings) and ``{"image"|"images", "prompt", "chosen", "rejected"}``. ``<image>`` tags in the
    prompt are kept and must match the number of images.
    """
    if not isinstance(d, dict):
        raise HalluError(f"{where}: expected a JSON object, got {type(d).__name__}")
    images = d.get("images", d.get("image", []))
    if isinstance(images, str):
        images = [images]
    if not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
        raise HalluError(f"{where}: 'image'/'images' must be a path or a list of paths")
    if "conversations" in d:
        conv = d["conversations"]
        if not isinstance(conv, list) or not conv:
            raise HalluError(f"{where}: 'conversations' must be a non-empty list of turns")
        human = [t for t in conv if not (isinstance(t, dict) and t.get("from") in ("gpt", "assistant"))]
        if len(human) != 1:
            raise HalluError(f"{where}: expected exactly one human turn in 'conversations', got {len(human)}")
        prompt = _turn_text(human[0], where, "human")
    elif "prompt" in d:
        prompt = _turn_text(d["prompt"], where, "prompt")
    else:
        raise HalluError(f"{where}: missing the prompt ('conversations' or 'prompt')")
    for key in ("chosen", "rejected"):
        if key not in d:
            raise HalluError(f"{where}: missing the field '{key}'")
    chosen = _turn_text(d["chosen"], where, "chosen")
    rejected = _turn_text(d["rejected"], where, "rejected")
    # LLaVA-style single-image prompts carry "<image>\n" up front: one tag for one image is just "images first".
    if len(images) == 1 and prompt.count(IMAGE_TAG) == 1 and prompt.strip().startswith(IMAGE_TAG):
        prompt = prompt.replace(IMAGE_TAG, "", 1).strip()
    pid = str(d.get("id", index))
    return PreferencePair.from_dict(
        {"id": pid, "images": images, "prompt": prompt, "chosen": chosen, "rejected": rejected,
         "meta": {"imported_from": where}},
        where,
    )
