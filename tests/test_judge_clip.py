"""The clip judge (CLIP-DPO's ranking) on a tiny random CLIP: scores against a direct CLIPModel forward,
the rule filters, best-vs-worst with the gap, and the errors for bad options."""

import math

import pytest
import torch
from PIL import Image

from hallu.errors import HalluError
from hallu.judges import clip as J
from hallu.judges.base import JudgeGroup
from hallu.records import Prompt, Response, Revision
from hallu.tiny_clip import build_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "tiny-clip"
    build_tiny_clip(out, seed=1)
    return out


def _group(tmp_path, texts, pid="p1", colours=((200, 30, 30),)):
    images = []
    for k, c in enumerate(colours):
        path = tmp_path / f"{pid}-{k}.png"
        Image.new("RGB", (40, 36), c).save(path)
        images.append(path)
    prompt = Prompt(id=pid, images=[p.name for p in images], question="Describe the image.")
    responses = [Response(id=f"{pid}#{i}", prompt_id=pid, sample=i, text=t, model="m") for i, t in enumerate(texts)]
    return JudgeGroup(prompt=prompt, responses=responses, images=images)


def _reference_scores(clip_dir, texts, image_paths):
    """100·max(cos, 0), the mean cosine over images, from CLIPModel's own logits (logit_scale · cos)."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    proc = AutoProcessor.from_pretrained(clip_dir)
    images = [Image.open(p).convert("RGB") for p in image_paths]
    enc = proc(text=texts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits_per_text  # (texts, images)
    cos = logits / model.logit_scale.exp().detach()
    return [100 * max(float(c), 0.0) for c in cos.mean(-1)]


TEXTS = ["A dog.", "There is a red car next to the bus.", "Two cats and a cup.", "A fork and a knife."]


def test_scores_equal_a_direct_clip_forward_and_roles_follow_them(clip_dir, tmp_path):
    group = _group(tmp_path, TEXTS, colours=((200, 30, 30), (10, 120, 240)))
    opts = {"clip_model": str(clip_dir), "gap": 0.0}
    J.check({**J.OPTIONS, **opts})
    revs = J.judge_groups([group], opts)
    ref = _reference_scores(clip_dir, TEXTS, group.images)
    assert any(r > 0 for r in ref)  # the fixture must be able to tell candidates apart
    assert [r["id"] for r in revs] == [f"p1#{i}" for i in range(4)]
    for rev, want in zip(revs, ref, strict=True):
        Revision.from_dict(rev, "test")  # a valid record
        assert rev["meta"]["score"] == pytest.approx(want, abs=1e-4)
        assert rev["text"] == TEXTS[int(rev["id"][-1])]
    best = max(range(4), key=lambda i: (ref[i], -i))
    worst = min(range(4), key=lambda i: (ref[i], -i))
    roles = {rev["id"]: rev["meta"]["role"] for rev in revs}
    assert roles[f"p1#{best}"] == "chosen" and roles[f"p1#{worst}"] == "rejected"
    assert sum(r is not None for r in roles.values()) == 2
    ranks = sorted(range(4), key=lambda i: (-ref[i], i))
    assert [revs[i]["meta"]["rank"] for i in ranks] == [1, 2, 3, 4]
    meta = revs[best]["meta"]
    assert meta["gap"] == pytest.approx(ref[best] - ref[worst], abs=1e-4)
    assert meta["clip"]["gap"] == 0.0 and meta["clip"]["max_tokens"] == 77 and meta["clip"]["model_digest"]


def test_a_gap_larger_than_the_spread_makes_no_pair(clip_dir, tmp_path):
    group = _group(tmp_path, TEXTS)
    ref = _reference_scores(clip_dir, TEXTS, group.images)
    spread = max(ref) - min(ref)
    revs = J.judge_groups([group], {"clip_model": str(clip_dir), "gap": math.floor(spread) + 1.0})
    assert all(r["meta"]["role"] is None for r in revs)
    assert revs[0]["meta"]["no_pair"].startswith(f"score gap {spread:.3f} <")


def test_filters_drop_empty_long_and_low_scoring_candidates(clip_dir, tmp_path):
    long_text = " ".join(["dog"] * 80)  # 80 word tokens + start/end: over CLIP's 77
    texts = ["A dog.", "", long_text, "A red car.", "A fork and a knife."]
    group = _group(tmp_path, texts, pid="p2", colours=((10, 120, 240),))
    kept = [0, 3, 4]
    ref = dict(zip(kept, _reference_scores(clip_dir, [texts[i] for i in kept], group.images), strict=True))
    lowest, second = sorted(ref.values())[:2]
    assert lowest + 1 < second, ref  # the fixture's three scores must differ
    floor = (lowest + second) / 2  # drops the lowest of the three
    revs = J.judge_groups([group], {"clip_model": str(clip_dir), "gap": 0.0, "min_score": floor})
    meta = [r["meta"] for r in revs]
    assert meta[1]["dropped"] == "empty" and meta[1]["role"] is None
    assert meta[2]["tokens"] == 82 and meta[2]["dropped"] == "82 CLIP tokens > max_tokens 77"
    assert meta[2]["score"] is None
    low = min(kept, key=lambda i: ref[i])
    assert meta[low]["dropped"].startswith("score ") and meta[low]["role"] is None
    survivors = [i for i in kept if i != low]
    hi, lo = sorted(survivors, key=lambda i: (-ref[i], i))
    assert meta[hi]["role"] == "chosen" and meta[lo]["role"] == "rejected"


def test_select_by_hand():
    assert J.select([10.0, None, 30.0, 12.0], gap=2.0) == (2, 0, None)
    assert J.select([10.0, 11.0], gap=2.0)[:2] == (None, None)
    assert J.select([5.0, 5.0, 5.0], gap=0.0) == (0, 2, None)  # ties: never the same candidate twice
    assert J.select([None, 4.0], gap=0.0)[2] == "1 candidate(s) passed the filters, a pair needs 2"


def test_bad_options_are_one_clear_error(clip_dir, tmp_path):
    with pytest.raises(HalluError, match="no CLIP model given"):
        J.check(dict(J.OPTIONS))
    with pytest.raises(HalluError, match="no config.json"):
        J.check({**J.OPTIONS, "clip_model": str(tmp_path)})
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(HalluError, match="model_type is 'llava'"):
        J.check({**J.OPTIONS, "clip_model": str(tmp_path)})
    with pytest.raises(HalluError, match=r"--option gap=-1.0"):
        J.check({**J.OPTIONS, "clip_model": str(clip_dir), "gap": -1.0})
    with pytest.raises(HalluError, match=r"--option max_tokens=0"):
        J.check({**J.OPTIONS, "clip_model": str(clip_dir), "max_tokens": 0})


def test_revise_stage_builds_clip_dpo_pairs_from_a_tiny_rollout(clip_dir, tmp_path):
    """prepare shapes -> tiny LLaVA rollout (4 samples) -> revise --judge clip: the pair of each prompt is its
    best- and worst-scored sample, with the judge's numbers; a rerun resumes to the same file."""
    from typer.testing import CliRunner

    from hallu.commands import app
    from hallu.records import PreferencePair, read_records

    runner = CliRunner()
    run, model = tmp_path / "run", tmp_path / "model"
    for args in (["prepare", "shapes", "--out", run, "--images", 3, "--seed", 2],
                 ["prepare", "tiny-model", "--family", "llava", "--out", model],
                 ["rollout", "--run", run, "--model", model, "--n", 4, "--max-new-tokens", 8, "--limit", 4]):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["revise", "--run", str(run), "--judge", "clip", "--option", f"clip_model={clip_dir}",
                            "--option", "gap=0.5"])
    assert r.exit_code == 0, r.output
    revs = read_records(run / "revise" / "revisions.jsonl", Revision)
    pairs = read_records(run / "revise" / "pairs.jsonl", PreferencePair)
    responses = read_records(run / "rollout" / "responses.jsonl", Response)
    assert [v.id for v in revs] == [r.id for r in responses] and len(revs) >= 8
    by_prompt: dict = {}
    for rev in revs:
        by_prompt.setdefault(rev.response_id.split("#")[0], []).append(rev)
    expected = 0
    for pid, group in by_prompt.items():
        scored = [v for v in group if v.meta["score"] is not None]
        best = max(scored, key=lambda v: (v.meta["score"], -int(v.id.split("#")[1])))
        worst = min(scored, key=lambda v: (v.meta["score"], -int(v.id.split("#")[1])))
        if best.meta["score"] - worst.meta["score"] >= 0.5:
            expected += 1
            pair = next(p for p in pairs if p.meta["prompt_id"] == pid)
            assert (pair.meta["chosen_response"], pair.meta["rejected_response"]) == (best.id, worst.id)
            assert pair.chosen == best.text and pair.rejected == worst.text
            assert pair.meta["chosen_judge"]["clip"]["gap"] == 0.5
    assert len(pairs) == expected >= 1
    before = (run / "revise" / "revisions.jsonl").read_bytes()
    r = runner.invoke(app, ["revise", "--run", str(run), "--judge", "clip", "--option", f"clip_model={clip_dir}",
                            "--option", "gap=0.5"])
    assert r.exit_code == 0, r.output
    assert (run / "revise" / "revisions.jsonl").read_bytes() == before
    r = runner.invoke(app, ["revise", "--run", str(run), "--judge", "clip"])
    assert r.exit_code == 2 and "no CLIP model given" in r.output and "Traceback" not in r.output
