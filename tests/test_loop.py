"""Stage-to-stage hand-offs of the loop on the shapes world: held-out images are evaluated, never trained on."""

import json

from typer.testing import CliRunner

from hallu.commands import app


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_pairs_on_held_out_images_are_marked_and_never_trained_on(tmp_path):
    from hallu.methods import get_method
    from hallu.train import dpo, sft

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
    pairs_path = run / "revise" / "pairs.jsonl"
    pairs = [json.loads(x) for x in pairs_path.read_text().splitlines()]
    assert {p["meta"]["prompt_id"]: p["meta"]["split"] for p in pairs} == {
        p["id"]: p["meta"]["split"] for p in prompts}
    # DPO and SFT read the same file and keep exactly the training images' pairs.
    spec = get_method("opa-dpo")
    kept = dpo.load_pairs(pairs_path, spec, spec.options())
    assert [p.meta["prompt_id"] for p, _ in kept] == train
    examples = sft.load_examples(pairs_path, with_gt=True)
    assert {e.id.removesuffix("#gt") for e in examples} == {p["id"] for p in pairs if p["meta"]["prompt_id"] in train}
