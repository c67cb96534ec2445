"""Many processes, one stage: `--nproc N` relaunches under accelerate launch (gloo on CPU), ranks share
the fixed batches, rank 0 merges; the output is byte-identical to one process, a killed rank loses
nothing, and `hallu status` never takes a stage lock to look."""

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from hallu import distributed as D
from hallu.commands import app
from hallu.commands._common import command_argv
from hallu.manifest import Run, process_start_token, stage_owner_alive
from hallu.stages import complete_lines, fold_leftover_shards, leftover_shards, rank_shard_path

runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def hallu(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hallu", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    assert cli("prepare", "shapes", "--out", root / "w", "--images", 12, "--seed", 3).exit_code == 0
    assert cli("prepare", "tiny-model", "--family", "llava", "--out", root / "model").exit_code == 0
    r = cli("prepare", "pope", "--objects", root / "w" / "data" / "pope" / "objects.jsonl", "--out", root / "pope",
            "--images-per-split", 2, "--seed", 0, "--dataset", "shapes")
    assert r.exit_code == 0, r.output
    return root


def _rollout_args(world, run, *extra):
    return ["rollout", "--run", run, "--model", world / "model", "--prompts", world / "w" / "data" / "prompts.jsonl",
            "--n", 2, "--max-new-tokens", 12, "--batch-size", 1, *extra]


# --------------------------------------------------------------------------------------------------
# Without launching anything


def test_nproc_beyond_the_cores_is_one_line_before_anything_loads(world, tmp_path):
    r = cli(*_rollout_args(world, tmp_path / "run", "--nproc", 999))
    assert r.exit_code == 2, r.output
    lines = error_lines(r.output)
    assert len(lines) == 1 and lines[0].startswith("error: --nproc 999: this machine has "), r.output
    assert f"{os.cpu_count()} CPU cores" in lines[0]
    assert not (tmp_path / "run").exists(), "nothing written"
    r = cli(*_rollout_args(world, tmp_path / "run", "--nproc", 2, "--gpus", 2))
    assert r.exit_code == 2 and "give one of them" in r.output
    r = cli("eval", "pope", "--questions", world / "pope" / "shapes_pope_random.json", "--answers", tmp_path / "a",
            "--nproc", 2)
    assert r.exit_code == 2 and "--nproc/--gpus: only with --model" in r.output


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="a CUDA machine")
def test_gpus_on_a_cpu_machine(world, tmp_path):
    r = cli(*_rollout_args(world, tmp_path / "run", "--gpus", 2))
    assert r.exit_code == 2
    assert error_lines(r.output) == ["error: --gpus 2: this machine has 0 CUDA GPUs (torch.cuda.device_count()); "
                                     "on a CPU machine use --nproc N"]


def test_inside_a_launch_nproc_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(D.HalluError, match="already rank 1 of 2"):
        D.check_processes(2, None)


def test_the_launch_command_and_the_rebuilt_argv():
    probe = typer.Typer()
    seen = {}

    @probe.command()
    def go(ctx: typer.Context, run: Path = typer.Option(..., "--run"), n: int = typer.Option(1, "--n"),
           greedy: bool = typer.Option(False, "--greedy"), q: list[Path] = typer.Option(None, "--questions"),
           nproc: int = typer.Option(None, "--nproc")):
        seen["argv"] = command_argv(ctx, drop=("nproc",))

    @probe.command()
    def other():  # two commands, so the command name is part of the path
        pass

    r = CliRunner().invoke(probe, ["go", "--run", "r x", "--greedy", "--questions", "a", "--questions", "b",
                                   "--nproc", "2"])
    assert r.exit_code == 0, r.output
    # Defaults the user did not type (--n) are left out; values keep their spaces (a list, no shell).
    assert seen["argv"] == ["go", "--run", "r x", "--greedy", "--questions", "a", "--questions", "b"]

    cmd = D.launch_command(["rollout", "--run", "r"], 2, port=29555, log_dir="/tmp/l")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd and "--cpu" not in cmd

    assert cmd[cmd.index("--module"):] == ["--module", "hallu", "rollout", "--run", "r"]
    ds = D.launch_command(["sft"], 2, port=1, log_dir="/tmp/l",
                          launcher_args=["--use_deepspeed", "--deepspeed_config_file", "z3.json"])
    assert "--multi_gpu" not in ds and ds.index("--use_deepspeed") < ds.index("--module")


