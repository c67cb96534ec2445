"""Loading a vision-language model and its processor: from a local folder, a Hub id, or a PEFT adapter.

Anything ``AutoModelForImageTextToText`` loads is accepted (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL,
InstructBLIP, Idefics3, ...). ``--model`` is resolved to folders by :mod:`hallu.hub` and checked before
any weights are read, so a wrong one fails in well under a second with a line that says what it is.
How to load (device, dtype, attention kernel, remote code, chat template) is one :class:`LoadOptions`,
checked by ``validate()`` before a stage starts. Prompts are always rendered by a chat template: the
model's, a ``--chat-template`` file, or the packaged one of its family (:mod:`hallu.processors`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.hub import ModelSource, first_line, resolve_model
from hallu.processors import ChatTemplate

ATTN_CHOICES = ("sdpa", "eager", "flash_attention_2", "auto")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu|npu)(:\d+)?)$")


@dataclass
class LoadOptions:
    """How to load a model: the one definition behind every command's --device/--dtype/--attn/... flags."""

    device: str = "auto"
    dtype: str = "auto"
    attn: str = "sdpa"
    trust_remote_code: bool = False
    chat_template: str | None = None  # a jinja file replacing the model's template

    def validate(self) -> LoadOptions:
        """Refuse typos and missing files before anything loads or is written (imports no torch)."""
        if not _DEVICE.match(self.device):
            raise HalluError(f"--device {self.device}: not a device; use auto, cpu, cuda, cuda:N (N a number) "
                             "or mps")
        if self.dtype not in DTYPE_CHOICES:
            raise HalluError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPE_CHOICES)}")
        if self.attn not in ATTN_CHOICES:
            raise HalluError(f"--attn {self.attn}: choose one of {', '.join(ATTN_CHOICES)}")
        self.template()
        return self

    def template(self) -> ChatTemplate | None:
        """The --chat-template file, read and test-rendered; None when the model's own is used."""
        from hallu.processors import template_file

        return template_file(self.chat_template) if self.chat_template else None

    def recorded(self) -> dict:
        """The options as stages record them. Where it runs (device) does not change what it computes;
        the template file is recorded only when given (older runs keep their options digest)."""
        rec: dict[str, Any] = {"dtype": self.dtype, "attn": self.attn, "trust_remote_code": self.trust_remote_code}
        if self.chat_template:
            template = self.template()
            rec.update(chat_template=str(self.chat_template), chat_template_sha256=template.sha256)
        return rec

    @classmethod
    def from_recorded(cls, options: dict, device: str = "auto") -> LoadOptions:
        names = {f.name for f in dataclasses.fields(cls)} - {"device"}
        return cls(device=device, **{k: options[k] for k in names if k in options})


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    path: Path  # the folder the weights came from (an adapter's base)
    model_type: str
    fingerprint: str  # digest of the folder(s) (config, tokenizer, weights; base + adapter), recorded with outputs
    source: ModelSource | None = None
    template: ChatTemplate | None = None  # the chat template that renders prompts


def check_model(model: str | os.PathLike, trust_remote_code: bool = False) -> ModelSource:
    """Resolve ``model`` (folder, Hub id, adapter) and check it is an image-text-to-text model.

    Reads config files only (and for an uncached Hub id online, downloads them): instant, no torch.
    """
    src = resolve_model(model, trust_remote_code=trust_remote_code)
    cfg, where = src.config, f"--model {src.spec}"
    if cfg.get("auto_map") and not trust_remote_code:
        raise HalluError(f"{where}: the model ships its own Python code (auto_map in config.json); "
                         "pass --trust-remote-code if you trust it")
    if not cfg.get("auto_map") and cfg.get("model_type") not in image_text_to_text_types():
        raise HalluError(f"{where}: a '{cfg.get('model_type')}' model is not a vision-language "
                         "(image-text-to-text) model")
    return src


def read_model_config(path: str | os.PathLike, trust_remote_code: bool = False) -> dict:
    """Validate that ``path`` names an image-text-to-text model; return its config.json (an adapter's base's)."""
    return check_model(path, trust_remote_code).config


