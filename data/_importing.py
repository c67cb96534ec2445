"""What every `hallu prepare SOURCE` importer shares: reading, images, skips, format sniffing, writing.

An importer is a generator of records (:class:`~hallu.records.Prompt` or
:class:`~hallu.records.PreferencePair`) built from the files a user downloaded. It reads through an
:class:`ImportContext`, which

- streams large JSON arrays record by record (:func:`iter_records`), so a 665k-record file is never
  held as one Python list, and names ``file:line`` for every record;
- writes images that arrive inline (base64, parquet bytes) once into ``RUN/data/images/`` under their
  content digest (:class:`ImageStore`), and finds images given as paths under ``--images`` (:meth:`find_image`);
- counts records it skips for a missing image (or raises with ``--strict``) and records it filters by
  the source's own rules (:class:`Tally`);
- says which other importer's format a file looks like when it is not the expected one (:func:`looks_like`).

:func:`write_import` drains an importer into ``RUN/data/{prompts,pairs}.jsonl`` inside staged folders,
so bad input leaves nothing half-written.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.records import IMAGE_TAG, PreferencePair, Prompt

PROMPTS_FILE = "prompts.jsonl"
PAIRS_FILE = "pairs.jsonl"
DATA_DIR = "data"
# Records live in RUN/data/ and inline images in RUN/data/images/: records name them "images/<sha256>.<ext>",
# inside the data folder (stages refuse relative paths that climb out of it).
IMAGES_DIR = "images"

_CHUNK = 1 << 20
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


# --------------------------------------------------------------------------------------------------
# Reading JSON arrays and JSON Lines as a stream of (line, record)


def iter_records(path: str | os.PathLike, chunk: int = _CHUNK) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, record)`` from a JSON array or a JSON Lines file, reading ``chunk`` characters at a time.

    A JSON array is decoded one element at a time (``json.JSONDecoder.raw_decode`` on a sliding buffer),
    so memory stays near one record plus one chunk whatever the file's size. ``line`` is where the
    element starts. A file that is one JSON object is one record.
    """
    from hallu.fileio import iter_jsonl, open_text

    path = Path(path)
    with open_text(path, "JSON or JSONL") as f:
        try:
            head = f.read(4096)
        except UnicodeDecodeError:
            raise HalluError(f"{path}: not UTF-8 text") from None
        first = head.lstrip()[:1]
        if first != "[":
            f.close()
            if first == "{":
                yield from iter_jsonl(path)
                return
            raise HalluError(f"{path}: expected a JSON array or JSON Lines of objects"
                             + (", the file is empty" if not first else f", found {first!r} first"))
        yield from _iter_array(path, f, head, chunk)


def _iter_array(path: Path, f, buf: str, chunk: int) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    eof = False
    base_line = 1  # line number of buf[0]
    pos = buf.index("[") + 1

    def fill() -> None:
        nonlocal buf, eof
        try:
            more = f.read(max(chunk, len(buf)))  # grow with the buffer: a huge record costs O(n), not O(n^2)
        except UnicodeDecodeError:
            raise HalluError(f"{path}:{base_line + buf.count(chr(10))}: not UTF-8 text") from None
        if not more:
            eof = True
        buf += more

    def skip_ws() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or eof:
                return
            fill()

    counted = [0, base_line]  # (position in buf, its line): counting moves forward only, never from 0

    def line_at(p: int) -> int:
        at, line = counted
        if p < at:  # only after an error report that looked back
            return base_line + buf.count("\n", 0, p)
        line += buf.count("\n", at, p)
        counted[:] = [p, line]
        return line

    expect_value = True
    while True:
        skip_ws()
        if pos >= len(buf):
            raise HalluError(f"{path}:{line_at(pos)}: not valid JSON (the array is not closed)")
        if buf[pos] == "]":
            if not expect_value:
                raise HalluError(f"{path}:{line_at(pos)}: not valid JSON (a ',' before the closing ']')")
            pos += 1
            skip_ws()
            if pos < len(buf):
                raise HalluError(f"{path}:{line_at(pos)}: not valid JSON (extra data after the array)")
            return
        try:
            value, end = decoder.raw_decode(buf, pos)
            complete = end < len(buf) or eof  # a number at the buffer's edge may continue in the next chunk
        except json.JSONDecodeError as e:
            # A record cut by the buffer's end fails near the end (or as an unterminated string); retry
            # with more text. An error well inside the buffer is the file's own.
            truncated = e.pos >= len(buf) - 8 or e.msg.startswith("Unterminated string")
            if truncated and not eof:
                complete = False
            else:
                raise HalluError(f"{path}:{line_at(e.pos)}: not valid JSON ({e.msg})") from None
        if not complete:
            fill()
            continue
        yield line_at(pos), value
        pos = end
        skip_ws()
        if pos < len(buf) and buf[pos] == ",":
            pos += 1
            expect_value = False
        elif pos < len(buf) and buf[pos] == "]":
            expect_value = True
        else:
            raise HalluError(f"{path}:{line_at(pos)}: not valid JSON (expected ',' or ']' after an element)")
        if pos > chunk:  # drop what has been decoded, keeping line numbers right
            base_line = line_at(pos)
            buf = buf[pos:]
            pos = 0
            counted[:] = [0, base_line]


