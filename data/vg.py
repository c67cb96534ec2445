"""Visual Genome (``image_data.json`` + ``region_descriptions.json`` [+ ``objects.json``]) as prompts.

One prompt per image that has region descriptions: the description instruction as the question and
the regions ``{x, y, width, height, phrase}`` as annotations (what the annotations judge and SHR's
judge read). With ``objects.json`` too, ``objects`` holds the image's distinct object names in file
order (``names`` in v1.4, ``name`` in older releases). An image's file is the last two components
of its ``url`` (``VG_100K_2/1.jpg``) under ``--images`` (default: the folder of ``image_data.json``).
``region_descriptions.json`` (about 700 MB) and ``objects.json`` are streamed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from hallu.data._importing import ImportContext, first_record, iter_records, looks_like, require_keys
from hallu.errors import HalluError
from hallu.fileio import read_json
from hallu.records import Prompt

SOURCE = "vg"
QUESTION = "Describe this image in detail."
_REGION_KEYS = ("x", "y", "width", "height", "phrase")


def _split(sources: list[Path]) -> tuple[Path, Path, Path | None]:
    image_data = regions = objects = None
    for path in sources:
        first = first_record(path)
        kind = looks_like(first)
        if kind == "vg (image_data.json)":
            image_data = path
        elif kind == "vg (region_descriptions.json)":
            regions = path
        elif kind == "vg (objects.json)":
            objects = path
        else:
            hint = f"; it looks like {kind} data" if kind else ""
            raise HalluError(f"{path}: not a VG image_data.json or region_descriptions.json{hint}")
    if image_data is None or regions is None:
        raise HalluError("prepare vg: give both image_data.json and region_descriptions.json with --from")
    return image_data, regions, objects


def object_names(path: Path) -> dict[int, list[str]]:
    """Image id -> distinct object names, in file order, streamed from ``objects.json``."""
    out: dict[int, list[str]] = {}
    for line, rec in iter_records(path):
        where = f"{path}:{line}"
        require_keys(rec, ("image_id", "objects"), where, "VG objects.json")
        names: dict[str, None] = {}
        for j, obj in enumerate(rec["objects"] if isinstance(rec["objects"], list) else []):
            got = obj.get("names", obj.get("name")) if isinstance(obj, dict) else None
            got = [got] if isinstance(got, str) else got
            if not (isinstance(got, list) and all(isinstance(n, str) for n in got)):
                raise HalluError(f"{where}: image {rec['image_id']}: object {j} has no 'names' list")
            names.update((n.strip(), None) for n in got if n.strip())
        out[int(rec["image_id"])] = list(names)
    return out


def read(ctx: ImportContext) -> Iterator[Prompt]:
    image_data, regions_path, objects_path = _split(ctx.sources)
    objects = object_names(objects_path) if objects_path else {}
    entries = read_json(image_data)
    by_id: dict[int, dict] = {}
    for i, e in enumerate(entries):
        require_keys(e, ("image_id", "url"), f"{image_data}: image #{i}", "VG image_data.json")
        by_id[int(e["image_id"])] = e
    root = (ctx.images_root or image_data.parent).resolve()
    for line, rec in iter_records(regions_path):
        where = f"{regions_path}:{line}"
        require_keys(rec, ("regions",), where, "VG region_descriptions.json")
        regs = rec["regions"]
        if not isinstance(regs, list):
            raise HalluError(f"{where}: 'regions' must be a list")
        iid = rec.get("id", regs[0].get("image_id") if regs and isinstance(regs[0], dict) else None)
        if not regs:
            ctx.tally.filter("no regions")
            continue
        if iid not in by_id:
            ctx.tally.skip(where, "missing image", f"VG image {iid} is not in {image_data.name}")
            continue
        entry = by_id[iid]
        rel = Path(*entry["url"].rstrip("/").split("/")[-2:])
        path = ctx.find_image(str(root / rel), where)
        if path is None:
            continue
        out = []
        for j, r in enumerate(regs):
            if not (isinstance(r, dict) and all(k in r for k in _REGION_KEYS)):
                raise HalluError(f"{where}: image {iid}: region {j} needs {', '.join(_REGION_KEYS)}")
            out.append({k: r[k] for k in _REGION_KEYS})
        yield Prompt(id=f"vg-{iid}", images=[path], question=QUESTION, regions=out, objects=objects.get(iid, []),
                     meta={"source": SOURCE, "image_id": iid, "coco_id": entry.get("coco_id"),
                           "width": entry.get("width"), "height": entry.get("height")})
