"""The slice that must run: prepare shapes -> tiny model -> rollout -> status, through the CLI.

Also: resume after a real SIGKILL ends byte-identical to an uninterrupted run, and every bad input
gets one clear line, exit code 2 and nothing half-written.
"""

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hallu.commands import app
from hallu.manifest import Run
from hallu.records import Response, read_records

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error_line(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {result.output!r}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("slice")
    r = cli("prepare", "shapes", "--out", root / "world", "--images", 12, "--seed", 3)
    assert r.exit_code == 0, r.output
    r = cli("prepare", "tiny-model", "--family", "llava", "--out", root / "model")
    assert r.exit_code == 0, r.output
    return root


def test_slice_prepare_rollout_status(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "world", run)
    r = cli("rollout", "--run", run, "--model", world / "model", "--n", 2, "--max-new-tokens", 8)
    assert r.exit_code == 0, r.output
    responses = read_records(run / "rollout" / "responses.jsonl", Response)
    prompts = [json.loads(x) for x in (run / "data" / "prompts.jsonl").read_text().splitlines()]
    assert [x.id for x in responses] == [f"{p['id']}#{s}" for p in prompts for s in (0, 1)]
    assert all(x.model.startswith("sha256:") for x in responses)
    m = Run(run).read()["stages"]
    assert m["rollout"]["outputs"]["responses"]["count"] == 24
    assert m["rollout"]["progress"] == {"done": 24, "total": 24}
    assert m["rollout"]["inputs"]["prompts"]["path"] == "data/prompts.jsonl", "defaults to the prepared prompts"

    r = cli("status", "--run", run)
    assert r.exit_code == 0
    rows = {ln.split("│")[1].strip(): ln for ln in r.output.splitlines() if ln.count("│") >= 4}
    assert "done" in rows["prepare"] and "done" in rows["rollout"] and "24/24" in rows["rollout"]
    assert "pending" in rows["sft"]

    # A finished stage rerun with the same options does no work and leaves the same bytes.
    before = (run / "rollout" / "responses.jsonl").read_bytes()
    r = cli("rollout", "--run", run, "--model", world / "model", "--n", 2, "--max-new-tokens", 8)
    assert r.exit_code == 0 and (run / "rollout" / "responses.jsonl").read_bytes() == before

    # Changing the prompts makes the rollout stale, and status says why.
    p = run / "data" / "prompts.jsonl"
    p.write_text(p.read_text().replace("Describe this image in detail.", "Describe the image."))
    r = cli("status", "--run", run, "--json")
    rows = {row["stage"]: row for row in json.loads(r.output)}
    assert rows["prepare"]["status"] == "stale" and rows["rollout"]["status"] == "stale"
    assert "input 'prompts' (data/prompts.jsonl) changed since the stage ran" in rows["rollout"]["reasons"]


def _rollout_cmd(run, world, prompts):
    return [sys.executable, "-m", "hallu", "rollout", "--run", str(run), "--model", str(world / "model"),
            "--prompts", str(prompts), "--n", "2", "--max-new-tokens", "24", "--batch-size", "1"]


def test_rollout_resumes_after_sigkill_to_identical_output(world, tmp_path):
    prompts = world / "world" / "data" / "prompts.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_rollout_cmd(ref, world, prompts), check=True, env=env, capture_output=True)
    expected = (ref / "rollout" / "responses.jsonl").read_bytes()
    assert expected.count(b"\n") == 24

    run = tmp_path / "killed"
    out = run / "rollout" / "responses.jsonl"
    proc = subprocess.Popen(_rollout_cmd(run, world, prompts), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the rollout finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_bytes()
    assert 2 <= partial.count(b"\n") < 24
    assert Run(run).views()[1].status == "failed", "a killed stage is not shown as running"

    subprocess.run(_rollout_cmd(run, world, prompts), check=True, env=env, capture_output=True)
    assert out.read_bytes() == expected
    rec = Run(run).stage_record("rollout")
    assert rec["status"] == "done" and rec["attempts"] == 2


def test_rollout_resume_after_a_torn_line(world, tmp_path):
    """A writer killed mid-line leaves a torn tail; the rerun drops it and still matches."""
    prompts = world / "world" / "data" / "prompts.jsonl"
    args = ["rollout", "--run", tmp_path / "a", "--model", world / "model", "--prompts", prompts, "--n", 2,
            "--max-new-tokens", 8, "--batch-size", 2]
    assert cli(*args).exit_code == 0
    expected = (tmp_path / "a" / "rollout" / "responses.jsonl").read_bytes()
    lines = expected.splitlines(keepends=True)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "rollout" / "responses.jsonl").write_bytes(b"".join(lines[:5]) + lines[5][:17])
    args[2] = tmp_path / "b"
    assert cli(*args).exit_code == 0
    assert (tmp_path / "b" / "rollout" / "responses.jsonl").read_bytes() == expected


def _prompts(tmp_path, rows):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def _good_prompt(world, pid="a"):
    img = str(world / "world" / "data" / "images" / "shapes_000000000001.png")
    return {"id": pid, "images": [img], "question": "Describe this image."}


def test_missing_image(world, tmp_path):
    p = _prompts(tmp_path, [_good_prompt(world), {"id": "b", "images": ["nope.png"], "question": "q"}])
    r = cli("rollout", "--run", tmp_path / "run", "--model", world / "model", "--prompts", p)
    assert_one_error_line(r, "prompts.jsonl", "'b'", "nope.png not found")
    assert not (tmp_path / "run").exists(), "nothing written"


def test_unreadable_image_fails_the_stage_cleanly(world, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    p = _prompts(tmp_path, [_good_prompt(world), {"id": "b", "images": ["broken.png"], "question": "q"}])
    r = cli("rollout", "--run", tmp_path / "run", "--model", world / "model", "--prompts", p,
            "--batch-size", 1, "--max-new-tokens", 4)
    assert_one_error_line(r, "request b", "broken.png cannot be read")
    rec = Run(tmp_path / "run").stage_record("rollout")
    assert rec["status"] == "failed" and "broken.png cannot be read" in rec["error"]
    lines = (tmp_path / "run" / "rollout" / "responses.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a#0"], "finished items kept, nothing half-written"


def test_line_that_is_not_json_and_missing_field(world, tmp_path):
    p = _prompts(tmp_path, [_good_prompt(world), "{oops"])
    assert_one_error_line(cli("rollout", "--run", tmp_path / "r", "--model", world / "model", "--prompts", p),
                          "prompts.jsonl:2: not valid JSON")
    p = _prompts(tmp_path, [_good_prompt(world), {"id": "b", "images": []}])
    assert_one_error_line(cli("rollout", "--run", tmp_path / "r", "--model", world / "model", "--prompts", p),
                          "prompts.jsonl:2: prompt record is missing the field 'question'")
    assert not (tmp_path / "r").exists()


def test_model_folder_that_is_not_a_vlm(world, tmp_path):
    m = tmp_path / "bert"
    m.mkdir()
    (m / "config.json").write_text('{"model_type": "bert"}')
    p = _prompts(tmp_path, [_good_prompt(world)])
    r = cli("rollout", "--run", tmp_path / "r", "--model", m, "--prompts", p)
    assert_one_error_line(r, "a 'bert' model is not a vision-language (image-text-to-text) model")
    r = cli("rollout", "--run", tmp_path / "r", "--model", tmp_path, "--prompts", p)
    assert_one_error_line(r, "no config.json, so this is not a model folder")
    assert not (tmp_path / "r").exists()


def test_remote_code_needs_the_flag(world, tmp_path):
    m = tmp_path / "custom"
    m.mkdir()
    (m / "config.json").write_text('{"model_type": "mystery", "auto_map": {"AutoConfig": "x.Y"}}')
    p = _prompts(tmp_path, [_good_prompt(world)])
    assert_one_error_line(cli("rollout", "--run", tmp_path / "r", "--model", m, "--prompts", p),
                          "pass --trust-remote-code")


def test_run_pointing_at_a_file(world, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    p = _prompts(tmp_path, [_good_prompt(world)])
    assert_one_error_line(cli("rollout", "--run", f, "--model", world / "model", "--prompts", p),
                          "is a file, not a run directory")
    assert_one_error_line(cli("status", "--run", f), "is a file, not a run directory")
    assert f.read_text() == "x"


def _hold(run_dir, started, release):
    with Run(run_dir).stage("rollout", options={}):
        started.set()
        release.wait(60)


def test_second_process_on_a_running_stage(world, tmp_path):
    ctx = mp.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(tmp_path / "run", started, release))
    proc.start()
    try:
        assert started.wait(30)
        p = _prompts(tmp_path, [_good_prompt(world)])
        r = cli("rollout", "--run", tmp_path / "run", "--model", world / "model", "--prompts", p)
        assert_one_error_line(r, "stage 'rollout'", "is already running in another process")
        assert not (tmp_path / "run" / "rollout" / "responses.jsonl").exists()
    finally:
        release.set()
        proc.join(30)


def test_manifest_written_by_a_newer_version(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 99, "hallu_version": "7.0", "stages": {}}))
    assert_one_error_line(cli("status", "--run", tmp_path), "written by a newer hallu (7.0", "upgrade hallu")


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "manifest.json").write_text("{")
    r = runner.invoke(app, ["--debug", "status", "--run", str(tmp_path)])
    assert r.exit_code != 0 and r.exception is not None and "not valid JSON" in str(r.exception)


