"""The demo's report: report.json (the issue's shape plus counts and settings), report.md, report.png.

report.json holds only what the runs computed (metrics, counts, settings), rounded to 4 places, so two
demos with one seed write the same bytes; wall times go to timings.json and report.md.

Shape::

    {"methods": {NAME: {"before": M, "after": M, "control": M, "change": ..., "targets": ...,
                        "beats_control": ...}},
     "world": {...}, "base": {...}, "config": {...}, "seed": S}
    M = {"pope": {SPLIT: {"f1", "accuracy", "yes_ratio"}}, "chair": {"chair_s", "chair_i", "recall"}}

Targets (the issue's): CHAIR_i down by >= 30 % relative, POPE-adversarial F1 up by >= 5 points, CHAIR
recall down by no more than 10 % relative, each against the model the method started from (the base).
"""

from __future__ import annotations

from pathlib import Path

from hallu.errors import HalluError

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_KEYS = ("f1", "accuracy", "yes_ratio")
CHAIR_KEYS = ("chair_s", "chair_i", "recall")
TARGETS = {"chair_i_rel": -0.30, "pope_adversarial_f1": 0.05, "recall_rel": -0.10}


def _r(x) -> float | None:
    return None if x is None else round(float(x), 4)


def _read(path: Path) -> dict:
    from hallu.fileio import read_json

    if not path.exists():
        raise HalluError(f"{path}: missing; the evaluation did not finish (rerun the demo to resume)")
    return read_json(path)


def metrics(eval_dir: Path) -> dict:
    """The report's metric block of one model from its eval folder (pope/ and chair/ results)."""
    pope = _read(eval_dir / "pope" / "results.json")
    chair = _read(eval_dir / "chair" / "results.json")
    splits = {}
    for key, block in pope["splits"].items():
        name = next((s for s in POPE_SPLITS if s in key), None)
        if name is None:
            raise HalluError(f"{eval_dir / 'pope' / 'results.json'}: split {key!r} is none of {POPE_SPLITS}")
        m = block["metrics"]
        splits[name] = {k: _r(m.get(k)) for k in POPE_KEYS}
    missing = [s for s in POPE_SPLITS if s not in splits]
    if missing:
        raise HalluError(f"{eval_dir / 'pope' / 'results.json'}: no {missing[0]} split")
    cm = chair["metrics"]
    return {"pope": {s: splits[s] for s in POPE_SPLITS}, "chair": {k: _r(cm[k]) for k in CHAIR_KEYS}}


def cooccurrence(eval_dir: Path, groups: dict[str, list[str]]) -> dict:
    """How many of a model's hallucinated CHAIR mentions name an object of a present object's group."""
    chair = _read(eval_dir / "chair" / "results.json")
    group_of = {name: g for g, names in groups.items() for name in names}
    total = same = 0
    for item in chair.get("items", []):
        present = {group_of.get(o) for o in item.get("gt_objects", [])} - {None}
        for _, node in item.get("hallucinated", []):
            total += 1
            same += group_of.get(node) in present
    return {"hallucinated_mentions": total, "cooccurrence_mentions": same,
            "cooccurrence_share": _r(same / total) if total else None,
            "captions": chair.get("counts", {}).get("captions"), "mentions": chair.get("counts", {}).get("mentions")}


def change(before: dict, after: dict) -> dict:
    """The three targeted changes (relative for CHAIR, absolute F1 points as fractions for POPE)."""
    def rel(key):
        b, a = before["chair"][key], after["chair"][key]
        return _r((a - b) / b) if b and a is not None else None  # None: a model with no mentions

    fb, fa = before["pope"]["adversarial"]["f1"], after["pope"]["adversarial"]["f1"]
    return {"chair_i_rel": rel("chair_i"), "recall_rel": rel("recall"), "chair_s_rel": rel("chair_s"),
            "pope_adversarial_f1": _r(fa - fb) if fa is not None and fb is not None else None}


def targets(ch: dict) -> dict:
    ok = {
        "chair_i_rel": ch["chair_i_rel"] is not None and ch["chair_i_rel"] <= TARGETS["chair_i_rel"],
        "pope_adversarial_f1": ch["pope_adversarial_f1"] is not None
        and ch["pope_adversarial_f1"] >= TARGETS["pope_adversarial_f1"],
        "recall_rel": ch["recall_rel"] is not None and ch["recall_rel"] >= TARGETS["recall_rel"],
    }
    return {**ok, "all": all(ok.values())}


