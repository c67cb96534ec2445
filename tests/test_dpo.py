"""`hallu dpo` on a tiny LLaVA: logs, references, methods, resume after SIGKILL, and bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hallu import tiny
from hallu.commands import app

OBJECTS = ["dog", "cat", "fork", "knife", "cup", "bowl"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("dpo")
    tiny.build_tiny_model("llava", root / "model", seed=0)
    rng = random.Random(0)
    (root / "img").mkdir()
    rows = []
    for i in range(8):
        Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))).save(root / "img" / f"{i}.png")
        a, b = rng.sample(OBJECTS, 2)
        original = f"There is a {a} next to the {b}."
        revised = f"There is a {a} and a cup."
        rows.append({"id": f"p{i}", "images": [f"img/{i}.png"], "prompt": "Describe the image in detail.",
                     "chosen": f"There is a {a}.", "rejected": original,
                     "meta": {"revised": revised,
                              "sentences_original": [{"text": original, "score": 2,
                                                      "error_type": "image_recognition_error"}],
                              "sentences_revised": [{"text": revised, "score": "3", "error_type": "Correct"}],
                              "chosen_variants": [f"There is a {a}.", f"I see a {a}."],
                              "rejected_variants": [original, f"A {a} and a {b}."]}})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _dpo(world, run, *extra):
    args = ["dpo", "--run", str(run), "--model", str(world / "model"), "--pairs", str(world / "pairs.jsonl"),
            "--batch-size", "2", "--logging-steps", "1", *extra]
    return CliRunner().invoke(app, args)


def _log(path: Path) -> list[dict]:
    """The per-step training rows (the file also ends with the Trainer's run summary)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert "train_runtime" in rows[-1]
    return [r for r in rows if "loss" in r]


def test_dpo_logs_like_trl_and_saves_an_adapter_that_reloads(world, tmp_path):
    r = _dpo(world, tmp_path / "run", "--max-steps", "3", "--set", "learning_rate=1e-3")
    assert r.exit_code == 0, r.output
    out = tmp_path / "run" / "dpo"
    log = _log(out / "log_history.jsonl")
    assert [row["step"] for row in log] == [1, 2, 3]
    first = log[0]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert key in first
    # the policy starts as the reference: rewards 0, loss log 2
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert first["rewards/chosen"] == 0.0 and first["rewards/margins"] == 0.0
    assert log[-1]["rewards/margins"] > 0  # it learned to prefer the chosen answers
    # the reference log-probs were stored with the data: one row per pair, per-token lists
    refs = [json.loads(x) for x in (out / "reference_logps.jsonl").read_text().splitlines()]
    assert len(refs) == 1 + 8 and all(len(r["ref"]) == 2 for r in refs[1:])
    assert sum(refs[1]["ref"][0]) == pytest.approx(log[0]["logps/chosen"], abs=30)  # same scale, sums of logps
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    stage = manifest["stages"]["dpo"]
    assert stage["status"] == "done"
    assert stage["steps"] == 3 and stage["world_size"] == 1
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(world / "model")
    peft_model = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_adapter_off_reference_matches_the_precomputed_one_at_the_start(world, tmp_path):
    r = _dpo(world, tmp_path / "run", "--max-steps", "1", "--reference", "adapter-off")
    assert r.exit_code == 0, r.output
    log = _log(tmp_path / "run" / "dpo" / "log_history.jsonl")
    assert log[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert not (tmp_path / "run" / "dpo" / "reference_logps.jsonl").exists()


def test_opa_dpo_logs_every_term_and_warns_without_the_opa_stage(world, tmp_path):
    r = _dpo(world, tmp_path / "run", "--method", "opa-dpo", "--max-steps", "2", "--set", "warmup_steps=0",
             "--set", "learning_rate=1e-3", "--set", "opa-dpo.position_wise=true")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "hallu sft --method opa-dpo" in r.output
    log = _log(tmp_path / "run" / "dpo" / "log_history.jsonl")
    for term in ("pair_gt", "pair_revised", "image_gt", "image_revised", "anchor"):
        assert f"loss/{term}" in log[0]
    assert log[0]["loss/anchor"] == pytest.approx(4 * 0.693147, abs=1e-4)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["dpo"]["options"]["method_options"]["position_wise"] is True
    refs = [json.loads(x) for x in (tmp_path / "run" / "dpo" / "reference_logps.jsonl").read_text().splitlines()]
    assert len(refs[1]["ref"]) == 5  # gt, original, revised, gt on the masked image, revised on the masked image
    # §5.4: only the language model's LoRA trains in this stage (r256/α512, no vision tower, no projector)
    from safetensors import safe_open

    adapter = tmp_path / "run" / "dpo" / "adapter"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("language_model" in k for k in keys)
    assert not [k for k in keys if "vision_tower" in k or "multi_modal_projector" in k]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 256 and config["lora_alpha"] == 512


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_opa_dpo_full_finetuning_leaves_the_vision_tower_and_projector_alone(world, tmp_path):
    r = _dpo(world, tmp_path / "run", "--method", "opa-dpo", "--full", "--max-steps", "1",
             "--set", "warmup_steps=0", "--set", "learning_rate=1e-2")
    assert r.exit_code == 0, r.output
    before, after = _weights(world / "model"), _weights(tmp_path / "run" / "dpo" / "model")
    vision = [k for k in before if "vision_tower" in k or "multi_modal_projector" in k]
    language = [k for k in before if "language_model" in k and k.endswith("q_proj.weight")]
    assert vision and language
    for k in vision:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in language)


def test_ha_dpo_full_finetuning_with_the_lm_term(world, tmp_path):
    r = _dpo(world, tmp_path / "run", "--method", "ha-dpo", "--full", "--max-steps", "1",
             "--set", "ha-dpo.pair_policy=all")
    assert r.exit_code == 0, r.output
    # no --sft-data and no prepared prompts in this run: the LM term falls back to the chosen answers, and says so
    assert "no SFT data for the LM term" in r.output
    log = _log(tmp_path / "run" / "dpo" / "log_history.jsonl")
    assert log[0]["loss"] == pytest.approx(log[0]["loss/dpo"] + 0.5 * log[0]["loss/lm"], rel=1e-5)
    assert (tmp_path / "run" / "dpo" / "model" / "config.json").exists()
    assert "16 pairs" in r.output  # "all": both variants of each of the 8 pairs


def test_ha_dpo_lm_term_trains_on_the_sft_data(world, tmp_path):
    """§2.4: each item carries a DPO pair plus an SFT sample; L_LM is the token-mean NLL of that sample."""
    from PIL import Image

    from hallu.models import load_model
    from hallu.train import pair_forward as pf

    sft = tmp_path / "sft.jsonl"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    sft.write_text(json.dumps({"id": "s0", "images": ["red.png"], "prompt": "What colour is the square?",
                               "completion": "The square is red."}) + "\n")
    r = _dpo(world, tmp_path / "run", "--method", "ha-dpo", "--max-steps", "1", "--sft-data", str(sft))
    assert r.exit_code == 0, r.output
    assert "no SFT data" not in r.output
    log = _log(tmp_path / "run" / "dpo" / "log_history.jsonl")
    # the only SFT sample, under the starting weights (a fresh LoRA changes nothing before its first step)
    lm = load_model(world / "model", device="cpu", dtype="float32")
    text = pf.render_prompt(lm.processor, "What colour is the square?", 1)
    ids = pf.completion_ids(lm.processor, "What colour is the square?", 1, "The square is red.", text)
    enc = pf.encode_prompts(lm.processor, [text], [[Image.open(tmp_path / "red.png").convert("RGB")]])
    with torch.no_grad():
        got = pf.continuation_logps(lm.model, enc, [[ids]], lm.processor.tokenizer.pad_token_id)
    nll = -got.token_logps.sum().item() / len(ids)
    assert log[0]["loss/lm"] == pytest.approx(nll, rel=1e-4)
    assert log[0]["loss"] == pytest.approx(log[0]["loss/dpo"] + 0.5 * nll, rel=1e-4)
    stage = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["dpo"]
    assert stage["options"]["sft_data"] == str(sft.resolve())


def test_ha_dpo_online_policy_draws_fresh_variants_each_epoch(world, tmp_path):
    from hallu.train.dpo import Example, _OnlineVariants

    views = [Example(f"p~{i}", [], "prompt", [[10 + i], [20 + i]], ref=[[-1.0 - i], [-2.0 - i]], variant_of="p",
                     n_variants=(3, 3)) for i in range(3)]
    data = _OnlineVariants(views, seed=42)
    assert len(data) == 1
    draws = set()
    for epoch in range(6):
        data.set_epoch(epoch)
        item = data[0]
        assert item == data[0]  # reproducible within an epoch
        c, rj = item.answers[0][0] - 10, item.answers[1][0] - 20
        assert item.ref == [[-1.0 - c], [-2.0 - rj]]  # each answer keeps its own reference log-probs
        draws.add((c, rj))
    assert len(draws) > 1  # a new draw per epoch
    # end to end: one item per pair per epoch, every variant scored once by the reference pass
    r = _dpo(world, tmp_path / "run", "--method", "ha-dpo", "--set", "ha-dpo.pair_policy=online",
             "--set", "num_train_epochs=2", "--set", "ha-dpo.sft_weight=0")
    assert r.exit_code == 0, r.output
    assert "8 steps on 8 pairs" in r.output
    refs = [json.loads(x) for x in (tmp_path / "run" / "dpo" / "reference_logps.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in refs[1:])[:2] == ["p0~0", "p0~1"] and len(refs) == 1 + 16


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-qwen") / "qwen"
    tiny.build_tiny_model("qwen2-vl", root, seed=0)
    return root


def test_dpo_on_qwen2_vl_takes_the_plain_path(world, qwen_model, tmp_path):
    args = ["dpo", "--run", str(tmp_path / "run"), "--model", str(qwen_model), "--pairs",
            str(world / "pairs.jsonl"), "--batch-size", "2", "--logging-steps", "1", "--max-steps", "2",
            "--set", "learning_rate=1e-3"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    log = _log(tmp_path / "run" / "dpo" / "log_history.jsonl")
    assert [row["step"] for row in log] == [1, 2]
    assert log[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # the policy starts as the reference
    refs = [json.loads(x) for x in (tmp_path / "run" / "dpo" / "reference_logps.jsonl").read_text().splitlines()]
    assert len(refs) == 1 + 8 and all(len(x["ref"]) == 2 and x["ref"][0] for x in refs[1:])
    assert (tmp_path / "run" / "dpo" / "adapter" / "adapter_config.json").exists()


def test_ha_dpo_pair_policies():
    from hallu.methods.ha_dpo import expand_variants

    pair = {"id": "x", "chosen": "c", "rejected": "r",
            "meta": {"chosen_variants": ["c0", "c1", "c2"], "rejected_variants": ["r0", "r1", "r2"]}}
    assert expand_variants(pair, "all", 42) == [("~0", "c0", "r0"), ("~1", "c1", "r1"), ("~2", "c2", "r2")]
    once = expand_variants(pair, "offline", 42)
    assert len(once) == 1 and once == expand_variants(pair, "offline", 42)  # drawn once, reproducibly
    assert once[0][1] in pair["meta"]["chosen_variants"]


def test_opa_token_weights_follow_the_report():
    from hallu.methods import opa_dpo

    text = "A dog sits. A cat runs."
    sentences = [{"text": "A dog sits.", "score": 4, "error_type": "correct"},
                 {"text": "A cat runs.", "score": "2", "error_type": "Image_recognition_error"}]
    offsets = [(0, 1), (1, 5), (5, 11), (11, 13), (13, 17), (17, 23)]
    spans = opa_dpo.char_weights(text, sentences, "score")
    assert opa_dpo.token_weights(offsets, spans, 7, "previous") == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    img = opa_dpo.char_weights(text, sentences, "image")
    assert opa_dpo.token_weights(offsets, img, 7, "zero") == [1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 0.0]


def _one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for n in needles:
        assert n in r.output, r.output


def test_bad_input_gets_one_line(world, tmp_path):
    _one_line_error(_dpo(world, tmp_path / "a", "--method", "opa_dpo"), "did you mean opa-dpo", "known: dpo")
    _one_line_error(_dpo(world, tmp_path / "b", "--set", "betta=0.2"), "betta", "beta")
    _one_line_error(_dpo(world, tmp_path / "c", "--set", "max_length=20"), "image tokens", "max_length=")
    _one_line_error(_dpo(world, tmp_path / "d", "--full", "--reference", "adapter-off"), "adapter-off")
    _one_line_error(_dpo(world, tmp_path / "e", "--gpus", "64"), "--gpus 64")
    _one_line_error(_dpo(world, tmp_path / "f", "--set", "opa-dpo.window=3"), "opa-dpo", "--method is dpo")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "images": ["img/0.png"], "prompt": "<image> and <image>?",
                               "chosen": "a", "rejected": "b"}) + "\n")
    r = CliRunner().invoke(app, ["dpo", "--run", str(tmp_path / "g"), "--model", str(world / "model"),
                                 "--pairs", str(bad)])
    _one_line_error(r, "bad.jsonl:1", "2 <image> tags but 1 images")
    for name in "abcdefg":
        assert not (tmp_path / name / "dpo").exists()  # nothing half-written


def test_opa_dpo_masked_image_on_patch_pixels_is_refused(world, qwen_model, tmp_path):
    r = CliRunner().invoke(app, ["dpo", "--run", str(tmp_path / "run"), "--model", str(qwen_model), "--pairs",
                                 str(world / "pairs.jsonl"), "--method", "opa-dpo"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    lines = [x for x in r.output.splitlines() if x.strip() and not x.startswith("warning:")]  # the no-OPA-stage one
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for needle in ("pairs.jsonl:1", "flattened patches", "opa-dpo.image_coef=0"):
        assert needle in lines[0]
    assert not (tmp_path / "run" / "dpo").exists()


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_at_the_same_step(world, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "hallu", "dpo", "--run", str(run), "--model", str(world / "model"),
           "--pairs", str(world / "pairs.jsonl"), "--batch-size", "1", "--logging-steps", "1",
           "--save-steps", "2", "--max-steps", "8"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run / "dpo" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (ckpts / "checkpoint-2" / "trainer_state.json").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpts / "checkpoint-2" / "trainer_state.json").exists()
    assert not (run / "dpo" / "adapter").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    stage = json.loads((run / "manifest.json").read_text())["stages"]["dpo"]
    assert stage["status"] == "done" and stage["steps"] == 8
    assert stage["resumed_from"].startswith("dpo/checkpoints/checkpoint-")
    steps = [row["step"] for row in _log(run / "dpo" / "log_history.jsonl")]
    assert steps == list(range(1, 9))
