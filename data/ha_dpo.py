"""HA-DPO's released preference data (``juliozhao/hadpo-data``) as preference pairs.

Two files per target model, read as HA-DPO's own training code reads them:

- ``desc_data.json``: description pairs. LLaVA variant: a dict keyed by Visual Genome image id,
  ``{"2345": {"chosen": [3 style variants], "rejected": [3 style variants]}}``; MiniGPT-4 /
  InstructBLIP variant: a list of ``{"image_id", "chosen": [...], "rejected": [...]}``. The prompt
  is one of the four "Describe ..." instructions, drawn per pair from ``seed``.
- ``pope_data.json``: existence QA pairs, a list of ``{"image_id", "question", "chosen", "reject",
  "answer", "correct"}`` (``rejected`` in the InstructBLIP copy). Records with ``correct: true`` are
  skipped, as the LLaVA and InstructBLIP readers do.

Images come from Visual Genome: ``--vg DIR`` holds ``image_data.json`` and the ``VG_100K*/`` folders;
an image's path is the last two components of its ``url``.

Sampling of the three style variants per side (``--sampling``):

- ``offline`` (HA-DPO's default): one chosen and one rejected variant drawn per image -> one pair;
- ``all``: every chosen variant with every rejected one -> up to 9 pairs per image;
- ``online``: one pair per image carrying all variants in ``meta`` (``chosen_variants``,
  ``rejected_variants``) for a trainer that draws per epoch; ``chosen``/``rejected`` hold the first.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from hallu.data._importing import ImportContext, looks_like, require_keys, strip_image_tags, text_field
from hallu.errors import HalluError
from hallu.fileio import read_json
from hallu.records import PreferencePair

SOURCE = "ha-dpo"
SAMPLING = ("offline", "all", "online")
# The four description instructions HA-DPO's LLaVA training draws from.
DESCRIBE_PROMPTS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)


def vg_image_paths(vg_dir: Path) -> dict[int, Path]:
    """VG image id -> file, from ``image_data.json``'s urls (``.../VG_100K_2/1.jpg`` -> ``VG_100K_2/1.jpg``)."""
    path = Path(vg_dir) / "image_data.json"
    data = read_json(path)
    if not isinstance(data, list):
        raise HalluError(f"{path}: expected a list of VG images, got {type(data).__name__}")
    out: dict[int, Path] = {}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not isinstance(rec.get("url"), str) or "image_id" not in rec:
            raise HalluError(f"{path}: image #{i} is not a VG image record ({{'image_id', 'url'}})")
        parts = rec["url"].rstrip("/").split("/")
        out[int(rec["image_id"])] = Path(vg_dir).joinpath(*parts[-2:])
    return out


def _kind_of(doc, path: Path) -> str:
    """'desc' or 'pope' from the content of a HA-DPO file."""
    if isinstance(doc, dict):
        first = next(iter(doc.values()), None)
        if isinstance(first, dict) and "chosen" in first and "rejected" in first:
            return "desc"
    elif isinstance(doc, list) and doc and isinstance(doc[0], dict):
        if "question" in doc[0]:
            return "pope"
        if isinstance(doc[0].get("chosen"), list):
            return "desc"
    other = looks_like(doc)
    hint = f"; it looks like {other} data" if other else ""
    raise HalluError(f"{path}: not a HA-DPO desc_data.json or pope_data.json{hint}")


def _image(ctx: ImportContext, paths: dict[int, Path], image_id, where: str) -> str | None:
    try:
        key = int(image_id)
    except (TypeError, ValueError):
        raise HalluError(f"{where}: 'image_id' must be a VG image id, got {image_id!r}") from None
    if key not in paths:
        ctx.tally.skip(where, "missing image", f"VG image {key} is not in image_data.json")
        return None
    return ctx.find_image(str(paths[key]), where)


