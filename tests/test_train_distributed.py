"""2-process DeepSpeed ZeRO-3 training on CPU (gloo): SFT and DPO with LoRA, then merge the adapters.

The first run on a fresh machine also JIT-builds DeepSpeed's shm_comm op (about 70 s, once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hallu import tiny
from hallu.data.shapes import build_world
from hallu.train import launch

HALLU = [sys.executable, "-m", "hallu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    build_world(root / "data", n_images=8, seed=0)
    tiny.build_tiny_model("llava", root / "llava", seed=0)
    prompts = [json.loads(x) for x in (root / "data" / "prompts.jsonl").read_text().splitlines()]
    pairs = []
    for p in prompts:
        if p["meta"].get("task") == "caption":
            wrong = p["meta"]["noisy_reference"] if p["meta"]["noisy_reference"] != p["reference"] else "No."
            pairs.append(
                {
                    "id": p["id"],
                    "images": p["images"],
                    "prompt": p["question"],
                    "chosen": p["reference"],
                    "rejected": wrong,
                }
            )
    (root / "data" / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
    return root


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}


def _check_zero3_stage(run: Path, stage: str, adapter: Path, base: Path, tmp: Path) -> None:
    rec = json.loads((run / "manifest.json").read_text())["stages"][stage]
    assert rec["status"] == "done"
    assert rec["world_size"] == 2 and rec["zero_stage"] == 3
    # Real partitioning: DeepSpeed split these parameters between the ranks (local numel < full numel).
    assert rec["partitioned_parameters"] > 0
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.numel() > 0 for p in lora_b)  # gathered on save, not empty ZeRO-3 shards
    assert any(float(p.abs().max()) > 0 for p in lora_b)  # training moved B away from its zero init
    merged = tmp / f"merged-{stage}"
    p = subprocess.run(
        [*HALLU, "merge-lora", "--adapter", str(adapter), "--out", str(merged)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert p.returncode == 0, p.stderr
    assert json.loads((merged / "merge.json").read_text())["max_abs_diff"] <= 1e-4
    AutoModelForImageTextToText.from_pretrained(merged)


def test_sft_lora_zero3_two_processes(setup, tmp_path):
    run = tmp_path / "run"
    p = subprocess.run(
        [
            *HALLU,
            "sft",
            "--run",
            str(run),
            "--model",
            str(setup / "llava"),
            "--data",
            str(setup / "data" / "prompts.jsonl"),
            "--lora",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--lr",
            "1e-2",
            "--nproc",
            "2",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world size 2" in p.stderr
    _check_zero3_stage(run, "sft", run / "sft" / "adapter", setup / "llava", tmp_path)


def test_dpo_lora_zero3_two_processes(setup, tmp_path):
    run = tmp_path / "run"
    p = subprocess.run(
        [
            *HALLU,
            "dpo",
            "--run",
            str(run),
            "--model",
            str(setup / "llava"),
            "--method",
            "dpo",
            "--pairs",
            str(setup / "data" / "pairs.jsonl"),
            "--lora",
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--set",
            "learning_rate=1e-2",
            "--nproc",
            "2",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    _check_zero3_stage(run, "dpo", run / "dpo" / "adapter", setup / "llava", tmp_path)


def test_launch_plan_defaults_to_zero3_and_checks_devices():
    from hallu.errors import HalluError

    plan = launch.plan_launch(None, 2, None)
    assert plan["processes"] == 2 and plan["deepspeed_config"] == launch.packaged_config("zero3")
    assert json.loads(plan["deepspeed_config"].read_text())["zero_optimization"]["stage"] == 3
    assert launch.launcher_args(plan) == ["--use_deepspeed", "--deepspeed_config_file", str(plan["deepspeed_config"])]
    z2 = launch.plan_launch(None, 2, "zero2")
    assert json.loads(z2["deepspeed_config"].read_text())["zero_optimization"]["stage"] == 2
    off = json.loads(launch.packaged_config("zero3-offload").read_text())["zero_optimization"]
    assert off["offload_param"]["device"] == "cpu" and off["offload_optimizer"]["device"] == "cpu"
    assert launch.plan_launch(None, None, None) is None  # one plain process: no launch
    with pytest.raises(
        HalluError, match=r"--gpus 4: this machine has 0 CUDA device\(s\); on a CPU machine use --nproc N"
    ):
        launch.plan_launch(4, None, None)
    with pytest.raises(HalluError, match="--accelerate-config zero4: not one of zero2, zero3, zero3-offload"):
        launch.plan_launch(None, 2, "zero4")
    assert launch._strip_launch_options(
        ["sft", "--nproc", "2", "--gpus=1", "--accelerate-config", "zero2", "--run", "r"]
    ) == ["sft", "--run", "r"]
