"""`hallu sft`: supervised fine-tuning of a VLM on answers, loss on the answer tokens only.

Examples are TRL prompt/completion records (``images``, ``prompt``, ``completion`` as message lists):
TRL masks the whole prompt, image tokens included, so the loss never sees them, and this works with
real chat templates (which carry no ``{% generation %}`` tags). Training data can be

* preference pairs (the revise stage's output): the chosen answer; with the OPA preset also the
  ground truth a pair carries in ``meta["gt"]`` (OPA-DPO trains on GT plus revised answers);
* prompts with a ``reference`` answer (the prepared data set; validation/test splits are skipped);
* plain SFT records ``{"id", "images", "prompt", "completion"}``.

The stage resumes from its last checkpoint after a kill and ends at the same step count.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.records import IMAGE_TAG, is_held_out, resolve_image, user_messages


@dataclass(frozen=True)
class SftPreset:
    """Per-method SFT defaults (notes: specs/methods.md §2.4, §4.7, §5.1)."""

    lora_r: int = 128
    lora_alpha: float = 256
    lora_dropout: float = 0.05
    lora_target: str = "language"  # every linear layer of the language model (HA-DPO, MIA-DPO)
    lora_vision: bool = False
    learning_rate: float = 2e-5
    epochs: float = 1.0
    with_gt: bool = False  # also train on the ground-truth answer a pair carries


# OPA-DPO's "OPA" step: LoRA r256/alpha512, dropout 0, on every linear layer including the vision tower
# and projector, GT + revised answers, 2 epochs, lr 2e-5. The other methods have no SFT stage of their
# own; their DPO LoRA settings (r128/alpha256 on the language model) are the generic default.
PRESETS: dict[str, SftPreset] = {
    "sft": SftPreset(),
    "opa-dpo": SftPreset(
        lora_r=256,
        lora_alpha=512,
        lora_dropout=0.0,
        lora_target="all-linear",
        lora_vision=True,
        learning_rate=2e-5,
        epochs=2.0,
        with_gt=True,
    ),
}


def known_methods() -> list[str]:
    """Method names `hallu sft --method` accepts: the DPO methods' registry plus ``sft``."""
    names = set(PRESETS)
    try:
        from hallu import methods

        names.update(_registry_names(methods))
    except ImportError:
        names.update(("dpo", "ha-dpo", "opa-dpo", "clip-dpo", "mia-dpo"))
    return sorted(names)


def _registry_names(methods) -> list[str]:
    for attr in ("names", "known_methods", "method_names"):
        fn = getattr(methods, attr, None)
        if callable(fn):
            return list(fn())
    for attr in ("METHODS", "REGISTRY"):
        reg = getattr(methods, attr, None)
        if isinstance(reg, dict):
            return list(reg)
    return ["dpo", "ha-dpo", "opa-dpo", "clip-dpo", "mia-dpo"]