def first_record(path: str | os.PathLike) -> Any:
    """The first record of a JSON array / JSONL file (for sniffing), without reading the rest."""
    for _, rec in iter_records(path):
        return rec
    return None


# --------------------------------------------------------------------------------------------------
# Which format does a record look like?


def looks_like(obj: Any) -> str | None:
    """Name the importer whose format ``obj`` (a record, or a whole JSON document) has, or None."""
    if isinstance(obj, list):
        return looks_like(obj[0]) if obj else None
    if not isinstance(obj, dict):
        return None
    keys = set(obj)
    if {"images", "annotations"} <= keys:
        anns = obj.get("annotations") or [{}]
        if isinstance(anns, list) and anns and isinstance(anns[0], dict) and "caption" in anns[0]:
            return "coco (captions file)"
        return "coco (instances file)"
    if "regions" in keys:
        return "vg (region_descriptions.json)"
    if {"image_id", "url"} <= keys:
        return "vg (image_data.json)"
    objs = obj.get("objects")
    if "image_id" in keys and isinstance(objs, list) and objs and isinstance(objs[0], dict):
        return "vg (objects.json)"  # POPE's objects files list plain names instead
    if "AI_json_report" in keys or "AI_pseudo_response" in keys:
        return "opa-dpo"
    if "origin_dataset" in keys and {"question", "chosen", "rejected"} <= keys:
        return "rlaif-v"
    if "reject" in keys or ("correct" in keys and "question" in keys):
        return "ha-dpo (pope_data.json)"
    if isinstance(obj.get("chosen"), list) and isinstance(obj.get("rejected"), list):
        if all(isinstance(x, str) for x in obj["chosen"]):
            return "ha-dpo (desc_data.json)"
        return "pairs (TRL conversational)"
    if "conversations" in keys:
        return "pairs (LLaMA-Factory)" if "chosen" in keys else "llava-665k"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "mia-dpo" if "gt" in keys or isinstance(obj.get("image"), list) else "pairs"
    # desc_data.json of HA-DPO's LLaVA variant: a dict keyed by image id
    vals = list(obj.values())[:1]
    if vals and isinstance(vals[0], dict) and "chosen" in vals[0] and "rejected" in vals[0]:
        return "ha-dpo (desc_data.json)"
    return None


