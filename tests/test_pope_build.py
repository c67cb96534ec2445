"""POPE question building: the seeded build equals the official generator, draw for draw."""

from __future__ import annotations

import json
import random

import pytest
import typer
from typer.testing import CliRunner

from hallu.commands import prepare_pope
from hallu.data import pope as P
from hallu.errors import HalluError

TEMPLATE = "Is there a {} in the image?"


# --------------------------------------------------------------------------------------------------
# A plain re-statement of the official generator (AoiDragon/POPE main.py + utils.pope), written from
# the spec, run on the *global* RNG after random.seed(S). Only addition: a cap on redraws, so a case
# where the official loop would spin forever shows up as _Hang instead of hanging the test.


class _Hang(Exception):
    pass


_DRAW_CAP = 20000


def official_generator(records, seed, img_num, sample_num=3, template=TEMPLATE):
    random.seed(seed)
    pool = []
    for r in records:
        if len(r["objects"]) >= sample_num:
            pool.append(r)
    assert len(pool) >= img_num
    chosen = random.sample(pool, img_num)

    counts = {}
    for r in chosen:
        for name in r["objects"]:
            if name in counts:
                counts[name] += 1
            else:
                counts[name] = 1
    names = list(counts.keys())
    by_count = [pair[0] for pair in sorted(counts.items(), key=lambda pair: pair[1], reverse=True)]

    pairs = {}
    for r in chosen:
        for a in r["objects"]:
            if a not in pairs:
                pairs[a] = {}
            for b in r["objects"]:
                if a == b:
                    continue
                pairs[a][b] = pairs[a][b] + 1 if b in pairs[a] else 1
    partners = {}
    for a in pairs:
        partners[a] = [pair[0] for pair in sorted(pairs[a].items(), key=lambda pair: pair[1], reverse=True)]

    def make(qid, image, name, label):
        vowel_template = template.replace("a", "an")  # the official "imange" typo, on purpose
        text = vowel_template.format(name) if name[0] in ["a", "e", "i", "o", "u"] else template.format(name)
        return {"question_id": qid, "image": image, "text": text, "label": label}

    def redraw(r, history):
        tries = 0
        while True:
            name = random.choice(names)
            if name not in history and name not in r["objects"]:
                return name
            tries += 1
            if tries > _DRAW_CAP:
                raise _Hang()

    splits = {}
    for strategy in ["random", "popular", "adversarial"]:
        rows = []
        qid = 1
        for r in chosen:
            history = []
            for i in range(sample_num):
                pos = r["objects"][i]
                history.append(pos)
                rows.append(make(qid, r["image"], pos, "yes"))
                qid += 1
                if strategy == "random":
                    neg = redraw(r, history)
                else:
                    ranked = by_count if strategy == "popular" else partners[pos]
                    neg = None
                    for cand in ranked:
                        if cand not in history and cand not in r["objects"]:
                            neg = cand
                            break
                    if neg is None:
                        neg = redraw(r, history)
                history.append(neg)
                rows.append(make(qid, r["image"], neg, "no"))
                qid += 1
        splits[strategy] = rows
    return splits, counts, partners


def synthetic_records(n=60, seed=11):
    """Objects lists with a small vocabulary: many frequency ties, short lists (filtered out),
    duplicates, vowel and capitalised names, and groups that only co-occur with each other
    (adversarial fallback)."""
    vocab = ["dog", "cat", "apple", "umbrella", "orange", "elephant", "car", "skis", "tv", "dining table",
             "Apple", "oven", "bus", "person", "bottle"]
    rng = random.Random(seed)
    records = []
    for i in range(n):
        k = rng.choice([1, 2, 3, 3, 4, 4, 5, 6])
        objs = [rng.choice(vocab) for _ in range(k)]
        records.append({"image": f"SYNTH_{i:04d}.jpg", "objects": objs, "extra": i})
    # A closed group: each member's only partners are the others, all in the image -> random fallback.
    for i in range(4):
        records.append({"image": f"KITCHEN_{i}.jpg", "objects": ["sink", "microwave", "toaster"]})
    return records


