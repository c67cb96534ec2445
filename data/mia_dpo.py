"""MIA-DPO's released pairs (``laolao77/MIA-DPO``): a JSON list of ``{"id", "image", "prompt", "chosen",
"rejected", "gt"}``, read as its trainer reads them.

- ``image`` a string (one image): the prompt's ``<image>`` tags are dropped and the image leads, as
  the trainer strips and prepends one placeholder;
- ``image`` a list (sequence data): the prompt keeps its own placeholders, one per image, in place;
  a count that differs from the number of images is an error naming the record.

The generator's ``<image-placeholder>`` spelling is converted to ``<image>``. Image paths are
relative to ``--images`` (the trainer's ``--image_folder``).
"""

from __future__ import annotations

from collections.abc import Iterator

from hallu.data._importing import (
    ImportContext,
    iter_records,
    require_keys,
    source_bucket,
    strip_image_tags,
    text_field,
)
from hallu.errors import HalluError
from hallu.records import IMAGE_TAG, PreferencePair

SOURCE = "mia-dpo"
GENERATOR_TAG = "<image-placeholder>"


def read(ctx: ImportContext) -> Iterator[PreferencePair]:
    for path in ctx.sources:
        for line, rec in iter_records(path):
            where = f"{path}:{line}"
            require_keys(rec, ("image", "prompt", "chosen", "rejected"), where, "MIA-DPO")
            prompt = text_field(rec, "prompt", where).replace(GENERATOR_TAG, IMAGE_TAG)
            chosen, rejected = text_field(rec, "chosen", where), text_field(rec, "rejected", where)
            raw = rec["image"]
            if isinstance(raw, str):
                names, prompt = [raw], strip_image_tags(prompt)
            elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
                names = raw
                tags = prompt.count(IMAGE_TAG)
                if tags != len(names):
                    rid = rec.get("id", "?")
                    raise HalluError(f"{where}: record {rid}: the prompt has {tags} {IMAGE_TAG} placeholders "
                                     f"but {len(names)} images")
                if len(names) == 1:
                    prompt = strip_image_tags(prompt)
            else:
                raise HalluError(f"{where}: 'image' must be a path or a non-empty list of paths")
            images = [ctx.find_image(n, where, base=path.parent) for n in names]
            if any(i is None for i in images):
                continue
            gt = rec.get("gt")
            yield PreferencePair(id=f"mia-{rec.get('id', line)}", images=images, prompt=prompt, chosen=chosen,
                                 rejected=rejected,
                                 meta={"source": SOURCE, "gt": gt if isinstance(gt, str) else None,
                                       "bucket": source_bucket(names[0])})

