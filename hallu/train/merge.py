"""`hallu merge-lora`: fold a LoRA adapter into its base and prove the merge changed nothing.

The base is found from the adapter's ``adapter_config.json`` (``base_model_name_or_path``) unless
given. Before anything is written, the logits of base+adapter and of the merged model are compared on
a fixed batch (a drawn image, a question and an answer through the chat template); the merged model
is then saved with its processor in a staging folder, reloaded with ``from_pretrained`` and compared
again. Only when both differences are within tolerance does the folder move into place. Adapters
saved under ZeRO-3 are ordinary adapter files (the save gathers them), so they merge the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hallu.errors import HalluError

# Largest |merged - (base+adapter)| logit difference accepted, per weights dtype: fp32 merges are
# exact up to rounding of W + BA; half precision rounds the merged weight itself.
DEFAULT_ATOL = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def adapter_base(adapter: Path, base: Path | None) -> Path:
    """The base model folder of ``adapter`` (checked before any weights load)."""
    cfg_path = adapter / "adapter_config.json"
    if not adapter.is_dir() or not cfg_path.is_file():
        raise HalluError(f"--adapter {adapter}: no adapter_config.json, so this is not a LoRA adapter folder")
    if base is not None:
        if not (base / "config.json").is_file():
            raise HalluError(f"--base {base}: no config.json, so this is not a model folder")
        return base
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HalluError(f"{cfg_path}: not valid JSON ({e})") from None
    named = cfg.get("base_model_name_or_path")
    if not named:
        raise HalluError(f"{cfg_path}: names no base model (base_model_name_or_path); pass --base MODEL")
    p = Path(named)
    if not p.is_absolute():
        p = (adapter / p) if (adapter / p / "config.json").is_file() else p
    if not (p / "config.json").is_file():
        raise HalluError(
            f"--adapter {adapter}: its base model {named} is not a local model folder here; pass --base MODEL"
        )
    return p


def fixed_batch(processor):
    """A deterministic batch: one drawn image, a question and an answer, rendered by the chat template."""
    from PIL import Image, ImageDraw

    from hallu.records import assistant_message, user_messages

    img = Image.new("RGB", (224, 224), (240, 240, 240))
    draw = ImageDraw.Draw(img)
    draw.rectangle((20, 30, 110, 120), fill=(200, 30, 30))
    draw.ellipse((120, 110, 210, 200), fill=(30, 60, 200))
    messages = user_messages("Describe the image.", 1) + [assistant_message("A red square and a blue circle.")]
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor(images=[img], text=[text], return_tensors="pt")


def _logits(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch).logits.float()


def merge_lora(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    atol: float | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Merge, verify, save. Returns the report (also written as ``OUT/merge.json``)."""
    from hallu.fileio import StagedDir, atomic_write_json
    from hallu.manifest import dir_fingerprint
    from hallu.models import read_model_config

    adapter, out = Path(adapter), Path(out)
    base_path = adapter_base(adapter, Path(base) if base is not None else None)
    read_model_config(base_path, trust_remote_code)
    if dtype not in DEFAULT_ATOL:
        raise HalluError(f"--dtype {dtype}: choose one of {', '.join(DEFAULT_ATOL)}")
    tol = DEFAULT_ATOL[dtype] if atol is None else atol
    if out.resolve() in (adapter.resolve(), base_path.resolve()):
        raise HalluError(f"--out {out}: would overwrite the adapter or its base; choose a new folder")

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # peft -> accelerate -> deepspeed would warn it "fell back"
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from hallu.models import quiet_transformers
    from hallu.processors import load_processor

    quiet_transformers()
    torch_dtype = getattr(torch, dtype)
    # The adapter folder's processor is the one training used (a changed chat template travels with it).
    proc_src = (
        adapter
        if (adapter / "preprocessor_config.json").exists() or (adapter / "processor_config.json").exists()
        else base_path
    )
    processor = load_processor(proc_src, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        base_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    try:
        model = PeftModel.from_pretrained(model, adapter)
    except (ValueError, KeyError, RuntimeError) as e:
        raise HalluError(
            f"--adapter {adapter}: does not fit the base {base_path} ({' '.join(str(e).split())[:200]})"
        ) from None
    model.eval()
    batch = fixed_batch(processor)
    batch = {k: (v.to(torch_dtype) if torch.is_floating_point(v) else v) for k, v in batch.items()}
    expected = _logits(model, batch)
    merged = model.merge_and_unload()
    diff_merged = float((_logits(merged, batch) - expected).abs().max())
    if not diff_merged <= tol:
        raise HalluError(
            f"merge-lora: merged logits differ from base+adapter by {diff_merged:.3g} (> {tol:g}); nothing written"
        )
    report = {
        "adapter": str(adapter.resolve()),
        "base": str(base_path.resolve()),
        "dtype": dtype,
        "atol": tol,
        "max_abs_diff": diff_merged,
        "adapter_digest": dir_fingerprint(adapter),
    }
    with StagedDir(out) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        reloaded = AutoModelForImageTextToText.from_pretrained(
            tmp, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        reloaded.eval()
        diff_reloaded = float((_logits(reloaded, batch) - expected).abs().max())
        if not diff_reloaded <= tol:
            raise HalluError(
                f"merge-lora: the saved merged model's logits differ from base+adapter by {diff_reloaded:.3g} "
                f"(> {tol:g}); nothing written"
            )
        report["max_abs_diff_reloaded"] = diff_reloaded
        atomic_write_json(tmp / "merge.json", report)
    return report
