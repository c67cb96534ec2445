"""What every training stage shares: options, model loading, LoRA, logging, precision, resume, ranks.

The distributed pieces follow ``notes/cpu-stack.md``: on a machine without CUDA, DeepSpeed needs an
accelerate ``PartialState`` created with the gloo backend *before* the training arguments are built,
or the HF side and DeepSpeed disagree about the world size.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.train.launch import launch_if_requested  # noqa: F401 - part of this module's API

# Set by ``hallu.train.launch`` in the processes it starts: the DeepSpeed JSON every rank trains with.
DEEPSPEED_CONFIG_ENV = "HALLU_DEEPSPEED_CONFIG"
# Module names of the vision side of every supported family (tower, projector, Q-Former, connector).
VISION_TOWER = r".*\b(vision_tower|vision_model)\..*"  # the encoder alone, not the projector


def freeze_matching(model, pattern: str) -> int:
    """requires_grad off for every parameter whose full name matches ``pattern``; how many."""
    import re

    compiled = re.compile(pattern)
    frozen = 0
    for name, param in model.named_parameters():
        if compiled.fullmatch(name):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def freeze_vision_tower(model) -> int:
    """The vision encoder frozen, the projector still training (LLaVA-1.5's second stage)."""
    return freeze_matching(model, VISION_TOWER)


VISION_MODULES = r".*(vision_tower|vision_model|visual|multi_modal_projector|mm_projector|connector|qformer|language_projection|image_newline).*"  # noqa: E501
LORA_TARGETS = ("language", "all-linear")


# --------------------------------------------------------------------------------------------------
# --set key=value


def parse_set(items: list[str], config_cls) -> dict:
    """Turn ``["beta=0.2", "loss_type=ipo"]`` into typed values for the dataclass ``config_cls``.

    Each value is typed by the field's annotation (bool, int, float, str, enums, lists and dicts as
    JSON, ``none`` where None is allowed). An unknown key names the closest known keys.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # an annotation that does not resolve: fall back to the raw ones
        hints = {name: f.type for name, f in fields.items()}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise HalluError(f"--set {item!r}: expected key=value")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise HalluError(f"--set {key}: {config_cls.__name__} has no field '{key}'{hint}")
        try:
            out[key] = _coerce(raw.strip(), hints.get(key, str))
        except ValueError as e:
            raise HalluError(f"--set {key}={raw}: {config_cls.__name__}.{key} {e}") from None
    return out


def _coerce(raw: str, annotation) -> Any:
    """``raw`` as a value of ``annotation``; ValueError says what was expected."""
    options = _union_members(annotation)
    allows_none = type(None) in options
    if allows_none and raw.lower() in ("none", "null"):
        return None
    options = [o for o in options if o is not type(None)]
    for opt in options:
        try:
            return _coerce_one(raw, opt)
        except (ValueError, TypeError):
            continue
    names = " or ".join(_type_name(o) for o in options) + (" or none" if allows_none else "")
    raise ValueError(f"expects {names}")


def _union_members(annotation) -> list:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        # Try the narrow types first, so "3" is an int before it is a str.
        order = {bool: 0, int: 1, float: 2}
        return sorted(typing.get_args(annotation), key=lambda t: order.get(t, 3))
    return [annotation]


def _coerce_one(raw: str, t) -> Any:
    origin = typing.get_origin(t)
    if t is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError("not a bool")
    if t is int:
        return int(raw)
    if t is float:
        return float(raw)
    if t is str or t is Any:
        return raw
    if origin is typing.Literal:
        choices = typing.get_args(t)
        for c in choices:
            if str(c) == raw:
                return c
        raise ValueError(f"one of {choices}")
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return t(raw).value
    if t in (list, dict) or origin in (list, dict):
        value = json.loads(raw) if raw[:1] in "[{" else None
        want = origin or t
        if value is None and want is list:
            value = [x.strip() for x in raw.split(",") if x.strip()]
        if not isinstance(value, want):
            raise ValueError("wrong container")
        return value
    raise ValueError(f"unsupported type {t}")


def _type_name(t) -> str:
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in t)
    if typing.get_origin(t) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(t)))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        t, getattr(t, "__name__", str(t))
    )


# --------------------------------------------------------------------------------------------------
# Models


def load_for_training(
    model: str | os.PathLike, *, dtype: str = "auto", trust_remote_code: bool = False, chat_template: str | None = None
):
    """Model (train mode, on CPU until the Trainer places it) and processor from a local folder.

    ``chat_template`` replaces the processor's template: a file path or the Jinja text itself.
    """
    from hallu.models import quiet_transformers, read_model_config, resolve_dtype

    path = Path(model)
    read_model_config(path, trust_remote_code)
    quiet_transformers()
    from transformers import AutoModelForImageTextToText

    from hallu.processors import load_processor

    try:
        processor = load_processor(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        raise HalluError(f"--model {path}: cannot load its processor ({' '.join(str(e).split())[:200]})") from None
    if chat_template is not None:
        template_path = Path(chat_template)
        processor.chat_template = (
            template_path.read_text(encoding="utf-8") if template_path.is_file() else chat_template
        )
    if getattr(processor, "chat_template", None) is None:
        raise HalluError(f"--model {path}: the processor has no chat template; pass --chat-template FILE")
    device = "cuda" if _cuda() else "cpu"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed (via accelerate) would warn it "fell back"
    try:
        # An absolute path, so an adapter's base_model_name_or_path finds the base from any folder.
        m = AutoModelForImageTextToText.from_pretrained(
            path.resolve(), dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise HalluError(f"--model {path}: cannot load its weights ({' '.join(str(e).split())[:200]})") from None
    m.train()
    return m, processor


def lora_config(r: int, alpha: float, dropout: float, target: str = "language", include_vision: bool = False):
    """A peft LoraConfig for a VLM.

    ``target``: ``language`` (every linear layer of the language model, lm_head excluded),
    ``all-linear`` (every linear layer, vision tower and projector included, lm_head excluded), or a
    regular expression over module names. ``include_vision`` adds the vision tower and projector to
    ``language`` or a regex; with ``all-linear`` they are always in.
    """
    import re

    from peft import LoraConfig

    if r < 1:
        raise HalluError(f"--lora-r {r}: must be at least 1")
    exclude = None
    if target == "all-linear" or (target == "language" and include_vision):
        targets: Any = "all-linear"
    elif target == "language":
        targets, exclude = "all-linear", VISION_MODULES
    else:
        try:
            re.compile(target)
        except re.error as e:
            raise HalluError(f"--lora-target {target!r}: not 'language', 'all-linear' or a valid regex ({e})") from None
        targets = target if include_vision else rf"(?!{VISION_MODULES[:-2]}){target}"
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        exclude_modules=exclude,
        task_type="CAUSAL_LM",
        bias="none",
    )


# --------------------------------------------------------------------------------------------------
# Precision and distribution


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def trainer_precision_kwargs(device: str | None = None) -> dict:
    """bf16 mixed precision on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        return {"bf16": True, "fp16": False} if torch.cuda.is_bf16_supported() else {"bf16": False, "fp16": True}
    # TRL defaults bf16=True; on CPU that is slow autocast, and under DeepSpeed it is refused outright.
    return {"bf16": False, "fp16": False}


def cpu_deepspeed_state_kwargs() -> dict:
    """The DeepSpeed-on-CPU workaround (notes/cpu-stack.md §5b); a no-op with CUDA or one process.

    Creates the process-wide accelerate state with the gloo backend and tells the training arguments
    to use it, so both sides agree on the world size.
    """
    import torch

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return {"accelerator_config": {"use_configured_state": True}}


def deepspeed_config_path() -> Path | None:
    """The DeepSpeed JSON this process trains with (set by the launcher), or None."""
    for var in (DEEPSPEED_CONFIG_ENV, "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        value = os.environ.get(var, "")
        if value and value.lower() != "none":
            return Path(value)
    return None


def distributed_args_kwargs() -> dict:
    """Keyword arguments for TrainingArguments that put this process in its launch's world."""
    ds = deepspeed_config_path()
    if ds is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _cuda():
            return {"use_cpu": True}  # plain DDP over gloo (cpu-stack.md §5a: without it, N lone runs)
        return {}
    return {"deepspeed": str(ds), "use_cpu": False, **cpu_deepspeed_state_kwargs()}


def world_facts(trainer) -> dict:
    """world_size, zero_stage and how many parameters DeepSpeed really split, for the manifest."""
    facts: dict[str, Any] = {"world_size": int(trainer.args.world_size), "zero_stage": None}
    ds_plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:
        facts["zero_stage"] = int(ds_plugin.zero_stage)
    params = list(trainer.model_wrapped.parameters())
    partitioned = [p for p in params if hasattr(p, "ds_shape") and p.numel() < _numel(p.ds_shape)]
    facts["parameters"] = len(params)
    facts["partitioned_parameters"] = len(partitioned)
    return facts


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# --------------------------------------------------------------------------------------------------
# Logging and checkpoints


class _LogHistoryBase:
    """One JSON object per logging step appended to ``path`` (rank 0 only), like TRL's log_history.

    On a resumed run the lines past the checkpoint's step are dropped first: they are about to be
    logged again, and the file should read as if the run had never stopped.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
            if rec.get("step", 0) <= state.global_step:
                keep.append(line)
        from hallu.fileio import atomic_write_text

        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        rec = {"step": state.global_step, "epoch": state.epoch, **logs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=float) + "\n")


def LogHistoryCallback(path: str | os.PathLike):  # noqa: N802 - reads as the class it builds
    """A transformers TrainerCallback appending one JSON per logging step to ``path``."""
    from transformers import TrainerCallback

    cls = type("LogHistoryCallback", (_LogHistoryBase, TrainerCallback), {})
    return cls(path)


def checkpoints_dir(out_dir: str | os.PathLike) -> Path:
    """Where a training stage's Trainer checkpoints live inside its output folder."""
    return Path(out_dir) / "checkpoints"


def final_dir(out_dir: str | os.PathLike, lora: bool) -> Path:
    """Where a training stage saves what it made: ``adapter/`` for LoRA, ``model/`` for full training."""
    return Path(out_dir) / ("adapter" if lora else "model")


def last_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-N`` under ``out_dir`` (or its ``checkpoints/``), else None.

    A checkpoint is complete once its trainer_state.json exists (the Trainer writes it last), so a
    checkpoint torn by a kill is never resumed from.
    """
    found: list[tuple[int, Path]] = []
    for base in (Path(out_dir), checkpoints_dir(out_dir)):
        if not base.is_dir():
            continue
        for p in base.glob("checkpoint-*"):
            step = p.name.rsplit("-", 1)[-1]
            if p.is_dir() and step.isdigit() and (p / "trainer_state.json").is_file():
                found.append((int(step), p))
    return max(found)[1] if found else None


# --------------------------------------------------------------------------------------------------
# The manifest stage of a training run


def is_rank_zero() -> bool:
    from hallu import distributed

    return distributed.is_main()


class TrainingStage:
    """What a training command sees of its manifest stage, on every rank.

    The :class:`hallu.manifest.StageRun` underneath is entered on every rank (rank 0 holds the lock and
    writes; the others follow its decisions). ``resume_checkpoint`` is collective: every rank calls it.
    """

    def __init__(self, stage, out_dir: Path):
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.extra: dict[str, Any] = {}

    @property
    def fresh(self) -> bool:
        return self.stage.fresh

    def resume_checkpoint(self) -> Path | None:
        """The checkpoint to resume from (rank 0 decides, every rank gets it), recorded as ``resumed_from``.

        When the options or inputs changed since the last attempt, its checkpoints are set aside as
        ``checkpoints.previous-N`` (a new N each time) instead of resumed, and a line says so: never
        deleted, a typo must not cost a run.
        """
        import sys

        from hallu import distributed
        from hallu.fileio import set_aside

        choice: Path | None = None
        if distributed.is_main():
            ckpts = checkpoints_dir(self.out_dir)
            if self.stage.fresh and last_checkpoint(ckpts) is not None:
                aside = set_aside(ckpts)
                print(f"note: {ckpts} was made with other options or inputs; kept it as {aside.name}",
                      file=sys.stderr, flush=True)
            choice = last_checkpoint(self.out_dir)
        shared = distributed.share(None if choice is None else str(choice), what="rank 0's resume checkpoint")
        choice = None if shared is None else Path(shared)
        self.extra["resumed_from"] = None if choice is None else _relative(choice, self.out_dir.parent)
        return choice

    def output(self, key: str, path: str | os.PathLike, **extra: Any) -> None:
        self.stage.output(key, path, **extra)

    def progress(self, done: int, total: int, force: bool = False) -> None:
        self.stage.progress(done, total, force=force)


def _relative(p: Path, base: Path) -> str:
    try:
        return p.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(p)


@contextmanager
def training_stage(
    run, name: str, options: dict, inputs: dict, out_dir: str | os.PathLike, after: tuple[str, ...] = ()
):
    """The manifest stage of a training command, entered on every rank (rank 0 writes).

    Records what the returned object's ``extra`` holds (``world_size``, ``zero_stage``,
    ``partitioned_parameters``, ``resumed_from``, ...) when the stage ends, whether it succeeds or fails.
    """
    with run.stage(name, options=options, inputs=inputs, after=after) as st:
        ts = TrainingStage(st, Path(out_dir))
        try:
            yield ts
        finally:
            st.extra.update(ts.extra)
