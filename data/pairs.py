"""Preference data someone already made, in TRL's or LLaMA-Factory's style, as preference pairs.

- TRL conversational vision preference: ``{"images", "prompt": [messages], "chosen": [messages],
  "rejected": [messages]}`` with content parts ``{"type": "image"}`` / ``{"type": "text", "text"}``
  (what ``hallu`` itself exports); image parts become ``<image>`` tags where they stand, dropped when
  they all lead the text. A system message is kept in ``meta["system"]``.
- LLaMA-Factory / LLaVA DPO style: ``{"images"|"image", "conversations": [human turn], "chosen",
  "rejected"}`` or ``{"image", "prompt", "chosen", "rejected"}``, read by
  :func:`hallu.records.pair_from_external`.

Relative image paths resolve against ``--images`` (default: the file's folder).
"""

from __future__ import annotations

from collections.abc import Iterator

from hallu.data._importing import ImportContext, iter_records, looks_like
from hallu.errors import HalluError
from hallu.records import IMAGE_TAG, PreferencePair, pair_from_external

SOURCE = "pairs"


def _content_text(content, where: str, what: str) -> tuple[str, int]:
    """(text with <image> tags where image parts stand, number of image parts) of a message's content."""
    if isinstance(content, str):
        return content, content.count(IMAGE_TAG)
    if not isinstance(content, list):
        raise HalluError(f"{where}: the {what} message's content must be text or a list of parts")
    pieces, n_images = [], 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_TAG)
            n_images += 1
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise HalluError(f"{where}: the {what} message has a part that is neither image nor text: {part!r}")
    # Typed parts lose the spaces around images: put one back, except before punctuation.
    text = ""
    for piece in pieces:
        piece = piece if piece == IMAGE_TAG else piece.strip()
        if text and piece and not text[-1].isspace() and piece[0] not in ".,;:!?)":
            text += " "
        text += piece
    rest, leading = text, 0
    while rest.startswith(IMAGE_TAG):
        rest, leading = rest[len(IMAGE_TAG):].lstrip(), leading + 1
    if n_images and leading == n_images:  # images first: our records say that by having no tags
        text = rest
    return text.strip(), n_images


def _answer(messages, where: str, key: str) -> str:
    if isinstance(messages, str):
        return messages
    if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)):
        raise HalluError(f"{where}: '{key}' must be a list of messages ending with the assistant's")
    if messages[-1].get("role") != "assistant":
        raise HalluError(f"{where}: the last '{key}' message must be the assistant's, got {messages[-1].get('role')!r}")
    return _content_text(messages[-1].get("content"), where, key)[0]


def _trl_pair(rec: dict, where: str, index: int) -> PreferencePair:
    msgs = rec.get("prompt")
    if msgs is None:
        raise HalluError(f"{where}: a TRL-style pair needs 'prompt' (a list of messages)")
    if isinstance(msgs, str):
        msgs = [{"role": "user", "content": msgs}]
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise HalluError(f"{where}: 'prompt' must be a list of messages")
    system = [m for m in msgs if m.get("role") == "system"]
    users = [m for m in msgs if m.get("role") == "user"]
    if len(users) != 1 or len(users) + len(system) != len(msgs):
        raise HalluError(f"{where}: expected one user message in 'prompt' (and at most a system one), "
                         f"got roles {[m.get('role') for m in msgs]}")
    images = rec.get("images") or []
    if not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
        raise HalluError(f"{where}: 'images' must be a list of paths")
    text, n_parts = _content_text(users[0].get("content"), where, "user")
    if n_parts != len(images):
        raise HalluError(f"{where}: the prompt has {n_parts} image parts but {len(images)} images")
    meta = {"source": SOURCE, "style": "trl"}
    if system:
        meta["system"] = _content_text(system[0].get("content"), where, "system")[0]
    return PreferencePair.from_dict(
        {"id": str(rec.get("id", index)), "images": images, "prompt": text,
         "chosen": _answer(rec["chosen"], where, "chosen"), "rejected": _answer(rec["rejected"], where, "rejected"),
         "meta": meta}, where)


def read(ctx: ImportContext) -> Iterator[PreferencePair]:
    for path in ctx.sources:
        for n, (line, rec) in enumerate(iter_records(path)):
            where = f"{path}:{line}"
            other = looks_like(rec)
            foreign = other is not None and not other.startswith(("pairs", "mia-dpo"))
            if foreign or not (isinstance(rec, dict) and "chosen" in rec and "rejected" in rec):
                hint = f"; it looks like {other} data (try `hallu prepare {other.split()[0]}`)" if other else ""
                raise HalluError(f"{where}: not a TRL or LLaMA-Factory preference pair{hint}")
            if isinstance(rec.get("prompt"), list) or isinstance(rec.get("chosen"), list):
                pair = _trl_pair(rec, where, n)
            else:
                pair = pair_from_external(rec, where, n)
                pair.meta = {"source": SOURCE, "style": "llama-factory"}
            images = [ctx.find_image(i, where, base=path.parent) for i in pair.images]
            if any(i is None for i in images):
                continue
            pair.images = images
            yield pair
