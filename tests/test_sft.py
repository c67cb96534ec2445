"""hallu sft: answer-only labels, LoRA targets, --set parsing, data reading, bad input, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hallu import tiny
from hallu.data.shapes import build_world
from hallu.errors import HalluError
from hallu.train import common, sft

HALLU = [sys.executable, "-m", "hallu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-world")
    build_world(root / "data", n_images=10, seed=0)
    return root / "data"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft-models") / "llava"
    tiny.build_tiny_model("llava", path, seed=0)
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft-models") / "qwen2-vl"
    tiny.build_tiny_model("qwen2-vl", path, seed=0)
    return path


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _prompts(world: Path) -> Path:
    return world / "prompts.jsonl"


# --------------------------------------------------------------------------------------------------
# Labels: loss on the answer only


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_labels_are_masked_on_every_prompt_and_image_token(family, world, request):
    model_dir = request.getfixturevalue(family)
    from trl import SFTTrainer

    examples = sft.load_examples(_prompts(world))[:3]
    opts = sft.SftOptions(lora=False, max_steps=1, learning_rate=1e-3, epochs=1).resolved()
    model, processor = common.load_for_training(model_dir)
    args = sft.sft_config(opts, Path(request.node.name), 1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft.build_dataset(examples, processor),
                         processing_class=processor)
    ds = sft.build_dataset(examples, processor)
    batch = trainer.data_collator([ds[i] for i in range(len(examples))])
    image_id = (
        model.config.image_token_id if hasattr(model.config, "image_token_id") else model.config.image_token_index
    )
    tok = processor.tokenizer
    for row, ex in enumerate(examples):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert (ids == image_id).sum() > 0  # the row really holds image tokens ...
        assert (labels[ids == image_id] == -100).all()  # ... and none of them is a label
        kept = labels != -100
        # Labels are exactly the tokens after the prompt: the answer, then the template's end of turn.
        from hallu.records import assistant_message, load_image, user_messages

        prompt_text = processor.apply_chat_template(
            user_messages(ex.prompt, 1), add_generation_prompt=True, tokenize=False
        )
        # The prompt is tokenized as rollout and evaluation tokenize it: with the tokenizer's leading
        # special tokens (LLaMA's <s>, which LLaVA's template does not write and TRL would leave out).
        prompt_enc = processor(images=[load_image(ex.images[0])], text=[prompt_text], return_tensors="pt")
        prompt_len = prompt_enc["input_ids"].shape[1]
        real = mask.nonzero().flatten()
        first_real = int(real[0])
        assert ids[first_real : first_real + prompt_len].tolist() == prompt_enc["input_ids"][0].tolist()
        assert not kept[: first_real + prompt_len].any()
        # The answer as the template renders it after the prompt (a leading space, an end-of-turn mark).
        full = processor.apply_chat_template(
            user_messages(ex.prompt, 1) + [assistant_message(ex.completion)], tokenize=False
        )
        assert full.startswith(prompt_text)
        answer_ids = tok(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        # ... up to its first end-of-sequence token, which generation stops at (added when the template has none).
        eos_at = answer_ids.index(tok.eos_token_id) if tok.eos_token_id in answer_ids else None
        answer_ids = answer_ids[: eos_at + 1] if eos_at is not None else answer_ids + [tok.eos_token_id]
        got = labels[kept].tolist()
        assert got == answer_ids
        assert tok.decode(got).strip().startswith(ex.completion)
        assert int(kept.sum()) == len(answer_ids) and int(mask.sum()) == prompt_len + len(answer_ids)


# --------------------------------------------------------------------------------------------------
# LoRA targets


def _adapted_modules(model_dir: Path, cfg) -> set[str]:
    from peft import get_peft_model

    model, _ = common.load_for_training(model_dir)
    peft_model = get_peft_model(model, cfg)
    return {
        n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
        for n, _ in peft_model.named_modules()
        if n.endswith(".lora_A")
    }


def test_lora_targets_language_vs_all_linear(llava):
    import torch

    model, _ = common.load_for_training(llava)
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    vision = {n for n in linear if "vision_tower" in n or "multi_modal_projector" in n}
    language = linear - vision
    assert vision and language
    assert _adapted_modules(llava, common.lora_config(4, 8, 0.0, "language", False)) == language
    assert _adapted_modules(llava, common.lora_config(4, 8, 0.0, "all-linear", True)) == linear
    assert _adapted_modules(llava, common.lora_config(4, 8, 0.0, "language", True)) == linear
    only_q = _adapted_modules(llava, common.lora_config(4, 8, 0.0, r".*\.q_proj", False))
    assert only_q == {n for n in language if n.endswith(".q_proj")}
    with pytest.raises(HalluError, match="--lora-target"):
        common.lora_config(4, 8, 0.0, "(", False)


def test_opa_preset_is_r256_alpha512_with_vision_and_gt():
    o = sft.SftOptions(method="opa-dpo").resolved()
    assert (o["lora_r"], o["lora_alpha"], o["lora_dropout"], o["lora_target"], o["lora_vision"]) == (
        256,
        512,
        0.0,
        "all-linear",
        True,
    )
    assert o["with_gt"] and o["epochs"] == 2.0 and o["learning_rate"] == 2e-5
    d = sft.SftOptions(method="dpo", lora_r=16).resolved()
    assert (d["lora_r"], d["lora_alpha"], d["lora_target"], d["lora_vision"]) == (16, 256, "language", False)
    with pytest.raises(
        HalluError, match=r"--method opa-dop: unknown method \(did you mean opa-dpo\?\); known: .*ha-dpo"
    ):
        sft.preset_for("opa-dop")


# --------------------------------------------------------------------------------------------------
# --set


def test_parse_set_types_values_by_field():
    from trl import DPOConfig, SFTConfig

    got = common.parse_set(
        ["beta=0.25", "max_length=64", "use_weighting=true", 'loss_type=["sigmoid"]', "report_to=none", "max_steps=7"],
        DPOConfig,
    )
    assert got["beta"] == 0.25 and isinstance(got["beta"], float)
    assert got["max_length"] == 64 and isinstance(got["max_length"], int)
    assert got["use_weighting"] is True
    assert got["loss_type"] == ["sigmoid"]
    assert got["max_steps"] == 7
    assert common.parse_set(["max_length=none"], SFTConfig) == {"max_length": None}
    with pytest.raises(HalluError, match=r"--set bta: DPOConfig has no field 'bta'; did you mean beta"):
        common.parse_set(["bta=0.1"], DPOConfig)
    with pytest.raises(HalluError, match=r"--set beta=high: DPOConfig.beta expects a number"):
        common.parse_set(["beta=high"], DPOConfig)
    with pytest.raises(HalluError, match="expected key=value"):
        common.parse_set(["beta"], DPOConfig)


# --------------------------------------------------------------------------------------------------
# Data


def test_load_examples_from_pairs_prompts_and_sft_records(world, tmp_path):
    prompts = [json.loads(x) for x in _prompts(world).read_text().splitlines()]
    train = [p for p in prompts if p["meta"].get("split") in (None, "train")]
    exs = sft.load_examples(_prompts(world))
    assert [e.id for e in exs] == [p["id"] for p in train]  # held-out splits skipped, order kept
    assert exs[0].completion == train[0]["reference"]
    assert Path(exs[0].images[0]).is_file()

    img = str(world / prompts[0]["images"][0])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps(
            {
                "id": "p1",
                "images": [img],
                "prompt": "Describe.",
                "chosen": "a cup",
                "rejected": "a cup and a fork",
                "meta": {"gt": "a cup and a bowl"},
            }
        )
        + "\n"
    )
    assert [(e.id, e.completion) for e in sft.load_examples(pairs)] == [("p1", "a cup")]
    assert [(e.id, e.completion) for e in sft.load_examples(pairs, with_gt=True)] == [
        ("p1", "a cup"),
        ("p1#gt", "a cup and a bowl"),
    ]

    recs = tmp_path / "sft.jsonl"
    recs.write_text(
        json.dumps({"id": "s1", "images": [img, img], "prompt": "<image> or <image>?", "completion": "left"}) + "\n"
    )
    assert sft.load_examples(recs)[0].images == [img, img]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "s1", "images": [img], "prompt": "<image> or <image>?", "completion": "x"}) + "\n")
    with pytest.raises(HalluError, match=r"bad.jsonl:1: prompt has 2 <image> tags but 1 images"):
        sft.load_examples(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"id": "s1", "images": ["nope.png"], "prompt": "q", "completion": "x"}) + "\n")
    with pytest.raises(HalluError, match=r"missing.jsonl:1: image .*nope.png not found"):
        sft.load_examples(missing)


def test_max_length_that_cuts_image_tokens_is_refused(world, llava):
    _, processor = common.load_for_training(llava)
    exs = sft.load_examples(_prompts(world))[:2]
    sft.check_max_length(exs, processor, 512)
    with pytest.raises(HalluError, match=r"would cut image tokens .* raise --max-length above \d+"):
        sft.check_max_length(exs, processor, 8)


def test_last_checkpoint_skips_torn_ones(tmp_path):
    ck = common.checkpoints_dir(tmp_path)
    (ck / "checkpoint-2").mkdir(parents=True)
    (ck / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (ck / "checkpoint-10").mkdir()  # killed while saving: no trainer_state.json
    (ck / "checkpoint-x").mkdir()
    assert common.last_checkpoint(tmp_path) == ck / "checkpoint-2"
    assert common.last_checkpoint(tmp_path / "nothing") is None


# --------------------------------------------------------------------------------------------------
# The command


def test_bad_input_is_one_line_and_writes_nothing(world, llava, tmp_path):
    run = tmp_path / "run"
    cases = [
        (["--method", "ha-dop"], "unknown method (did you mean ha-dpo?); known:"),
        (["--set", "learning_rat=1"], "SFTConfig has no field 'learning_rat'; did you mean learning_rate"),
        (["--gpus", "2"], "--gpus 2: this machine has 0 CUDA device(s)"),
        (["--max-length", "8"], "would cut image tokens"),
    ]
    for extra, message in cases:
        p = subprocess.run(
            [
                *HALLU,
                "sft",
                "--run",
                str(run),
                "--model",
                str(llava),
                "--data",
                str(_prompts(world)),
                "--full",
                "--max-steps",
                "1",
                *extra,
            ],
            capture_output=True,
            text=True,
            env=_env(),
        )
        assert p.returncode == 2, (extra, p.stderr)
        err = " ".join(p.stderr.split())
        assert message in err, (extra, p.stderr)
        assert "Traceback" not in p.stderr
        assert not (run / "sft" / "model").exists()


def test_sft_resumes_after_sigkill_and_ends_at_the_same_step(world, llava, tmp_path):
    run = tmp_path / "run"
    steps = 40
    cmd = [
        *HALLU,
        "sft",
        "--run",
        str(run),
        "--model",
        str(llava),
        "--data",
        str(_prompts(world)),
        "--full",
        "--max-steps",
        str(steps),
        "--save-steps",
        "5",
        "--logging-steps",
        "1",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    ckpts = run / "sft" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and common.last_checkpoint(run / "sft") is None and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = common.last_checkpoint(run / "sft")
    assert killed_at is not None and not (run / "sft" / "model").exists()
    killed_step = int(killed_at.name.split("-")[1])
    assert killed_step < steps
    rec = json.loads((run / "manifest.json").read_text())["stages"]["sft"]
    assert rec["status"] == "running"  # what a killed process leaves; status shows it as failed

    p = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert p.returncode == 0, p.stderr
    rec = json.loads((run / "manifest.json").read_text())["stages"]["sft"]
    assert rec["status"] == "done" and rec["steps"] == steps and rec["attempts"] == 2
    resumed = rec["resumed_from"]
    assert resumed is not None and resumed.startswith("sft/checkpoints/checkpoint-")
    assert int(resumed.rsplit("-", 1)[1]) >= killed_step
    state = json.loads((common.last_checkpoint(run / "sft") / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    logged = [json.loads(x)["step"] for x in (run / "sft" / "log_history.jsonl").read_text().splitlines()]
    assert logged[:-1] == list(range(1, steps + 1))  # every step once, none twice after the resume
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(run / "sft" / "model")
    assert ckpts.is_dir()