def require_keys(obj: Any, keys: tuple[str, ...], where: str, fmt: str) -> None:
    """A record of format ``fmt`` must be an object with ``keys``; the error says what it looks like instead."""
    if not isinstance(obj, dict):
        raise HalluError(f"{where}: expected a JSON object ({fmt} record), got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        other = looks_like(obj)
        hint = f"; it looks like {other} data (try `hallu prepare {other.split()[0]}`)" if other else ""
        raise HalluError(f"{where}: not a {fmt} record (missing {', '.join(repr(k) for k in missing)}){hint}")


def text_field(obj: dict, key: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise HalluError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    return v


_TAG_AND_SPACE = re.compile(re.escape(IMAGE_TAG) + r"\s*")


def strip_image_tags(text: str) -> str:
    """A single-image prompt needs no tag (images come first): drop ``<image>`` and the newline after it."""
    return _TAG_AND_SPACE.sub("", text).strip() if IMAGE_TAG in text else text.strip()


def source_bucket(image: str) -> str:
    """MIA-DPO's source bucket: the first path component (``coco/train2017/x.jpg`` -> ``coco``)."""
    parts = image.lstrip("./").split("/")
    return parts[0] if len(parts) > 1 else ""


# --------------------------------------------------------------------------------------------------
# Skips, images


@dataclass
class Tally:
    """Records skipped for missing images (an error with ``strict``) and filtered by a source's own rules."""

    strict: bool = False
    skipped: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def skip(self, where: str, reason: str, message: str) -> None:
        if self.strict:
            raise HalluError(f"{where}: {message} (--strict stops at the first such record)")
        self.skipped[reason] += 1
        self.examples.setdefault(reason, f"{where}: {message}")

    def filter(self, reason: str) -> None:
        self.filtered[reason] += 1

    def summary(self) -> dict:
        return {"skipped": dict(self.skipped), "filtered": dict(self.filtered), "examples": dict(self.examples)}


class ImageStore:
    """Images carried inline, written once to ``<data>/images/<sha256>.<ext>`` (``folder``: the staged one)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.written = 0
        self.reused = 0

    def put(self, data: bytes, where: str) -> str:
        """Store encoded image bytes; return the record path. Unreadable bytes raise naming ``where``."""
        import hashlib

        from PIL import Image, UnidentifiedImageError

        if not data:
            raise HalluError(f"{where}: the inline image is empty")
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise HalluError(f"{where}: the inline image cannot be decoded ({type(e).__name__})") from None
        name = f"{hashlib.sha256(data).hexdigest()}.{_PIL_EXT.get(fmt or '', 'img')}"
        if (self.folder / name).exists():
            self.reused += 1
        else:
            # A plain write: the folder is staged and moved in whole, so a per-file fsync (seconds per
            # thousand images, an 83k-image RLAIF-V import) buys nothing a crash could not redo.
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / name).write_bytes(data)
            self.written += 1
        return f"{IMAGES_DIR}/{name}"

    def put_base64(self, text: Any, where: str) -> str:
        if isinstance(text, (bytes, bytearray)):
            return self.put(bytes(text), where)
        if not isinstance(text, str):
            raise HalluError(f"{where}: the inline image must be a base64 string, got {type(text).__name__}")
        if text.startswith("data:") and "," in text:  # a data URL
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise HalluError(f"{where}: the inline image is not valid base64") from None
        return self.put(data, where)


@dataclass
class ImportContext:
    """What an importer reads with: its source files, options, the image folder, the store and the tally."""

    sources: list[Path]
    images_root: Path | None
    store: ImageStore
    tally: Tally
    seed: int = 0
    options: dict = field(default_factory=dict)
    progress: Callable[[int], None] = lambda n: None

    _roots: dict = field(default_factory=dict, repr=False)

    def find_image(self, image: str, where: str, base: Path | None = None) -> str | None:
        """The absolute path of an image named in a record, or None (counted) when it is not on disk.

        Called once per record of files with 665k of them: string paths and a resolved root, no pathlib.
        """
        if os.path.isabs(image):
            p = os.path.normpath(image)
        else:
            root = self.images_root if self.images_root is not None else base
            if root is None:
                raise HalluError(f"{where}: image {image!r} is a relative path; pass --images DIR")
            if root not in self._roots:
                self._roots[root] = str(Path(root).resolve())
            p = os.path.normpath(os.path.join(self._roots[root], image))
        if not os.path.isfile(p):
            self.tally.skip(where, "missing image", f"image {p} not found")
            return None
        return p


# --------------------------------------------------------------------------------------------------
# Writing


def prompt_of_pair(pair: PreferencePair) -> Prompt:
    """The prompt a pair answers, so `hallu rollout` can sample the policy on pair data too."""
    gt = pair.meta.get("gt")
    return Prompt(id=pair.id, images=list(pair.images), question=pair.prompt,
                  reference=gt if isinstance(gt, str) else pair.chosen,
                  meta={k: v for k, v in pair.meta.items() if k in ("source", "kind", "image_id", "bucket")})


@dataclass
class ImportSummary:
    prompts: int = 0
    pairs: int = 0
    renamed_ids: int = 0
    images_written: int = 0
    images_reused: int = 0
    tally: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "pairs": self.pairs, "renamed_duplicate_ids": self.renamed_ids,
                "images_written": self.images_written, "images_reused": self.images_reused, **self.tally}


class _Writer:
    """Streams records into a JSONL file, making ids unique (real data sets repeat ids, e.g. LLaVA-665k)."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "w", encoding="utf-8")
        self.count = 0
        self.renamed = 0
        self._seen: dict[str, int] = {}

    def write(self, rec: Prompt | PreferencePair) -> None:
        n = self._seen.get(rec.id, 0)
        self._seen[rec.id] = n + 1
        if n:
            rec.meta = {**rec.meta, "original_id": rec.id}
            rec.id = f"{rec.id}~{n + 1}"
            self.renamed += 1
        # Fields are JSON values already: a shallow dict, not dataclasses.asdict's deep copy (3x faster).
        row = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def write_import(records: Iterator[Prompt | PreferencePair], data_dir: Path, store: ImageStore,
                 tally: Tally, progress: Callable[[int], None] = lambda n: None) -> ImportSummary:
    """Drain an importer into ``data_dir/prompts.jsonl`` (and ``pairs.jsonl`` when it yields pairs).

    ``data_dir`` is a staging folder; the caller moves it in only when this returns.
    """
    prompts = _Writer(data_dir / PROMPTS_FILE)
    pairs: _Writer | None = None
    n = 0
    try:
        for rec in records:
            if isinstance(rec, PreferencePair):
                if pairs is None:
                    pairs = _Writer(data_dir / PAIRS_FILE)
                pairs.write(rec)
                prompt = prompt_of_pair(rec)
                prompt.id = rec.id  # the pair's (possibly de-duplicated) id
                prompts.write(prompt)
            else:
                prompts.write(rec)
            n += 1
            if n % 1000 == 0:
                progress(n)
    finally:
        prompts.close()
        if pairs is not None:
            pairs.close()
    progress(n)
    if prompts.count == 0:
        hint = ""
        if tally.skipped or tally.filtered:
            hint = f" (skipped {dict(tally.skipped)}, filtered {dict(tally.filtered)})"
        example = next(iter(tally.examples.values()), "")
        raise HalluError(f"no records imported{hint}" + (f"; first skip: {example}" if example else ""))
    return ImportSummary(prompts=prompts.count, pairs=pairs.count if pairs else 0,
                         renamed_ids=prompts.renamed, images_written=store.written, images_reused=store.reused,
                         tally=tally.summary())


# --------------------------------------------------------------------------------------------------
# One import as a `prepare` stage of a run


def run_import(source: str, importer: Callable[[ImportContext], Iterator[Prompt | PreferencePair]], out: Path,
               sources: list[Path], images: Path | None = None, strict: bool = False, seed: int = 0,
               options: dict | None = None, progress: Callable[[int], None] = lambda n: None) -> dict:
    """Run ``importer`` as the ``prepare`` stage of the run at ``out``; return the summary.

    Records go to ``RUN/data/`` and inline images to ``RUN/data/images/``, built in a staged folder
    and moved in only when the whole import succeeded. Data an earlier prepare made with other options
    or inputs is set aside as ``RUN/data.previous-N`` (``summary["kept"]``), never deleted. The manifest
    records the source files (with digests), the options, the outputs and what was skipped.
    """
    from hallu.fileio import StagedDir, set_aside
    from hallu.manifest import Run

    out = Path(out)
    if not sources:
        raise HalluError(f"prepare {source}: give the downloaded file(s) with --from PATH")
    for s in sources:
        if not s.exists():
            raise HalluError(f"--from {s}: not found")
    if images is not None and not images.is_dir():
        raise HalluError(f"--images {images}: not a folder")
    run = Run(out, flag="--out")
    opts = {"dataset": source, "from": [str(s.resolve()) for s in sources],
            "images": str(images.resolve()) if images else None, "strict": strict, "seed": seed, **(options or {})}
    inputs = {f"from{i}" if len(sources) > 1 else "from": s for i, s in enumerate(sources)}
    data = out / DATA_DIR
    kept = None
    with run.stage("prepare", options=opts, inputs=inputs) as st:
        tally = Tally(strict=strict)
        with StagedDir(data) as tmp:
            store = ImageStore(tmp / IMAGES_DIR)
            ctx = ImportContext(sources=list(sources), images_root=images, store=store, tally=tally, seed=seed,
                                options=options or {}, progress=progress)
            summary = write_import(importer(ctx), tmp, store, tally, progress)
            # Only once the new data is complete: what another prepare made is kept, never replaced.
            if st.fresh and data.is_dir() and any(data.iterdir()):
                kept = set_aside(data)
        st.output("prompts", data / PROMPTS_FILE, count=summary.prompts)
        if summary.pairs:
            st.output("pairs", data / PAIRS_FILE, count=summary.pairs)
        if store.written:
            st.output("images", data / IMAGES_DIR, count=store.written)
        result = summary.to_dict()
        st.extra["summary"] = result
    return {**result, "kept": str(kept) if kept else None}
