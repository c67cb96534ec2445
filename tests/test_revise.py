"""The revise stage through the CLI: revisions and pairs that reload, resume, and one clear line per bad input."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from hallu.commands import app
from hallu.manifest import Run
from hallu.methods import opa_dpo
from hallu.objects import node_words
from hallu.records import PreferencePair, Prompt, Response, Revision, read_records

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error_line(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {result.output!r}"
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("revise") / "world"
    r = cli("prepare", "shapes", "--out", root, "--images", 8, "--seed", 2)
    assert r.exit_code == 0, r.output
    return root


def _responses(world, path, prompts=None):
    """Two samples per caption prompt: the clean reference, and the reference plus one absent object."""
    prompts = prompts or read_records(world / "data" / "prompts.jsonl", Prompt)
    rows = []
    for p in prompts:
        rows.append(Response(id=f"{p.id}#0", prompt_id=p.id, sample=0, text=p.reference, model="m").to_dict())
        extra = "There is a giraffe in the corner." if "giraffe" not in p.objects else "There is a zebra."
        rows.append(Response(id=f"{p.id}#1", prompt_id=p.id, sample=1, text=f"{p.reference} {extra}",
                             model="m").to_dict())
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prompts


def _run(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world, run)
    return run


def test_annotations_dpo_pairs_reload_and_rerun_is_identical(world, tmp_path):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    prompts = _responses(world, resp)
    r = cli("revise", "--run", run, "--responses", resp, "--batch-size", 3)
    assert r.exit_code == 0, r.output
    revs = read_records(run / "revise" / "revisions.jsonl", Revision)
    assert [v.id for v in revs] == [f"{p.id}#{s}" for p in prompts for s in (0, 1)]
    pairs = read_records(run / "revise" / "pairs.jsonl", PreferencePair)
    # the clean sample gives no pair (nothing to correct); the other gives reference ≻ reference + giraffe
    assert [p.id for p in pairs] == [f"{p.id}#1" for p in prompts]
    by_prompt = {p.id: p for p in prompts}
    for pair in pairs:
        prompt = by_prompt[pair.meta["prompt_id"]]
        assert pair.chosen == prompt.reference and pair.rejected.startswith(prompt.reference)
        assert pair.prompt == prompt.question and pair.meta["method"] == "dpo"
        assert pair.meta["hallucinated"] in (["giraffe"], ["zebra"])
        assert all(json.loads(json.dumps(i)).startswith("/") for i in pair.images)
        assert all((run / "data" / img).resolve().as_posix() in pair.images for img in prompt.images)
    rec = Run(run).read()["stages"]["revise"]
    assert rec["status"] == "done" and rec["outputs"]["pairs"]["count"] == len(prompts)
    assert rec["outputs"]["revisions"]["count"] == 2 * len(prompts)
    assert rec["skipped"] == {"judge found nothing to correct": len(prompts)}
    assert rec["options"]["judge_options"] == {"mode": "remove", "use_reference": True}
    before = [(run / "revise" / f).read_bytes() for f in ("revisions.jsonl", "pairs.jsonl")]
    r = cli("revise", "--run", run, "--responses", resp, "--batch-size", 3)
    assert r.exit_code == 0, r.output
    assert [(run / "revise" / f).read_bytes() for f in ("revisions.jsonl", "pairs.jsonl")] == before


def test_opa_pairs_carry_what_the_opa_trainer_reads(world, tmp_path):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    prompts = _responses(world, resp)
    r = cli("revise", "--run", run, "--responses", resp, "--method", "opa-dpo", "--mode", "rewrite")
    assert r.exit_code == 0, r.output
    pairs = read_records(run / "revise" / "pairs.jsonl", PreferencePair)
    assert len(pairs) == 2 * len(prompts)  # OPA keeps unchanged answers too: they anchor the revised side
    for pair in pairs:
        m = pair.meta
        assert pair.chosen == m["gt"] and pair.rejected == m["original"]
        assert set(node_words(m["revised"])) <= set(node_words(m["gt"]))
        # every report sentence is found in its text, so each token gets its sentence's weight
        for text, key in ((pair.rejected, "sentences_original"), (m["revised"], "sentences_revised")):
            spans = opa_dpo.char_weights(text, m[key], "score")
            assert len(spans) == len(m[key]) > 0
        weights = {w for *_, w in opa_dpo.char_weights(pair.rejected, m["sentences_original"], "score")}
        assert weights == ({1.0, 2.0} if pair.id.endswith("#1") else {1.0})


def test_resume_after_a_stop_midway_equals_an_uninterrupted_run(world, tmp_path, monkeypatch):
    from hallu.errors import HalluError
    from hallu.judges import annotations

    resp = tmp_path / "responses.jsonl"
    _responses(world, resp)
    whole = _run(world, tmp_path / "a")
    assert cli("revise", "--run", whole, "--responses", resp, "--batch-size", 2).exit_code == 0

    broken = _run(world, tmp_path / "b")
    real, calls = annotations.judge_groups, []

    def flaky(groups, options, progress=None):
        calls.append(len(groups))
        if len(calls) == 3:
            raise HalluError("judge: stopped on purpose")
        return real(groups, options, progress=progress)

    monkeypatch.setattr(annotations, "judge_groups", flaky)
    assert_one_error_line(cli("revise", "--run", broken, "--responses", resp, "--batch-size", 2), "on purpose")
    rec = Run(broken).read()["stages"]["revise"]
    assert rec["status"] == "failed" and "on purpose" in rec["error"]
    kept = (broken / "revise" / "revisions.jsonl").read_text().splitlines()
    assert len(kept) == 8  # two finished batches of 2 prompts x 2 samples
    calls.clear()
    assert cli("revise", "--run", broken, "--responses", resp, "--batch-size", 2).exit_code == 0
    assert len(calls) == 2, "only the two unfinished batches ran again"
    name = "revisions.jsonl"
    assert (broken / "revise" / name).read_bytes() == (whole / "revise" / name).read_bytes()
    # pairs hold absolute image paths, so the two runs differ exactly there
    a, b = ((d / "revise" / "pairs.jsonl").read_text() for d in (whole, broken))
    assert b == a.replace(str(whole.resolve()), str(broken.resolve())) and a != b


def test_unknown_prompt_id_names_file_and_line(world, tmp_path):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    _responses(world, resp)
    lines = resp.read_text().splitlines()
    lines[2] = lines[2].replace('"prompt_id": "shapes_', '"prompt_id": "nope_')
    resp.write_text("\n".join(lines) + "\n")
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp), f"{resp}:3", "nope_", "not in")
    assert not (run / "revise").exists()


def test_missing_images_are_skipped_and_counted_or_an_error_with_strict(world, tmp_path):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    prompts = _responses(world, resp)
    (run / "data" / prompts[0].images[0]).unlink()
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp, "--strict"),
                          prompts[0].id, "not found", "--strict")
    r = cli("revise", "--run", run, "--responses", resp)
    assert r.exit_code == 0, r.output
    rec = Run(run).read()["stages"]["revise"]
    assert rec["skipped"]["prompt images missing"] == 1
    assert rec["outputs"]["pairs"]["count"] == len(prompts) - 1


def test_bad_options_are_one_line(world, tmp_path):
    run = _run(world, tmp_path)
    resp = tmp_path / "responses.jsonl"
    _responses(world, resp)
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp, "--judge", "gpt"), "--judge", "'gpt'")
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp, "--method", "ppo"), "--method ppo")
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp, "--option", "colour=red"),
                          "--option colour", "annotations")
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp, "--option", "use_reference=maybe"),
                          "use_reference=maybe", "bool")
    assert_one_error_line(cli("revise", "--run", run, "--responses", resp, "--max-cost", 1),
                          "--max-cost", "annotations judge")
    assert_one_error_line(cli("revise", "--run", tmp_path / "empty"), "no finished rollout")