def _entries(records):
    return [P.ImageObjects(r["image"], tuple(r["objects"])) for r in records]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7, 42, 123, 2024, 99991, 2**40 + 5])
@pytest.mark.parametrize("img_num", [10, 25, "all"])
def test_seeded_build_equals_official_generator(seed, img_num):
    records = synthetic_records()
    eligible = sum(len(r["objects"]) >= 3 for r in records)
    n = eligible if img_num == "all" else img_num
    try:
        expected, counts, partners = official_generator(records, seed, n)
    except _Hang:
        # The official loop would never end: we must say so instead of hanging.
        with pytest.raises(HalluError, match="no object is left"):
            P.build(_entries(records), seed=seed, images_per_split=n)
        return
    typo = P.build(_entries(records), seed=seed, images_per_split=n, an_template=TEMPLATE.replace("a", "an"))
    assert typo.questions == expected
    assert typo.ground_truth_objects == counts
    assert list(typo.ground_truth_objects) == list(counts)  # insertion order too
    assert typo.co_occurrence == partners and list(typo.co_occurrence) == list(partners)

    # Default: the same questions, with "image" spelled right in the vowel template.
    fixed = P.build(_entries(records), seed=seed, images_per_split=n)
    for a, b in zip(fixed.questions.values(), expected.values(), strict=True):
        assert [dict(q, text=q["text"].replace("imange", "image")) for q in b] == a
    assert not any("imange" in q["text"] for qs in fixed.questions.values() for q in qs)

    # The files are the official ones byte for byte.
    files = P.render_build(typo, "coco")
    for split, rows in expected.items():
        assert files[f"coco_pope_{split}.json"] == "".join(json.dumps(q) + "\n" for q in rows).encode()
    assert files["coco_ground_truth_objects.json"] == json.dumps(counts).encode()
    assert files["coco_co_occur.json"] == json.dumps(partners).encode()


def test_where_official_would_hang_we_raise():
    # Two images of three objects from a 5-object vocabulary, two negatives each: enough negatives
    # exist only when the two sampled images share exactly one object.
    vocab = ["dog", "cat", "apple", "car", "bus"]
    rng = random.Random(5)
    records = [{"image": f"im{i}.jpg", "objects": rng.sample(vocab, 3)} for i in range(6)]
    outcomes = set()
    for seed in range(40):
        try:
            expected, _, _ = official_generator(records, seed, 2, sample_num=2)
        except _Hang:
            outcomes.add("hang")
            with pytest.raises(HalluError, match=r"image im\d\.jpg: no object is left"):
                P.build(_entries(records), seed=seed, images_per_split=2, sample_num=2)
            continue
        outcomes.add("ok")
        got = P.build(_entries(records), seed=seed, images_per_split=2, sample_num=2,
                      an_template=TEMPLATE.replace("a", "an"))
        assert got.questions == expected
    assert outcomes == {"hang", "ok"}


def test_some_seeds_exercise_the_fallbacks():
    """The comparison above is only meaningful if the random fallback of adversarial is hit."""
    records = synthetic_records()
    eligible = sum(len(r["objects"]) >= 3 for r in records)
    result = P.build(_entries(records), seed=0, images_per_split=eligible)
    kitchen = [q for q in result.questions["adversarial"] if q["image"].startswith("KITCHEN")]
    negatives = {q["text"] for q in kitchen if q["label"] == "no"}
    assert kitchen and not any(n in t for t in negatives for n in ("sink", "microwave", "toaster"))


def test_global_rng_untouched():
    state = random.getstate()
    P.build(_entries(synthetic_records()), seed=5, images_per_split=10)
    assert random.getstate() == state


# --------------------------------------------------------------------------------------------------
# Hand-checked tiny cases