def test_prepare_shapes_bad_input_writes_nothing(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    assert_one_error_line(cli("prepare", "shapes", "--out", f, "--images", 3), "is a file")
    assert f.read_text() == "x"
    r = cli("prepare", "tiny-model", "--family", "gpt2", "--out", tmp_path / "m")
    assert_one_error_line(r, "--family gpt2: unknown")
    assert not (tmp_path / "m").exists()


def test_eval_help_lists_the_benchmarks():
    r = cli("eval", "--help")
    assert r.exit_code == 0
    for name in ("pope", "chair", "shr", "compare"):
        assert f" {name} " in r.output


def test_help_is_light_and_lists_only_built_commands():
    code = ("import sys, hallu.commands; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(hallu.commands.app, ['--help']); print(r.output); "
            "print('HEAVY' if {'torch', 'transformers'} & set(sys.modules) else 'LIGHT')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("LIGHT"), "hallu --help must not import torch or transformers"
    # Command rows of the plain help: "  name  description" under "Commands:"; wrapped lines are indented deeper.
    section = out.split("Commands:", 1)[1].splitlines()
    commands = [line.split()[0] for line in section if line.startswith("  ") and line[2] != " " and line.strip()]
    assert commands == ["prepare", "rollout", "revise", "sft", "dpo", "merge-lora", "eval", "status", "demo"], commands
    assert Path(sys.executable).exists()
