"""COCO annotations (instances and/or captions, read with pycocotools) as prompt records.

One prompt per image: the description instruction as the question, the first caption as the
reference (all captions in ``meta["captions"]``), the distinct category names in annotation order as
``objects`` (what CHAIR and the annotations judge compare against), and every instance box as a
region ``{x, y, width, height, phrase: category}``. Which ``--from`` file is which is read from its
content; images are ``--images DIR/<file_name>``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

from hallu.data._importing import ImportContext, looks_like
from hallu.errors import HalluError
from hallu.fileio import read_json
from hallu.records import Prompt

SOURCE = "coco"
QUESTION = "Describe this image in detail."


def _coco(doc: dict, path: Path):
    """A pycocotools COCO index over an already-read document (its loader prints to stdout; we keep stdout clean)."""
    from pycocotools.coco import COCO

    c = COCO()
    c.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            c.createIndex()
        except (KeyError, TypeError) as e:
            raise HalluError(f"{path}: malformed COCO annotations ({type(e).__name__}: {e})") from None
    return c


def _load(sources: list[Path]):
    instances = captions = None
    for path in sources:
        doc = read_json(path)
        if not (isinstance(doc, dict) and isinstance(doc.get("images"), list)
                and isinstance(doc.get("annotations"), list)):
            other = looks_like(doc)
            hint = f"; it looks like {other} data" if other else ""
            raise HalluError(f"{path}: not a COCO annotations file (no 'images' and 'annotations' lists){hint}")
        anns = doc["annotations"]
        is_captions = bool(anns) and isinstance(anns[0], dict) and "caption" in anns[0]
        if is_captions or (not anns and "categories" not in doc):
            if captions is not None:
                raise HalluError(f"{path}: a second COCO captions file; give one instances and one captions file")
            captions = (path, _coco(doc, path))
        else:
            if "categories" not in doc:
                raise HalluError(f"{path}: COCO instances file without 'categories'")
            if instances is not None:
                raise HalluError(f"{path}: a second COCO instances file; give one instances and one captions file")
            instances = (path, _coco(doc, path))
    return instances, captions


def read(ctx: ImportContext) -> Iterator[Prompt]:
    instances, captions = _load(ctx.sources)
    images: dict[int, dict] = {}
    for part in (instances, captions):
        if part is not None:
            for iid, img in part[1].imgs.items():
                images.setdefault(iid, img)
    for iid in sorted(images):
        img = images[iid]
        src = (instances or captions)[0]
        where = f"{src}: image {iid}"
        name = img.get("file_name")
        if not isinstance(name, str):
            raise HalluError(f"{where}: the image has no 'file_name'")
        path = ctx.find_image(name, where, base=src.parent)
        if path is None:
            continue
        objects, regions = [], []
        if instances is not None:
            c = instances[1]
            for ann in c.imgToAnns.get(iid, []):
                cat = c.cats.get(ann.get("category_id"))
                if cat is None:
                    raise HalluError(f"{instances[0]}: annotation {ann.get('id')}: unknown category_id "
                                     f"{ann.get('category_id')!r}")
                if cat["name"] not in objects:
                    objects.append(cat["name"])
                bbox = ann.get("bbox")
                if isinstance(bbox, list) and len(bbox) == 4:
                    x, y, w, h = bbox
                    regions.append({"x": x, "y": y, "width": w, "height": h, "phrase": cat["name"]})
        caps = [a["caption"].strip() for a in captions[1].imgToAnns.get(iid, [])] if captions else []
        yield Prompt(id=f"coco-{iid}", images=[path], question=QUESTION, reference=caps[0] if caps else None,
                     objects=objects, regions=regions,
                     meta={"source": SOURCE, "image_id": iid, "file_name": name, "captions": caps})
