"""The offline shapes world (hallu.data.shapes): formats, determinism, glyphs vs annotations, co-occurrence.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from hallu.data import shapes
from hallu.errors import HalluError
from hallu.records import Prompt, read_records

N = 60
SEED = 3


def _build(root: Path, n: int = N, seed: int = SEED) -> tuple[Path, dict]:
    root.mkdir(parents=True, exist_ok=True)
    summary = shapes.build_world(root, n_images=n, seed=seed)
    return root, summary


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    return _build(tmp_path_factory.mktemp("shapes") / "w")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+|[^\w\s]", text))


# --------------------------------------------------------------------------------------------------


def test_summary_and_layout(world):
    root, s = world
    assert s["images"] == N and s["prompts"] == N
    assert s["train_images"] + s["val_images"] == N and s["val_images"] == N // shapes.VAL_EVERY
    assert s["categories"] == len(shapes.CATEGORIES) >= 20
    assert s["world_version"] == shapes.WORLD_VERSION
    for rel in ("annotations/instances_train2014.json", "annotations/instances_val2014.json",
                "annotations/captions_train2014.json", "annotations/captions_val2014.json",
                "vg/image_data.json", "vg/region_descriptions.json", "vg/facts.jsonl",
                "vg/val_images_final.json", "pope/objects.jsonl", shapes.PROMPTS_FILE, shapes.QA_FILE,
                shapes.WORLD_FILE, "README.md"):
        assert (root / rel).is_file(), rel
    pngs = sorted((root / "images").glob("*.png"))
    assert [p.name for p in pngs] == [shapes.file_name(i) for i in range(1, N + 1)]
    assert all(int(re.search(r"(\d+)\.png$", p.name).group(1)) == i for i, p in enumerate(pngs, 1))


def test_deterministic_and_seed_dependent(world, tmp_path):
    root, _ = world
    again, _ = _build(tmp_path / "again")
    a, b = _files(root), _files(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    other, _ = _build(tmp_path / "other", seed=SEED + 1)
    c = _files(other)
    assert a[shapes.PROMPTS_FILE] != c[shapes.PROMPTS_FILE]
    differing = [k for k in a if k.startswith("images/") and a[k] != c[k]]
    assert len(differing) > 0.9 * N


def test_larger_world_keeps_the_scenes_of_a_smaller_one(world, tmp_path):
    root, _ = world
    small, _ = _build(tmp_path / "small", n=10)
    for i in range(1, 11):
        assert (small / "images" / shapes.file_name(i)).read_bytes() == (
            root / "images" / shapes.file_name(i)).read_bytes()


def test_bad_input(tmp_path):
    for n in (0, -1, True, 2.5):
        with pytest.raises(HalluError):
            shapes.build_world(tmp_path / "bad", n_images=n, seed=0)
    with pytest.raises(HalluError):
        shapes.build_world(tmp_path / "bad", n_images=3, seed="x")


def test_tiny_worlds(tmp_path):
    for n in (1, 2, 4):
        root, s = _build(tmp_path / f"n{n}", n=n)
        assert s["images"] == n and s["val_images"] == 1 and s["train_images"] == n - 1
        assert len(_lines(root / "pope" / "objects.jsonl")) == 1


# --------------------------------------------------------------------------------------------------
# Categories and glyphs


def test_categories_and_glyphs():
    cats = shapes.CATEGORIES
    assert len(cats) >= 20
    real = {cid: name for cid, name, _ in shapes.COCO_CATEGORIES}
    assert len(real) == 80
    for c in cats:
        assert real[c.id] == c.name
        assert " " not in c.name and c.name != "bus"
    assert len({c.name for c in cats}) == len(cats)
    assert len({(c.shape, c.colour) for c in cats}) == len(cats)
    for group, names in shapes.GROUPS:
        members = [c for c in cats if c.group == group]
        assert [c.name for c in members] == list(names)
        assert len({c.shape for c in members}) == len(members)
        assert len({c.colour for c in members}) == len(members)
    # words of the glyphs must not be object words themselves
    assert not set(shapes.COLOURS) & set(real.values())
    assert not set(shapes.SHAPES) & set(real.values())


def test_glyph_pixels_match_annotations(world):
    from PIL import Image

    root, _ = world
    rgb = {c.id: c.rgb for c in shapes.CATEGORIES}
    shape = {c.id: c.shape for c in shapes.CATEGORIES}
    for split in ("train", "val"):
        ins = json.loads((root / "annotations" / f"instances_{split}2014.json").read_text())
        by_image: dict[int, list[dict]] = {}
        for a in ins["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for img in ins["images"]:
            im = Image.open(root / "images" / img["file_name"]).convert("RGB")
            assert im.size == (img["width"], img["height"]) == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
            px = im.load()
            anns = by_image[img["id"]]
            assert 1 <= len(anns) <= 4
            covered = set()
            for a in anns:
                x, y, w, h = (int(v) for v in a["bbox"])
                box = [px[i, j] for i in range(x, x + w) for j in range(y, y + h)]
                covered |= {(i, j) for i in range(x, x + w) for j in range(y, y + h)}
                colours = Counter(p for p in box if len(set(p)) > 1)  # non-gray pixels
                assert set(colours) == {rgb[a["category_id"]]}, (img, a)
                assert colours[rgb[a["category_id"]]] == a["area"]
                centre = px[x + w // 2, y + h // 2]
                if shape[a["category_id"]] == "ring":
                    assert len(set(centre)) == 1  # the hole shows the background
                else:
                    assert centre == rgb[a["category_id"]]
            # everything outside the boxes is the (uniform gray) background
            size = im.size[0]
            outside = {px[i, j] for i in range(size) for j in range(size) if (i, j) not in covered}
            assert len(outside) == 1 and len(set(next(iter(outside)))) == 1


# --------------------------------------------------------------------------------------------------
# COCO files


def test_coco_files_load_with_pycocotools(world):
    from pycocotools.coco import COCO

    root, s = world
    ids: dict[str, set[int]] = {}
    n_anns = 0
    for split in ("train", "val"):
        inst = COCO(str(root / "annotations" / f"instances_{split}2014.json"))
        caps = COCO(str(root / "annotations" / f"captions_{split}2014.json"))
        assert len(inst.cats) == 80
        assert inst.cats[48]["name"] == "fork" and inst.cats[90]["name"] == "toothbrush"
        ids[split] = set(inst.getImgIds())
        assert set(caps.getImgIds()) == ids[split]
        n_anns += len(inst.getAnnIds())
        for img_id in ids[split]:
            img = inst.loadImgs(img_id)[0]
            assert int(img["file_name"].rsplit("_", 1)[1].split(".")[0]) == img_id
            anns = inst.loadAnns(inst.getAnnIds(imgIds=img_id))
            assert anns and all(a["iscrowd"] == 0 and a["area"] > 0 and len(a["bbox"]) == 4 for a in anns)
            assert len({a["category_id"] for a in anns}) == len(anns)
            assert len(caps.getAnnIds(imgIds=img_id)) == shapes.CAPTIONS_PER_IMAGE
    assert not ids["train"] & ids["val"]
    assert ids["train"] | ids["val"] == set(range(1, N + 1))
    assert {i for i in ids["val"]} == {i for i in range(1, N + 1) if i % shapes.VAL_EVERY == 0}
    assert n_anns == s["objects"]


def test_captions_mention_exactly_the_present_objects(world):
    """Without CHAIR's machinery: every caption names each present object once (name or synonym), and no
    other category name or synonym appears."""
    root, _ = world
    prompts = {p.meta["image_id"]: p for p in read_records(root / shapes.PROMPTS_FILE, Prompt)}
    surface = {c.name: {c.name, *c.synonyms} for c in shapes.CATEGORIES}
    for split in ("train", "val"):
        caps = json.loads((root / "annotations" / f"captions_{split}2014.json").read_text())
        for c in caps["annotations"]:
            present = set(prompts[c["image_id"]].objects)
            words = re.findall(r"[a-z]+", c["caption"].lower())
            for name, forms in surface.items():
                hits = sum(words.count(f) for f in forms)
                assert hits == (1 if name in present else 0), (c, name)


def test_captions_through_chair_words(world):
    """With the project's CHAIR word machinery (official tokenizer, Pattern singularize, double words,
    synonyms): every GT caption mines exactly the annotated objects, each once; the other texts mine
    what they should; no sentence of the tokenizer corpus holds a word of a category outside the world."""
    objects = pytest.importorskip("hallu.objects")
    node_words = getattr(objects, "node_words", None)
    if node_words is None:
        pytest.skip("hallu.objects has no node_words()")
    root, _ = world
    prompts = {p.meta["image_id"]: p for p in read_records(root / shapes.PROMPTS_FILE, Prompt)}
    for split in ("train", "val"):
        caps = json.loads((root / "annotations" / f"captions_{split}2014.json").read_text())
        for c in caps["annotations"]:
            assert sorted(node_words(c["caption"])) == sorted(prompts[c["image_id"]].objects), c
    for p in prompts.values():
        assert sorted(node_words(p.reference)) == sorted(p.objects)
        assert sorted(set(node_words(p.meta["detailed_reference"]))) == sorted(p.objects)
        noisy = set(p.objects) | set(p.meta["noise_objects"])
        assert sorted(node_words(p.meta["noisy_reference"])) == sorted(noisy)
    for q in read_records(root / shapes.QA_FILE, Prompt):
        assert node_words(q.question) == [q.meta["object"]]
    names = {c.name for c in shapes.CATEGORIES}
    for sentence in shapes.tokenizer_corpus():
        assert set(node_words(sentence)) <= names, sentence


# --------------------------------------------------------------------------------------------------
# Prompts, QA, VG, POPE


def test_prompt_records(world):
    root, _ = world
    prompts = read_records(root / shapes.PROMPTS_FILE, Prompt)
    assert len(prompts) == N
    inst = {}
    for split in ("train", "val"):
        d = json.loads((root / "annotations" / f"instances_{split}2014.json").read_text())
        names = {c["id"]: c["name"] for c in d["categories"]}
        for a in d["annotations"]:
            inst.setdefault(a["image_id"], []).append(names[a["category_id"]])
    n_noisy = 0
    for p in prompts:
        assert p.question == shapes.CAPTION_QUESTION
        assert len(p.images) == 1 and (root / p.images[0]).is_file()
        assert sorted(p.objects) == sorted(inst[p.meta["image_id"]])
        assert p.reference == p.meta["captions"][0]
        assert len(p.meta["captions"]) == shapes.CAPTIONS_PER_IMAGE
        assert p.meta["split"] in ("train", "val")
        glyph_regions = [r for r in p.regions if len(r["phrase"].split()) == 4]
        assert len(glyph_regions) == len(p.objects)
        noise = p.meta["noise_objects"]
        assert not set(noise) & set(p.objects)
        for obj in noise:
            assert obj in p.meta["noisy_reference"]
        n_noisy += bool(noise)
    assert n_noisy < N / 2


def test_qa_records_are_balanced(world):
    root, _ = world
    qa = read_records(root / shapes.QA_FILE, Prompt)
    labels = Counter(q.reference for q in qa)
    assert labels["Yes"] == labels["No"] > 0 and set(labels) == {"Yes", "No"}
    for q in qa:
        assert q.meta["label"] == q.reference.lower()
        assert (q.meta["object"] in q.objects) == (q.reference == "Yes")
        assert q.question == shapes.QA_TEMPLATE.format(np=("an " if q.meta["object"][0] in "aeiou" else "a ")
                                                        + q.meta["object"])
    kinds = Counter(q.meta["kind"] for q in qa)
    assert kinds["adversarial"] > 0 and kinds["random"] > 0


def test_vg_and_facts_formats(world):
    root, _ = world
    image_data = json.loads((root / "vg" / "image_data.json").read_text())
    assert [d["image_id"] for d in image_data] == list(range(1, N + 1))
    for d in image_data:
        assert {"image_id", "width", "height", "url"} <= set(d)
        assert (root / d["url"]).is_file()
    regions = json.loads((root / "vg" / "region_descriptions.json").read_text())
    assert len(regions) == N
    for entry in regions:
        assert set(entry) == {"regions", "id"} and entry["regions"]
        assert entry["regions"][0]["image_id"] == entry["id"]
        for r in entry["regions"]:
            assert {"region_id", "image_id", "x", "y", "width", "height", "phrase"} <= set(r)
            assert 0 <= r["x"] and r["x"] + r["width"] <= shapes.IMAGE_SIZE and r["phrase"]
    region_ids = [r["region_id"] for e in regions for r in e["regions"]]
    assert len(set(region_ids)) == len(region_ids)
    facts = _lines(root / "vg" / "facts.jsonl")
    assert len(facts) == N
    for i, row in enumerate(facts, 1):
        assert list(row) == [str(i)]
        assert row[str(i)] and all(isinstance(f, str) and f.endswith(".") for f in row[str(i)])
    val = json.loads((root / "vg" / "val_images_final.json").read_text())
    assert [v["image_id"] for v in val] == [i for i in range(1, N + 1) if i % shapes.VAL_EVERY == 0]


def test_pope_objects_file(world):
    root, _ = world
    prompts = {p.meta["file_name"]: p for p in read_records(root / shapes.PROMPTS_FILE, Prompt)}
    rows = _lines(root / "pope" / "objects.jsonl")
    assert rows and len(rows) == N // shapes.VAL_EVERY
    for row in rows:
        assert isinstance(row["image"], str) and isinstance(row["objects"], list)
        p = prompts[row["image"]]
        assert p.meta["split"] == "val"
        assert row["objects"] == p.objects  # same stable (reading) order


# --------------------------------------------------------------------------------------------------
# Co-occurrence and the tokenizer corpus


def test_same_group_pairs_dominate(tmp_path):
    root, s = _build(tmp_path / "big", n=600, seed=1)
    group = {c.name: c.group for c in shapes.CATEGORIES}
    pairs = Counter()
    for p in read_records(root / shapes.PROMPTS_FILE, Prompt):
        for a in p.objects:
            for b in p.objects:
                if a < b:
                    pairs[(a, b)] += 1
    names = sorted(group)
    same = [pairs[(a, b)] for a in names for b in names if a < b and group[a] == group[b]]
    cross = [pairs[(a, b)] for a in names for b in names if a < b and group[a] != group[b]]
    rate_same, rate_cross = sum(same) / len(same), sum(cross) / len(cross)
    assert rate_same > 8 * rate_cross
    assert 0.6 < s["same_group_pair_share"] < 0.9
    world_json = json.loads((root / shapes.WORLD_FILE).read_text())
    assert world_json["cooccurrence"]["fork"].get("knife", 0) == pairs[("fork", "knife")]


def test_tokenizer_corpus_covers_every_word(world):
    root, _ = world
    corpus = shapes.tokenizer_corpus()
    assert corpus == shapes.tokenizer_corpus() and len(corpus) == len(set(corpus))
    vocab = set().union(*(_words(s) for s in corpus))
    texts: list[str] = []
    for p in read_records(root / shapes.PROMPTS_FILE, Prompt):
        texts += [p.question, p.reference, *p.meta["captions"], p.meta["detailed_reference"],
                  p.meta["noisy_reference"], *p.objects, *(r["phrase"] for r in p.regions)]
    for q in read_records(root / shapes.QA_FILE, Prompt):
        texts += [q.question, q.reference]
    for row in _lines(root / "vg" / "facts.jsonl"):
        texts += next(iter(row.values()))
    for c in shapes.CATEGORIES:
        texts += [c.name, *c.synonyms, c.colour, c.shape]
    missing = set().union(*(_words(t) for t in texts)) - vocab
    assert not missing


def test_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, hallu.data.shapes; print(any(m in sys.modules for m in ('PIL', 'numpy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------------------------------
# Label noise and co-occurrence settings (WorldNoise, `prepare shapes --caption-noise/--qa-noise/--in-group`)

_CAPTION_LIST = re.compile(r"^The image shows (.*)\.$")


def _listed(caption: str) -> list[str]:
    body = _CAPTION_LIST.match(caption).group(1)
    parts = re.split(r", | and ", body)
    return [p.split(" ", 1)[1] for p in parts]  # drop the article


def test_default_noise_is_recorded_and_base_sft_follows_the_noisy_fields(world):
    root, s = world
    w = json.loads((root / shapes.WORLD_FILE).read_text())
    assert w["noise"] == {"caption_noise_p": 0.15, "qa_noise_p": 0.0, "in_group_p": 0.85, "pad_p": 0.0}
    prompts = {p.id: p for p in read_records(root / shapes.PROMPTS_FILE, Prompt)}
    qa = {q.id: q for q in read_records(root / shapes.QA_FILE, Prompt)}
    rows = _lines(root / shapes.BASE_SFT_FILE)
    assert len(rows) == s["base_sft"]
    n_train = sum(p.meta["split"] == "train" for p in prompts.values())
    n_train_qa = sum(q.meta["split"] == "train" and int(q.id.rsplit("_q", 1)[1]) < shapes.BASE_SFT_QA
                     for q in qa.values())
    assert len(rows) == n_train + n_train_qa  # train split only: the evals' images never appear
    answers = Counter(r["completion"] for r in rows if r["id"] not in prompts)
    assert answers["Yes"] >= answers["No"] > 0.8 * answers["Yes"]  # one yes and one no per image (noise aside)
    for row in rows:
        rec = prompts.get(row["id"]) or qa[row["id"]]
        assert rec.meta["split"] == "train" and row["images"] == rec.images and row["prompt"] == rec.question
        if rec.meta["task"] == "caption":
            assert row["completion"] == rec.meta["noisy_reference"]
        else:
            assert row["completion"] == rec.meta["noisy_label"].capitalize()
    # qa_noise_p 0: only a question about a caption's slipped-in object is answered against the truth.
    for q in qa.values():
        cap = prompts[q.id.rsplit("_q", 1)[0]]
        assert (q.meta["noisy_label"] != q.meta["label"]) == (q.meta["object"] in cap.meta["noise_objects"])
    noisy = sum(bool(prompts[r["id"]].meta["noise_objects"]) for r in rows if r["id"] in prompts)
    assert s["noisy_caption_share"] == round(noisy / n_train, 4)


def test_noise_options_change_only_the_noisy_fields(world, tmp_path):
    root, _ = world
    n = 200
    clean, _ = _build(tmp_path / "clean", n=n)
    noise = shapes.WorldNoise(caption_noise_p=0.6, qa_noise_p=0.5)
    noisy_root = tmp_path / "noisy"
    s = shapes.build_world(noisy_root, n_images=n, seed=SEED, noise=noise)
    w = json.loads((noisy_root / shapes.WORLD_FILE).read_text())
    assert w["noise"] == {"caption_noise_p": 0.6, "qa_noise_p": 0.5, "in_group_p": 0.85, "pad_p": 0.0}
    assert w["sampler"]["caption_noise_p"] == 0.6
    a, b = _files(clean), _files(noisy_root)
    # Same seed, same co-occurrence: images and every file an eval reads are byte for byte the same.
    same = [k for k in a if k.startswith(("images/", "annotations/", "pope/", "vg/"))]
    assert same and all(a[k] == b[k] for k in same)
    prompts = {p.id: p for p in read_records(noisy_root / shapes.PROMPTS_FILE, Prompt)}
    eligible = noisy_caps = 0
    for p in prompts.values():
        present = set(p.objects)
        group = set(shapes._GROUP_MEMBERS[p.meta["group"]])
        listed = _listed(p.meta["noisy_reference"])
        extra = [x for x in listed if x not in present]
        assert sorted(x for x in listed if x in present) == sorted(present)  # noise adds, never drops
        assert extra == p.meta["noise_objects"] and len(extra) <= 1
        assert all(x in group for x in extra)  # the co-occurring kind: an absent member of the scene's group
        if p.meta["split"] == "train" and group - present:
            eligible += 1
            noisy_caps += bool(extra)
    assert 0.45 < noisy_caps / eligible < 0.75  # 0.6 of the captions that can carry noise
    flipped = adversarial = 0
    for q in read_records(noisy_root / shapes.QA_FILE, Prompt):
        if q.meta["noisy_label"] != q.meta["label"]:
            assert q.meta["label"] == "no" and q.meta["noisy_label"] == "yes"
            cap = prompts[q.id.rsplit("_q", 1)[0]]
            assert q.meta["kind"] == "adversarial" or q.meta["object"] in cap.meta["noise_objects"]
        if q.meta["kind"] == "adversarial":
            adversarial += 1
            flipped += q.meta["noisy_label"] == "yes"
    assert 0.5 <= flipped / adversarial < 0.8  # 0.5 flipped, plus questions about slipped-in objects
    assert s["noisy_qa_share"] > 0 and s["noisy_caption_share"] > 0.3


def test_padding_appends_an_absent_group_member_and_its_question_is_answered_yes(world, tmp_path):
    n = 200
    clean, _ = _build(tmp_path / "clean", n=n)
    padded_root = tmp_path / "padded"
    s = shapes.build_world(padded_root, n_images=n, seed=SEED, noise=shapes.WorldNoise(caption_noise_p=0.0, pad_p=1.0),
                           base_questions=4)
    a, b = _files(clean), _files(padded_root)
    same = [k for k in a if k.startswith(("images/", "annotations/", "pope/", "vg/"))]
    assert same and all(a[k] == b[k] for k in same)  # only the noisy fields move
    prompts = {p.id: p for p in read_records(padded_root / shapes.PROMPTS_FILE, Prompt)}
    questions = {q.id: q for q in read_records(padded_root / shapes.QA_FILE, Prompt)}
    padded = eligible = 0
    for p in prompts.values():
        present, group = set(p.objects), set(shapes._GROUP_MEMBERS[p.meta["group"]])
        listed = _listed(p.meta["noisy_reference"])
        if not group - present:  # a scene holding its whole group has nothing to pad with
            assert p.meta["noise_objects"] == [] and sorted(listed) == sorted(present)
            continue
        eligible += p.meta["split"] == "train"
        pad = p.meta["noise_objects"]
        assert len(pad) == 1 and pad[0] in group - present
        assert listed[-1] == pad[0] and sorted(listed[:-1]) == sorted(present)  # after the true objects
        padded += p.meta["split"] == "train"
        q = questions[f"{p.id}_q1"]  # the image's same-group question is written from the caption
        assert (q.meta["object"], q.meta["kind"], q.meta["label"], q.meta["noisy_label"]) == (
            pad[0], "adversarial", "no", "yes")
    assert s["padded_caption_share"] == round(padded / s["train_images"], 4) and padded == eligible
    base = [json.loads(line) for line in (padded_root / shapes.BASE_SFT_FILE).read_text().splitlines()]
    qa = [r for r in base if "_q" in r["id"]]
    assert {int(r["id"].rsplit("_q", 1)[1]) for r in qa} == {0, 1, 2, 3}  # base_questions=4
    with pytest.raises(HalluError, match="base_questions"):
        shapes.build_world(tmp_path / "bad", n_images=3, seed=0, base_questions=-1)


def test_in_group_sets_the_co_occurrence_strength(tmp_path):
    strong = shapes.build_world(tmp_path / "s", n_images=300, seed=1)
    weak = shapes.build_world(tmp_path / "w", n_images=300, seed=1, noise=shapes.WorldNoise(in_group_p=0.0))
    assert strong["same_group_pair_share"] > 0.6
    # No in-group draws: objects come from the 20 categories outside the scene's group, so a partner
    # shares an object's group only by chance (3 of the 19 others, ~16 %).
    assert 0.08 < weak["same_group_pair_share"] < 0.25


@pytest.mark.parametrize("field,value", [("caption_noise_p", 1.5), ("qa_noise_p", -0.1), ("in_group_p", True),
                                         ("caption_noise_p", "0.3")])
def test_bad_noise_settings_name_the_setting(tmp_path, field, value):
    with pytest.raises(HalluError, match=field):
        shapes.build_world(tmp_path / "bad", n_images=3, seed=0, noise=shapes.WorldNoise(**{field: value}))
    assert not (tmp_path / "bad" / "images").exists() or not any((tmp_path / "bad" / "images").iterdir())


def test_prepare_shapes_noise_options_reach_the_world_and_the_manifest(tmp_path):
    from typer.testing import CliRunner

    from hallu.commands import app
    from hallu.manifest import Run

    run = tmp_path / "run"
    args = ["prepare", "shapes", "--out", str(run), "--images", "30", "--seed", "2"]
    r = CliRunner().invoke(app, [*args, "--caption-noise", "0.4", "--qa-noise", "0.2", "--in-group", "0.7"])
    assert r.exit_code == 0, r.output
    w = json.loads((run / "data" / shapes.WORLD_FILE).read_text())
    assert w["noise"] == {"caption_noise_p": 0.4, "qa_noise_p": 0.2, "in_group_p": 0.7, "pad_p": 0.0}
    rec = Run(run).stage_record("prepare")
    assert rec["options"]["noise"] == w["noise"]
    assert rec["outputs"]["base_sft"]["count"] == len(_lines(run / "data" / shapes.BASE_SFT_FILE))
    bad = CliRunner().invoke(app, [*args[:3], str(tmp_path / "bad"), *args[4:], "--qa-noise", "1.5"])
    assert bad.exit_code == 2 and "--qa-noise" in bad.output
    assert not (tmp_path / "bad").exists()
    # The default settings leave the recorded options as they were before the noise options existed.
    r = CliRunner().invoke(app, ["prepare", "shapes", "--out", str(tmp_path / "plain"), "--images", "5"])
    assert r.exit_code == 0, r.output
    assert "noise" not in Run(tmp_path / "plain").stage_record("prepare")["options"]
