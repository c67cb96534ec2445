"""`hallu demo`: the report's arithmetic (units), and `hallu demo --quick` end to end (integration).

The integration tests run `--quick` once (the report's shape, the direction of each change) and a smaller
loop twice (straight through, and killed twice then resumed: the same report.json byte for byte), so they
are marked slow.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hallu import report as R
from hallu.commands import app
from hallu.demo import DemoConfig, check_config_file
from hallu.errors import HalluError


def _block(chair_i, recall, adv_f1, chair_s=0.5):
    pope = {s: {"f1": adv_f1, "accuracy": 0.5, "yes_ratio": 0.5} for s in R.POPE_SPLITS}
    return {"pope": pope, "chair": {"chair_s": chair_s, "chair_i": chair_i, "recall": recall}}


# --------------------------------------------------------------------------------------------------
# Units: the report's numbers


def test_change_and_targets_against_hand_computed_values():
    before, after = _block(0.20, 0.80, 0.70), _block(0.13, 0.76, 0.76)
    ch = R.change(before, after)
    assert ch["chair_i_rel"] == pytest.approx(-0.35)  # (0.13 - 0.20) / 0.20
    assert ch["recall_rel"] == pytest.approx(-0.05)  # (0.76 - 0.80) / 0.80
    assert ch["pope_adversarial_f1"] == pytest.approx(0.06)
    assert R.targets(ch) == {"chair_i_rel": True, "pope_adversarial_f1": True, "recall_rel": True, "all": True}
    # CHAIR_i -25 %, F1 +4 points, recall -12.5 %: every target missed
    missed = R.targets(R.change(before, _block(0.15, 0.70, 0.74)))
    assert missed == {"chair_i_rel": False, "pope_adversarial_f1": False, "recall_rel": False, "all": False}


def test_a_model_that_names_nothing_wins_nothing():
    before, silent = _block(0.20, 0.80, 0.70), _block(None, 0.0, None)
    ch = R.change(before, silent)
    assert ch["chair_i_rel"] is None and ch["pope_adversarial_f1"] is None
    assert R.targets(ch)["all"] is False
    assert R.beats(silent, before) == {"chair_i": False, "pope_adversarial_f1": False, "both": False}
    assert R.beats(before, silent)["both"] is True


def test_cooccurrence_share_counts_absent_objects_of_a_present_group(tmp_path):
    items = [  # fork present: knife (kitchen) is a co-occurrence hallucination, dog (park) is not
        {"gt_objects": ["fork"], "hallucinated": [["knife", "knife"], ["dog", "dog"]]},
        {"gt_objects": ["cat", "car"], "hallucinated": [["bench", "bench"]]},  # park via cat
        {"gt_objects": ["apple"], "hallucinated": []},
    ]
    (tmp_path / "chair").mkdir()
    (tmp_path / "chair" / "results.json").write_text(json.dumps({"items": items, "counts": {"captions": 3}}))
    groups = {"kitchen": ["fork", "knife"], "park": ["dog", "cat", "bench"], "street": ["car"],
              "produce": ["apple"]}
    got = R.cooccurrence(tmp_path, groups)
    assert (got["hallucinated_mentions"], got["cooccurrence_mentions"]) == (3, 2)
    assert got["cooccurrence_share"] == pytest.approx(0.6667)


def test_metrics_reads_the_three_pope_splits_and_names_a_missing_one(tmp_path):
    split = {"metrics": {"f1": 0.8, "accuracy": 0.75, "yes_ratio": 0.55, "precision": 0.7}}
    (tmp_path / "pope").mkdir()
    (tmp_path / "chair").mkdir()
    (tmp_path / "chair" / "results.json").write_text(json.dumps(
        {"metrics": {"chair_s": 0.3, "chair_i": 0.123456, "recall": 0.7, "len": 1.0}}))
    pope = {"splits": {f"shapes_pope_{s}": split for s in ("random", "popular")}}
    (tmp_path / "pope" / "results.json").write_text(json.dumps(pope))
    with pytest.raises(HalluError, match="no adversarial split"):
        R.metrics(tmp_path)
    pope["splits"]["shapes_pope_adversarial"] = split
    (tmp_path / "pope" / "results.json").write_text(json.dumps(pope))
    m = R.metrics(tmp_path)
    assert m["pope"]["adversarial"] == {"f1": 0.8, "accuracy": 0.75, "yes_ratio": 0.55}
    assert m["chair"] == {"chair_s": 0.3, "chair_i": 0.1235, "recall": 0.7}


def test_png_is_a_readable_image_with_one_row_per_method():
    import io

    from PIL import Image

    rep = {"methods": {m: {"before": _block(0.2, 0.8, 0.7), "control": _block(0.18, 0.8, 0.72),
                           "after": _block(0.12, 0.79, 0.77)} for m in ("opa-dpo", "ha-dpo")}}
    one = Image.open(io.BytesIO(R.png({"methods": dict(list(rep["methods"].items())[:1])})))
    two = Image.open(io.BytesIO(R.png(rep)))
    assert one.format == "PNG" and two.height > one.height and two.width == one.width


def test_a_demo_folder_refuses_other_settings(tmp_path):
    check_config_file(tmp_path, DemoConfig.quick(), 0)
    check_config_file(tmp_path, DemoConfig.quick(), 0)  # the same settings resume
    other = DemoConfig(**{**DemoConfig.quick().__dict__, "base_steps": 7})
    with pytest.raises(HalluError, match=r"other settings \(base_steps differ\)"):
        check_config_file(tmp_path, other, 0)
    with pytest.raises(HalluError, match=r"\(seed"):
        check_config_file(tmp_path, DemoConfig.quick(), 1)


def test_config_round_trips_through_its_dict():
    c = DemoConfig.quick()
    assert DemoConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(HalluError, match="unknown setting 'base_stepz'"):
        DemoConfig.from_dict({"base_stepz": 3})


def test_cli_names_an_unknown_method_in_one_line(tmp_path, monkeypatch):
    import dataclasses

    from hallu import demo

    monkeypatch.setattr(demo.DemoConfig, "quick", classmethod(
        lambda cls: dataclasses.replace(cls(), methods=("opa-dpo", "po-dpo"))))
    r = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "d")])
    assert r.exit_code == 2
    assert "unknown method 'po-dpo'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------------------------------
# Integration: hallu demo --quick


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    r = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out, r.output


@pytest.mark.slow
def test_quick_demo_report_shape(quick_demo):
    out, output = quick_demo
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["methods"]) == {"opa-dpo", "ha-dpo"}
    for name, m in rep["methods"].items():
        for row in ("before", "after", "control"):
            assert set(m[row]) == {"pope", "chair"}
            assert set(m[row]["pope"]) == {"random", "popular", "adversarial"}
            for split in m[row]["pope"].values():
                assert set(split) == {"f1", "accuracy", "yes_ratio"}
            assert set(m[row]["chair"]) == {"chair_s", "chair_i", "recall"}
        assert m["before"]["chair"]["chair_i"] is not None, "the base names no object: nothing to reduce"
        assert m["pairs"] > 0 and m["steps"] == DemoConfig.quick().method_steps(name)
    assert rep["world"]["summary"]["noisy_caption_share"] > 0
    assert 0 <= rep["base"]["hallucinations"]["cooccurrence_share"] <= 1
    md = (out / "report.md").read_text()
    assert "| before |" in md and "| after |" in md and "| control |" in md and "CHAIR_i" in output
    from PIL import Image

    assert Image.open(out / "report.png").format == "PNG"
    timings = json.loads((out / "timings.json").read_text())
    assert timings["stages"]["sft"] > 0 and "methods/opa-dpo/dpo" in timings["stages"]
    # every stage of every sub-run is recorded done in its manifest
    from hallu.manifest import Run

    for sub in ("methods/opa-dpo", "methods/ha-dpo"):
        states = {v.name: v.status for v in Run(out / sub).views() if v.name in ("rollout", "revise", "dpo")}
        assert states == {"rollout": "done", "revise": "done", "dpo": "done"}, (sub, states)


@pytest.mark.slow
def test_quick_demo_each_method_lowers_chair_i_and_raises_pope_adversarial_f1(quick_demo):
    out, _ = quick_demo
    rep = json.loads((out / "report.json").read_text())
    wrong = []
    for name, m in rep["methods"].items():
        before, after = m["before"], m["after"]
        if not (after["chair"]["chair_i"] is not None and after["chair"]["chair_i"] < before["chair"]["chair_i"]):
            wrong.append(f"{name}: CHAIR_i {before['chair']['chair_i']} -> {after['chair']['chair_i']}")
        fb, fa = before["pope"]["adversarial"]["f1"], after["pope"]["adversarial"]["f1"]
        if not (fa is not None and fb is not None and fa > fb):
            wrong.append(f"{name}: POPE-adversarial F1 {fb} -> {fa}")
    assert not wrong, "; ".join(wrong)


# A smaller loop than --quick for the resume test: byte-identity, not direction, is what it checks.
MICRO = dataclasses.replace(DemoConfig.quick(), images=150, vision_steps=20, base_steps=120, eval_images=20,
                            rollout_images=40, opa_sft_steps=6, opa_dpo_steps=40, ha_dpo_steps=6)
_RUN_MICRO = ("import json, sys; from pathlib import Path; from hallu.demo import DemoConfig, run_demo; "
              "run_demo(Path(sys.argv[1]), DemoConfig.from_dict(json.loads(sys.argv[2])))")


def _stage_progress(manifest: Path, stage: str) -> int:
    try:
        rec = json.loads(manifest.read_text())["stages"].get(stage) or {}
    except (OSError, ValueError):  # not written yet
        return 0
    return (rec.get("progress") or {}).get("done", 0) if rec.get("status") == "running" else 0


def _run_until(out: Path, manifest: str, stage: str, steps: int) -> None:
    """Start the micro demo in a process of its own; SIGKILL it once ``stage`` of ``manifest`` has trained
    ``steps`` steps (mid-stage: the demo must not depend on where it was cut)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _RUN_MICRO, str(out), json.dumps(MICRO.to_dict())], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and _stage_progress(out / manifest, stage) < steps:
        time.sleep(0.2)
    assert proc.poll() is None, f"the demo ended before {stage} reached step {steps}: " \
                                f"{proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_demo_killed_twice_midway_resumes_to_the_same_report(tmp_path):
    from hallu.demo import run_demo

    straight = tmp_path / "straight"
    run_demo(straight, MICRO)
    out = tmp_path / "killed"
    # killed inside the base's full SFT, then inside OPA-DPO's DPO training
    _run_until(out, "manifest.json", "sft", 30)
    _run_until(out, "methods/opa-dpo/manifest.json", "dpo", 10)
    assert not (out / "report.json").exists()
    run_demo(out, MICRO)
    assert (out / "report.json").read_bytes() == (straight / "report.json").read_bytes()
    top = json.loads((out / "manifest.json").read_text())["stages"]
    assert top["prepare"]["attempts"] == 1 and top["sft"]["attempts"] == 2  # finished stages are not redone
    sub = json.loads((out / "methods" / "opa-dpo" / "manifest.json").read_text())["stages"]
    assert sub["rollout"]["attempts"] == 1 and sub["dpo"]["attempts"] == 2