def _variants(rec: dict, key: str, where: str) -> list[str]:
    v = rec.get(key)
    if isinstance(v, str):
        v = [v]
    if not (isinstance(v, list) and v and all(isinstance(x, str) for x in v)):
        raise HalluError(f"{where}: '{key}' must be a non-empty list of strings")
    return v


def _desc_pairs(ctx: ImportContext, doc, path: Path, paths: dict[int, Path], sampling: str) -> Iterator:
    items = doc.items() if isinstance(doc, dict) else (
        (rec.get("image_id") if isinstance(rec, dict) else None, rec) for rec in doc)
    for n, (image_id, rec) in enumerate(items):
        where = f"{path}: image {image_id}" if isinstance(doc, dict) else f"{path}: record #{n}"
        require_keys(rec, ("chosen", "rejected"), where, "HA-DPO desc_data.json")
        chosen, rejected = _variants(rec, "chosen", where), _variants(rec, "rejected", where)
        image = _image(ctx, paths, image_id, where)
        if image is None:
            continue
        # One generator per image: the draw for an image does not depend on which others were skipped.
        rng = random.Random(f"{ctx.seed}:ha-dpo:{image_id}")
        if sampling == "offline":
            combos = [(rng.randrange(len(chosen)), rng.randrange(len(rejected)))]
        elif sampling == "all":
            combos = [(i, j) for i in range(len(chosen)) for j in range(len(rejected))]
        else:
            combos = [(0, 0)]
        for i, j in combos:
            meta = {"source": SOURCE, "kind": "desc", "image_id": int(image_id), "sampling": sampling,
                    "chosen_variant": i, "rejected_variant": j}
            if sampling == "online":
                meta.update(chosen_variants=chosen, rejected_variants=rejected)
            pid = f"hadpo-desc-{image_id}" + (f"-c{i}r{j}" if sampling == "all" else "")
            yield PreferencePair(id=pid, images=[image], prompt=rng.choice(DESCRIBE_PROMPTS), chosen=chosen[i],
                                 rejected=rejected[j], meta=meta)


def _pope_pairs(ctx: ImportContext, doc: list, path: Path, paths: dict[int, Path]) -> Iterator:
    for n, rec in enumerate(doc):
        where = f"{path}: record #{n}"
        require_keys(rec, ("image_id", "question", "chosen"), where, "HA-DPO pope_data.json")
        rej_key = "reject" if "reject" in rec else "rejected"
        if rej_key not in rec:
            raise HalluError(f"{where}: HA-DPO pope record has neither 'reject' nor 'rejected'")
        if rec.get("correct") is True:  # the model already answered right: no preference to learn
            ctx.tally.filter("pope correct")
            continue
        question, chosen, rejected = (text_field(rec, k, where) for k in ("question", "chosen", rej_key))
        image = _image(ctx, paths, rec["image_id"], where)
        if image is None:
            continue
        yield PreferencePair(id=f"hadpo-pope-{n}", images=[image], prompt=strip_image_tags(question),
                             chosen=chosen, rejected=rejected,
                             meta={"source": SOURCE, "kind": "pope", "image_id": int(rec["image_id"]),
                                   "answer": rec.get("answer")})


def read(ctx: ImportContext) -> Iterator[PreferencePair]:
    sampling = ctx.options.get("sampling", "offline")
    if sampling not in SAMPLING:
        raise HalluError(f"--sampling {sampling}: unknown; choose one of {', '.join(SAMPLING)}")
    vg = ctx.options.get("vg") or ctx.images_root
    if vg is None:
        raise HalluError("prepare ha-dpo: pass --vg DIR (the Visual Genome folder with image_data.json)")
    paths = vg_image_paths(Path(vg).resolve())
    for path in ctx.sources:
        doc = read_json(path)
        if _kind_of(doc, path) == "desc":
            yield from _desc_pairs(ctx, doc, path, paths, sampling)
        else:
            yield from _pope_pairs(ctx, doc, path, paths)