def preset_for(method: str) -> SftPreset:
    names = known_methods()
    if method not in names:
        import difflib

        close = difflib.get_close_matches(method, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise HalluError(f"--method {method}: unknown method{hint}; known: {', '.join(names)}")
    return PRESETS.get(method, PRESETS["sft"])


@dataclass
class SftOptions:
    method: str = "sft"
    lora: bool = True
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_target: str | None = None
    lora_vision: bool | None = None
    learning_rate: float | None = None
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int | None = 1024
    save_steps: int = 200
    logging_steps: int = 10
    seed: int = 0
    dtype: str = "auto"
    report_to: str = "none"
    trust_remote_code: bool = False
    chat_template: str | None = None
    # Full fine-tuning with the vision tower frozen (LLaVA-1.5's second stage: projector and LLM train)
    freeze_vision_tower: bool = False
    overrides: dict = field(default_factory=dict)  # --set key=value for SFTConfig

    def resolved(self) -> dict:
        """Every setting after the method preset fills what the user left open (recorded in the manifest)."""
        p = preset_for(self.method)
        d = dict(self.__dict__)
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target", "lora_vision", "learning_rate", "epochs"):
            if d[key] is None:
                d[key] = getattr(p, key)
        d["with_gt"] = p.with_gt
        if not self.lora:
            for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target", "lora_vision"):
                d[key] = None
        return d


@dataclass
class SftExample:
    id: str
    images: list[str]  # absolute paths
    prompt: str  # may place images with <image> tags
    completion: str


# --------------------------------------------------------------------------------------------------
# Data


def default_data(run) -> tuple[Path, tuple[str, ...]]:
    """The run's revise output (pairs) when there is one, else its prepared prompts; and that stage."""
    stages = run.read()["stages"]
    for stage, key in (("revise", "pairs"), ("prepare", "prompts")):
        rec = stages.get(stage) or {}
        if rec.get("status") == "done" and key in rec.get("outputs", {}):
            return run.resolve(rec["outputs"][key]["path"]), (stage,)
    raise HalluError(
        f"--run {run.dir}: no revised pairs and no prepared prompts to train on; run `hallu revise` "
        "or `hallu prepare`, or pass --data FILE"
    )


def load_examples(path: str | os.PathLike, with_gt: bool = False) -> list[SftExample]:
    """Read pairs, prompts with references, or SFT records (one kind per file) as SFT examples."""
    from hallu.fileio import iter_jsonl
    from hallu.records import PreferencePair, Prompt

    path = Path(path)
    base = path.parent
    out: list[SftExample] = []
    seen: set[str] = set()
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise HalluError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "chosen" in obj:
            pair = PreferencePair.from_dict(obj, where)
            if is_held_out(pair.meta):
                continue  # a pair built on a held-out image: the evals score it
            images = [str(resolve_image(i, base)) for i in pair.images]
            found = [SftExample(pair.id, images, pair.prompt, pair.chosen)]
            gt = pair.meta.get("gt")
            if with_gt and isinstance(gt, str) and gt.strip() and gt != pair.chosen:
                found.append(SftExample(f"{pair.id}#gt", images, pair.prompt, gt))
        elif "question" in obj:
            prompt = Prompt.from_dict(obj, where)
            if is_held_out(prompt.meta):
                continue  # never train on what the evals hold out
            if not prompt.reference:
                raise HalluError(f"{where}: prompt {prompt.id!r} has no 'reference' answer to train on")
            found = [
                SftExample(
                    prompt.id, [str(resolve_image(i, base)) for i in prompt.images], prompt.question, prompt.reference
                )
            ]
        elif "completion" in obj:
            found = [_sft_record(obj, where, base)]
        else:
            raise HalluError(
                f"{where}: not a preference pair ('chosen'), a prompt ('question', 'reference') or an SFT "
                "record ('prompt', 'completion')"
            )
        for ex in found:
            if ex.id in seen:
                raise HalluError(f"{where}: duplicate id {ex.id!r}")
            seen.add(ex.id)
            for img in ex.images:
                if not Path(img).is_file():
                    raise HalluError(f"{where}: image {img} not found")
            out.append(ex)
    if not out:
        raise HalluError(f"{path}: no training examples (empty, or only held-out splits)")
    return out


def _sft_record(obj: dict, where: str, base: Path) -> SftExample:
    for key, kind in (("id", str), ("prompt", str), ("completion", str)):
        if not isinstance(obj.get(key), kind):
            raise HalluError(f"{where}: SFT record needs a string field '{key}'")
    images = obj.get("images", [])
    if not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
        raise HalluError(f"{where}: 'images' must be a list of paths")
    tags = obj["prompt"].count(IMAGE_TAG)
    if tags and tags != len(images):
        raise HalluError(f"{where}: prompt has {tags} {IMAGE_TAG} tags but {len(images)} images")
    return SftExample(obj["id"], [str(resolve_image(i, base)) for i in images], obj["prompt"], obj["completion"])


def to_trl_rows(examples: list[SftExample], processor) -> list[dict]:
    """TRL prompt/completion rows (images still as paths), rendered here rather than by TRL.

    TRL renders conversational rows itself and tokenizes them without special tokens, so a template that
    does not write the BOS (LLaVA's) would train on prompts without the ``<s>`` that rollout, evaluation and
    ``hallu dpo`` all put first. Rendering the strings here, with the tokenizer's leading special tokens and
    the answer exactly as DPO's pair forward scores it, keeps every stage on the same tokens.
    """
    from hallu.processors import leading_special_text
    from hallu.train.pair_forward import completion_text, render_prompt

    lead = leading_special_text(getattr(processor, "tokenizer", processor))
    rows = []
    for ex in examples:
        prompt = render_prompt(processor, ex.prompt, len(ex.images))
        if lead and not prompt.startswith(lead):
            prompt = lead + prompt
        rows.append({"images": ex.images, "prompt": prompt,
                     "completion": completion_text(processor, ex.prompt, len(ex.images), ex.completion)})
    return rows


def build_dataset(examples: list[SftExample], processor):
    """A datasets.Dataset whose images decode lazily from their paths."""
    import datasets

    datasets.disable_progress_bars()
    rows = to_trl_rows(examples, processor)
    ds = datasets.Dataset.from_list(rows)
    feature_cls = getattr(datasets, "List", None) or datasets.Sequence
    return ds.cast_column("images", feature_cls(datasets.Image()))


def check_max_length(examples: list[SftExample], processor, max_length: int | None) -> None:
    """Refuse a max_length that would cut into a prompt (and so into its image tokens)."""
    if max_length is None:
        return
    from hallu.records import load_image

    cache: dict[tuple, int] = {}
    for ex in examples:
        images = [load_image(p) for p in ex.images]
        key = (ex.prompt, tuple(im.size for im in images))
        if key not in cache:
            text = processor.apply_chat_template(
                user_messages(ex.prompt, len(images)), add_generation_prompt=True, tokenize=False
            )
            # The tokenizer's defaults: the leading special tokens to_trl_rows puts before the prompt count too.
            enc = processor(images=images or None, text=[text], return_tensors="pt")
            cache[key] = int(enc["input_ids"].shape[1])
        n = cache[key]
        if n >= max_length:
            raise HalluError(
                f"example {ex.id!r}: its prompt is {n} tokens with its image tokens, so --max-length {max_length} "
                f"would cut image tokens and leave no room for the answer; raise --max-length above {n} "
                "(e.g. to the prompt length plus the longest answer)"
            )


# --------------------------------------------------------------------------------------------------
# The stage


def sft_config(opts: dict, checkpoints: Path, max_steps: int | None):
    """The SFTConfig for these options (user --set values win)."""
    import torch
    from trl import SFTConfig

    from hallu.train.common import distributed_args_kwargs, trainer_precision_kwargs

    kwargs: dict[str, Any] = dict(
        output_dir=str(checkpoints),
        per_device_train_batch_size=opts["batch_size"],
        gradient_accumulation_steps=opts["grad_accum"],
        learning_rate=opts["learning_rate"],
        num_train_epochs=opts["epochs"],
        max_steps=max_steps if max_steps is not None else -1,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        logging_steps=opts["logging_steps"],
        save_strategy="steps",
        save_steps=opts["save_steps"],
        report_to=opts["report_to"],
        seed=opts["seed"],
        data_seed=opts["seed"],
        max_length=opts["max_length"],
        completion_only_loss=True,
        remove_unused_columns=False,
        gradient_checkpointing=torch.cuda.is_available(),
        disable_tqdm=True,  # hallu draws a rich progress bar instead
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        **trainer_precision_kwargs(),
    )
    kwargs.update(distributed_args_kwargs())
    kwargs.update(opts["overrides"])
    with warnings.catch_warnings():
        # transformers 5 renames gradient_checkpointing; TRL still sets the old name.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        return SFTConfig(**kwargs)


def run_sft(run, model: Path, data: Path | None, out_dir: Path | None, options: SftOptions) -> dict:
    """Train; returns a summary (final folder, steps, world facts). Resumes a killed run."""
    from hallu.train import common

    opts = options.resolved()
    after: tuple[str, ...] = ()
    if data is None:
        data, after = default_data(run)
    data = Path(data)
    examples = load_examples(data, with_gt=opts["with_gt"])
    out_dir = Path(out_dir) if out_dir is not None else run.dir / "sft"
    lora = opts["lora"]
    final = common.final_dir(out_dir, lora)
    checkpoints = common.checkpoints_dir(out_dir)
    log_path = out_dir / "log_history.jsonl"
    manifest_opts = {k: v for k, v in opts.items() if k not in ("trust_remote_code",)}
    manifest_opts.update(model=str(Path(model).resolve()), data=str(data.resolve()), out=str(out_dir.resolve()))

    args = sft_config(opts, checkpoints, opts["max_steps"])  # before the model: ZeRO-3 init needs it
    model_obj, processor = common.load_for_training(
        model, dtype=opts["dtype"], trust_remote_code=opts["trust_remote_code"], chat_template=opts["chat_template"]
    )
    check_max_length(examples, processor, opts["max_length"])
    if opts.get("freeze_vision_tower") and not lora:
        if not common.freeze_vision_tower(model_obj):
            raise HalluError(f"--freeze-vision-tower: {model} has no vision tower parameters to freeze")
    peft_config = None
    if lora:
        peft_config = common.lora_config(
            opts["lora_r"], opts["lora_alpha"], opts["lora_dropout"], opts["lora_target"], opts["lora_vision"]
        )

    with common.training_stage(run, "sft", manifest_opts, {"data": data, "model": model}, out_dir, after=after) as ts:
        from trl import SFTTrainer

        trainer = SFTTrainer(
            model=model_obj,
            args=args,
            train_dataset=build_dataset(examples, processor),
            processing_class=processor,
            peft_config=peft_config,
            callbacks=[common.LogHistoryCallback(log_path), _manifest_progress(ts)],
        )
        _use_rich_progress(trainer)
        resume = ts.resume_checkpoint()
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        ts.extra.update(common.world_facts(trainer))
        ts.extra["steps"] = int(trainer.state.global_step)
        ts.progress(ts.extra["steps"], ts.extra["steps"], force=True)
        _save_final(trainer, processor, final)
        if common.is_rank_zero():
            ts.output("adapter" if lora else "model", final)
            if log_path.exists():
                ts.output("log_history", log_path)
    return {"final": final, "examples": len(examples), **ts.extra}


def _save_final(trainer, processor, final: Path) -> None:
    """Save the adapter (or model) and processor; the folder appears whole or not at all."""
    import shutil

    from hallu.train.common import is_rank_zero

    staging = final.with_name(f".{final.name}.partial")
    if is_rank_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))  # collective under ZeRO-3: every rank gathers, rank 0 writes
    if is_rank_zero():
        processor.save_pretrained(str(staging))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)


def _manifest_progress(ts):
    from transformers import TrainerCallback

    class ManifestProgress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ts.progress(state.global_step, state.max_steps)

    return ManifestProgress()


def _use_rich_progress(trainer) -> None:
    """A rich progress bar on a terminal (TRL's RichProgressCallback), nothing when output is piped.

    The Trainer's own printer writes dicts to stdout, which carries only results here: it goes.
    """
    import sys

    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if not sys.stderr.isatty():
        return
    from trl.trainer.callbacks import RichProgressCallback

    trainer.add_callback(RichProgressCallback())
