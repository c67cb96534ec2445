"""Rollout beyond plain sampling: beam search, per-token log-probs, multi-image and multi-turn prompts,
MIA-DPO's attention capture and corrupted inputs; each against the model run by hand."""

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hallu import tiny
from hallu.commands import app
from hallu.engine import Decoding, Engine, GenRequest, ScoreRequest
from hallu.manifest import Run
from hallu.models import load_model
from hallu.records import Prompt, Response, read_records, write_records
from hallu.rollout import RolloutOptions

runner = CliRunner()
TURNS = [{"role": "user", "text": "Is there a dog?"}, {"role": "assistant", "text": "No"},
         {"role": "user", "text": "Is there a cat in the image?"}, {"role": "assistant", "text": "Yes"}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout-more")
    tiny.build_tiny_model("llava", root / "model", seed=2)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (48, 32), (10, 100, 200)).save(root / "b.png")
    Image.new("RGB", (40, 40), (90, 200, 90)).save(root / "noisy.png")
    prompts = [
        Prompt(id="single", images=["a.png"], question="Describe the image."),
        Prompt(id="multi", images=["a.png", "b.png"], question="<image> left, <image> right: same?"),
        Prompt(id="turns", images=["a.png"], question="Is there a dog?", meta={"turns": TURNS}),
        Prompt(id="pip", images=["a.png"], question="Looking at the central image, what is it?",
               reference="A red square.", meta={"mia": {"format": "pip", "corrupted_image": "noisy.png"}}),
    ]
    write_records(root / "prompts.jsonl", prompts)
    return root, load_model(root / "model")


def rollout(root, run, *args):
    r = runner.invoke(app, ["rollout", "--run", str(run), "--model", str(root / "model"), "--prompts",
                            str(root / "prompts.jsonl"), *[str(a) for a in args]])
    return r


def responses(run):
    return {r.id: r for r in read_records(run / "rollout" / "responses.jsonl", Response)}


def by_hand(lm, messages, images, **generate):
    """The processor's own rendering of ``messages``, one unbatched ``model.generate``."""
    text = lm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = lm.processor(images=images, text=[text], return_tensors="pt")
    with torch.inference_mode():
        out = lm.model.generate(**enc, do_sample=False, pad_token_id=lm.processor.tokenizer.pad_token_id,
                                **generate)
    return lm.processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _user(text, n_images=0):
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def _images(root, *names):
    return [Image.open(root / n).convert("RGB") for n in names]


def test_multi_image_and_multi_turn_equal_the_model_run_by_hand(world, tmp_path):
    root, lm = world
    r = rollout(root, tmp_path / "run", "--greedy", "--max-new-tokens", 8)
    assert r.exit_code == 0, r.output
    got = responses(tmp_path / "run")
    multi = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "left,"}, {"type": "image"},
                                          {"type": "text", "text": "right: same?"}]}]
    assert got["multi#0"].text == by_hand(lm, multi, _images(root, "a.png", "b.png"), max_new_tokens=8)
    # the last user turn is answered, after the first question and the answer the data set gave
    conversation = [_user("Is there a dog?", 1), {"role": "assistant", "content": [{"type": "text", "text": "No"}]},
                    _user("Is there a cat in the image?")]
    assert Engine.messages(GenRequest("turns", ["a.png"], "Is there a cat in the image?", history=TURNS[:2])) == (
        conversation)
    assert got["turns#0"].text == by_hand(lm, conversation, _images(root, "a.png"), max_new_tokens=8)
    assert got["single#0"].text == by_hand(lm, [_user("Describe the image.", 1)], _images(root, "a.png"),
                                           max_new_tokens=8)
    assert all(r.logprobs is None and "attention" not in r.meta for r in got.values())
    assert got["turns#0"].meta["turn"] == 1 and "turn" not in got["single#0"].meta
    # --turn first: the first question, as a single-turn prompt
    r = rollout(root, tmp_path / "first", "--greedy", "--max-new-tokens", 8, "--turn", "first")
    assert r.exit_code == 0, r.output
    first = responses(tmp_path / "first")["turns#0"]
    assert first.text == by_hand(lm, [_user("Is there a dog?", 1)], _images(root, "a.png"), max_new_tokens=8)
    assert "turn" not in first.meta and first.text != got["turns#0"].text
    assert Run(tmp_path / "first").stage_record("rollout")["options"]["turn"] == "first"