def beats(after: dict, control: dict) -> dict:
    """Whether the method beats its SFT-only control: lower CHAIR_i and higher POPE-adversarial F1."""
    def lower(a, b):  # None (no mentions, or no yes answers for F1) never counts as a win
        return a is not None and (b is None or a < b)

    ci = lower(after["chair"]["chair_i"], control["chair"]["chair_i"])
    fa, fc = after["pope"]["adversarial"]["f1"], control["pope"]["adversarial"]["f1"]
    f1 = fa is not None and (fc is None or fa > fc)
    return {"chair_i": ci, "pope_adversarial_f1": f1, "both": ci and f1}


def build(demo) -> dict:
    """report.json's content for a finished demo."""
    from hallu.demo import method_dir
    from hallu.fileio import read_json

    world = read_json(demo.data / "world.json")
    groups = world["groups"]
    base_dir = demo.out / "eval" / "base"
    before = metrics(base_dir)
    methods = {}
    for name in demo.config.methods:
        d = method_dir(demo, name)
        after, control = metrics(d / "eval"), metrics(d / "control" / "eval")
        ch = change(before, after)
        methods[name] = {
            "before": before, "after": after, "control": control,
            "change": ch, "control_change": change(before, control),
            "targets": targets(ch), "beats_control": beats(after, control),
            "steps": demo.config.method_steps(name),
            "pairs": _count_lines(d / "revise" / "pairs.jsonl"),
            "responses": _count_lines(d / "rollout" / "responses.jsonl"),
            "after_hallucinations": cooccurrence(d / "eval", groups),
        }
    return {
        "methods": methods,
        "world": {"settings": world.get("sampler", {}), "noise": world.get("noise"), "summary": world.get("summary")},
        "base": {"hallucinations": cooccurrence(base_dir, groups)},
        "config": demo.config.to_dict(),
        "seed": demo.seed,
        "targets": TARGETS,
    }


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def timings(out: Path) -> dict[str, float]:
    """Seconds of every finished stage under the demo folder, read from the manifests (run/stage -> s)."""
    from hallu.fileio import read_json

    found = {}
    for path in sorted(out.rglob("manifest.json")):
        rel = path.parent.relative_to(out).as_posix()
        for stage, rec in read_json(path).get("stages", {}).items():
            if rec.get("status") == "done" and rec.get("seconds") is not None:
                found[f"{rel}/{stage}" if rel != "." else stage] = round(float(rec["seconds"]), 1)
    return found


# --------------------------------------------------------------------------------------------------
# Markdown


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _signed(x, rel: bool) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.1f} %" if rel else f"{100 * x:+.1f}"


