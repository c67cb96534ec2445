"""hallu merge-lora: merged logits equal base+adapter, a mismatch writes nothing, a missing base is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hallu import tiny
from hallu.errors import HalluError
from hallu.train import merge


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("merge-models") / "llava"
    tiny.build_tiny_model("llava", path, seed=0)
    return path


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A LoRA adapter with non-zero B (peft's init leaves B = 0, which would make any merge look exact)."""
    import torch
    from peft import get_peft_model

    from hallu.train.common import load_for_training, lora_config

    model, processor = load_for_training(base)
    peft_model = get_peft_model(model, lora_config(4, 8, 0.0, "all-linear", True))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("merge-adapter") / "adapter"
    peft_model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _logits(model_dir_or_model, batch, adapter_dir=None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = model_dir_or_model
    if isinstance(model, Path):
        model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_merged_model_reloads_with_the_logits_of_base_plus_adapter(base, adapter, tmp_path):
    from hallu.processors import load_processor

    out = tmp_path / "merged"
    report = merge.merge_lora(adapter, out)
    assert report["base"] == str(base.resolve())  # found from adapter_config.json
    assert report["max_abs_diff"] <= 1e-4 and report["max_abs_diff_reloaded"] <= 1e-4
    assert json.loads((out / "merge.json").read_text())["max_abs_diff"] == report["max_abs_diff"]
    # An independent check on another batch: the saved folder against base + adapter.
    processor = load_processor(out)
    from PIL import Image

    from hallu.records import user_messages

    img = Image.new("RGB", (64, 48), (10, 200, 90))
    text = processor.apply_chat_template(
        user_messages("Is there a cup in the image?", 1), add_generation_prompt=True, tokenize=False
    )
    batch = processor(images=[img], text=[text], return_tensors="pt")
    merged = _logits(out, batch)
    expected = _logits(base, batch, adapter)
    plain = _logits(base, batch)
    diff = float((merged - expected).abs().max())
    print(f"merged vs base+adapter max |logit diff| = {diff:.3g}")
    assert diff <= 1e-4
    assert float((plain - expected).abs().max()) > 1e-2  # the adapter really changes the model


def test_mismatch_refuses_to_write(base, adapter, tmp_path, monkeypatch):
    real = merge._logits
    calls = []

    def perturbed(model, batch):
        calls.append(1)
        out = real(model, batch)
        return out + 0.5 if len(calls) > 1 else out  # the merged model's logits come second

    monkeypatch.setattr(merge, "_logits", perturbed)
    out = tmp_path / "merged"
    with pytest.raises(HalluError, match=r"merged logits differ from base\+adapter by 0.5 .*nothing written"):
        merge.merge_lora(adapter, out)
    assert not out.exists()
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def test_adapter_without_its_base_is_one_line(adapter, tmp_path):
    moved = tmp_path / "adapter"
    moved.mkdir()
    for f in adapter.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "hallu", "merge-lora", "--adapter", str(moved), "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 2
    err = " ".join(p.stderr.split())
    assert "its base model" in err and "gone is not a local model folder here; pass --base MODEL" in err
    assert "Traceback" not in p.stderr and not (tmp_path / "m").exists()
    with pytest.raises(HalluError, match="not a LoRA adapter folder"):
        merge.adapter_base(tmp_path, None)
