"""Exact fingerprints: every byte counts, and unchanged big files are hashed once (hallu.digests)."""

import hashlib
import os
import time

import pytest

from hallu import digests, fileio
from hallu.manifest import Run, artifact_digest, dir_fingerprint

BIG = 17 << 20  # over the old 16 MiB "head + tail only" limit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("HALLU_CACHE_DIR", str(root))
    monkeypatch.delenv("HALLU_DIGEST_CACHE", raising=False)
    monkeypatch.setattr(digests, "_MEMO", {})
    return root / "digests"


@pytest.fixture
def hashed(monkeypatch):
    """The paths fully hashed, in order (hallu.digests hashes through fileio.sha256_file)."""
    calls = []
    real = fileio.sha256_file

    def counting(path, *a, **k):
        calls.append(os.path.basename(path))
        return real(path, *a, **k)

    monkeypatch.setattr(fileio, "sha256_file", counting)
    return calls


def _model(folder):
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llava"}')
    data = bytearray(os.urandom(BIG))
    (folder / "model.safetensors").write_bytes(data)
    time.sleep(digests.RACY_WINDOW_NS / 1e9 + 0.05)  # older than the racy window, as real weights are
    return folder, data


def _flip_middle(path):
    with open(path, "r+b") as f:
        f.seek(BIG // 2)
        b = f.read(1)
        f.seek(BIG // 2)
        f.write(bytes([b[0] ^ 0xFF]))


def test_digest_is_the_sha256_of_every_byte(tmp_path, cache):
    p = tmp_path / "w.bin"
    data = os.urandom(BIG)
    p.write_bytes(data)
    assert digests.file_digest(p) == "sha256:" + hashlib.sha256(data).hexdigest()


def test_middle_byte_flip_makes_the_stage_stale_with_the_cache_in_place(tmp_path, cache, hashed):
    model, _ = _model(tmp_path / "model")
    run = Run(tmp_path / "run")
    with run.stage("rollout", options={"n": 1}, inputs={"model": model}):
        pass
    assert {v.name: v.status for v in run.views()}["rollout"] == "done"
    assert list(cache.rglob("*.json")), "the big file's digest was remembered on disk"
    before = dir_fingerprint(model)

    _flip_middle(model / "model.safetensors")
    view = {v.name: v for v in run.views()}["rollout"]
    assert view.status == "stale"
    assert view.reasons == ["input 'model' (" + str(model.resolve()) + ") changed since the stage ran"]
    assert dir_fingerprint(model) != before


def test_flip_with_restored_mtime_is_still_seen(tmp_path, cache):
    model, _ = _model(tmp_path / "model")
    before = dir_fingerprint(model)
    w = model / "model.safetensors"
    st = w.stat()
    _flip_middle(w)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # what `cp -p` or a careless tool does
    assert w.stat().st_mtime_ns == st.st_mtime_ns and w.stat().st_size == st.st_size
    assert dir_fingerprint(model) != before


def test_unchanged_file_is_not_rehashed_across_processes(tmp_path, cache, hashed):
    model, _ = _model(tmp_path / "model")
    first = dir_fingerprint(model)
    assert hashed.count("model.safetensors") == 1
    digests._MEMO.clear()  # a new process: only the disk cache remains
    run = Run(tmp_path / "run")
    with run.stage("rollout", options={}, inputs={"model": model}):
        pass
    run.views()
    assert dir_fingerprint(model) == first
    assert hashed == ["config.json", "model.safetensors"], "nothing was hashed again: the folder is remembered"


def test_folder_of_small_files_is_remembered_and_still_exact(tmp_path, cache, hashed):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        (images / f"{i:02d}.png").write_bytes(os.urandom(100_000))  # 1.2 MB in all, each file small
    time.sleep(digests.RACY_WINDOW_NS / 1e9 + 0.05)
    first = dir_fingerprint(images)
    assert len(hashed) == 12
    digests._MEMO.clear()
    assert dir_fingerprint(images) == first and len(hashed) == 12, "an unchanged folder is not rehashed"

    f = images / "05.png"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[50_000] ^= 1
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime and bytes differ
    flipped = dir_fingerprint(images)
    assert flipped != first
    (images / "12.png").write_bytes(b"x")
    added = dir_fingerprint(images)
    assert added not in (first, flipped)
    (images / "12.png").unlink()
    assert dir_fingerprint(images) == flipped


def test_touched_but_equal_file_is_rehashed_to_the_same_digest(tmp_path, cache, hashed):
    model, _ = _model(tmp_path / "model")
    first = dir_fingerprint(model)
    time.sleep(0.01)
    os.utime(model / "model.safetensors")  # touch: new mtime, same bytes
    digests._MEMO.clear()
    assert dir_fingerprint(model) == first
    assert hashed.count("model.safetensors") == 2


def test_a_file_changed_right_after_hashing_is_not_trusted(tmp_path, cache, hashed):
    p = tmp_path / "w.bin"
    p.write_bytes(b"x" * (2 << 20))
    digests.file_digest(p)  # hashed within the racy window of its last change
    digests.file_digest(p)
    assert hashed == ["w.bin", "w.bin"]
    time.sleep(digests.RACY_WINDOW_NS / 1e9 + 0.05)
    digests.file_digest(p)  # old enough now: remembered
    digests.file_digest(p)
    assert hashed == ["w.bin", "w.bin", "w.bin"]


def test_corrupt_or_foreign_cache_entries_are_ignored(tmp_path, cache, hashed):
    p = tmp_path / "w.bin"
    data = os.urandom(2 << 20)
    p.write_bytes(data)
    time.sleep(digests.RACY_WINDOW_NS / 1e9 + 0.05)
    truth = "sha256:" + hashlib.sha256(data).hexdigest()
    assert digests.file_digest(p) == truth
    (entry,) = cache.rglob("*.json")
    entry.write_text("{not json")
    digests._MEMO.clear()
    assert digests.file_digest(p) == truth
    text = entry.read_text().replace(truth, "sha256:" + "0" * 64)  # a lying entry for another file's bytes
    entry.write_text(text.replace(os.path.realpath(p), "/elsewhere"))
    digests._MEMO.clear()
    assert digests.file_digest(p) == truth
    assert hashed == ["w.bin"] * 3


def test_unwritable_cache_costs_time_not_correctness(tmp_path, monkeypatch, hashed):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("HALLU_CACHE_DIR", str(blocker))
    monkeypatch.setattr(digests, "_MEMO", {})
    p = tmp_path / "w.bin"
    data = os.urandom(2 << 20)
    p.write_bytes(data)
    assert artifact_digest(p) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert blocker.read_text().startswith("a file")


def test_cache_can_be_turned_off(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("HALLU_DIGEST_CACHE", "off")
    p = tmp_path / "w.bin"
    p.write_bytes(os.urandom(2 << 20))
    digests.file_digest(p)
    assert not cache.exists()