TINY = [P.ImageObjects("i0", ("dog", "apple")), P.ImageObjects("i1", ("cat", "dog")),
        P.ImageObjects("i2", ("umbrella", "cat", "dog"))]


def _qa(rows):
    return [(q["image"], q["text"], q["label"]) for q in rows]


def test_tiny_seed1_by_hand():
    r = P.build(TINY, seed=1, images_per_split=3, sample_num=1)
    # CPython's Mersenne Twister: random.seed(1); random.sample(3 items, 3) -> indices 0, 2, 1.
    assert r.images == ["i0", "i2", "i1"]
    # Counts in first-seen order over the sampled images: dog 3, apple 1, umbrella 1, cat 2.
    assert list(r.ground_truth_objects.items()) == [("dog", 3), ("apple", 1), ("umbrella", 1), ("cat", 2)]
    # Popular order: dog, cat, then the tie apple/umbrella in first-seen order.
    assert _qa(r.questions["popular"]) == [
        ("i0", "Is there a dog in the image?", "yes"), ("i0", "Is there a cat in the image?", "no"),
        ("i2", "Is there an umbrella in the image?", "yes"), ("i2", "Is there an apple in the image?", "no"),
        ("i1", "Is there a cat in the image?", "yes"), ("i1", "Is there an apple in the image?", "no"),
    ]
    assert r.co_occurrence == {"dog": ["cat", "apple", "umbrella"], "apple": ["dog"],
                               "umbrella": ["cat", "dog"], "cat": ["dog", "umbrella"]}
    # Adversarial: umbrella's partners (cat, dog) are both in i2 -> random fallback, only apple is valid.
    assert _qa(r.questions["adversarial"]) == [
        ("i0", "Is there a dog in the image?", "yes"), ("i0", "Is there a cat in the image?", "no"),
        ("i2", "Is there an umbrella in the image?", "yes"), ("i2", "Is there an apple in the image?", "no"),
        ("i1", "Is there a cat in the image?", "yes"), ("i1", "Is there an umbrella in the image?", "no"),
    ]
    rnd = r.questions["random"]
    assert rnd[1]["text"] in ("Is there an umbrella in the image?", "Is there a cat in the image?")
    assert rnd[3]["text"] == "Is there an apple in the image?"
    assert [q["question_id"] for q in rnd] == [1, 2, 3, 4, 5, 6]


def test_tiny_seed0_ties_follow_sample_order():
    r = P.build(TINY, seed=0, images_per_split=3, sample_num=1)
    assert r.images == ["i1", "i2", "i0"]  # random.seed(0); random.sample(3 items, 3) -> 1, 2, 0
    # First seen: cat, dog, umbrella, apple -> popular order dog 3, cat 2, umbrella 1, apple 1.
    assert [q["text"] for q in r.questions["popular"] if q["label"] == "no"] == [
        "Is there an umbrella in the image?", "Is there an apple in the image?",
        "Is there a cat in the image?"]


def test_adversarial_takes_most_frequent_partner():
    data = [P.ImageObjects("a", ("fork", "knife")), P.ImageObjects("b", ("fork", "spoon")),
            P.ImageObjects("c", ("fork", "spoon"))]
    for seed in range(5):  # order-independent by construction
        r = P.build(data, seed=seed, images_per_split=3, sample_num=1)
        neg = {q["image"]: q["text"] for q in r.questions["adversarial"] if q["label"] == "no"}
        assert neg == {"a": "Is there a spoon in the image?", "b": "Is there a knife in the image?",
                       "c": "Is there a knife in the image?"}


