"""What a hostile new user tries on the first floor, through the CLI: every bad input gets exit code 2,
exactly one ``error:`` line naming it, no traceback, and nothing half-written."""

import contextlib
import json
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
from hallu.errors import HalluError
from hallu.fileio import atomic_write_json, atomic_write_text
from hallu.manifest import OPERATIONAL_OPTIONS, Run
from hallu.records import Prompt, check_images, resolve_image

runner = CliRunner()
CHAIR = Path(__file__).parent / "data" / "chair"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(output: str, exit_code: int, *fragments: str) -> str:
    assert exit_code == 2, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one line, got: {output!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in output
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def listing(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders): compared before and after."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@contextlib.contextmanager
def read_only(folder: Path):
    """Make ``folder`` truly read-only, even for root (a read-only bind mount); skip where impossible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield folder
        finally:
            for p, m in modes.items():
                p.chmod(m)
        return
    ok = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
    if ok and subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode:
        subprocess.run(["umount", str(folder)], capture_output=True)
        ok = False
    if not ok:
        pytest.skip("cannot make a read-only folder here (root without mount rights)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    r = cli("prepare", "shapes", "--out", root / "world", "--images", 6, "--seed", 1)
    assert r.exit_code == 0, r.output
    r = cli("prepare", "tiny-model", "--family", "llava", "--out", root / "model")
    assert r.exit_code == 0, r.output
    return root


def cli_in_subprocess(*args) -> tuple[int, str, bool]:
    """Run the CLI in a fresh interpreter: (exit code, stderr, whether torch got imported on the way)."""
    code = ("import sys\nfrom hallu.commands import app\ntry:\n    app(sys.argv[1:])\nfinally:\n"
            "    print('TORCH' if 'torch' in sys.modules else 'NO TORCH', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    *lines, marker = proc.stderr.strip().splitlines()
    return proc.returncode, "\n".join(lines), marker == "TORCH"


def _write_prompts(folder: Path, rows) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _local_image(world, folder: Path, name="img.png") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(world / "world" / "data" / "images" / "shapes_000000000001.png", folder / name)
    return name


# -- rich markup: user text is printed verbatim --------------------------------------------------------


def test_path_with_brackets_does_not_crash_the_error_printer(tmp_path):
    bad = tmp_path / "[/bold]"  # a closing tag with no opening one: rich's MarkupError
    r = cli("status", "--run", bad)
    one_error_line(r.output, r.exit_code, f"--run {bad}: no such run directory")


def test_bracketed_text_in_messages_is_kept(tmp_path):
    folder = tmp_path / "runs[facts]"
    r = cli("status", "--run", folder)
    one_error_line(r.output, r.exit_code, f"--run {folder}: no such run directory")


def test_bracketed_text_in_help_is_kept():
    r = cli("rollout", "--help")
    assert r.exit_code == 0
    assert "[flash]" in " ".join(r.output.split())


def test_status_table_shows_reasons_verbatim(tmp_path):
    run = Run(tmp_path / "run")
    with pytest.raises(HalluError):
        with run.stage("rollout", options={}):
            raise HalluError("image [red]x[/red].png and [/] are odd")
    r = cli("status", "--run", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "image [red]x[/red].png and [/] are odd" in " ".join(r.output.split())


# -- OS errors become one line ---------------------------------------------------------------------


def test_json_onto_a_folder(tmp_path):
    (tmp_path / "out").mkdir()
    r = cli("eval", "chair", "--captions", CHAIR / "dev_captions.jsonl", "--coco-annotations",
            CHAIR / "coco_annotations", "--json", tmp_path / "out")
    one_error_line(_last_line_only(r), r.exit_code, f"{tmp_path / 'out'}: is a folder")
    assert listing(tmp_path / "out") == {}


def _last_line_only(r):
    """``eval chair`` prints its table to stdout before writing --json; the error is the stderr line."""
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    return "\n".join(lines)


def test_json_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("eval", "chair", "--captions", CHAIR / "dev_captions.jsonl", "--coco-annotations",
            CHAIR / "coco_annotations", "--json", f / "out.json")
    one_error_line(_last_line_only(r), r.exit_code, f"{f / 'out.json'}: cannot write ({f} is a file, not a folder)")
    assert f.read_text() == "x"


def test_json_onto_a_read_only_folder(tmp_path):
    with read_only(tmp_path / "ro") as ro:
        r = cli("eval", "chair", "--captions", CHAIR / "dev_captions.jsonl", "--coco-annotations",
                CHAIR / "coco_annotations", "--json", ro / "out.json")
        one_error_line(_last_line_only(r), r.exit_code, f"{ro / 'out.json'}: cannot write (")
        assert listing(ro) == {}


def test_tiny_model_out_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("prepare", "tiny-model", "--family", "llava", "--out", f / "model")
    one_error_line(r.output, r.exit_code, f"{f / 'model'}: cannot write ({f} is a file, not a folder)")
    assert listing(tmp_path) == {"file": b"x"}
    with read_only(tmp_path / "ro") as ro:
        r = cli("prepare", "tiny-model", "--family", "llava", "--out", ro / "model")
        one_error_line(r.output, r.exit_code, f"{ro / 'model'}: cannot write")
        assert listing(ro) == {}


def test_read_only_run_folder(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "world", run)
    before = listing(run)
    with read_only(run):
        r = cli("prepare", "shapes", "--out", run, "--images", 3)
        one_error_line(r.output, r.exit_code, str(run))
        r = cli("status", "--run", run)  # reading still works
        assert r.exit_code == 0 and "prepare" in r.output
    assert listing(run) == before


def test_atomic_writes_keep_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {})
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "c.txt", "x")
        assert (tmp_path / "c.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_cli_outputs_are_readable_by_the_team(tmp_path):
    old = os.umask(0o022)
    try:
        r = cli("prepare", "shapes", "--out", tmp_path / "w", "--images", 2)
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    for name in ("manifest.json", "data/prompts.jsonl"):
        assert (tmp_path / "w" / name).stat().st_mode & 0o777 == 0o644, name


# -- --out errors name --out -----------------------------------------------------------------------


def test_errors_about_out_name_out(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    r = cli("prepare", "shapes", "--out", f, "--images", 2)
    one_error_line(r.output, r.exit_code, f"--out {f}: is a file")
    r = cli("eval", "chair", "--model", tmp_path / "m", "--images", tmp_path, "--out", f)
    line = one_error_line(r.output, r.exit_code, f"--out {f}")
    assert "--run" not in line
    assert f.read_text() == "x"


# -- image paths -----------------------------------------------------------------------------------


def test_image_path_escaping_the_data_folder_is_refused(world, tmp_path):
    data = tmp_path / "data"
    p = _write_prompts(data, [{"id": "a", "images": [_local_image(world, data)], "question": "q"},
                              {"id": "evil", "images": ["../../../../etc/passwd"], "question": "q"}])
    before = listing(tmp_path)
    r = cli("rollout", "--run", tmp_path / "run", "--model", world / "model", "--prompts", p)
    one_error_line(r.output, r.exit_code, "prompt 'evil'",
                   "'../../../../etc/passwd' points outside the data folder", "--allow-outside-images")
    assert listing(tmp_path) == before, "nothing written"


def test_eval_image_escaping_the_images_folder_is_refused(world, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "../../../../etc/passwd", "text": "Is there a dog?",
                             "label": "yes"}) + "\n")
    before = listing(tmp_path)
    images = world / "world" / "data" / "images"
    r = cli("eval", "pope", "--questions", q, "--model", world / "model", "--images", images, "--out", tmp_path / "out")
    one_error_line(r.output, r.exit_code, "item 'q/1'", "points outside the data folder", "--allow-outside-images")
    assert listing(tmp_path) == before, "the eval stage never started"


def test_allow_outside_images_lets_dotdot_through():
    base = Path(__file__).parent / "data" / "chair"
    target = resolve_image("../pope/pope_answers_realistic.jsonl", base, allow_outside=True)
    assert target == base / "../pope/pope_answers_realistic.jsonl" and target.is_file()
    with pytest.raises(HalluError, match=r"prompt 'p': image '\.\./x\.png' points outside the data folder"):
        check_images([Prompt(id="p", images=["../x.png"], question="q")], base, "f.jsonl")
    # "a/../b.png" stays inside: only paths that climb out are refused.
    assert resolve_image("a/../b.png", base) == base / "a/../b.png"


def test_unreadable_first_image_fails_before_the_model_loads(world, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"\x89PNG but not really")
    p = _write_prompts(data, [{"id": "a", "images": ["broken.png"], "question": "q"}])
    before = listing(tmp_path)
    rc, stderr, torch_loaded = cli_in_subprocess("rollout", "--run", tmp_path / "run", "--model", world / "model",
                                                 "--prompts", p)
    assert not torch_loaded
    one_error_line(stderr, rc, "prompt 'a'", "broken.png cannot be read")
    assert listing(tmp_path) == before


# -- the stage lock is checked before the model is read ------------------------------------------------


def _hold(run_dir, started, release):
    with Run(run_dir).stage("rollout", options={}):
        started.set()
        release.wait(60)


def test_second_process_fails_before_model_imports(world, tmp_path):
    import multiprocessing as mp

    data = tmp_path / "data"
    p = _write_prompts(data, [{"id": "a", "images": [_local_image(world, data)], "question": "q"}])
    ctx = mp.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path / "run", started, release))
    holder.start()
    try:
        assert started.wait(30)
        t = time.monotonic()
        rc, stderr, torch_loaded = cli_in_subprocess("rollout", "--run", tmp_path / "run", "--model",
                                                     world / "model", "--prompts", p)
        assert not torch_loaded, "the lock must be checked before torch is imported"
        one_error_line(stderr, rc, "stage 'rollout'", "already running")
        assert time.monotonic() - t < 30
        assert not (tmp_path / "run" / "rollout").exists()
    finally:
        release.set()
        holder.join(30)


# -- superseded outputs are kept, numbered, and announced ------------------------------------------------


def test_changed_options_keep_every_superseded_output(world, tmp_path):
    data = tmp_path / "data"
    p = _write_prompts(data, [{"id": "a", "images": [_local_image(world, data)], "question": "q"}])
    base = ["rollout", "--run", tmp_path / "run", "--model", world / "model", "--prompts", p, "--batch-size", 1]
    out = tmp_path / "run" / "rollout" / "responses.jsonl"
    texts = []
    for tokens in (3, 4, 5):
        r = cli(*base, "--max-new-tokens", tokens, "--seed", tokens)
        assert r.exit_code == 0, r.output
        texts.append(out.read_bytes())
    assert (out.parent / "responses.previous-1.jsonl").read_bytes() == texts[0]
    assert (out.parent / "responses.previous-2.jsonl").read_bytes() == texts[1]
    assert "kept it as responses.previous-2.jsonl" in " ".join(r.output.split())


# -- SIGTERM ---------------------------------------------------------------------------------------


def _rollout_cmd(run, world, prompts):
    return [sys.executable, "-m", "hallu", "rollout", "--run", str(run), "--model", str(world / "model"),
            "--prompts", str(prompts), "--n", "2", "--max-new-tokens", "24", "--batch-size", "1"]


def test_sigterm_stops_resumably_with_one_line(world, tmp_path):
    prompts = world / "world" / "data" / "prompts.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_rollout_cmd(ref, world, prompts), check=True, env=env, capture_output=True)
    expected = (ref / "rollout" / "responses.jsonl").read_bytes()
    total = expected.count(b"\n")

    run = tmp_path / "term"
    out = run / "rollout" / "responses.jsonl"
    proc = subprocess.Popen(_rollout_cmd(run, world, prompts), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the rollout finished before it could be stopped; make it longer"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines == ["interrupted; rerun the same command to resume"], stderr
    assert 2 <= out.read_bytes().count(b"\n") < total
    rec = Run(run).stage_record("rollout")
    assert rec["status"] == "failed" and "interrupted" in rec["error"]

    subprocess.run(_rollout_cmd(run, world, prompts), check=True, env=env, capture_output=True)
    assert out.read_bytes() == expected
    assert Run(run).stage_record("rollout")["status"] == "done"


# -- options that never change a result ------------------------------------------------------------


def test_one_set_of_operational_options(world, tmp_path):
    from hallu.evals.generation import ModelOptions

    assert {"device", "allow_outside_images"} <= OPERATIONAL_OPTIONS
    recorded = ModelOptions.from_knobs(Path("m"), {"device": "cpu", "allow_outside_images": True}).recorded()
    assert not OPERATIONAL_OPTIONS & set(recorded) and recorded["dtype"] == "auto"

    data = tmp_path / "data"
    p = _write_prompts(data, [{"id": "a", "images": [_local_image(world, data)], "question": "q"}])
    base = ["rollout", "--run", tmp_path / "run", "--model", world / "model", "--prompts", p, "--max-new-tokens", 3]
    assert cli(*base, "--device", "cpu").exit_code == 0
    first = Run(tmp_path / "run").stage_record("rollout")
    assert not OPERATIONAL_OPTIONS & set(first["options"])
    r = cli(*base, "--device", "auto", "--allow-outside-images")
    assert r.exit_code == 0, r.output
    assert "previous" not in r.output, "an operational option restarted the stage"
    assert Run(tmp_path / "run").stage_record("rollout")["options_digest"] == first["options_digest"]
    assert not list((tmp_path / "run" / "rollout").glob("*.previous*"))


def test_prepare_with_other_options_keeps_the_earlier_world(tmp_path):
    out = tmp_path / "w"
    assert cli("prepare", "shapes", "--out", out, "--images", 2).exit_code == 0
    first = listing(out / "data")
    r = cli("prepare", "shapes", "--out", out, "--images", 2)  # same options: the same world, nothing set aside
    assert r.exit_code == 0 and "kept" not in r.output and not (tmp_path / "w" / "data.previous-1").exists()
    r = cli("prepare", "shapes", "--out", out, "--images", 3)
    assert r.exit_code == 0, r.output
    assert f"kept: {out / 'data'} held an earlier build; it is now {out / 'data.previous-1'}" in r.output
    assert listing(out / "data.previous-1") == first
    assert Run(out).stage_record("prepare")["summary"]["images"] == 3
    assert len(list((out / "data" / "images").iterdir())) == 3
    assert len(list((out / "data.previous-1" / "images").iterdir())) == 2
    r = cli("prepare", "tiny-model", "--family", "llava", "--out", tmp_path / "m")
    assert r.exit_code == 0
    model = listing(tmp_path / "m")
    r = cli("prepare", "tiny-model", "--family", "llava", "--out", tmp_path / "m", "--seed", 1)
    assert r.exit_code == 0 and "it is now" in r.output
    assert listing(tmp_path / "m.previous-1") == model


def test_full_disk_while_appending_is_one_line(tmp_path, monkeypatch):
    from hallu.shards import JsonlShard

    path = tmp_path / "out.jsonl"
    with JsonlShard(path) as shard:
        shard.open()
        shard.append([{"id": "a"}])

        def full(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(HalluError, match=r"out\.jsonl: cannot write \(No space left on device\); free space"):
            shard.append([{"id": "b"}])
    monkeypatch.undo()
    with JsonlShard(path) as shard:
        assert shard.open() in (["a"], ["a", "b"])  # whatever reached the disk is whole lines