def test_beam_search_equals_generate_with_beams(world, tmp_path):
    root, lm = world
    r = rollout(root, tmp_path / "run", "--num-beams", 3, "--max-new-tokens", 8)
    assert r.exit_code == 0, r.output
    got = responses(tmp_path / "run")
    assert got["single#0"].text == by_hand(lm, [_user("Describe the image.", 1)], _images(root, "a.png"),
                                           max_new_tokens=8, num_beams=3)
    options = Run(tmp_path / "run").stage_record("rollout")["options"]
    assert options["num_beams"] == 3


def _greedy_by_hand(lm, request, max_new_tokens):
    """Greedy decoding with a full forward per step (no cache, no batch): tokens and their log-probs."""
    text = lm.processor.apply_chat_template(Engine.messages(request), add_generation_prompt=True, tokenize=False)
    images = [Image.open(i).convert("RGB") for i in request.images]
    enc = lm.processor(images=images, text=[text], return_tensors="pt")
    ids, eos = enc["input_ids"], lm.model.generation_config.eos_token_id
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        with torch.inference_mode():
            logits = lm.model(**{**enc, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[0, -1]
        lp = logits.float().log_softmax(-1)
        t = int(lp.argmax())
        if t == eos:
            break
        tokens.append(t)
        logprobs.append(float(lp[t]))
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return tokens, logprobs


@pytest.mark.parametrize("share_prefix", [True, False])
def test_logprobs_equal_a_step_by_step_forward(world, share_prefix):
    root, lm = world
    reqs = [GenRequest("single", [root / "a.png"], "Describe the image."),
            GenRequest("multi", [root / "a.png", root / "b.png"], "<image> left, <image> right: same?"),
            GenRequest("turns", [root / "a.png"], "Is there a cat in the image?", history=TURNS[:2])]
    engine = Engine(lm.model, lm.processor, batch_size=4, share_prefix=share_prefix)
    gens = {g.id: g for b in engine.generate(reqs, Decoding(max_new_tokens=7, logprobs=True)) for g in b}
    assert len(gens) == 3
    for req in reqs:
        g = gens[req.id]  # the shared path yields rows grouped by image
        tokens, logprobs = _greedy_by_hand(lm, GenRequest(req.id, [str(i) for i in req.images], req.text,
                                                          history=req.history), 7)
        assert g.tokens == len(tokens) == len(g.logprobs)
        assert g.text == lm.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert g.logprobs == pytest.approx(logprobs, abs=1e-4)


def test_sampled_logprobs_are_the_untempered_model_and_cover_every_token(world, tmp_path):
    root, lm = world
    req = GenRequest("single", [root / "a.png"], "Describe the image.")
    engine = Engine(lm.model, lm.processor)
    decoding = Decoding(max_new_tokens=6, do_sample=True, temperature=0.5, n=3, seed=4, logprobs=True)
    text = lm.processor.apply_chat_template(Engine.messages(req), add_generation_prompt=True, tokenize=False)
    enc = lm.processor(images=_images(root, "a.png"), text=[text], return_tensors="pt")
    for g in [g for b in engine.generate([req], decoding) for g in b]:
        ids = torch.cat([enc["input_ids"], torch.tensor([g.token_ids])], 1)
        with torch.inference_mode():
            logits = lm.model(**{**enc, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[0]
        n = enc["input_ids"].shape[1]
        steps = logits[n - 1 : n - 1 + len(g.token_ids)].float()
        raw = steps.log_softmax(-1).gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
        tempered = (steps / 0.5).log_softmax(-1).gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
        assert g.logprobs == pytest.approx(raw.tolist(), abs=1e-4)
        assert not torch.allclose(raw, tempered, atol=1e-3)
    r = rollout(root, tmp_path / "run", "--n", 2, "--temperature", 0.5, "--max-new-tokens", 6, "--logprobs")
    assert r.exit_code == 0, r.output
    got = responses(tmp_path / "run")
    assert len(got) == 8
    assert all(len(resp.logprobs) == resp.meta["tokens"] and max(resp.logprobs) <= 0 for resp in got.values())


def test_capture_attention_records_what_the_engine_measures(world, tmp_path):
    root, lm = world
    run = tmp_path / "run"
    r = rollout(root, run, "--greedy", "--max-new-tokens", 6, "--capture-attention")
    assert r.exit_code == 0, r.output
    got = responses(run)
    assert Run(run).stage_record("rollout")["attention_layer"] == 1  # the middle of 2 layers
    engine = Engine(lm.model, lm.processor)
    for pid, names, text in [("single", ["a.png"], "Describe the image."),
                             ("multi", ["a.png", "b.png"], "<image> left, <image> right: same?")]:
        resp = got[f"{pid}#0"]
        req = ScoreRequest(pid, _images(root, *names), text, completions=[resp.text])
        [att] = next(engine.attention([req], layers=[1], maps=True))
        [score] = next(engine.score([req], include_eos=True))
        a = resp.meta["attention"]
        assert a["layer"] == 1 and a["image_tokens"] == [16] * len(names)
        assert a["image_shares"] == pytest.approx(att.image_shares[0], abs=1e-5)
        assert a["ratios"] == pytest.approx(att.ratios(), abs=1e-5)
        assert sum(a["image_shares"]) + a["text_share"] == pytest.approx(1.0, abs=1e-5)
        assert resp.meta["perplexity"] == pytest.approx(score.perplexity, rel=1e-4)
        if len(names) == 1:
            assert a["map"] == pytest.approx(att.image_maps[0][0], abs=1e-6)
            assert sum(a["map"]) == pytest.approx(a["image_shares"][0], abs=1e-5)
        else:
            assert "map" not in a
    # turns: attention over the whole conversation, the images in the first turn
    assert got["turns#0"].meta["attention"]["image_tokens"] == [16]
    r = rollout(root, tmp_path / "run0", "--greedy", "--max-new-tokens", 6, "--capture-attention",
                "--attention-layer", -2)
    assert r.exit_code == 0, r.output
    assert responses(tmp_path / "run0")["single#0"].meta["attention"]["layer"] == 0


def test_corrupted_images_answer_from_the_noisy_copy(world, tmp_path):
    root, lm = world
    r = rollout(root, tmp_path / "run", "--greedy", "--max-new-tokens", 8, "--corrupted-images")
    assert r.exit_code == 0, r.output
    got = responses(tmp_path / "run")
    q = [_user("Looking at the central image, what is it?", 1)]
    assert got["pip#0"].text == by_hand(lm, q, _images(root, "noisy.png"), max_new_tokens=8)
    assert got["single#0"].text == by_hand(lm, [_user("Describe the image.", 1)], _images(root, "a.png"),
                                           max_new_tokens=8)  # prompts without a corrupted copy: unchanged


def test_resume_after_a_torn_line_with_everything_recorded(world, tmp_path):
    root, _ = world
    args = ["--n", 2, "--max-new-tokens", 6, "--logprobs", "--capture-attention", "--batch-size", 1]
    assert rollout(root, tmp_path / "a", *args).exit_code == 0
    expected = (tmp_path / "a" / "rollout" / "responses.jsonl").read_bytes()
    (tmp_path / "b" / "rollout").mkdir(parents=True)
    lines = expected.splitlines(keepends=True)
    (tmp_path / "b" / "rollout" / "responses.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][:40])
    r = rollout(root, tmp_path / "b", *args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "rollout" / "responses.jsonl").read_bytes() == expected


def test_new_options_are_recorded_only_when_used():
    plain = RolloutOptions().recorded()
    assert not {"num_beams", "logprobs", "capture_attention", "attention_layer", "corrupted_images"} & set(plain)
    used = RolloutOptions(num_beams=4, capture_attention=True).recorded()
    assert used["num_beams"] == 4 and used["capture_attention"] is True and "logprobs" not in used


def _one_error_line(r, *fragments):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_bad_input_is_one_clear_line(world, tmp_path):
    root, _ = world
    _one_error_line(rollout(root, tmp_path / "r1", "--num-beams", 2, "--n", 2), "--num-beams 2", "--n 1")
    _one_error_line(rollout(root, tmp_path / "r2", "--num-beams", 2, "--logprobs"), "drop --logprobs")
    _one_error_line(rollout(root, tmp_path / "r2b", "--turn", "middle"), "--turn middle", "last, first")
    r = rollout(root, tmp_path / "r3", "--greedy", "--capture-attention", "--attention-layer", 5)
    _one_error_line(r, "--attention-layer 5", "2 decoder layers")
    assert not (tmp_path / "r3" / "rollout" / "responses.jsonl").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "t", "images": [str(root / "a.png")], "question": "q",
                               "meta": {"turns": [{"role": "user", "text": "q"}, {"from": "gpt", "value": "x"}]}})
                   + "\n")
    r = runner.invoke(app, ["rollout", "--run", str(tmp_path / "r4"), "--model", str(root / "model"), "--prompts",
                            str(bad)])
    _one_error_line(r, "bad.jsonl", "prompt 't'", "meta.turns")
    two_tags = [{"role": "user", "text": "<image> and <image>?"}, {"role": "assistant", "text": "x"},
                {"role": "user", "text": "and now?"}]
    bad.write_text(json.dumps({"id": "t", "images": [str(root / "a.png")], "question": "q",
                               "meta": {"turns": two_tags}}) + "\n")
    r = runner.invoke(app, ["rollout", "--run", str(tmp_path / "r5"), "--model", str(root / "model"), "--prompts",
                            str(bad)])
    _one_error_line(r, "prompt 't'", "2 <image> tags", "1 images")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"id": "m", "images": [str(root / "a.png")], "question": "q",
                                   "meta": {"mia": {"format": "pip", "corrupted_image": "nope.png"}}}) + "\n")
    r = runner.invoke(app, ["rollout", "--run", str(tmp_path / "r6"), "--model", str(root / "model"), "--prompts",
                            str(missing), "--corrupted-images"])
    _one_error_line(r, "prompt (corrupted image) 'm'", "nope.png", "not found")


def test_two_ranks_record_the_same_bytes_as_one_process(world, tmp_path):
    """--nproc 2 (gloo ranks) with log-probs and attention capture: the merged output is one process's."""
    import os
    import subprocess
    import sys

    root, _ = world
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = ["--n", 2, "--max-new-tokens", 6, "--logprobs", "--capture-attention", "--batch-size", 1]
    assert rollout(root, tmp_path / "one", *args).exit_code == 0
    cmd = [sys.executable, "-m", "hallu", "rollout", "--run", str(tmp_path / "two"), "--model", str(root / "model"),
           "--prompts", str(root / "prompts.jsonl"), *map(str, args), "--nproc", "2"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    one = (tmp_path / "one" / "rollout" / "responses.jsonl").read_bytes()
    assert (tmp_path / "two" / "rollout" / "responses.jsonl").read_bytes() == one
    assert b'"attention"' in one and b'"logprobs": [' in one