def test_question_text_articles():
    assert P.question_text("apple") == "Is there an apple in the image?"
    assert P.question_text("umbrella") == "Is there an umbrella in the image?"
    assert P.question_text("orange") == "Is there an orange in the image?"
    assert P.question_text("dog") == "Is there a dog in the image?"
    assert P.question_text("skis") == "Is there a skis in the image?"  # no other grammar, as official
    assert P.question_text("Apple") == "Is there a Apple in the image?"  # lowercase vowels only
    assert P.question_text("umbrella", an_template=TEMPLATE.replace("a", "an")) == (
        "Is there an umbrella in the imange?")
    assert P.an_template_for("Do you see a {} here?") == "Do you see an {} here?"
    assert P.an_template_for("Is {} visible?") == "Is {} visible?"
    assert P.question_text("egg", "A {} is visible?") == "An egg is visible?"


def test_build_errors():
    with pytest.raises(HalluError, match=r"only 1 of 3 images have at least 3 objects; 3 images"):
        P.build(TINY, seed=0, images_per_split=3)
    same = [P.ImageObjects("x", ("a1", "b1", "c1")), P.ImageObjects("y", ("a1", "b1", "c1"))]
    with pytest.raises(HalluError, match="image [xy]: no object is left"):
        P.build(same, seed=0, images_per_split=2)
    with pytest.raises(HalluError, match="exactly one"):
        P.build(TINY, seed=0, images_per_split=1, sample_num=1, template="Is there a thing?")


# --------------------------------------------------------------------------------------------------
# Readers


def test_read_objects_file(tmp_path):
    f = tmp_path / "seg.json"
    f.write_text('{"image": "a.jpg", "objects": ["dog", "cat"], "score": 1}\r\n'
                 '{"image": "b.jpg", "objects": []}\n', encoding="utf-8")
    assert P.read_objects_file(f) == [P.ImageObjects("a.jpg", ("dog", "cat")), P.ImageObjects("b.jpg", ())]
    f.write_text('{"image": "a.jpg", "objects": ["dog", ""]}\n{"image": "b.jpg", "objects": []}\n')
    with pytest.raises(HalluError, match=r"seg.json:1: object names must be non-empty"):
        P.read_objects_file(f)
    f.write_text('{"image": "a.jpg", "objects": ["dog"]}\n{"img": "b.jpg"}\n')
    with pytest.raises(HalluError, match=r"seg.json:2: expected an object with 'image' and 'objects'"):
        P.read_objects_file(f)


def _coco(tmp_path):
    data = {
        "images": [{"id": 7, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"},
                   {"id": 9, "file_name": "empty.jpg"}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 17, "name": "cat"},
                       {"id": 62, "name": "chair"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 18}, {"id": 2, "image_id": 7, "category_id": 17},
            {"id": 3, "image_id": 3, "category_id": 1}, {"id": 4, "image_id": 3, "category_id": 18},
            {"id": 5, "image_id": 3, "category_id": 17},
            {"id": 6, "image_id": 7, "category_id": 62, "iscrowd": 1},
        ],
    }
    f = tmp_path / "instances_val2014.json"
    f.write_text(json.dumps(data))
    return f


def test_read_coco_instances(tmp_path, capsys):
    got = P.read_coco_instances(_coco(tmp_path))
    assert got == [P.ImageObjects("b.jpg", ("cat", "chair")),
                   P.ImageObjects("a.jpg", ("dog", "person", "cat")),
                   P.ImageObjects("empty.jpg", ())]
    assert capsys.readouterr().out == ""  # pycocotools' progress prints are swallowed


def test_read_coco_instances_errors(tmp_path):
    f = tmp_path / "x.json"
    f.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(HalluError, match="not a COCO instances file"):
        P.read_coco_instances(f)
    f.write_text(json.dumps({"images": [{"id": 1, "file_name": "a"}],
                             "categories": [{"id": 1, "name": "dog"}],
                             "annotations": [{"id": 1, "image_id": 1, "category_id": 5}]}))
    with pytest.raises(HalluError, match=r"annotations\[1\] has category_id 5"):
        P.read_coco_instances(f)


# --------------------------------------------------------------------------------------------------
# The command


def _app():
    app = typer.Typer()
    app.command()(prepare_pope.pope)
    return app


