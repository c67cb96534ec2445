"""Stage-to-stage hand-offs of the loop on the shapes world (prepare -> rollout answers -> revise -> pairs)."""

import json

import pytest
from typer.testing import CliRunner

from hallu.commands import app
from hallu.manifest import Run


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.xfail(strict=True, reason="revise pairs every answered prompt, held-out val ones too; the fix "
                   "(skip them when building pairs) breaks 5 tests in tests/test_revise.py that expect pairs on "
                   "every shapes prompt, so it waits for the maintainer's call")
def test_revise_makes_no_pair_on_the_held_out_images_the_evals_score(tmp_path):
    run = tmp_path / "run"
    r = cli("prepare", "shapes", "--out", run, "--images", 20, "--seed", 1)
    assert r.exit_code == 0, r.output
    prompts = [json.loads(x) for x in (run / "data" / "prompts.jsonl").read_text().splitlines()]
    val = {p["id"] for p in prompts if p["meta"]["split"] == "val"}
    train = [p["id"] for p in prompts if p["meta"]["split"] == "train"]
    assert len(val) == 4 and len(train) == 16  # every 5th image is held out
    # Answers that repeat the reference: the judge keeps every sentence, so opa-dpo pairs each one.
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(
        json.dumps({"id": f"{p['id']}#0", "prompt_id": p["id"], "sample": 0, "text": p["reference"],
                    "model": "sha256:" + "0" * 64}) + "\n" for p in prompts))
    r = cli("revise", "--run", run, "--judge", "annotations", "--method", "opa-dpo",
            "--responses", responses, "--prompts", run / "data" / "prompts.jsonl")
    assert r.exit_code == 0, r.output
    pairs = [json.loads(x) for x in (run / "revise" / "pairs.jsonl").read_text().splitlines()]
    assert [p["meta"]["prompt_id"] for p in pairs] == train
    assert len((run / "revise" / "revisions.jsonl").read_text().splitlines()) == 20, "held-out answers still judged"
    assert Run(run).stage_record("revise")["skipped"] == {"held-out split (evaluated, never trained on)": 4}
