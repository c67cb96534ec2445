"""The run directory: stage state machine, locks, staleness, atomic writes, version guard."""

import json
import multiprocessing as mp
import os
import time

import pytest

from hallu.errors import HalluError
from hallu.fileio import atomic_write_json
from hallu.manifest import SCHEMA_VERSION, Run


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_stage_done_records_options_inputs_outputs(tmp_path):
    inp = _write(tmp_path / "in.jsonl", '{"id": "a"}\n')
    run = Run(tmp_path / "run")
    assert not (tmp_path / "run").exists(), "opening a run writes nothing"
    with run.stage("rollout", options={"n": 2, "debug": True}, inputs={"prompts": inp}) as st:
        assert st.fresh
        out = _write(st.dir / "responses.jsonl", '{"id": "a#0"}\n')
        st.output("responses", out, count=1)
    rec = run.stage_record("rollout")
    assert rec["status"] == "done"
    assert rec["options"] == {"n": 2}, "operational options stay out of the digest"
    assert rec["inputs"]["prompts"]["digest"].startswith("sha256:")
    assert rec["outputs"]["responses"] == {**rec["outputs"]["responses"], "path": "rollout/responses.jsonl",
                                           "count": 1}
    assert rec["attempts"] == 1 and rec["ended"] and rec["seconds"] >= 0
    assert "transformers" in rec["versions"] and "hallu" in rec["versions"]
    views = {v.name: v for v in run.views()}
    assert views["rollout"].status == "done" and views["prepare"].status == "pending"


def test_failure_is_recorded_with_its_message(tmp_path):
    run = Run(tmp_path)
    with pytest.raises(HalluError):
        with run.stage("rollout", options={}):
            raise HalluError("prompts.jsonl:3: missing field 'id'")
    rec = run.stage_record("rollout")
    assert rec["status"] == "failed" and rec["error"] == "prompts.jsonl:3: missing field 'id'"
    with pytest.raises(ZeroDivisionError):
        with run.stage("rollout", options={}):
            1 / 0  # noqa: B018
    rec = run.stage_record("rollout")
    assert rec["attempts"] == 2 and rec["error"].startswith("ZeroDivisionError")


def test_resume_only_with_same_options_and_inputs(tmp_path):
    inp = _write(tmp_path / "in.jsonl", "1\n")
    run = Run(tmp_path / "run")
    with run.stage("s", options={"a": 1}, inputs={"x": inp}) as st:
        assert st.fresh
    with run.stage("s", options={"a": 1}, inputs={"x": inp}) as st:
        assert not st.fresh, "same options and inputs: the earlier output may be resumed"
    with run.stage("s", options={"a": 2}, inputs={"x": inp}) as st:
        assert st.fresh, "changed options: start over"
    inp.write_text("2\n")
    with run.stage("s", options={"a": 2}, inputs={"x": inp}) as st:
        assert st.fresh, "changed input: start over"


def test_stale_when_an_input_or_output_changes_or_upstream_is_not_done(tmp_path):
    run = Run(tmp_path)
    with run.stage("prepare", options={}) as st:
        prompts = _write(st.dir / "prompts.jsonl", "a\n")
        st.output("prompts", prompts, count=1)
    with run.stage("rollout", options={}, inputs={"prompts": prompts}, after=("prepare",)) as st:
        out = _write(st.dir / "responses.jsonl", "r\n")
        st.output("responses", out, count=1)
    assert [v.status for v in run.views()][:2] == ["done", "done"]

    time.sleep(0.01)
    prompts.write_text("b\n")
    views = {v.name: v for v in run.views()}
    assert views["prepare"].status == "stale"
    assert views["prepare"].reasons == ["output 'prompts' (prepare/prompts.jsonl) was modified after the stage"]
    assert views["rollout"].status == "stale"
    assert "upstream stage 'prepare' is stale" in views["rollout"].reasons
    assert "input 'prompts' (prepare/prompts.jsonl) changed since the stage ran" in views["rollout"].reasons

    prompts.unlink()
    views = {v.name: v for v in run.views()}
    assert "input 'prompts' (prepare/prompts.jsonl) is missing" in views["rollout"].reasons


def test_same_bytes_rewritten_is_not_stale(tmp_path):
    run = Run(tmp_path)
    with run.stage("prepare", options={}) as st:
        p = _write(st.dir / "p.jsonl", "a\n")
        st.output("prompts", p)
    time.sleep(0.01)
    p.write_text("a\n")  # new mtime, same content: the digest decides
    assert run.views()[0].status == "done"


def _hold_stage(run_dir, started, release):
    run = Run(run_dir)
    with run.stage("rollout", options={}):
        started.set()
        release.wait(30)


def test_second_process_on_a_running_stage_is_refused(tmp_path):
    ctx = mp.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_stage, args=(tmp_path, started, release))
    proc.start()
    try:
        assert started.wait(30)
        run = Run(tmp_path)
        assert run.views()[1].status == "running"
        with pytest.raises(HalluError, match="stage 'rollout' in .* is already running in another process"):
            with run.stage("rollout", options={}):
                pass
        assert run.stage_record("rollout")["status"] == "running", "the refused attempt changed nothing"
    finally:
        release.set()
        proc.join(30)
    assert Run(tmp_path).stage_record("rollout")["status"] == "done"


def test_a_killed_stage_shows_as_failed_not_running(tmp_path):
    ctx = mp.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_stage, args=(tmp_path, started, release))
    proc.start()
    assert started.wait(30)
    proc.kill()
    proc.join(30)
    view = Run(tmp_path).views()[1]
    assert view.status == "failed"
    assert view.reasons == ["the process running it died (rerun to resume)"]
    with Run(tmp_path).stage("rollout", options={}):  # the OS released the dead process's lock
        pass


def test_run_pointing_at_a_file(tmp_path):
    f = _write(tmp_path / "notadir", "x")
    with pytest.raises(HalluError, match=r"--run .*notadir: is a file, not a run directory"):
        Run(f)


def test_manifest_from_a_newer_hallu_is_refused(tmp_path):
    atomic_write_json(tmp_path / "manifest.json",
                      {"schema": SCHEMA_VERSION + 1, "hallu_version": "9.0.0", "stages": {}})
    with pytest.raises(HalluError, match=r"written by a newer hallu \(9\.0\.0.*upgrade hallu"):
        Run(tmp_path)


def test_corrupt_manifest_names_the_file_and_line(tmp_path):
    (tmp_path / "manifest.json").write_text('{\n "schema": 1,\n "stages": {\n')
    with pytest.raises(HalluError, match=r"manifest\.json:\d+: not valid JSON"):
        Run(tmp_path)


def test_manifest_writes_are_atomic(tmp_path, monkeypatch):
    run = Run(tmp_path)
    with run.stage("a", options={}):
        pass
    before = (tmp_path / "manifest.json").read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(HalluError, match=r"manifest\.json: cannot write \(disk full\)"):
        with run.stage("b", options={}):
            pass
    assert (tmp_path / "manifest.json").read_text() == before
    assert json.loads(before)["stages"]["a"]["status"] == "done"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temp file left behind"
