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
