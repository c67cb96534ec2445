"""The attention judge (MIA-DPO's selection): ratios by hand, every rule, and the whole path on a tiny
LLaVA: prepare mia -> rollout --capture-attention --corrupted-images -> judge."""

import math

import pytest
from PIL import Image
from typer.testing import CliRunner

from hallu.commands import app
from hallu.errors import HalluError
from hallu.judges import attention as A
from hallu.judges.base import JudgeGroup
from hallu.records import Prompt, Response, Revision, read_records, write_records

runner = CliRunner()
OPTS = dict(A.OPTIONS)


def test_sequence_ratio_by_hand():
    # means 0.3/16 = 0.01875 and 0.1/16 = 0.00625 -> 0.75 and 0.25
    assert A.sequence_ratio([0.3, 0.1], [16, 16], 1) == pytest.approx(0.75)
    assert A.sequence_ratio([0.3, 0.1], [16, 16], 2) == pytest.approx(0.25)
    # unequal token counts: means 0.2/10 = 0.02, 0.2/40 = 0.005 -> 0.8
    assert A.sequence_ratio([0.2, 0.2], [10, 40], 1) == pytest.approx(0.8)


def test_grid_ratio_splits_like_array_split():
    m4 = [float(i) for i in range(16)]  # 4x4, row r = 4r..4r+3
    # 1x2: left half is columns 0-1 -> 0+1+4+5+8+9+12+13 = 52 of 120
    assert A.grid_ratio(m4, 1, 2, 1) == pytest.approx(52 / 120)
    assert A.grid_ratio(m4, 1, 2, 2) == pytest.approx(68 / 120)
    # 5x5 into 2x2: rows/cols [0,3) and [3,5) (the remainder goes to the first block)
    m5 = [1.0] * 25
    assert [A.grid_ratio(m5, 2, 2, k) for k in (1, 2, 3, 4)] == pytest.approx([9 / 25, 6 / 25, 6 / 25, 4 / 25])
    # 1x3 of a 4x4 map: columns [0,2), [2,3), [3,4)
    assert A.grid_ratio([1.0] * 16, 1, 3, 2) == pytest.approx(4 / 16)
    with pytest.raises(ValueError, match="15 tokens is not square"):
        A.grid_ratio([1.0] * 15, 1, 2, 1)


