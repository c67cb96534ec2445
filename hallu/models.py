"""Loading a vision-language model and its processor from a local folder.

Anything ``AutoModelForImageTextToText`` loads is accepted (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL,
InstructBLIP, Idefics3, ...). The folder is checked before any weights are read, so a wrong folder
fails in milliseconds with a line that says what it is. Prompts are always rendered by the
processor's chat template.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hallu.errors import HalluError

ATTN_CHOICES = ("sdpa", "eager", "flash_attention_2", "auto")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    path: Path
    model_type: str
    fingerprint: str  # digest of the folder (config, tokenizer, weights), recorded with every output


def read_model_config(path: str | os.PathLike, trust_remote_code: bool = False) -> dict:
    """Validate that ``path`` holds an image-text-to-text model; return its config.json.

    Only config.json is read: the check is instant and needs no torch.
    """
    p = Path(path)
    if not p.exists():
        raise HalluError(f"--model {p}: no such folder")
    if not p.is_dir():
        raise HalluError(f"--model {p}: is a file; expected a model folder (config.json, weights, processor)")
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        raise HalluError(f"--model {p}: no config.json, so this is not a model folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HalluError(f"{cfg_path}: not valid JSON ({e})") from None
    model_type = cfg.get("model_type")
    if cfg.get("auto_map") and not trust_remote_code:
        raise HalluError(
            f"--model {p}: the model ships its own Python code (auto_map in config.json); "
            "pass --trust-remote-code if you trust it"
        )
    if not cfg.get("auto_map"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as vlm_types

        if model_type not in vlm_types:
            raise HalluError(
                f"--model {p}: a '{model_type}' model is not a vision-language (image-text-to-text) model"
            )
    return cfg


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HalluError(f"--device {device}: CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype not in DTYPE_CHOICES:
        raise HalluError(f"--dtype {dtype}: choose one of {', '.join(DTYPE_CHOICES)}")
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def flash_attention_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attention(attn: str, device: str) -> str:
    if attn not in ATTN_CHOICES:
        raise HalluError(f"--attn {attn}: choose one of {', '.join(ATTN_CHOICES)}")
    if attn == "auto":
        return "flash_attention_2" if device.startswith("cuda") and flash_attention_available() else "sdpa"
    if attn == "flash_attention_2" and not (device.startswith("cuda") and flash_attention_available()):
        raise HalluError(
            "--attn flash_attention_2 needs a CUDA device and the flash-attn package (pip install 'hallu[flash]')"
        )
    return attn


def load_model(
    path: str | os.PathLike,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attn: str = "sdpa",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load model + processor for inference (eval mode, left padding for batched generation)."""
    from hallu.manifest import dir_fingerprint

    p = Path(path)
    cfg = read_model_config(p, trust_remote_code)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    attn_impl = resolve_attention(attn, device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import transformers

    transformers.logging.set_verbosity_error()  # e.g. the "fell back to the PIL image processor" notice
    transformers.logging.disable_progress_bar()  # hallu draws its own progress
    from transformers import AutoModelForImageTextToText

    from hallu.processors import load_processor

    try:
        processor = load_processor(p, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        raise HalluError(f"--model {p}: cannot load its processor ({' '.join(str(e).split())[:200]})") from None
    if getattr(processor, "chat_template", None) is None:
        raise HalluError(f"--model {p}: the processor has no chat template, so prompts cannot be rendered")
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            p, dtype=torch_dtype, attn_implementation=attn_impl, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise HalluError(f"--model {p}: cannot load its weights ({' '.join(str(e).split())[:200]})") from None
    model.to(device)
    model.eval()
    return LoadedModel(model, processor, p, cfg.get("model_type", "?"), dir_fingerprint(p))
