"""`hallu eval compare`: results of different runs side by side, with the settings that differ."""

import json

from typer.testing import CliRunner

from hallu.commands import app
from hallu.evals.compare import load_result, rows

runner = CliRunner()


def _pope(tmp_path, name, accuracy, precision, parser):
    metrics = {"accuracy": accuracy, "precision": precision, "recall": 1.0, "f1": None, "yes_ratio": 0.5}
    items = [{"question_id": 1, "label": "yes", "answer": "Yes", "pred": "yes"}]
    result = {"benchmark": "pope", "parser": parser,
              "splits": {"coco_pope_random": {"metrics": metrics, "count": 4}}, "items": items,
              "settings": {"parser": parser, "mode": "generate"}}
    run = tmp_path / name
    run.mkdir()
    (run / "results.json").write_text(json.dumps(result))
    return run


def test_compare_two_pope_runs(tmp_path):
    a = _pope(tmp_path, "base", 0.75, 2 / 3, "pope-official")
    b = _pope(tmp_path, "dpo", 1.0, 1.0, "strict")
    name, result = load_result(a)
    assert name == "base"
    assert rows(result)[0] == ("random accuracy", 0.75, True)
    r = runner.invoke(app, ["eval", "compare", str(a), str(b / "results.json")], terminal_width=200)
    assert r.exit_code == 0, r.output
    acc = next(line for line in r.output.splitlines() if "random accuracy" in line)
    assert "75.00" in acc and "100.00" in acc
    assert "66.67" in next(line for line in r.output.splitlines() if "random precision" in line)
    assert "n/a" in next(line for line in r.output.splitlines() if "random F1" in line)
    parser_row = next(line for line in r.output.splitlines() if "parser" in line)
    assert "pope-official" in parser_row and "strict" in parser_row


def test_compare_rejects_what_is_not_a_result(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    r = runner.invoke(app, ["eval", "compare", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "not a hallu results file" in r.output
    r = runner.invoke(app, ["eval", "compare", str(tmp_path)])
    assert r.exit_code == 2 and "a folder without results.json" in r.output


def test_compare_chair_results_from_the_one_shape(tmp_path):
    from pathlib import Path

    from hallu.evals import chair

    ann = Path(__file__).parent / "data" / "chair" / "coco_annotations"
    captions = Path(__file__).parent / "data" / "chair" / "dev_captions.jsonl"
    result = chair.evaluate_file(captions, ann)
    (tmp_path / "a.json").write_text(json.dumps(result))
    fewer = chair.evaluate(chair.load_captions(captions)[:5], chair.CocoGroundTruth(ann))
    (tmp_path / "b.json").write_text(json.dumps(fewer))
    name, loaded = load_result(tmp_path / "a.json")
    assert name == "a" and loaded.splits["all"]["count"] == 15
    assert rows(loaded)[0] == ("CHAIR_s", result["metrics"]["chair_s"], True)
    r = runner.invoke(app, ["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                      terminal_width=200)
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "CHAIR_s" in x)
    assert f"{100 * result['metrics']['chair_s']:.2f}" in line and f"{100 * fewer['metrics']['chair_s']:.2f}" in line
    assert "chair-official" in next(x for x in r.output.splitlines() if "parser" in x)


def test_compare_refuses_a_malformed_result_in_one_line(tmp_path):
    bad = {"benchmark": "pope", "splits": {"s": {"metrics": {"accuracy": "high"}, "count": 3}}, "items": [],
           "settings": {}}
    cases = [
        (bad, "splits['s'].metrics.accuracy must be a number or null"),
        (dict(bad, splits={"s": {"metrics": {}}}), "splits['s'].count must be a non-negative integer"),
        (dict(bad, splits={}, items={"a": 1}), "field 'items' must be a list of objects"),
        (dict(bad, splits={}, schema=99), "results schema 99 is newer"),
        ([1, 2], "not a hallu results file"),
        (dict(bad, splits={}, benchmark="amber"), "benchmark 'amber' is not one compare knows"),
    ]
    for i, (content, message) in enumerate(cases):
        f = tmp_path / f"r{i}.json"
        f.write_text(json.dumps(content))
        r = runner.invoke(app, ["eval", "compare", str(f)])
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and str(f) in lines[0] and message in lines[0], r.output