def test_pip_ratio_is_the_central_16_of_24():
    m = [1.0] * 576
    assert A.pip_ratio(m) == pytest.approx(256 / 576)
    only_centre = [1.0 if 4 <= i // 24 < 20 and 4 <= i % 24 < 20 else 0.0 for i in range(576)]
    assert A.pip_ratio(only_centre) == pytest.approx(1.0)


def test_word_edit_distance():
    assert A.word_edit_distance("a red car", "a blue car") == pytest.approx(1 / 3)
    assert A.word_edit_distance("a b", "a b c d") == pytest.approx(2 / 4)
    assert A.word_edit_distance("same words", "same words") == 0.0


def _prompt(fmt="sequence", **mia):
    defaults = {"sequence": {"target": 1, "n_images": 2}, "grid": {"target": 2, "n_images": 2}, "pip": {}}[fmt]
    images = ["a.png", "b.png"] if fmt == "sequence" else ["a.png"]
    return Prompt(id="p", images=images, question="q", reference="A red square and a blue circle.",
                  meta={"mia": {"format": fmt, **defaults, **mia}})


def _response(text="A green triangle next to a dog.", ppl=2.0, **attention):
    att = {"layer": 1, "image_tokens": [16, 16], "image_shares": [0.1, 0.4], "text_share": 0.5, **attention}
    return Response(id="p#0", prompt_id="p", sample=0, text=text, model="m",
                    meta={"attention": att, "perplexity": ppl})


def _verdict(prompt, response, **opts):
    rev = A.judge_response(prompt, response, {**OPTS, **opts})
    Revision.from_dict(rev, "test")
    return rev


def test_sequence_selection_rules():
    rev = _verdict(_prompt(), _response())
    assert rev["meta"]["role"] == "rejected" and rev["meta"]["chosen"] == "reference"
    assert rev["text"] == "A red square and a blue circle."  # the pair's chosen side
    assert rev["meta"]["ratio"] == pytest.approx(0.2) and rev["meta"]["rule"] == "r <= 0.8"
    assert rev["meta"]["length_ratio"] == pytest.approx(7 / 7)
    # the model looked at the target image: 0.9 of the attention -> not selected
    rev = _verdict(_prompt(), _response(image_shares=[0.45, 0.05]))
    assert rev["meta"]["role"] is None and rev["meta"]["dropped"].startswith("attention ratio 0.9000 not <= 0.8")
    assert rev["text"] == "A green triangle next to a dog."
    # exactly at the threshold is selected for sequences (r <= t)
    assert _verdict(_prompt(), _response(image_shares=[0.4, 0.1]))["meta"]["role"] == "rejected"
    # a confident answer (ppl <= 1.1) is not a hallucination candidate
    assert "perplexity 1.0500 <= min_perplexity 1.1" in _verdict(_prompt(), _response(ppl=1.05))["meta"]["dropped"]
    # three images have their own threshold
    rev = _verdict(_prompt(n_images=3), _response(image_tokens=[16] * 3, image_shares=[0.2, 0.1, 0.1]))
    assert rev["meta"]["threshold"] == 0.7 and rev["meta"]["role"] == "rejected"


def test_grid_and_pip_use_the_map():
    left_heavy = [3.0 if i % 4 < 2 else 1.0 for i in range(16)]  # target 2 (right half) gets 1/4
    rev = _verdict(_prompt("grid"), _response(map=left_heavy))
    assert rev["meta"]["ratio"] == pytest.approx(0.25) and rev["meta"]["rule"] == "r < 0.7"
    assert rev["meta"]["role"] == "rejected"
    rev = _verdict(_prompt("grid", target=1), _response(map=left_heavy))
    assert rev["meta"]["dropped"].startswith("attention ratio 0.7500 not < 0.7")
    rev = _verdict(_prompt("grid", n_images=5), _response(map=left_heavy))
    assert rev["meta"]["dropped"] == "no attention ratio: no grid threshold for 5 images"
    rev = _verdict(_prompt("pip"), _response(map=[1.0] * 576))
    assert rev["meta"]["ratio"] == pytest.approx(256 / 576) and rev["meta"]["role"] == "rejected"
    rev = _verdict(_prompt("pip"), _response(map=[1.0] * 576), pip_threshold=0.4)
    assert rev["meta"]["role"] is None
    rev = _verdict(_prompt("pip"), _response())  # no map recorded
    assert "no attention map" in rev["meta"]["dropped"]


def test_post_selection_and_pre_filters():
    p = _prompt()
    assert _verdict(p, _response(text="A red square and a blue circle."))["meta"]["dropped"] == (
        "response equals the reference")
    assert _verdict(p, _response(text="  "))["meta"]["dropped"] == "empty response"
    long = " ".join(["dog"] * 40)  # 40 words vs 7: ratio 5.71 > 5
    assert _verdict(p, _response(text=long))["meta"]["dropped"] == "length ratio 5.714 outside [0.2, 5.0]"
    near = "A red square and a blue circles."  # one word of 7 differs: 0.143
    assert _verdict(p, _response(text=near))["meta"]["role"] == "rejected"
    rev = _verdict(p, _response(text=near), min_edit_distance=0.2)
    assert rev["meta"]["dropped"] == "edit distance 0.143 < min_edit_distance 0.2"
    short_ref = Prompt(id="p", images=p.images, question="q", reference="x" * 600, meta=p.meta)
    assert _verdict(short_ref, _response())["meta"]["dropped"].startswith("reference of 600 chars >= ")
    plain = Prompt(id="p", images=["a.png"], question="q", reference="r")
    assert _verdict(plain, _response())["meta"]["dropped"].startswith("not a MIA-DPO prompt")
    later = _response()
    later.meta["turn"] = 2
    assert _verdict(p, later)["meta"]["dropped"].startswith("the response answers user turn 2")
    refusal = _prompt(refusal=True, target=3)
    rev = _verdict(refusal, _response(image_shares=[0.5, 0.4]))
    assert rev["meta"]["role"] == "rejected" and rev["meta"]["rule"].startswith("refusal")


def test_missing_statistics_and_bad_options_are_one_clear_error():
    bare = Response(id="p#0", prompt_id="p", sample=0, text="A dog.", model="m")
    with pytest.raises(HalluError, match="response 'p#0': no attention statistics.*--capture-attention"):
        A.judge_response(_prompt(), bare, OPTS)
    with pytest.raises(HalluError, match="--option sequence_thresholds=2-0.8"):
        A.check({"sequence_thresholds": "2-0.8"})
    with pytest.raises(HalluError, match="--option grid_thresholds=2:1.5"):
        A.check({"grid_thresholds": "2:1.5"})
    with pytest.raises(HalluError, match="min_length_ratio=6.0 is above max_length_ratio=5.0"):
        A.check({"min_length_ratio": 6.0})
    with pytest.raises(HalluError, match="--option min_perplexity=-1"):
        A.check({"min_perplexity": -1})


def test_several_selected_samples_rank_by_ratio_and_top_perplexity_drops():
    p = _prompt()
    resps = [Response(id=f"p#{k}", prompt_id="p", sample=k, text=f"A green triangle number {k} here.", model="m",
                      meta={"attention": {"image_tokens": [16, 16], "image_shares": [s, 0.4]}, "perplexity": ppl})
             for k, (s, ppl) in enumerate([(0.2, 3.0), (0.05, 9.0), (0.3, 1.5)])]
    revs = A.judge_groups([JudgeGroup(p, resps, [])], OPTS)
    assert [r["meta"]["rank"] for r in revs] == [2, 1, 3]
    assert A.drop_top_perplexity(revs, 0.34) == {"p#1"}
    assert A.drop_top_perplexity(revs, 0.0) == set()


# --------------------------------------------------------------------------------------------------
# On a tiny LLaVA


@pytest.fixture(scope="module")
def mia_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mia-judge")
    src = root / "src"
    (src / "coco").mkdir(parents=True)
    prompts = []
    for i, c in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]):
        Image.new("RGB", (64, 48), c).save(src / "coco" / f"img{i}.png")
        prompts.append(Prompt(id=f"c{i}", images=[f"coco/img{i}.png"], question="What colour is the picture?",
                              reference=f"The picture is colour number {i}."))
    write_records(src / "prompts.jsonl", prompts)
    r = runner.invoke(app, ["prepare", "tiny-model", "--family", "llava", "--out", str(root / "model")])
    assert r.exit_code == 0, r.output
    run = root / "run"
    r = runner.invoke(app, ["prepare", "mia", "--prompts", str(src / "prompts.jsonl"), "--out", str(run),
                            "--refusal-every", "0", "--seed", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["rollout", "--run", str(run), "--model", str(root / "model"), "--greedy",
                            "--max-new-tokens", "6", "--capture-attention", "--corrupted-images"])
    assert r.exit_code == 0, r.output
    return root, run


def test_judge_on_a_tiny_llava_rollout(mia_run):
    root, run = mia_run
    prompts = {p.id: p for p in read_records(run / "data" / "prompts.jsonl", Prompt)}
    responses = read_records(run / "rollout" / "responses.jsonl", Response)
    assert {p.meta["mia"]["format"] for p in prompts.values()} == {"sequence", "grid", "pip"}
    groups = [JudgeGroup(prompts[r.prompt_id], [r], []) for r in responses]
    revs = A.judge_groups(groups, OPTS)
    assert len(revs) == len(responses)
    for rev, resp in zip(revs, responses, strict=True):
        prompt, att, meta = prompts[resp.prompt_id], resp.meta["attention"], rev["meta"]
        assert len(att["image_shares"]) == len(prompt.images)
        assert sum(att["image_shares"]) + att["text_share"] == pytest.approx(1.0, abs=1e-4)
        mia = prompt.meta["mia"]
        if mia["format"] == "sequence":
            want = A.sequence_ratio(att["image_shares"], att["image_tokens"], mia["target"])
        else:
            assert len(att["map"]) == 16 and sum(att["map"]) == pytest.approx(att["image_shares"][0], abs=1e-5)
            want = (A.grid_ratio(att["map"], *A.GRID_SHAPES[mia["n_images"]], mia["target"])
                    if mia["format"] == "grid" else A.pip_ratio(att["map"]))
        if "ratio" in meta:
            assert meta["ratio"] == pytest.approx(want)
            selected = (want <= meta["threshold"]) if mia["format"] == "sequence" else (want < meta["threshold"])
            if not selected:
                assert meta["role"] is None and meta["dropped"].startswith("attention ratio")
        assert math.isfinite(resp.meta["perplexity"]) and resp.meta["perplexity"] >= 1.0
    # random weights: the tiny model is unsure of everything, so some answers pass every rule
    assert any(r["meta"]["role"] == "rejected" for r in revs)


def test_revise_stage_with_the_attention_judge(mia_run):
    _, run = mia_run
    r = runner.invoke(app, ["revise", "--run", str(run), "--judge", "attention", "--option", "min_perplexity=1.5"])
    assert r.exit_code == 0, r.output
    revs = read_records(run / "revise" / "revisions.jsonl", Revision)
    responses = read_records(run / "rollout" / "responses.jsonl", Response)
    assert [v.id for v in revs] == [r.id for r in responses]
    assert all(v.judge == "attention" for v in revs)
    for v, resp in zip(revs, responses, strict=True):
        if resp.meta["perplexity"] <= 1.5 and v.meta.get("dropped"):
            assert v.meta["role"] is None