@functools.lru_cache(maxsize=1)
def image_text_to_text_types() -> frozenset[str]:
    """The model types ``AutoModelForImageTextToText`` loads.

    Importing transformers' mapping imports torch (seconds), and this check runs before a stage takes its
    lock, on every command; so the mapping is read from the installed transformers' source as a literal.
    If that ever fails (a refactored file), the import is the fallback.
    """
    import ast
    import importlib.util

    name = "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"
    spec = importlib.util.find_spec("transformers")
    if spec is not None and spec.submodule_search_locations:
        source = Path(list(spec.submodule_search_locations)[0]) / "models" / "auto" / "modeling_auto.py"
        try:
            for node in ast.parse(source.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                    return frozenset(k for k, _ in ast.literal_eval(node.value.args[0]))
        except (OSError, SyntaxError, ValueError, AttributeError, IndexError, TypeError):
            pass
    from transformers.models.auto import modeling_auto

    return frozenset(getattr(modeling_auto, name))


def resolve_device(device: str) -> str:
    import torch

    if not _DEVICE.match(device):
        raise HalluError(f"--device {device}: not a device; use auto, cpu, cuda, cuda:N or mps")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HalluError(f"--device {device}: CUDA is not available on this machine")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise HalluError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise HalluError("--device mps: MPS is not available on this machine")
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


def quiet_transformers() -> None:
    """Keep library chatter off the user's terminal: hallu prints its own progress and errors.

    transformers' info notices (e.g. "fell back to the PIL image processor") and progress bars go, and so do
    the v6 deprecation warnings that peft and TRL trigger inside transformers by calling the
    ``gradient_checkpointing`` names (hallu's own code uses the current APIs; the engine tests turn
    deprecations into errors). Filtered by the module that raises them, so nothing else is hidden.
    """
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for module in ("transformers.modeling_utils", "transformers.training_args"):
        warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning,
                                module=module)


def load_model(model: str | os.PathLike, options: LoadOptions | None = None, **fields: Any) -> LoadedModel:
    """Load model + processor for inference (eval mode, left padding for batched generation).

    ``model``: a folder, a Hub id or a PEFT adapter (merged into its base after loading). ``fields``
    override single options (``load_model(path, dtype="float32")``). The weights go straight to the
    target device in the resolved dtype (``device_map``), with no full copy in CPU memory first.
    """
    opts = dataclasses.replace(options or LoadOptions(), **fields).validate()
    override = opts.template()
    check_model(model, opts.trust_remote_code)  # before any download: a wrong model fails fast
    src = resolve_model(model, trust_remote_code=opts.trust_remote_code, download=True)
    where = f"--model {src.spec}"
    device = resolve_device(opts.device)
    torch_dtype = resolve_dtype(opts.dtype, device)
    attn_impl = resolve_attention(opts.attn, device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    quiet_transformers()
    from transformers import AutoModelForImageTextToText

    from hallu.processors import choose_chat_template, load_processor

    model_type = src.config.get("model_type", "?")
    # An adapter saved with its processor (hallu sft does) may carry a changed template or tokens.
    proc_dir = src.adapter if src.adapter is not None and _has_processor(src.adapter) else src.path
    try:
        processor = load_processor(proc_dir, trust_remote_code=opts.trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError, TypeError) as e:
        raise HalluError(f"{where}: cannot load its processor from {proc_dir} ({first_line(e)})") from e
    template = choose_chat_template(processor, model_type, override, where)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    weights = _load_weights(AutoModelForImageTextToText, src, where, device, dtype=torch_dtype,
                            attn_implementation=attn_impl, trust_remote_code=opts.trust_remote_code)
    weights.eval()
    return LoadedModel(weights, processor, src.path, model_type, src.fingerprint(), src, template)


def _has_processor(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("processor_config.json", "preprocessor_config.json",
                                                "tokenizer_config.json"))


def _load_weights(auto_class, src: ModelSource, where: str, device: str, **kwargs):
    import torch
    from safetensors import SafetensorError  # a corrupt or truncated weights file

    try:
        model = auto_class.from_pretrained(src.path, device_map=device, **kwargs)
    except torch.OutOfMemoryError as e:
        raise HalluError(f"{where}: its weights do not fit on {device} ({first_line(e)})") from e
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise HalluError(f"{where}: cannot load its weights from {src.path} ({first_line(e)})") from e
    if src.adapter is None:
        return model
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(src.adapter), is_trainable=False, torch_device=device)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise HalluError(f"{where}: cannot apply the adapter {src.adapter} to its base {src.base_spec} "
                         f"({first_line(e)})") from e
    # Merged, the model is a plain transformers model again: the engine's fast paths and the family checks
    # see the architecture they know, and each forward skips the adapter's extra matmuls.
    return peft_model.merge_and_unload()