# The launcher's report when rank 1 was SIGKILLed (torch 2.13 elastic agent, shortened).
_REPORT = """\
W1201 11:26:45.017000 9577 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 9658 closing \
signal SIGTERM
E1201 11:26:45.216000 9577 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9) \
local_rank: 1 (pid: 9659) of binary: python3
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 9658)  (SIGTERM)
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 9659)  (SIGKILL)
"""


def _stream(lines):
    s = D._Stream(debug=False)
    s.pump(iter(line + "\n" for line in lines), sys.stderr)
    return s


def test_a_failed_launch_becomes_one_line_naming_the_rank(capsys):
    s = _stream(["[default0]:interrupted; rerun the same command to resume", *_REPORT.splitlines()])
    assert s.failure(1) == ("rank 1 exited with code -9 (killed by signal 9); nothing was merged; "
                            "rerun the same command to resume")
    assert capsys.readouterr().err == "", "held back: rank 0's own stop line and the launcher's chatter"
    # A rank that stopped on a user error: its own line, once.
    report = _REPORT.replace("exitcode  : -9", "exitcode  : 2")
    s = _stream(["[default1]:error: prompts.jsonl:3: not valid JSON", "[default0]:error: rank 0: another rank "
                 "of this launch stopped", *report.splitlines()])
    assert s.failure(1) == "prompts.jsonl:3: not valid JSON"
    assert _stream(["boom"]).failure(1) == "accelerate launch failed (exit code 1): boom"


# --------------------------------------------------------------------------------------------------
# Shards: any N resumes


def _lines(path, ids, torn=""):
    path.write_text("".join(json.dumps({"id": i, "text": i * 2}) + "\n" for i in ids) + torn)


def test_leftover_shards_of_any_n_fold_into_the_output(tmp_path):
    out = tmp_path / "responses.jsonl"
    _lines(out, ["a", "b"], torn='{"id": "c", "te')
    _lines(rank_shard_path(out, 0), ["c"], torn='{"id"')
    _lines(rank_shard_path(out, 2), ["e", "a"])  # "a" twice (a crash between replace and delete): kept once
    _lines(rank_shard_path(out, 11), ["f"])
    (tmp_path / "responses.previous-1.jsonl").write_text('{"id": "old"}\n')
    assert [p.name for p in leftover_shards(out)] == ["responses.rank0.jsonl", "responses.rank2.jsonl",
                                                      "responses.rank11.jsonl"]
    fold_leftover_shards(out)
    assert list(complete_lines(out)) == ["a", "b", "c", "e", "f"]
    assert out.read_text().endswith("\n") and leftover_shards(out) == []
    assert (tmp_path / "responses.previous-1.jsonl").exists(), "only rank shards are folded"
    (tmp_path / "responses.rank1.jsonl").write_text("not json\n")
    with pytest.raises(D.HalluError, match=r"responses.rank1.jsonl:1: corrupt line"):
        fold_leftover_shards(out)


# --------------------------------------------------------------------------------------------------
# Status looks without locking


def _hold(run_dir, started, release):
    with Run(run_dir).stage("rollout", options={}):
        started.set()
        release.wait(60)


def test_status_of_a_running_stage_takes_no_lock(tmp_path, monkeypatch):
    ctx = mp.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(tmp_path, started, release))
    proc.start()
    try:
        assert started.wait(30)
        import filelock

        class NoLocks:
            def __init__(self, *a, **k):
                raise AssertionError("status took a lock")

        monkeypatch.setattr(filelock, "FileLock", NoLocks)
        view = {v.name: v for v in Run(tmp_path).views()}["rollout"]
        assert view.status == "running" and view.reasons == []
        rec = view.record
        assert rec["pid"] == proc.pid and rec["host"] == socket.gethostname() and rec["ranks"] == 1
        assert rec["pid_started"] == process_start_token(proc.pid)
    finally:
        release.set()
        proc.join(30)
    assert {v.name: v for v in Run(tmp_path).views()}["rollout"].status == "done"


