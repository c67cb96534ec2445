"""`hallu eval pope | chair | shr --model`: answers from a tiny model on the shapes world, stored, rescored."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from openai_server import FakeOpenAIServer, Reply
from typer.testing import CliRunner

from hallu.commands import app
from hallu.manifest import Run
from hallu.models import load_model
from hallu.records import read_eval_result, user_messages

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    assert cli("prepare", "shapes", "--out", root / "w", "--images", 60, "--seed", 2).exit_code == 0
    assert cli("prepare", "tiny-model", "--family", "llava", "--out", root / "model").exit_code == 0
    r = cli("prepare", "pope", "--objects", root / "w" / "data" / "pope" / "objects.jsonl", "--out", root / "pope",
            "--images-per-split", 4, "--seed", 0, "--dataset", "shapes")
    assert r.exit_code == 0, r.output
    return root


def _splits(world):
    return [world / "pope" / f"shapes_pope_{s}.json" for s in ("random", "popular", "adversarial")]


def _pope(world, out, *extra, model=None):
    args = ["eval", "pope", "--model", model or world / "model", "--images", world / "w" / "data" / "images",
            "--out", out, "--max-new-tokens", 6]
    for q in _splits(world):
        args += ["--questions", q]
    return cli(*args, *extra)


def test_pope_generate_scores_three_splits_and_asks_shared_questions_once(world, tmp_path):
    out = tmp_path / "pope"
    model = tmp_path / "model"
    shutil.copytree(world / "model", model)
    r = _pope(world, out, model=model)
    assert r.exit_code == 0, r.output
    result = json.loads((out / "results.json").read_text())
    assert list(result["splits"]) == ["shapes_pope_random", "shapes_pope_popular", "shapes_pope_adversarial"]
    assert all(s["count"] == 24 for s in result["splits"].values())
    assert len(result["items"]) == 72
    gens = (out / "generations.jsonl").read_text().splitlines()
    questions = {(q["image"], q["text"]) for f in _splits(world) for q in map(json.loads, f.read_text().splitlines())}
    assert len(gens) == len(questions) < 72, "a question asked in several splits is generated once"
    s = result["settings"]
    assert s["mode"] == "generate" and s["parser"] == "pope-official" and s["decoding"]["max_new_tokens"] == 6
    assert s["model_fingerprint"].startswith("sha256:") and s["chat_template_sha256"].startswith("sha256:")
    assert "Is there a" in s["prompt_example"]
    assert all(v["sha256"].startswith("sha256:") for v in s["questions"].values())
    # The one EvalResult shape: what was asked, of which model, on which inputs.
    loaded = read_eval_result(out)
    assert loaded.missing_settings() == [] and loaded.metrics == result["mean"]
    assert s["request"] == {"prompt": "{question}", "mode": "generate", "decoding": s["decoding"],
                            "chat_template_sha256": s["chat_template_sha256"]}
    assert s["model_fingerprint"] == Run(out).read()["stages"]["eval-pope"]["options"]["model_fingerprint"]
    assert {k for k in s["inputs"]} == {f"questions:{split}" for split in result["splits"]}

    # The stored answers are what one-at-a-time generation gives.
    lm = load_model(world / "model")
    from hallu.records import load_image

    for item in result["items"][:6]:
        q = next(json.loads(x) for x in _splits(world)[0].read_text().splitlines()
                 if json.loads(x)["question_id"] == item["question_id"])
        prompt = lm.processor.apply_chat_template(user_messages(q["text"], 1), add_generation_prompt=True,
                                                  tokenize=False)
        enc = lm.processor(images=[load_image(world / "w" / "data" / "images" / q["image"])], text=[prompt],
                           return_tensors="pt")
        with torch.inference_mode():
            o = lm.model.generate(**enc, max_new_tokens=6, do_sample=False)
        assert item["answer"] == lm.processor.tokenizer.decode(o[0, enc["input_ids"].shape[1]:],
                                                               skip_special_tokens=True).strip()

    # Rescoring needs neither the model nor the images: only the run folder.
    shutil.rmtree(model)
    r = cli("eval", "pope", "--rescore", "--out", out, "--parser", "strict")
    assert r.exit_code == 0, r.output
    rescored = json.loads((out / "results.json").read_text())
    assert rescored["parser"] == "strict"
    assert [i["answer"] for i in rescored["items"]] == [i["answer"] for i in result["items"]]
    assert Run(out).views()[0].status == "done"

    # A changed question file makes the stored answers unusable: refused, and the run stays as it was.
    questions = json.loads((out / "manifest.json").read_text())["stages"]["eval-pope"]["options"]["questions"]
    q0 = Path(questions[0])
    original = q0.read_bytes()
    try:
        q0.write_bytes(original.replace(b"Is there", b"Is there really", 1))
        manifest = (out / "manifest.json").read_bytes()
        r = cli("eval", "pope", "--rescore", "--out", out)
        assert r.exit_code == 2 and "questions_0 changed since the run" in r.output
        assert (out / "manifest.json").read_bytes() == manifest
    finally:
        q0.write_bytes(original)


def test_pope_choice_mode(world, tmp_path):
    out = tmp_path / "choice"
    r = _pope(world, out, "--mode", "choice")
    assert r.exit_code == 0, r.output
    result = json.loads((out / "results.json").read_text())
    assert result["settings"]["mode"] == "choice" and result["settings"]["choices"] == ["Yes", "No"]
    assert any("mode=choice" in n for n in result["notes"])
    assert {i["answer"] for i in result["items"]} <= {"Yes", "No"}
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert all(g["text"] == max(g["scores"], key=g["scores"].get) for g in gens)


def test_pope_generation_resumes_from_a_torn_store(world, tmp_path):
    full = tmp_path / "full"
    assert _pope(world, full).exit_code == 0
    expected = (full / "generations.jsonl").read_bytes()
    part = tmp_path / "part"
    shutil.copytree(full, part)
    lines = expected.splitlines(keepends=True)
    (part / "generations.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][:10])
    assert _pope(world, part).exit_code == 0
    assert (part / "generations.jsonl").read_bytes() == expected


def test_pope_model_mode_bad_inputs(world, tmp_path):
    r = cli("eval", "pope", "--model", world / "model", "--questions", _splits(world)[0], "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--images DIR is required" in r.output
    r = cli("eval", "pope", "--model", world / "model", "--questions", _splits(world)[0], "--out", tmp_path / "o",
            "--images", tmp_path)
    assert r.exit_code == 2 and "image" in r.output and "not found" in r.output
    r = cli("eval", "pope", "--rescore", "--out", tmp_path / "nothing")
    assert r.exit_code == 2 and "no 'eval-pope' run with a model here to rescore" in r.output


def test_chair_with_a_model(world, tmp_path):
    out = tmp_path / "chair"
    data = world / "w" / "data"
    r = cli("eval", "chair", "--model", world / "model", "--images", data / "images", "--coco-annotations",
            data / "annotations", "--out", out, "--n-images", 8, "--max-new-tokens", 12)
    assert r.exit_code == 0, r.output
    result = json.loads((out / "results.json").read_text())
    assert result["counts"]["captions"] == 8 and len(result["settings"]["images"]["files"]) == 8
    assert result["settings"]["prompt"] == "Please describe this image in detail."
    assert result["settings"]["images"]["seed"] == 42
    loaded = read_eval_result(out)
    assert loaded.missing_settings() == [] and loaded.splits["all"]["count"] == 8
    assert loaded.settings["request"]["prompt"] == "Please describe this image in detail."
    assert loaded.settings["model_fingerprint"].startswith("sha256:")
    before = result["metrics"]
    r = cli("eval", "chair", "--rescore", "--out", out)
    assert r.exit_code == 0 and json.loads((out / "results.json").read_text())["metrics"] == before


def test_shr_with_a_model_and_a_loopback_judge(world, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-123")
    data = world / "w" / "data"
    out = tmp_path / "shr"
    with FakeOpenAIServer() as server:
        # Responses of a random model have any number of sentences; a one-line judgement fits the ones
        # with one sentence and leaves the others unclassified (the official count-mismatch rule).
        server.on(lambda req: True, Reply("Judgement:\n1. correct: fine"))
        args = ["eval", "shr", "--model", world / "model", "--images", data / "images", "--vg", data / "vg",
                "--facts", data / "vg" / "facts.jsonl", "--image-list", data / "vg" / "val_images_final.json",
                "--out", out, "--max-new-tokens", 8, "--num-beams", 2, "--base-url", server.base_url]
        r = cli(*args)
        assert r.exit_code == 0, r.output
        n_requests = len(server.requests)
        result = json.loads((out / "results.json").read_text())
        assert result["counts"]["images"] == 12 and n_requests >= 1
        assert result["settings"]["generation"]["decoding"]["num_beams"] == 2
        loaded = read_eval_result(out)
        assert loaded.missing_settings() == [] and loaded.splits["all"]["count"] == 12
        assert loaded.settings["request"]["decoding"]["num_beams"] == 2
        assert loaded.settings["model_fingerprint"].startswith("sha256:")
        assert set(loaded.settings["inputs"]) == {"image_data", "facts_0"}
        r = cli(*args)
        assert r.exit_code == 0 and len(server.requests) == n_requests, "a rerun makes no new judge calls"
    for f in out.iterdir():
        if f.is_file():
            assert "sk-test-secret-123" not in f.read_text(errors="ignore"), f"the API key leaked into {f.name}"