def _objects_file(tmp_path):
    f = tmp_path / "objects.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records()))
    return f


def test_cli_prepare_seeded(tmp_path):
    f = _objects_file(tmp_path)
    out = tmp_path / "pope"
    res = CliRunner().invoke(_app(), ["--objects", str(f), "--out", str(out), "--images-per-split", "12",
                                      "--seed", "3", "--dataset", "synth"])
    assert res.exit_code == 0, res.output
    expected, counts, partners = official_generator(synthetic_records(), 3, 12)
    for split, rows in expected.items():
        lines = (out / f"synth_pope_{split}.json").read_text().splitlines()
        assert [json.loads(x) for x in lines] == [dict(q, text=q["text"].replace("imange", "image"))
                                                  for q in rows]
    assert json.loads((out / "synth_ground_truth_objects.json").read_text()) == counts
    assert json.loads((out / "synth_co_occur.json").read_text()) == partners
    info = json.loads((out / "synth_build.json").read_text())
    assert info["settings"]["seed"] == 3 and info["settings"]["seed_given"] is True
    assert info["source"]["objects"] == str(f)
    assert sorted(p.name for p in out.iterdir()) == sorted(P.build_file_names("synth").values())


def test_cli_prepare_without_seed_records_it(tmp_path):
    f = _objects_file(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    res = CliRunner().invoke(_app(), ["--objects", str(f), "--out", str(a), "--images-per-split", "12"])
    assert res.exit_code == 0
    info = json.loads((a / "coco_build.json").read_text())
    assert info["settings"]["seed_given"] is False
    seed = info["settings"]["seed"]
    res = CliRunner().invoke(_app(), ["--objects", str(f), "--out", str(b), "--images-per-split", "12",
                                      "--seed", str(seed)])
    assert res.exit_code == 0
    for split in P.SPLITS:
        assert (a / f"coco_pope_{split}.json").read_bytes() == (b / f"coco_pope_{split}.json").read_bytes()


def test_cli_prepare_coco(tmp_path):
    extra = tmp_path / "more.json"
    data = json.loads(_coco(tmp_path).read_text())
    # Two more images so negatives exist: the sampled images' vocabulary must exceed each image's objects.
    data["images"] += [{"id": 11, "file_name": "c.jpg"}, {"id": 12, "file_name": "d.jpg"}]
    data["categories"] += [{"id": 44, "name": "bottle"}, {"id": 3, "name": "car"},
                           {"id": 5, "name": "airplane"}]
    data["annotations"] += [{"id": 20 + i, "image_id": im, "category_id": c} for i, (im, c) in
                            enumerate([(11, 44), (11, 3), (11, 5), (12, 3), (12, 5), (12, 1)])]
    extra.write_text(json.dumps(data))
    out = tmp_path / "o"
    res = CliRunner().invoke(_app(), ["--coco-instances", str(extra), "--out", str(out),
                                      "--images-per-split", "3", "--seed", "0"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "coco_pope_popular.json").read_text().splitlines()]
    assert len(rows) == 18
    a_jpg = [q["text"] for q in rows if q["image"] == "a.jpg" and q["label"] == "yes"]
    assert a_jpg == ["Is there a dog in the image?", "Is there a person in the image?",
                     "Is there a cat in the image?"]


@pytest.mark.parametrize("args, message", [
    (["--images-per-split", "500"], "images have at least 3 objects"),
    (["--coco-instances", "x.json"], "exactly one of --objects"),
    (["--dataset", "../x"], "--dataset"),
])
def test_cli_prepare_errors_write_nothing(tmp_path, args, message):
    f = _objects_file(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(_app(), ["--objects", str(f), "--out", str(out), "--images-per-split", "12",
                                      *args])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))
    res = CliRunner().invoke(_app(), ["--out", str(out)])
    assert res.exit_code == 2 and "exactly one of --objects" in res.stderr