def test_owner_liveness_dead_reused_and_remote_pids():
    me = os.getpid()
    host = socket.gethostname()
    assert stage_owner_alive({"pid": me, "host": host, "pid_started": process_start_token(me)}) == (True, None)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert stage_owner_alive({"pid": child.pid, "host": host})[0] is False
    if process_start_token(me) is not None:  # Linux: a pid now used by another process is not the stage's
        assert stage_owner_alive({"pid": me, "host": host, "pid_started": "1"})[0] is False
    alive, why = stage_owner_alive({"pid": 1234, "host": "elsewhere.example"})
    assert alive and why == "running on host elsewhere.example (pid 1234); not checked from here"


# --------------------------------------------------------------------------------------------------
# Real launches: two processes over gloo


@pytest.mark.distributed
def test_rollout_on_two_ranks_equals_one_process(world, tmp_path):
    assert cli(*_rollout_args(world, tmp_path / "one")).exit_code == 0
    expected = (tmp_path / "one" / "rollout" / "responses.jsonl").read_bytes()
    r = hallu(*_rollout_args(world, tmp_path / "two", "--nproc", 2))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "two" / "rollout"
    assert (out / "responses.jsonl").read_bytes() == expected, "sampling, n=2, per-batch seeds: same bytes"
    assert sorted(p.name for p in out.iterdir()) == ["responses.jsonl"], "shards merged and removed"
    assert "rollout: 24 responses" in r.stderr and r.stderr.count("rollout: 24 responses") == 1
    rec = Run(tmp_path / "two").stage_record("rollout")
    assert rec["status"] == "done" and rec["ranks"] == 2 and rec["progress"] == {"done": 24, "total": 24}
    assert rec["attempts"] == 1 and "pid" not in rec


def _pope_args(world, out, *extra):
    args = ["eval", "pope", "--model", world / "model", "--images", world / "w" / "data" / "images", "--out", out,
            "--max-new-tokens", 4, "--batch-size", 4]
    for s in ("random", "popular", "adversarial"):
        args += ["--questions", world / "pope" / f"shapes_pope_{s}.json"]
    return [*args, *extra]


@pytest.mark.distributed
def test_pope_eval_on_two_ranks_equals_one_process(world, tmp_path):
    assert cli(*_pope_args(world, tmp_path / "one")).exit_code == 0
    r = hallu(*_pope_args(world, tmp_path / "two", "--nproc", 2))
    assert r.returncode == 0, r.stderr
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "generations.jsonl").read_bytes() == (one / "generations.jsonl").read_bytes()
    res1, res2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert res2["items"] == res1["items"] and res2["splits"] == res1["splits"]
    assert r.stdout.count("POPE") == 1, "one report, from rank 0"
    assert sorted(p.name for p in two.iterdir()) == [".locks", "generations.jsonl", "manifest.json", "results.json"]


def _rank_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of rank ``rank`` of the hallu launch working on ``run_dir`` (Linux /proc)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"hallu" in cmd and str(run_dir).encode() in cmd and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's pid in /proc")
def test_a_killed_rank_stops_the_launch_and_a_rerun_with_another_n_resumes(world, tmp_path):
    assert cli(*_rollout_args(world, tmp_path / "ref", "--max-new-tokens", 24)).exit_code == 0
    expected = (tmp_path / "ref" / "rollout" / "responses.jsonl").read_bytes()

    run = tmp_path / "killed"
    out = run / "rollout" / "responses.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "hallu", *map(str, _rollout_args(world, run, "--max-new-tokens",
                                                                                    24, "--nproc", 2))],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shard1 = rank_shard_path(out, 1)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if shard1.exists() and shard1.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    pid = _rank_pid(run, 1)
    assert proc.poll() is None and pid is not None, "rank 1 finished before it could be killed; make it longer"
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert error_lines(stderr) == ["error: rank 1 exited with code -9 (killed by signal 9); nothing was merged; "
                                   "rerun the same command to resume"]
    assert shard1.read_bytes().count(b"\n") < 12, "rank 1 did not get to finish"
    assert not out.exists() or out.read_bytes().count(b"\n") == 0, "nothing merged"
    rec = Run(run).stage_record("rollout")
    assert rec["status"] == "failed"
    assert {v.name: v for v in Run(run).views()}["rollout"].status == "failed"

    # Batches are fixed, so one process picks up what two left: the same bytes as never being killed.
    assert cli(*_rollout_args(world, run, "--max-new-tokens", 24)).exit_code == 0
    assert out.read_bytes() == expected
    assert leftover_shards(out) == []
    assert Run(run).stage_record("rollout")["attempts"] == 2
