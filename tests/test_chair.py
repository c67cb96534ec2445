"""CHAIR scoring (hallu.evals.chair) against the official script's outputs, plus inputs and the CLI."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from hallu.commands import eval_chair
from hallu.errors import HalluError
from hallu.evals import chair as C

DATA = Path(__file__).parent / "data" / "chair"
ANN = DATA / "coco_annotations"
DEV_CAPTIONS = DATA / "dev_captions.jsonl"
DEV = json.loads((DATA / "dev_expected.json").read_text(encoding="utf-8"))["sentences"]


@pytest.fixture(scope="module")
def dev_gt():
    return C.CocoGroundTruth(ANN)


@pytest.fixture(scope="module")
def dev_result(dev_gt):
    return C.evaluate_file(DEV_CAPTIONS, ANN, ground_truth=dev_gt)


# --------------------------------------------------------------------------------------------------
# The official script's outputs


@pytest.mark.parametrize("k", range(len(DEV)), ids=[f"dev{s['key']}" for s in DEV])
def test_each_caption_matches_official(dev_result, k):
    exp, item = DEV[k], dev_result["items"][k]
    assert item["image_id"] == exp["image_id"] and item["caption"] == exp["caption"]
    assert item["words"] == exp["processed_words"]
    assert item["surface"] == exp["mscoco_words"]
    assert item["mentioned"] == exp["mscoco_generated_words"]
    assert item["object_idxs"] == exp["object_idxs"]
    assert item["hallucinated"] == exp["mscoco_hallucinated_words"]
    assert item["hallucination_idxs"] == exp["hallucination_idxs"]
    assert item["gt_objects"] == exp["mscoco_gt_words"]
    assert item["chair_s"] == exp["CHAIRs"]
    assert item["chair_i"] == pytest.approx(exp["CHAIRi"], abs=0, rel=1e-15)


def test_overall_metrics(dev_result):
    m, c = dev_result["metrics"], dev_result["counts"]
    # By hand from dev_expected.json: captions 1, 2, 4, 5, 10, 13 hallucinate (6 of 15); 38 mentions,
    # 6 of them hallucinated (cat, laptop, stop sign, fork, chair, dog).
    assert c["captions"] == 15 and c["images"] == 9
    assert c["captions_with_hallucination"] == 6
    assert c["mentions"] == 38 and c["hallucinated_mentions"] == 6
    assert m["chair_s"] == 6 / 15
    assert m["chair_i"] == 6 / 38
    # The same numbers re-derived from the official per-caption outputs.
    assert sum(s["CHAIRs"] for s in DEV) == c["captions_with_hallucination"]
    assert sum(len(s["mscoco_words"]) for s in DEV) == c["mentions"]
    assert sum(len(s["mscoco_hallucinated_words"]) for s in DEV) == c["hallucinated_mentions"]
    # OPERA's recall and len, from the official fields.
    recalled = sum(len(set(s["mscoco_generated_words"]) & set(s["mscoco_gt_words"])) for s in DEV)
    gt = sum(len(s["mscoco_gt_words"]) for s in DEV)
    assert (c["recalled_objects"], c["gt_objects"]) == (recalled, gt) == (30, 43)
    assert m["recall"] == 30 / 43
    words = sum(len(s["processed_words"]) for s in DEV)
    assert c["words"] == words == 168
    assert m["len"] == 0.01 * 168 / 15


def test_result_layout(dev_result):
    assert dev_result["benchmark"] == "chair"
    # The one EvalResult shape: the keys CHAIR always wrote, plus splits, counts, usage, notes, schema.
    assert set(dev_result) == {"schema", "benchmark", "metrics", "splits", "counts", "usage", "notes", "items",
                               "settings"}
    assert set(dev_result["metrics"]) == {"chair_s", "chair_i", "recall", "len"}
    assert dev_result["splits"] == {"all": {"metrics": dev_result["metrics"], "count": 15}}
    s = dev_result["settings"]
    assert s["normaliser"] == "pattern-3.6"
    assert s["parser"] == "chair-official" and s["request"] is None and s["model_fingerprint"] is None
    assert s["inputs"]["captions"]["sha256"] == s["captions_file"]["digest"]
    assert {k for k in s["inputs"] if k.startswith("annotations:")} == {f"annotations:{n}" for n in C.ANNOTATION_FILES}
    assert set(s["annotations"]) == set(C.ANNOTATION_FILES)
    assert all(d.startswith("sha256:") for d in s["annotations"].values())
    assert s["captions_file"]["digest"].startswith("sha256:")
    item = dev_result["items"][1]
    assert item["mentioned"] == ["dog", "cat", "frisbee"]
    assert item["hallucinated"] == [["cat", "cat"]]
    assert item["gt_objects"] == sorted(item["gt_objects"])
    json.dumps(dev_result)  # serialisable as is


def test_reference_captions_add_ground_truth(dev_gt):
    # Image 900005's masks hold an elephant only; its reference caption "two adults" adds person.
    assert dev_gt.objects(900005) == {"elephant", "person"}
    assert dev_gt.objects(900005) is dev_gt.objects(900005)  # computed once


# --------------------------------------------------------------------------------------------------
# A hand-built micro world for recall and len


def _write_coco(folder: Path, *, instances_val=None, instances_train=None, captions_val=None,
                captions_train=None):
    cats = json.loads((ANN / "instances_train2014.json").read_text())["categories"]
    by_name = {c["name"]: c["id"] for c in cats}

    def inst(images, anns):
        return {"images": [{"id": i, "file_name": f"COCO_x_{i:012d}.jpg"} for i in images],
                "annotations": [{"id": n + 1, "image_id": i, "category_id": by_name[name],
                                 "bbox": [0, 0, 1, 1]} for n, (i, name) in enumerate(anns)],
                "categories": cats}

    def caps(images, anns):
        return {"images": [{"id": i, "file_name": f"COCO_x_{i:012d}.jpg"} for i in images],
                "annotations": [{"id": n + 1, "image_id": i, "caption": text}
                                for n, (i, text) in enumerate(anns)]}

    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "instances_val2014.json": inst(*(instances_val or ([], []))),
        "instances_train2014.json": inst(*(instances_train or ([], []))),
        "captions_val2014.json": caps(*(captions_val or ([], []))),
        "captions_train2014.json": caps(*(captions_train or ([], []))),
    }
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj))
    return folder


@pytest.fixture
def micro(tmp_path):
    ann = _write_coco(
        tmp_path / "ann",
        instances_val=([10, 11, 12], [(10, "person"), (10, "frisbee"), (11, "car")]),
        instances_train=([1], [(1, "dog")]),
        # "A bus" singularizes to "bu" and adds nothing; "Two buses" adds bus.
        captions_val=([10, 11, 12], [(10, "A man with a frisbee."), (11, "A bus on the street."),
                                     (11, "Two buses."), (12, "An empty room.")]),
        captions_train=([1], [(1, "A puppy.")]),
    )
    records = [
        {"image_id": 10, "caption": "A man throws a frisbee to a dog."},  # 9 words, dog hallucinated
        {"image_id": 10, "caption": "A person and a man."},  # 6 words, person twice
        {"image_id": 11, "caption": "A red car."},  # 4 words
        {"image_id": 12, "caption": "A cat on a sofa."},  # 6 words, empty ground truth: both hallucinated
        {"image_id": 1, "caption": "nothing to see here"},  # 4 words, no mention
    ]
    return ann, records


def test_micro_metrics_by_hand(micro):
    ann, records = micro
    gt = C.CocoGroundTruth(ann)
    assert gt.objects(10) == {"person", "frisbee"}
    assert gt.objects(11) == {"car", "bus"}
    assert gt.objects(12) == frozenset()
    assert gt.objects(1) == {"dog"}
    r = C.evaluate(records, gt)
    m, c = r["metrics"], r["counts"]
    assert c["mentions"] == 3 + 2 + 1 + 2 + 0
    assert c["hallucinated_mentions"] == 1 + 2
    assert m["chair_i"] == 3 / 8
    assert m["chair_s"] == 2 / 5
    # Recall: distinct correct objects per caption (2, 1, 1, 0, 0) over ground-truth sizes (2, 2, 2, 0, 1).
    assert m["recall"] == 4 / 7
    assert [it["recalled"] for it in r["items"]] == [["frisbee", "person"], ["person"], ["car"], [], []]
    assert [it["recall"] for it in r["items"]] == [1.0, 0.5, 0.5, 0.0, 0.0]
    # Len: 0.01 x mean merged words per caption, punctuation included.
    assert c["words"] == 9 + 6 + 4 + 6 + 4
    assert m["len"] == pytest.approx(0.01 * 29 / 5)
    assert r["items"][3]["hallucinated"] == [["cat", "cat"], ["sofa", "couch"]]
    assert r["items"][3]["chair_i"] == 1.0 and r["items"][4]["chair_i"] == 0.0
    assert c["captions_with_mentions"] == 4 and c["images"] == 4


def test_no_mentions_at_all(micro):
    ann, _ = micro
    r = C.evaluate([{"image_id": 10, "caption": "Nothing here."}], C.CocoGroundTruth(ann))
    assert r["metrics"]["chair_i"] is None  # the official script divides by zero here
    assert r["metrics"]["chair_s"] == 0.0 and r["metrics"]["recall"] == 0.0


def test_unknown_image(micro):
    ann, _ = micro
    gt = C.CocoGroundTruth(ann)
    recs = [{"image_id": 77, "caption": "A dog.", "where": "caps.jsonl:3"}]
    with pytest.raises(HalluError, match=r"caps\.jsonl:3: image_id 77 is not in the COCO annotations"):
        C.evaluate(recs, gt)
    r = C.evaluate(recs, gt, unknown_images="empty")  # the official behaviour
    assert r["items"][0]["hallucinated"] == [["dog", "dog"]] and r["items"][0]["gt_objects"] == []
    with pytest.raises(HalluError, match="unknown_images"):
        C.evaluate(recs, gt, unknown_images="ignore")


# --------------------------------------------------------------------------------------------------
# Caption file formats


def _formats(tmp_path: Path, records: list[dict]) -> dict[str, Path]:
    out = {}
    out["list"] = tmp_path / "caps.json"
    out["list"].write_text(json.dumps(records))
    out["jsonl"] = tmp_path / "caps.jsonl"
    out["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))
    out["imgToEval"] = tmp_path / "official.json"
    out["imgToEval"].write_text(json.dumps({
        "overall": {"CIDEr": 1.0},
        "imgToEval": {str(i): {**r, "CIDEr": 0.5} for i, r in enumerate(records)},
    }))
    return out


def test_caption_formats_agree(tmp_path, micro):
    ann, records = micro
    gt = C.CocoGroundTruth(ann)
    results = {k: C.evaluate_file(p, ann, ground_truth=gt) for k, p in _formats(tmp_path, records).items()}
    metrics = {k: r["metrics"] for k, r in results.items()}
    assert metrics["list"] == metrics["jsonl"] == metrics["imgToEval"]
    assert [it["key"] for it in results["imgToEval"]["items"]] == ["0", "1", "2", "3", "4"]
    assert "key" not in results["list"]["items"][0]
    # A lone record (one-line JSONL parses as one JSON document) is one caption.
    lone = tmp_path / "one.jsonl"
    lone.write_text(json.dumps(records[0]) + "\n")
    r = C.evaluate_file(lone, ann, ground_truth=gt)
    assert r["counts"]["captions"] == 1 and r["items"][0]["hallucinated"] == [["dog", "dog"]]
    # OPERA's configurable keys, and image ids written as strings.
    custom = tmp_path / "custom.jsonl"
    custom.write_text("".join(json.dumps({"img": str(x["image_id"]), "text": x["caption"]}) + "\n"
                              for x in records))
    r = C.evaluate_file(custom, ann, image_id_key="img", caption_key="text", ground_truth=gt)
    assert r["metrics"] == metrics["list"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"no caption records"),
        ("[]", r"no caption records"),
        ('{"imgToEval": {}}', r"no caption records"),
        ('{"image_id": 10, "caption": "a"}\n{"image_id": 10}\n', r"caps\.jsonl:2: record has no 'caption'"),
        ('{"caption": "a"}\n', r"caps\.jsonl:1: record has no 'image_id'"),
        ('[{"image_id": 10, "caption": "a"}, 3]', r"caps\.jsonl: \[1\]: expected an object"),
        ('{"imgToEval": {"k7": {"caption": "a"}}}', r"imgToEval\['k7'\]: record has no 'image_id'"),
        ('{"imgToEval": [1]}', r"'imgToEval' must be an object"),
        ('{"image_id": "abc", "caption": "a"}', r"'image_id' is 'abc', expected a COCO image id"),
        ('{"image_id": true, "caption": "a"}', r"'image_id' is True"),
        ('{"image_id": 10, "caption": 5}', r"'caption' must be a string, got int"),
        ('{"sentences": []}', r"expected a JSON list or JSONL"),
        ('{"image_id": 10, "caption": "a"}\n{oops\n', r"caps\.jsonl:2: not valid JSON"),
    ],
)
def test_bad_caption_files(tmp_path, micro, content, message):
    ann, _ = micro
    path = tmp_path / "caps.jsonl"
    path.write_text(content)
    with pytest.raises(HalluError, match=message) as e:
        C.evaluate_file(path, ann)
    assert "\n" not in str(e.value)


def test_missing_captions_file(tmp_path):
    with pytest.raises(HalluError, match=r"nope\.jsonl: file not found"):
        C.load_captions(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("missing", C.ANNOTATION_FILES)
def test_missing_annotation_file(tmp_path, missing):
    folder = tmp_path / "ann"
    shutil.copytree(ANN, folder)
    (folder / missing).unlink()
    with pytest.raises(HalluError, match=rf"{missing}: missing; CHAIR needs"):
        C.CocoGroundTruth(folder)


def test_bad_annotation_folders(tmp_path):
    with pytest.raises(HalluError, match="no such folder"):
        C.CocoGroundTruth(tmp_path / "absent")
    folder = tmp_path / "ann"
    shutil.copytree(ANN, folder)
    inst = json.loads((folder / "instances_val2014.json").read_text())
    del inst["annotations"][3]["category_id"]
    (folder / "instances_val2014.json").write_text(json.dumps(inst))
    with pytest.raises(HalluError, match=r"instances_val2014\.json: annotations\[3\] has no 'category_id'"):
        C.CocoGroundTruth(folder)
    inst["annotations"][3]["category_id"] = 999
    (folder / "instances_val2014.json").write_text(json.dumps(inst))
    with pytest.raises(HalluError, match=r"instances_val2014\.json: annotation .* category_id 999"):
        C.CocoGroundTruth(folder)
    train = json.loads((folder / "instances_train2014.json").read_text())
    train["categories"][0]["name"] = "unicorn"
    (folder / "instances_train2014.json").write_text(json.dumps(train))
    with pytest.raises(HalluError, match=r"instances_train2014\.json: category 1 'unicorn' is not a COCO"):
        C.CocoGroundTruth(folder)
    (folder / "captions_val2014.json").write_text("[1, 2")
    with pytest.raises(HalluError, match=r"captions_val2014\.json:1: not valid JSON"):
        C.CocoGroundTruth(folder)
    (folder / "captions_val2014.json").write_text("[]")
    with pytest.raises(HalluError, match=r"captions_val2014\.json: not a COCO captions file"):
        C.CocoGroundTruth(folder)


# --------------------------------------------------------------------------------------------------
# Image selection (OPERA's protocol) and file -> image id


def test_select_images(tmp_path):
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(30, 0, -1)]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.jpg").mkdir()
    picked = C.select_images(tmp_path, n=5, seed=42)
    # OPERA: random.seed(seed); random.shuffle(listing); first n. Here the listing is sorted first.
    expected = sorted(names)
    random.seed(42)
    random.shuffle(expected)
    assert [p.name for p in picked] == expected[:5]
    assert C.select_images(tmp_path, n=5, seed=42) == picked  # reproducible
    assert C.select_images(tmp_path, n=5, seed=1) != picked
    assert len(C.select_images(tmp_path, n=500)) == 30
    with pytest.raises(HalluError, match="no such image folder"):
        C.select_images(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HalluError, match="no image files"):
        C.select_images(empty)


def test_image_id_for_file(dev_gt):
    assert C.image_id_for_file("/x/COCO_val2014_000000391895.jpg") == 391895
    assert C.image_id_for_file("000000000042.png") == 42
    assert C.image_id_for_file("SYNTH_000000900001.jpg", dev_gt.file_names) == 900001
    assert C.image_id_for_file("img7_v2.jpg", {"img7_v2.jpg": 123}) == 123
    assert C.image_id_for_file("img7_v2.jpg") == 2  # the last run of digits
    with pytest.raises(HalluError, match="cannot tell its COCO image id"):
        C.image_id_for_file("cat.jpg")


# --------------------------------------------------------------------------------------------------
# CLI


def _app():
    app = typer.Typer()
    app.command()(eval_chair.chair)
    return app


def test_cli_scores_and_writes_json(tmp_path, dev_result):
    out = tmp_path / "res" / "chair.json"
    res = CliRunner().invoke(_app(), ["--captions", str(DEV_CAPTIONS), "--coco-annotations", str(ANN),
                                      "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "CHAIR_s" in res.stdout and "40.0" in res.stdout and "15.8" in res.stdout
    saved = json.loads(out.read_text())
    assert saved["metrics"] == dev_result["metrics"]
    assert saved["items"] == dev_result["items"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--captions", str(DEV_CAPTIONS), "--coco-annotations", "/nonexistent/ann"], "no such folder"),
        (["--coco-annotations", str(ANN)], "--captions FILE is required"),
        (["--captions", str(DEV_CAPTIONS)], "--coco-annotations DIR is required"),
        (["--captions", str(DEV_CAPTIONS), "--coco-annotations", str(ANN), "--unknown-images", "skip"],
         "--unknown-images skip"),
    ],
)
def test_cli_bad_input_is_one_error_line(args, message):
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.stderr


def test_cli_bad_record(tmp_path):
    bad = tmp_path / "caps.jsonl"
    bad.write_text('{"image_id": 900001, "caption": "A dog."}\n{"image_id": 900001}\n')
    res = CliRunner().invoke(_app(), ["--captions", str(bad), "--coco-annotations", str(ANN)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}:2: record has no 'caption'" in lines[0], res.stderr


def test_cli_no_mentions_shows_na(tmp_path):
    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"image_id": 900001, "caption": "Nothing at all."}\n')
    res = CliRunner().invoke(_app(), ["--captions", str(caps), "--coco-annotations", str(ANN)])
    assert res.exit_code == 0, res.output
    assert "n/a" in res.stdout


# --------------------------------------------------------------------------------------------------
# One COCO category list


def test_one_coco_category_list():
    from hallu import coco, tiny
    from hallu.data import shapes
    from hallu.objects import get_matcher

    assert len(coco.CATEGORIES) == 80 and len({cid for cid, _, _ in coco.CATEGORIES}) == 80
    assert coco.CATEGORY_NAMES[:3] == ("person", "bicycle", "car") and coco.CATEGORIES[-1] == (90, "toothbrush",
                                                                                               "indoor")
    # CHAIR's shipped synonym table (an official asset) starts its 80 lines with the same names, in order.
    assert tuple(get_matcher().categories) == coco.CATEGORY_NAMES
    # The builders and tiny models use that one list, not copies of it.
    assert shapes.COCO_CATEGORIES is coco.CATEGORIES and tiny.COCO_CATEGORIES is coco.CATEGORY_NAMES
    # The test fixture's train file names its categories with the same ids.
    train = json.loads((ANN / "instances_train2014.json").read_text())
    by_id = {cid: name for cid, name, _ in coco.CATEGORIES}
    assert all(by_id[c["id"]] == c["name"] for c in train["categories"])
