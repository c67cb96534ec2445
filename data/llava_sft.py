"""LLaVA-v1.5-mix665k (and any LLaVA/ShareGPT ``conversations`` file) as prompt records.

Each record ``{"id", "image", "conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}, ...]}``
becomes one prompt, in one of two shapes (``--turns``):

- ``first`` (default; what MIA-DPO and the description loop use): the first human turn is the
  question, the first answer the reference; the whole conversation is kept in
  ``meta["conversation"]`` (roles user/assistant);
- ``all``: the prompt asks the last human turn after the conversation so far: ``meta["turns"]`` holds
  every turn up to it (`hallu rollout` answers a prompt with turns at its last user turn), the
  question is that turn and the reference its answer.

The ``<image>`` tag must
appear once per image over the human turns. Text-only records (ShareGPT) are filtered and counted;
the file is streamed, so the 1 GB release needs memory for one record at a time.
``meta["bucket"]`` is the image's first path component (coco, gqa, ocr_vqa, textvqa, vg): MIA-DPO draws
companion images from the same bucket.
"""

from __future__ import annotations

from collections.abc import Iterator

from hallu.data._importing import ImportContext, iter_records, require_keys, source_bucket, strip_image_tags
from hallu.errors import HalluError
from hallu.records import IMAGE_TAG, Prompt

SOURCE = "llava-665k"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def turns_of(conv, where: str) -> list[dict]:
    if not isinstance(conv, list) or not conv:
        raise HalluError(f"{where}: 'conversations' must be a non-empty list of turns")
    turns = []
    for i, t in enumerate(conv):
        if not (isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") in _ROLES):
            raise HalluError(f"{where}: turn {i} must be {{'from': 'human'|'gpt', 'value': text}}")
        turns.append({"role": _ROLES[t["from"]], "text": t["value"]})
    if turns[0]["role"] != "user":
        raise HalluError(f"{where}: the first turn must be from 'human', got {conv[0]['from']!r}")
    return turns


TURNS = ("first", "all")


def read(ctx: ImportContext) -> Iterator[Prompt]:
    mode = ctx.options.get("turns", "first")
    if mode not in TURNS:
        raise HalluError(f"--turns {mode}: unknown; choose one of {', '.join(TURNS)}")
    for path in ctx.sources:
        for line, rec in iter_records(path):
            where = f"{path}:{line}"
            require_keys(rec, ("conversations",), where, "LLaVA conversations")
            rid = str(rec.get("id", line))
            turns = turns_of(rec["conversations"], f"{where}: record {rid}")
            raw = rec.get("image")
            if raw is None:
                ctx.tally.filter("text-only")
                continue
            names = [raw] if isinstance(raw, str) else raw
            if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
                raise HalluError(f"{where}: record {rid}: 'image' must be a path or a list of paths")
            tags = sum(t["text"].count(IMAGE_TAG) for t in turns if t["role"] == "user")
            if tags != len(names):
                raise HalluError(f"{where}: record {rid}: {tags} {IMAGE_TAG} tags in the human turns but "
                                 f"{len(names)} image(s)")
            images = [ctx.find_image(n, where) for n in names]
            if any(i is None for i in images):
                continue
            if len(names) == 1:  # one image: it leads, no tag needed
                turns = [{**t, "text": strip_image_tags(t["text"])} for t in turns]
            meta = {"source": SOURCE, "bucket": source_bucket(names[0]), "image_name": names[0]}
            if mode == "all":
                last = max(i for i, t in enumerate(turns) if t["role"] == "user")
                answer = next((t["text"] for t in turns[last:] if t["role"] == "assistant"), None)
                question, meta["turns"] = turns[last]["text"], turns[:last + 1]
            else:
                answer = next((t["text"] for t in turns if t["role"] == "assistant"), None)
                question, meta["conversation"] = turns[0]["text"], turns
            yield Prompt(id=rid, images=images, question=question, reference=answer, meta=meta)
