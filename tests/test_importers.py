"""`hallu prepare SOURCE --from ...`: every importer on small files of its real format, written here.

Each test writes the files the way the released data sets lay them out, runs the CLI, and reads back
the records (through the validating reader), the images and the manifest.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from hallu.commands import app
from hallu.data import _importing as imp
from hallu.data import ha_dpo, opa_dpo, rlaif_v
from hallu.errors import HalluError
from hallu.records import PreferencePair, Prompt, export_pairs_trl, read_records, write_records

runner = CliRunner()


def _png(path: Path | None = None, colour=(200, 30, 30), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    data = buf.getvalue()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def _dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


def _prepare(*args: str):
    res = runner.invoke(app, ["prepare", *[str(a) for a in args]])
    return res, (res.output or "") + (getattr(res, "stderr", "") or "")


def _pairs(run: Path) -> list[PreferencePair]:
    return read_records(run / "data" / "pairs.jsonl", PreferencePair)


def _prompts(run: Path) -> list[Prompt]:
    return read_records(run / "data" / "prompts.jsonl", Prompt)


def _stage(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]["prepare"]


# --------------------------------------------------------------------------------------------------
# Streaming reader


def test_iter_records_streams_arrays_with_line_numbers(tmp_path):
    recs = [{"id": i, "text": "x" * (i * 7), "n": 10 ** i} for i in range(12)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(recs, indent=2), encoding="utf-8")
    lines = path.read_text().splitlines()
    # A chunk far smaller than one record forces records and numbers across buffer edges.
    got = list(imp.iter_records(path, chunk=5))
    assert [r for _, r in got] == recs
    for line, rec in got:
        assert lines[line - 1].strip() == "{" and f'"id": {rec["id"]},' in lines[line]
    nums = tmp_path / "n.json"
    nums.write_text("[1234567, 89]")
    assert [v for _, v in imp.iter_records(nums, chunk=3)] == [1234567, 89]
    # Streamed: the first record comes back without reading (or choking on) what follows it.
    lazy = tmp_path / "lazy.json"
    lazy.write_text('[{"id": 1},\n' + " " * 3_000_000 + "this is not JSON")
    assert imp.first_record(lazy) == {"id": 1}
    jl = tmp_path / "r.jsonl"
    jl.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(imp.iter_records(jl)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_iter_records_memory_stays_near_one_chunk(tmp_path):
    import tracemalloc

    path = tmp_path / "big.json"
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps({"id": i, "conversations": [{"from": "human", "value": "q" * 300},
                                                                          {"from": "gpt", "value": "a" * 300}]})
                                     for i in range(6000)) + "\n]\n")
    size = path.stat().st_size  # about 4 MB
    tracemalloc.start()
    count = sum(1 for _ in imp.iter_records(path, chunk=1 << 16))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 6000
    assert peak < size / 8, (peak, size)  # json.load would hold several times the file


@pytest.mark.parametrize("text, message", [
    ('[\n{"a": 1},\n{"a": 2,,}\n]', ":3: not valid JSON"),
    ('[{"a": 1},\n]', ":2: not valid JSON (a ',' before the closing ']')"),
    ('[{"a": 1}', "not valid JSON"),
    ('[{"a": 1}] x', "extra data after the array"),
    ("7", "expected a JSON array or JSON Lines"),
])
def test_iter_records_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(HalluError, match=None) as e:
        list(imp.iter_records(path, chunk=4))
    assert message in str(e.value) and str(path) in str(e.value)


# --------------------------------------------------------------------------------------------------
# HA-DPO


@pytest.fixture
def hadpo(tmp_path):
    vg = tmp_path / "VG"
    _png(vg / "VG_100K" / "1.jpg", (255, 0, 0))
    _png(vg / "VG_100K_2" / "2.jpg", (0, 255, 0))  # image 3 is listed but not downloaded
    _dump(vg / "image_data.json", [
        {"image_id": i, "url": f"https://cs.stanford.edu/people/rak248/{d}/{i}.jpg", "width": 24, "height": 16}
        for i, d in ((1, "VG_100K"), (2, "VG_100K_2"), (3, "VG_100K"))])
    desc = _dump(tmp_path / "desc_data.json", {
        str(i): {"chosen": [f"c{i}-{k}" for k in range(3)], "rejected": [f"r{i}-{k}" for k in range(3)]}
        for i in (1, 2, 3)})
    pope = _dump(tmp_path / "pope_data.json", [
        {"image_id": 1, "question": "Is there a cat in the image?", "chosen": "No, there is no cat.",
         "reject": "Yes, there is a cat.", "answer": "no", "correct": False},
        {"image_id": 2, "question": "Is there a dog in the image?", "chosen": "Yes.", "reject": "No.",
         "answer": "yes", "correct": True},
        {"image_id": 2, "question": "<image>\nIs there a tree?", "chosen": "Yes, a tree.", "reject": "No tree.",
         "answer": "yes", "correct": False},
    ])
    return vg, desc, pope


def test_ha_dpo_offline_pairs_skip_missing_and_correct(tmp_path, hadpo):
    vg, desc, pope = hadpo
    run = tmp_path / "run"
    res, out = _prepare("ha-dpo", "--from", desc, "--from", pope, "--vg", vg, "--out", run)
    assert res.exit_code == 0, out
    pairs = _pairs(run)
    by_id = {p.id: p for p in pairs}
    assert sorted(by_id) == ["hadpo-desc-1", "hadpo-desc-2", "hadpo-pope-0", "hadpo-pope-2"]
    d1 = by_id["hadpo-desc-1"]
    assert d1.prompt in ha_dpo.DESCRIBE_PROMPTS
    assert d1.chosen == f"c1-{d1.meta['chosen_variant']}" and d1.rejected == f"r1-{d1.meta['rejected_variant']}"
    assert d1.images == [str((vg / "VG_100K" / "1.jpg").resolve())]
    assert by_id["hadpo-desc-2"].images == [str((vg / "VG_100K_2" / "2.jpg").resolve())]
    p2 = by_id["hadpo-pope-2"]
    assert (p2.prompt, p2.chosen, p2.rejected) == ("Is there a tree?", "Yes, a tree.", "No tree.")
    st = _stage(run)
    assert st["status"] == "done"
    assert st["outputs"]["pairs"]["count"] == 4 and st["outputs"]["prompts"]["count"] == 4
    assert st["summary"]["skipped"] == {"missing image": 1} and st["summary"]["filtered"] == {"pope correct": 1}
    assert "VG_100K/3.jpg" in st["summary"]["examples"]["missing image"]
    # Same seed, same draw: a second import writes the same bytes.
    first = (run / "data" / "pairs.jsonl").read_bytes()
    run2 = tmp_path / "run2"
    assert _prepare("ha-dpo", "--from", desc, "--from", pope, "--vg", vg, "--out", run2)[0].exit_code == 0
    assert (run2 / "data" / "pairs.jsonl").read_bytes() == first


def test_ha_dpo_all_and_online_sampling(tmp_path, hadpo):
    vg, desc, _ = hadpo
    res, out = _prepare("ha-dpo", "--from", desc, "--vg", vg, "--sampling", "all", "--out", tmp_path / "a")
    assert res.exit_code == 0, out
    pairs = _pairs(tmp_path / "a")
    assert len(pairs) == 18  # 2 images x 3 chosen x 3 rejected
    assert {(p.chosen, p.rejected) for p in pairs if p.meta["image_id"] == 1} == {
        (f"c1-{i}", f"r1-{j}") for i in range(3) for j in range(3)}
    res, out = _prepare("ha-dpo", "--from", desc, "--vg", vg, "--sampling", "online", "--out", tmp_path / "o")
    assert res.exit_code == 0, out
    online = _pairs(tmp_path / "o")
    assert len(online) == 2 and online[0].meta["chosen_variants"] == ["c1-0", "c1-1", "c1-2"]
    res, out = _prepare("ha-dpo", "--from", desc, "--vg", vg, "--sampling", "sometimes", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "--sampling sometimes: unknown" in out and not (tmp_path / "x").exists()


def test_ha_dpo_list_variant_and_rejected_key(tmp_path, hadpo):
    # MiniGPT-4 / InstructBLIP copies: desc_data.json is a list, pope_data.json says "rejected".
    vg, _, _ = hadpo
    desc = _dump(tmp_path / "desc_list.json", [{"image_id": 2, "chosen": ["good"], "rejected": ["bad"]}])
    pope = _dump(tmp_path / "pope_ib.json", [{"image_id": 1, "question": "Is there a cat?", "chosen": "No.",
                                              "rejected": "Yes.", "answer": "no", "correct": False}])
    res, out = _prepare("ha-dpo", "--from", desc, "--from", pope, "--vg", vg, "--out", tmp_path / "run")
    assert res.exit_code == 0, out
    d, p = _pairs(tmp_path / "run")
    assert (d.id, d.chosen, d.rejected) == ("hadpo-desc-2", "good", "bad")
    assert (p.prompt, p.chosen, p.rejected) == ("Is there a cat?", "No.", "Yes.")
    other = _dump(tmp_path / "x.json", [{"id": 1, "image": "a.jpg", "conversations": []}])
    res, out = _prepare("ha-dpo", "--from", other, "--vg", vg, "--out", tmp_path / "run2")
    assert res.exit_code == 2 and "not a HA-DPO desc_data.json or pope_data.json" in out and "llava-665k" in out


def test_ha_dpo_strict_stops_and_writes_nothing(tmp_path, hadpo):
    vg, desc, pope = hadpo
    run = tmp_path / "run"
    res, out = _prepare("ha-dpo", "--from", desc, "--vg", vg, "--strict", "--out", run)
    assert res.exit_code == 2
    assert "image 3" in out and "VG_100K/3.jpg not found" in out and "Traceback" not in out
    assert not (run / "data").exists()
    assert _stage(run)["status"] == "failed"


# --------------------------------------------------------------------------------------------------
# OPA-DPO


def _opa_records() -> tuple[list[dict], bytes]:
    img = _png(None, (10, 120, 250), (20, 20))
    b64 = base64.b64encode(img).decode()
    report = {
        "image_description": "A blue square.",
        "0": {"copied_content": "There is a blue square.", "score": 4, "error_type": "correct",
              "object": [], "rewritten_content": "There is a blue square.", "reason": ""},
        "1": {"copied_content": "A dog sits next to it.", "score": "2", "error_type": "Image_recognition_error",
              "object": ["dog -> nothing"], "rewritten_content": "Nothing is next to it.", "reason": "no dog"},
        "Added": {"rewritten_content": "The background is white."},
    }
    good = {"query": "<image>\nDescribe the image.", "image_id": "coco/1.jpg",
            "standard_response": "A blue square on white.",
            "original_generate_response": "There is a blue square. A dog sits next to it.",
            "AI_generate_response": "There is a blue square. A dog sits next to it.",
            "AI_pseudo_response": "There is a blue square. Nothing is next to it. The background is white.",
            "AI_json_report": report, "image_bytes": b64}
    empty = {**good, "AI_json_report": ""}
    loop = {**good, "original_generate_response": "A square. A circle. A square."}
    twin = {**good, "query": "<image>\nWhat colour is it?"}
    return [good, empty, loop, twin], img


def test_opa_dpo_rollout_json(tmp_path):
    recs, img = _opa_records()
    src = _dump(tmp_path / "rollouts" / "step0_rank0.json", recs)
    run = tmp_path / "run"
    res, out = _prepare("opa-dpo", "--from", src, "--out", run)
    assert res.exit_code == 0, out
    pairs = _pairs(run)
    assert [p.prompt for p in pairs] == ["Describe the image.", "What colour is it?"]
    p = pairs[0]
    assert p.chosen == recs[0]["AI_pseudo_response"] and p.rejected == recs[0]["original_generate_response"]
    assert p.meta["gt"] == "A blue square on white."
    sents = p.meta["opa"]["sentences"]
    assert [(s["key"], s["score"], s["error_type"], s["score_weight"], s["image_weight"]) for s in sents] == [
        ("0", 4, "correct", 1.0, 1.0), ("1", 2, "image_recognition_error", 2.0, 3.0), ("Added", None, None, 1.0, 1.0)]
    # The image is written once, named by its content digest, and the pair points at it.
    name = hashlib.sha256(img).hexdigest() + ".png"
    assert sorted(x.name for x in (run / "data" / "images").iterdir()) == [name]
    assert (run / "data" / "images" / name).read_bytes() == img
    assert p.images == [f"images/{name}"] and pairs[1].images == p.images
    prompts = _prompts(run)
    assert prompts[0].reference == "A blue square on white."  # the GT, what rollout's reference should be
    # `hallu rollout --run RUN` finds these prompts and their images without --prompts.
    from hallu.manifest import Run
    from hallu.records import check_images
    from hallu.rollout import default_prompts

    assert default_prompts(Run(run)) == run / "data" / "prompts.jsonl"
    check_images(prompts, run / "data", "prompts.jsonl")  # the paths stay inside the data folder
    st = _stage(run)
    assert st["summary"]["filtered"] == {"empty report": 1, "degenerate original": 1}
    assert st["outputs"]["images"]["count"] == 1


def test_opa_dpo_saved_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    recs, _ = _opa_records()
    cols = {"queries": [], "image_bytes": [], "standard_response": [], "AI_pseudo_response": [],
            "original_generate_response": [], "AI_json_report": []}
    for r in (recs[0], recs[3]):
        cols["queries"].append(r["query"])
        for k in list(cols)[1:]:
            v = r[k]
            cols[k].append(json.dumps(v) if k == "AI_json_report" else v)
    folder = tmp_path / "opadpo_training_data-7B"
    datasets.Dataset.from_dict(cols).save_to_disk(str(folder))
    run = tmp_path / "run"
    res, out = _prepare("opa-dpo", "--from", folder, "--out", run)
    assert res.exit_code == 0, out
    pairs = _pairs(run)
    assert len(pairs) == 2 and pairs[0].meta["opa"]["sentences"][1]["image_weight"] == 3.0
    assert pairs[1].prompt == "What colour is it?"


def test_opa_report_normalisation_and_degenerate_rule():
    assert opa_dpo.normalise_score("3.0") == 3 and opa_dpo.normalise_score("x") is None
    assert opa_dpo.normalise_score(7) is None and opa_dpo.normalise_score(True) is None
    assert opa_dpo.is_degenerate("It is red. It is big. It is red.")
    assert not opa_dpo.is_degenerate("It is red. It is big.")
    assert opa_dpo.is_degenerate(" ".join(["word"] * 31)) and not opa_dpo.is_degenerate(" ".join(["word"] * 30))


def test_opa_dpo_bad_base64_names_the_record(tmp_path):
    recs, _ = _opa_records()
    src = _dump(tmp_path / "r.json", [recs[0], {**recs[0], "image_bytes": "not base64!!"}])
    res, out = _prepare("opa-dpo", "--from", src, "--out", tmp_path / "run")
    assert res.exit_code == 2 and f"{src}:" in out and "not valid base64" in out
    assert not (tmp_path / "run" / "data").exists()


# --------------------------------------------------------------------------------------------------
# MIA-DPO pairs


def test_mia_dpo_placeholders(tmp_path):
    _png(tmp_path / "img" / "coco" / "a.jpg")
    _png(tmp_path / "img" / "coco" / "b.jpg", (0, 0, 255))
    src = _dump(tmp_path / "mia.json", [
        {"id": 1, "image": "coco/a.jpg", "prompt": "<image>\nWhat is red?", "chosen": "A box.",
         "rejected": "A cat.", "gt": "A box."},
        {"id": 2, "image": ["coco/a.jpg", "coco/b.jpg"],
         "prompt": "Image1: <image-placeholder>\nImage2: <image-placeholder>\nIn Image2, what colour is it?",
         "chosen": "Blue.", "rejected": "Red.", "gt": "Blue."},
    ])
    run = tmp_path / "run"
    res, out = _prepare("mia-dpo", "--from", src, "--images", tmp_path / "img", "--out", run)
    assert res.exit_code == 0, out
    single, multi = _pairs(run)
    assert single.prompt == "What is red?" and len(single.images) == 1
    assert multi.prompt == "Image1: <image>\nImage2: <image>\nIn Image2, what colour is it?"
    assert multi.images == [str((tmp_path / "img" / "coco" / n).resolve()) for n in ("a.jpg", "b.jpg")]
    assert multi.meta["bucket"] == "coco" and multi.meta["gt"] == "Blue."
    bad = _dump(tmp_path / "bad.json", [{"id": 7, "image": ["coco/a.jpg", "coco/b.jpg"],
                                         "prompt": "<image> one tag", "chosen": "a", "rejected": "b"}])
    res, out = _prepare("mia-dpo", "--from", bad, "--images", tmp_path / "img", "--out", tmp_path / "r2")
    assert res.exit_code == 2 and f"{bad}:2: record 7" in out and "1 <image> placeholders but 2 images" in out


def test_wrong_format_says_what_it_looks_like(tmp_path):
    recs, _ = _opa_records()
    src = _dump(tmp_path / "step0_rank0.json", recs[:1])
    res, out = _prepare("mia-dpo", "--from", src, "--out", tmp_path / "run")
    assert res.exit_code == 2 and "not a MIA-DPO record" in out and "looks like opa-dpo" in out
    pope = _dump(tmp_path / "pope_data.json", [{"image_id": 1, "question": "q", "chosen": "a", "reject": "b",
                                                "answer": "no", "correct": False}])
    res, out = _prepare("pairs", "--from", pope, "--out", tmp_path / "run2")
    assert res.exit_code == 2 and "looks like ha-dpo (pope_data.json)" in out
    res, out = _prepare("llava-665k", "--from", pope, "--out", tmp_path / "run3")
    assert res.exit_code == 2 and "missing 'conversations'" in out and "ha-dpo" in out


# --------------------------------------------------------------------------------------------------
# RLAIF-V


def _rlaif_shards(folder: Path, rows: int = 10) -> list[bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    imgs = [_png(None, (i * 20, 0, 0)) for i in range(rows)]
    origins = ["vqav2"] * 6 + ["coco"] * 4
    table = pa.table({
        "ds_name": ["RLAIF-V"] * rows,
        "image": [{"bytes": imgs[i], "path": f"{i}.jpg"} for i in range(rows)],
        "question": [f"question {i}?" for i in range(rows)],
        "chosen": [f"good {i}" for i in range(rows)],
        "rejected": [f"bad {i}" for i in range(rows)],
        "origin_dataset": origins[:rows],
        "origin_split": ["train"] * rows,
        "idx": list(range(rows)),
        "image_path": [f"{i}.jpg" for i in range(rows)],
        "logps": [[-1.5 - i, -2.5 - i] for i in range(rows)],
    })
    pq.write_table(table.slice(0, 7), folder / "RLAIF-V-Dataset_000.parquet")
    pq.write_table(table.slice(7), folder / "RLAIF-V-Dataset_001.parquet")
    return imgs


def test_rlaif_v_parquet_and_stratified_subset(tmp_path):
    imgs = _rlaif_shards(tmp_path / "rlaif")
    run = tmp_path / "run"
    res, out = _prepare("rlaif-v", "--from", tmp_path / "rlaif", "--out", run)
    assert res.exit_code == 0, out
    pairs = _pairs(run)
    assert [p.chosen for p in pairs] == [f"good {i}" for i in range(10)]
    assert pairs[8].id == "rlaifv-RLAIF-V-Dataset_001-1" and pairs[8].meta["origin_dataset"] == "coco"
    assert pairs[8].meta["logps"] == [-9.5, -10.5] and pairs[8].meta["idx"] == 8
    assert (run / "data" / pairs[3].images[0]).read_bytes() == imgs[3]
    assert len(list((run / "data" / "images").iterdir())) == 10
    res, out = _prepare("rlaif-v", "--from", tmp_path / "rlaif", "--subset", "5", "--out", tmp_path / "sub")
    assert res.exit_code == 0, out
    sub = _pairs(tmp_path / "sub")
    assert sorted(p.meta["origin_dataset"] for p in sub) == ["coco", "coco", "vqav2", "vqav2", "vqav2"]
    assert len(list((tmp_path / "sub" / "data" / "images").iterdir())) == 5  # only the kept rows' images
    assert _stage(tmp_path / "sub")["summary"]["filtered"] == {"not in --subset": 5}


def test_stratified_subset_keeps_shares_and_is_seeded():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    pick = rlaif_v.stratified_subset(labels, 10, seed=42)
    assert pick == sorted(pick) and len(set(pick)) == 10
    assert [sum(labels[i] == g for i in pick) for g in "abc"] == [5, 3, 2]
    assert rlaif_v.stratified_subset(labels, 10, seed=42) == pick
    assert rlaif_v.stratified_subset(labels, 10, seed=7) != pick
    # 7 of (5, 3, 2)/10: exact shares 3.5, 2.1, 1.4 -> floors 3, 2, 1 and the largest remainder (a) gets one more
    small = ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    assert sorted(small[i] for i in rlaif_v.stratified_subset(small, 7, 0)) == list("aaaabbc")
    assert rlaif_v.stratified_subset(small, 99, 0) == list(range(10))


def test_rlaif_v_rejects_a_parquet_of_another_shape(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "x").mkdir()
    pq.write_table(pa.table({"query": ["q"], "answer": ["a"]}), tmp_path / "x" / "part.parquet")
    res, out = _prepare("rlaif-v", "--from", tmp_path / "x", "--out", tmp_path / "run")
    assert res.exit_code == 2 and "not an RLAIF-V shard (no column question, chosen, rejected, image)" in out
    hadpo_json = _dump(tmp_path / "pope_data.json", [{"image_id": 1, "question": "q", "chosen": "a", "reject": "b"}])
    res, out = _prepare("rlaif-v", "--from", hadpo_json, "--out", tmp_path / "run")
    assert res.exit_code == 2 and "not a parquet file" in out and "looks like ha-dpo (pope_data.json)" in out
    _rlaif_shards(tmp_path / "shards", rows=2)
    res, out = _prepare("opa-dpo", "--from", tmp_path / "shards", "--out", tmp_path / "run")
    assert res.exit_code == 2 and "hallu prepare rlaif-v" in out


# --------------------------------------------------------------------------------------------------
# LLaVA-665k


def test_llava_665k_conversations(tmp_path):
    _png(tmp_path / "img" / "coco" / "train2017" / "1.jpg")
    _png(tmp_path / "img" / "gqa" / "images" / "2.jpg")
    src = _dump(tmp_path / "llava_v1_5_mix665k.json", [
        {"id": "000000001", "image": "coco/train2017/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A red box."},
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": "Red."}]},
        {"id": "text-1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "000000001", "image": "gqa/images/2.jpg", "conversations": [
            {"from": "human", "value": "Is it sunny?\n<image>"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "3", "image": "vg/VG_100K/3.jpg", "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
    ])
    run = tmp_path / "run"
    res, out = _prepare("llava-665k", "--from", src, "--images", tmp_path / "img", "--out", run)
    assert res.exit_code == 0, out
    a, b = _prompts(run)
    assert (a.id, a.question, a.reference) == ("000000001", "What is in the picture?", "A red box.")
    conversation = [{"role": "user", "text": "What is in the picture?"}, {"role": "assistant", "text": "A red box."},
                    {"role": "user", "text": "What colour is it?"}, {"role": "assistant", "text": "Red."}]
    assert a.meta["conversation"] == conversation and "turns" not in a.meta
    assert a.meta["bucket"] == "coco" and b.meta["bucket"] == "gqa"
    assert (b.id, b.question, b.meta["original_id"]) == ("000000001~2", "Is it sunny?", "000000001")
    s = _stage(run)["summary"]
    assert s["filtered"] == {"text-only": 1} and s["skipped"] == {"missing image": 1}
    assert s["renamed_duplicate_ids"] == 1
    assert f"{src}:" in s["examples"]["missing image"]
    # --turns all: the prompt asks the last question after the earlier turns, as rollout answers it.
    res, out = _prepare("llava-665k", "--from", src, "--images", tmp_path / "img", "--turns", "all",
                        "--out", tmp_path / "all")
    assert res.exit_code == 0, out
    a = _prompts(tmp_path / "all")[0]
    assert (a.question, a.reference, a.meta["turns"]) == ("What colour is it?", "Red.", conversation[:3])
    from hallu.rollout import request_of

    req = request_of(a)
    assert list(req.history) == conversation[:2] and req.text == "What colour is it?"
    res, out = _prepare("llava-665k", "--from", src, "--turns", "some", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "--turns some: unknown" in out


def test_llava_tag_count_mismatch_names_file_and_line(tmp_path):
    _png(tmp_path / "img" / "1.jpg")
    src = tmp_path / "l.json"
    src.write_text('[\n{"id": "ok", "image": "1.jpg", "conversations": [{"from": "human", "value": "<image>q"},'
                   ' {"from": "gpt", "value": "a"}]},\n{"id": "two", "image": "1.jpg", "conversations": '
                   '[{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}]}\n]')
    run = tmp_path / "run"
    res, out = _prepare("llava-665k", "--from", src, "--images", tmp_path / "img", "--out", run)
    assert res.exit_code == 2 and f"{src}:3: record two: 2 <image> tags" in out and "1 image(s)" in out
    assert not (run / "data").exists()


# --------------------------------------------------------------------------------------------------
# COCO and Visual Genome


def _coco_files(tmp_path: Path) -> tuple[Path, Path]:
    images = [{"id": 9, "file_name": "COCO_val2014_000000000009.jpg", "width": 24, "height": 16},
              {"id": 4, "file_name": "COCO_val2014_000000000004.jpg", "width": 24, "height": 16}]
    for im in images:
        _png(tmp_path / "val2014" / im["file_name"])
    cats = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 18, "name": "dog", "supercategory": "a"}]
    inst = _dump(tmp_path / "instances_val2014.json", {"images": images, "categories": cats, "annotations": [
        {"id": 1, "image_id": 9, "category_id": 18, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 0},
        {"id": 2, "image_id": 9, "category_id": 1, "bbox": [5, 6, 7, 8], "area": 56, "iscrowd": 0},
        {"id": 3, "image_id": 9, "category_id": 18, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0}]})
    caps = _dump(tmp_path / "captions_val2014.json", {"images": images, "annotations": [
        {"id": 10, "image_id": 9, "caption": "A dog and a man. "}, {"id": 11, "image_id": 9, "caption": "Two dogs."},
        {"id": 12, "image_id": 4, "caption": "An empty room."}]})
    return inst, caps


def test_coco_instances_and_captions(tmp_path):
    inst, caps = _coco_files(tmp_path)
    run = tmp_path / "run"
    res, out = _prepare("coco", "--from", caps, "--from", inst, "--images", tmp_path / "val2014", "--out", run)
    assert res.exit_code == 0, out
    assert "loading annotations" not in res.stdout  # pycocotools' prints stay off stdout
    four, nine = _prompts(run)
    assert (four.id, four.objects, four.reference) == ("coco-4", [], "An empty room.")
    assert nine.objects == ["dog", "person"] and nine.meta["captions"] == ["A dog and a man.", "Two dogs."]
    assert nine.regions[1] == {"x": 5, "y": 6, "width": 7, "height": 8, "phrase": "person"}
    res, out = _prepare("coco", "--from", caps, "--from", caps, "--images", tmp_path / "val2014", "--out", run)
    assert res.exit_code == 2 and "a second COCO captions file" in out


def test_vg_regions(tmp_path):
    vg = tmp_path / "VG"
    _png(vg / "VG_100K" / "1.jpg")
    imgdata = _dump(vg / "image_data.json", [{"image_id": 1, "url": "http://x/VG_100K/1.jpg", "width": 24,
                                              "height": 16, "coco_id": None, "flickr_id": 5},
                                             {"image_id": 2, "url": "http://x/VG_100K/2.jpg", "width": 24,
                                              "height": 16, "coco_id": 77, "flickr_id": None}])
    regions = _dump(vg / "region_descriptions.json", [
        {"id": 1, "regions": [{"region_id": 5, "image_id": 1, "x": 1, "y": 2, "width": 3, "height": 4,
                               "phrase": "a red box"}]},
        {"id": 2, "regions": [{"region_id": 6, "image_id": 2, "x": 0, "y": 0, "width": 1, "height": 1,
                               "phrase": "sky"}]}])
    objects = _dump(vg / "objects.json", [{"image_id": 1, "objects": [
        {"object_id": 1, "x": 1, "y": 2, "w": 3, "h": 4, "names": ["box"]},
        {"object_id": 2, "x": 0, "y": 0, "w": 2, "h": 2, "names": ["table", "box"]},
        {"object_id": 3, "x": 0, "y": 0, "w": 2, "h": 2, "name": "cup"}]}])
    run = tmp_path / "run"
    res, out = _prepare("vg", "--from", imgdata, "--from", regions, "--from", objects, "--out", run)
    assert res.exit_code == 0, out
    (p,) = _prompts(run)
    assert p.id == "vg-1" and p.regions == [{"x": 1, "y": 2, "width": 3, "height": 4, "phrase": "a red box"}]
    assert p.objects == ["box", "table", "cup"]
    assert p.images == [str((vg / "VG_100K" / "1.jpg").resolve())]
    assert _stage(run)["summary"]["skipped"] == {"missing image": 1}
    res, out = _prepare("vg", "--from", imgdata, "--out", tmp_path / "r2")
    assert res.exit_code == 2 and "give both image_data.json and region_descriptions.json" in out


# --------------------------------------------------------------------------------------------------
# Existing pairs


def test_pairs_trl_round_trip_and_llama_factory(tmp_path):
    _png(tmp_path / "d" / "a.png")
    _png(tmp_path / "d" / "b.png", (0, 0, 255))
    original = [
        PreferencePair(id="p1", images=["a.png"], prompt="What is red?", chosen="A box.", rejected="A cat."),
        PreferencePair(id="p2", images=["a.png", "b.png"], prompt="Compare <image> with <image>.",
                       chosen="Red vs blue.", rejected="Same."),
        PreferencePair(id="p3", images=["b.png", "a.png"], prompt="Describe both.", chosen="Two.", rejected="One."),
    ]
    write_records(tmp_path / "d" / "mine.jsonl", original)
    export_pairs_trl(tmp_path / "d" / "mine.jsonl", tmp_path / "d" / "trl.jsonl")
    run = tmp_path / "run"
    res, out = _prepare("pairs", "--from", tmp_path / "d" / "trl.jsonl", "--out", run)
    assert res.exit_code == 0, out
    back = _pairs(run)
    assert [(p.id, p.prompt, p.chosen, p.rejected) for p in back] == [
        (p.id, p.prompt, p.chosen, p.rejected) for p in original]
    assert back[1].images == [str((tmp_path / "d" / n).resolve()) for n in ("a.png", "b.png")]
    lf = _dump(tmp_path / "d" / "lf.json", [{"conversations": [{"from": "human", "value": "<image>Describe."}],
                                             "chosen": {"from": "gpt", "value": "Red."},
                                             "rejected": {"from": "gpt", "value": "Blue."}, "images": ["b.png"]}])
    res, out = _prepare("pairs", "--from", lf, "--out", tmp_path / "run2")
    assert res.exit_code == 0, out
    (p,) = _pairs(tmp_path / "run2")
    assert (p.prompt, p.chosen, p.rejected, p.meta["style"]) == ("Describe.", "Red.", "Blue.", "llama-factory")


def test_failed_import_leaves_the_previous_one(tmp_path, hadpo):
    vg, desc, pope = hadpo
    run = tmp_path / "run"
    assert _prepare("ha-dpo", "--from", desc, "--from", pope, "--vg", vg, "--out", run)[0].exit_code == 0
    before = {p.name: p.read_bytes() for p in (run / "data").iterdir()}
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image_id": 1, "question": "q", "chosen": "a", "reject": "b", "correct": false},\n{')
    res, out = _prepare("ha-dpo", "--from", desc, "--from", broken, "--vg", vg, "--out", run)
    assert res.exit_code == 2 and "broken.json" in out
    assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == before
    assert not [p for p in run.iterdir() if "staging" in p.name]


def test_another_prepare_sets_the_earlier_data_aside(tmp_path, hadpo):
    vg, desc, pope = hadpo
    run = tmp_path / "run"
    assert _prepare("ha-dpo", "--from", desc, "--from", pope, "--vg", vg, "--out", run)[0].exit_code == 0
    pairs_before = (run / "data" / "pairs.jsonl").read_bytes()
    inst, caps = _coco_files(tmp_path)
    res, out = _prepare("coco", "--from", inst, "--from", caps, "--images", tmp_path / "val2014", "--out", run)
    assert res.exit_code == 0, out
    assert "data.previous-1" in out
    assert (run / "data.previous-1" / "pairs.jsonl").read_bytes() == pairs_before
    assert sorted(p.name for p in (run / "data").iterdir()) == ["prompts.jsonl"]  # no stale pairs file
    st = _stage(run)
    assert st["options"]["dataset"] == "coco" and "pairs" not in st["outputs"]
