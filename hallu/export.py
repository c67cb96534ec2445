"""Preference pairs out to other trainers' formats (``hallu prepare export``).

- ``trl``: a ``datasets`` folder (``Dataset.save_to_disk``) in TRL's conversational vision-preference
  format: ``images`` (a list of ``Image`` features, the pixels inside the dataset), ``prompt``,
  ``chosen`` and ``rejected`` as message lists with typed content parts, plus ``id``. Stock
  ``trl.DPOTrainer`` trains on ``datasets.load_from_disk(DIR)`` unchanged.
- ``llama-factory``: ``DIR/pairs.json`` in LLaMA-Factory's sharegpt ranking style
  (``conversations`` with one human turn holding ``<image>`` tags, ``chosen`` / ``rejected`` gpt
  turns, ``images``), the images copied into ``DIR/images/`` (named by content digest, so repeated
  images are stored once) and a ``DIR/dataset_info.json`` entry named ``hallu_pairs``.

Both are written into a staging folder and moved in whole: a bad pair leaves no half-written output.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hallu.errors import HalluError
from hallu.records import IMAGE_TAG, PreferencePair, load_image, pair_to_trl, read_records, resolve_image

FORMATS = ("trl", "llama-factory")
LLAMA_FACTORY_NAME = "hallu_pairs"


def export_pairs(pairs_path: Path, out: Path, fmt: str, *, allow_outside_images: bool = False) -> dict:
    from hallu.fileio import StagedDir

    if fmt not in FORMATS:
        raise HalluError(f"--format {fmt}: unknown (choose from {', '.join(FORMATS)})")
    pairs_path = Path(pairs_path)
    pairs = read_records(pairs_path, PreferencePair)
    if not pairs:
        raise HalluError(f"{pairs_path}: no pairs to export")
    base = pairs_path.parent
    files = []
    for line, p in enumerate(pairs, 1):
        where = f"{pairs_path}:{line}: pair {p.id!r}"
        paths = [resolve_image(i, base, allow_outside=allow_outside_images, where=where) for i in p.images]
        for f in paths:
            if not f.is_file():
                raise HalluError(f"{where}: image {f} not found")
        files.append(paths)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HalluError(f"--out {out}: is a file, expected a folder")
    with StagedDir(out) as tmp:
        if fmt == "trl":
            _write_trl(pairs, files, tmp, pairs_path)
        else:
            _write_llama_factory(pairs, files, tmp)
    return {"pairs": len(pairs), "format": fmt, "out": str(out)}


def _write_trl(pairs: list[PreferencePair], files: list[list[Path]], tmp: Path, pairs_path: Path) -> None:
    from datasets import Dataset, Features, Image, List, Value

    message = List({"role": Value("string"),
                    "content": List({"type": Value("string"), "text": Value("string")})})
    features = Features({"id": Value("string"), "images": List(Image()), "prompt": message,
                         "chosen": message, "rejected": message})

    def rows():
        for line, (pair, paths) in enumerate(zip(pairs, files, strict=True), 1):
            row = pair_to_trl(pair)
            for part in (p for m in row["prompt"] + row["chosen"] + row["rejected"] for p in m["content"]):
                part.setdefault("text", None)  # one struct shape for image and text parts
            # Decoded once here: an unreadable file is one clear error now, not a crash mid-training.
            for f in paths:
                load_image(f, f"{pairs_path}:{line}: pair {pair.id!r}").close()
            row["images"] = [str(f) for f in paths]
            yield row

    ds = Dataset.from_list(list(rows()), features=features)
    # save_to_disk embeds the image bytes: the folder stands alone, moved or copied anywhere.
    ds.save_to_disk(str(tmp))


def _write_llama_factory(pairs: list[PreferencePair], files: list[list[Path]], tmp: Path) -> None:
    from hallu.fileio import atomic_write_json, sha256_file

    (tmp / "images").mkdir()
    copied: dict[Path, str] = {}
    rows = []
    for pair, paths in zip(pairs, files, strict=True):
        names = []
        for f in paths:
            if f not in copied:
                name = f"images/{sha256_file(f).split(':')[-1][:16]}{f.suffix.lower()}"
                if not (tmp / name).exists():
                    shutil.copyfile(f, tmp / name)
                copied[f] = name
            names.append(copied[f])
        prompt = pair.prompt
        if IMAGE_TAG not in prompt:  # LLaMA-Factory places images where the tags stand: all first
            prompt = IMAGE_TAG * len(names) + prompt
        rows.append({"id": pair.id, "conversations": [{"from": "human", "value": prompt}],
                     "chosen": {"from": "gpt", "value": pair.chosen},
                     "rejected": {"from": "gpt", "value": pair.rejected}, "images": names})
    atomic_write_json(tmp / "pairs.json", rows, indent=1)
    atomic_write_json(tmp / "dataset_info.json", {LLAMA_FACTORY_NAME: {
        "file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"},
    }}, indent=1)
