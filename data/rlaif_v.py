"""RLAIF-V (``openbmb/RLAIF-V-Dataset``) parquet shards from a local folder, as preference pairs.

Columns read: ``question``, ``chosen``, ``rejected``, ``image`` (``{"bytes", "path"}``), and when
present ``origin_dataset``, ``origin_split``, ``idx``, ``image_path`` and any ``*logp*`` column (kept
in ``meta``). Shards are read a batch at a time, so memory holds one batch of images, not the set.

``--subset N`` draws N records stratified by ``origin_dataset`` the way OPA-DPO's data step does:
every origin keeps its share of N (largest remainders round), the records within an origin drawn
with ``random.Random(seed)``. This is our own stratified draw: it keeps the proportions of
sklearn's ``train_test_split(stratify=...)`` but not its exact selection.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from hallu.data._importing import ImportContext, first_record, looks_like
from hallu.errors import HalluError
from hallu.records import PreferencePair

SOURCE = "rlaif-v"
REQUIRED = ("question", "chosen", "rejected", "image")
_BATCH_ROWS = 256


def shards(sources: list[Path]) -> list[Path]:
    files: list[Path] = []
    for s in sources:
        found = sorted(s.rglob("*.parquet")) if s.is_dir() else [s]
        if s.is_dir() and not found:
            raise HalluError(f"--from {s}: no .parquet files in the folder")
        files += found
    return files


def stratified_subset(labels: list[str], n: int, seed: int) -> list[int]:
    """Indices of ``n`` items whose label shares match the whole list's (largest remainder), sorted."""
    if n >= len(labels):
        return list(range(len(labels)))
    groups: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        groups[lab].append(i)
    total = len(labels)
    exact = {g: len(ix) * n / total for g, ix in groups.items()}
    take = {g: int(v) for g, v in exact.items()}
    short = n - sum(take.values())
    for g in sorted(groups, key=lambda g: (-(exact[g] - take[g]), g))[:short]:
        take[g] += 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for g in sorted(groups):
        chosen += rng.sample(groups[g], take[g])
    return sorted(chosen)


def _open(path: Path):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not parquet
        hint = ""
        if path.suffix in (".json", ".jsonl"):
            other = looks_like(first_record(path))
            hint = f"; it is JSON that looks like {other} data" if other else "; it is JSON"
        raise HalluError(f"{path}: not a parquet file ({type(e).__name__}){hint}") from None
    names = pf.schema_arrow.names
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        other = looks_like({c: None for c in names})
        hint = f"; its columns look like {other} data" if other else ""
        raise HalluError(f"{path}: not an RLAIF-V shard (no column {', '.join(missing)}){hint}")
    return pf


def read(ctx: ImportContext) -> Iterator[PreferencePair]:
    files = shards(ctx.sources)
    opened = [(p, _open(p)) for p in files]
    subset = ctx.options.get("subset")
    keep: set[tuple[int, int]] | None = None
    if subset is not None:
        # Only the origin column is read for the draw; images are read for the kept rows alone.
        labels, where = [], []
        for fi, (_, pf) in enumerate(opened):
            col = (pf.read(columns=["origin_dataset"]).column(0).to_pylist()
                   if "origin_dataset" in pf.schema_arrow.names else [""] * pf.metadata.num_rows)
            labels += [str(x) for x in col]
            where += [(fi, r) for r in range(len(col))]
        keep = {where[i] for i in stratified_subset(labels, subset, ctx.seed)}
        ctx.tally.filtered["not in --subset"] += len(labels) - len(keep)
    for fi, (path, pf) in enumerate(opened):
        names = pf.schema_arrow.names
        extra_cols = [c for c in names if c in ("origin_dataset", "origin_split", "idx", "image_path", "ds_name")
                      or "logp" in c.lower()]
        row = 0
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=list(REQUIRED) + extra_cols):
            for rec in batch.to_pylist():
                r, row = row, row + 1
                if keep is not None and (fi, r) not in keep:
                    continue
                yield _pair(ctx, path, r, rec, extra_cols)


def _pair(ctx: ImportContext, path: Path, row: int, rec: dict, extra_cols: list[str]) -> PreferencePair:
    where = f"{path}: row {row}"
    for k in ("question", "chosen", "rejected"):
        if not isinstance(rec.get(k), str):
            raise HalluError(f"{where}: '{k}' must be a string, got {type(rec.get(k)).__name__}")
    img = rec.get("image")
    data = img.get("bytes") if isinstance(img, dict) else img if isinstance(img, bytes) else None
    if not data:
        raise HalluError(f"{where}: the row has no image bytes")
    image = ctx.store.put(data, where)
    meta = {"source": SOURCE, "row": row, "shard": path.name}
    for c in extra_cols:
        meta[c] = rec.get(c)
    if isinstance(img, dict) and img.get("path"):
        meta["image_name"] = img["path"]
    return PreferencePair(id=f"rlaifv-{path.stem}-{row}", images=[image], prompt=rec["question"].strip(),
                          chosen=rec["chosen"], rejected=rec["rejected"], meta=meta)