def markdown(report: dict, seconds: dict[str, float]) -> str:
    lines = ["# hallu demo: the shapes world", ""]
    summary = (report["world"].get("summary") or {})
    base_h = report["base"]["hallucinations"]
    lines += [
        f"World: {summary.get('images')} images ({summary.get('train_images')} train / {summary.get('val_images')} "
        f"held out), noise {report['world'].get('noise')}: train captions naming an absent object "
        f"{_pct(summary.get('noisy_caption_share'))} % (padded ones {_pct(summary.get('padded_caption_share'))} %), "
        f"train yes/no answers against the truth {_pct(summary.get('noisy_qa_share'))} %.",
        f"Base: {base_h['hallucinated_mentions']} hallucinated CHAIR mentions, "
        f"{_pct(base_h['cooccurrence_share'])} % of them co-occurrence ones (an absent object of a present "
        "object's group).", "",
    ]
    header = "| model | CHAIR_s | CHAIR_i | recall | POPE rand F1 | POPE pop F1 | POPE adv F1 | adv acc | adv yes % |"
    for name, m in report["methods"].items():
        lines += [f"## {name}", "", header, "|" + "---|" * 9]
        for row in ("before", "control", "after"):
            b = m[row]
            p = b["pope"]
            lines.append(f"| {row} | {_pct(b['chair']['chair_s'])} | {_pct(b['chair']['chair_i'])} | "
                         f"{_pct(b['chair']['recall'])} | {_pct(p['random']['f1'])} | {_pct(p['popular']['f1'])} | "
                         f"{_pct(p['adversarial']['f1'])} | {_pct(p['adversarial']['accuracy'])} | "
                         f"{_pct(p['adversarial']['yes_ratio'])} |")
        ch, t = m["change"], m["targets"]
        mark = {True: "met", False: "MISSED"}
        lines += [
            "",
            f"- CHAIR_i {_signed(ch['chair_i_rel'], True)} relative (target ≤ −30 %): {mark[t['chair_i_rel']]}",
            f"- POPE-adversarial F1 {_signed(ch['pope_adversarial_f1'], False)} points (target ≥ +5): "
            f"{mark[t['pope_adversarial_f1']]}",
            f"- CHAIR recall {_signed(ch['recall_rel'], True)} relative (target ≥ −10 %): {mark[t['recall_rel']]}",
            f"- against its SFT-only control ({m['steps']} steps on the same {m['pairs']} revised pairs): "
            + ("beats it on CHAIR_i and POPE-adversarial F1" if m["beats_control"]["both"] else
               "does NOT beat it on " + " and ".join(k for k in ("chair_i", "pope_adversarial_f1")
                                                     if not m["beats_control"][k])),
            f"- after: {_pct(m['after_hallucinations']['cooccurrence_share'])} % of "
            f"{m['after_hallucinations']['hallucinated_mentions']} hallucinated mentions are co-occurrence ones",
            "",
        ]
    if seconds:
        lines += ["## Wall time per stage (seconds)", "", "| stage | s |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
        lines += [f"| **total** | {sum(seconds.values()):.1f} |", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# PNG (PIL: matplotlib is not a dependency)

_BAR_METRICS = (("CHAIR_i", ("chair", "chair_i")), ("CHAIR_s", ("chair", "chair_s")), ("recall", ("chair", "recall")),
                ("POPE adv F1", ("pope", "adversarial", "f1")), ("POPE pop F1", ("pope", "popular", "f1")),
                ("POPE rand F1", ("pope", "random", "f1")))
_COLOURS = {"before": (150, 150, 150), "control": (230, 160, 60), "after": (50, 110, 200)}


def _get(block: dict, path: tuple[str, ...]):
    for k in path:
        block = block[k]
    return block or 0.0


def png(report: dict) -> bytes:
    """Before / control / after bars per metric, one row of panels per method."""
    from PIL import Image, ImageDraw

    methods = list(report["methods"].items())
    pw, ph, pad = 150, 170, 10
    width = pad + len(_BAR_METRICS) * (pw + pad)
    height = 30 + len(methods) * (ph + 30) + 20
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    x = pad
    for row, colour in _COLOURS.items():
        d.rectangle([x, 8, x + 10, 18], fill=colour)
        d.text((x + 14, 7), row, fill=(0, 0, 0))
        x += 80
    for r, (name, m) in enumerate(methods):
        top = 30 + r * (ph + 30)
        d.text((pad, top), name, fill=(0, 0, 0))
        for i, (label, key) in enumerate(_BAR_METRICS):
            x0, y0 = pad + i * (pw + pad), top + 16
            base_y = y0 + ph - 30
            d.line([x0, base_y, x0 + pw, base_y], fill=(0, 0, 0))
            d.text((x0, base_y + 4), label, fill=(0, 0, 0))
            for j, row in enumerate(("before", "control", "after")):
                v = max(0.0, min(1.0, float(_get(m[row], key))))
                bx = x0 + 10 + j * 45
                d.rectangle([bx, base_y - int(v * (ph - 50)), bx + 35, base_y], fill=_COLOURS[row])
                d.text((bx, base_y - int(v * (ph - 50)) - 12), f"{100 * v:.0f}", fill=(0, 0, 0))
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write(demo) -> dict:
    """Write report.json, report.md, report.png and timings.json into the demo folder; return the report."""
    from hallu.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

    report = build(demo)
    seconds = timings(demo.out)
    atomic_write_json(demo.out / "report.json", report)
    atomic_write_json(demo.out / "timings.json", {"stages": seconds, "total": round(sum(seconds.values()), 1)})
    atomic_write_text(demo.out / "report.md", markdown(report, seconds))
    atomic_write_bytes(demo.out / "report.png", png(report))
    return report
