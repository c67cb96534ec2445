"""Model answers for a benchmark: generation (or choice scoring) into a resumable, rescorable store.

Every benchmark run with ``--model`` works in an output folder that is also a run directory:

    OUT/manifest.json       the stage ``eval-<benchmark>``: options, inputs, model digest, progress
    OUT/generations.jsonl   one record per distinct prompt: {"id", "text"[, "scores"]}; resumable
    OUT/results.json        metrics + items, rewritten by ``--rescore`` without touching the model

Identical prompts are generated once: POPE's three splits share most of their questions, and a greedy
answer to the same (image, prompt) is the same answer. Items point at their prompt by a content key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.fileio import atomic_write_json, digest_json, iter_jsonl
from hallu.manifest import Run, StageRun
from hallu.models import LoadOptions
from hallu.records import EvalItem, check_images
from hallu.shards import JsonlShard

GENERATIONS = "generations.jsonl"
RESULTS = "results.json"
MODES = ("generate", "choice")


@dataclass
class ModelOptions:
    """How to load and drive the model; everything here is recorded with the results."""

    model: Path  # a folder, a Hub id or a PEFT adapter
    load: LoadOptions = field(default_factory=LoadOptions)  # device, dtype, attn, remote code, chat template
    batch_size: int = 32
    mode: str = "generate"  # generate | choice
    choices: tuple[str, ...] = ("Yes", "No")
    max_new_tokens: int = 128
    num_beams: int = 1
    allow_outside_images: bool = False  # operational: see records.resolve_image

    def recorded(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "load"}
        d.update(self.load.recorded())  # flat, under the keys results have always had (dtype, attn, ...)
        d["model"] = str(self.model)
        d["choices"] = list(self.choices)
        from hallu.manifest import OPERATIONAL_OPTIONS

        for k in OPERATIONAL_OPTIONS & set(d):  # e.g. where it ran does not change what it computes
            d.pop(k)
        return d

    @classmethod
    def from_recorded(cls, options: dict, device: str = "auto") -> ModelOptions:
        names = {f.name for f in fields(cls)} - {"model", "load", "choices"}
        return cls(model=Path(options["model"]), load=LoadOptions.from_recorded(options, device),
                   choices=tuple(options.get("choices", ("Yes", "No"))),
                   **{k: options[k] for k in names if k in options})

    @classmethod
    def from_knobs(cls, model: str | Path, knobs: dict) -> ModelOptions:
        """From the flat flags a command passes (dtype=..., batch_size=...)."""
        load_names = {f.name for f in fields(LoadOptions)}
        load = LoadOptions(**{k: v for k, v in knobs.items() if k in load_names})
        return cls(model=Path(model), load=load, **{k: v for k, v in knobs.items() if k not in load_names})


def check_model_knobs(knobs: dict) -> None:
    """Model options, checked before a run folder is opened or a model is read, so a typo (or a missing
    --chat-template file) costs one line and leaves nothing behind. ``knobs`` may hold any subset."""
    mode = knobs.get("mode", "generate")
    if mode not in MODES:
        raise HalluError(f"--mode {mode}: unknown; choose one of {', '.join(MODES)}")
    load_names = {f.name for f in fields(LoadOptions)}
    LoadOptions(**{k: v for k, v in knobs.items() if k in load_names}).validate()


class ModelEval:
    """A benchmark run with a model in a run folder: its options are recorded so ``--rescore`` can
    re-score the stored answers later with nothing but the folder (and, for POPE, another parser)."""

    def __init__(self, out: Path | None, stage: str, rescore: bool):
        if out is None:
            raise HalluError("--out DIR is required with --model/--rescore (it holds generations and results)")
        self.run = Run(out, flag="--out")
        self.stage_name = stage
        self.rescore = rescore
        self.recorded: dict | None = None
        if rescore:
            rec = self.run.stage_record(stage)
            if rec is None:
                raise HalluError(f"--out {out}: no '{stage}' run with a model here to rescore")
            self.recorded = rec["options"]

    def options(self, model: Path | None, images: Path | None, knobs: dict, **benchmark_options: Any) -> dict:
        """The run's options: the recorded ones when rescoring, else checked ones built from the flags."""
        if self.recorded is not None:
            return self.recorded
        from hallu.models import check_model

        if model is None:
            raise HalluError("--model M is required (or --rescore with an --out folder of an earlier run)")
        if images is None:
            raise HalluError("--images DIR is required with --model: the folder holding the images")
        if not Path(images).is_dir():
            raise HalluError(f"--images {images}: not a folder")
        source = check_model(model, knobs.get("trust_remote_code", False))
        mopts = ModelOptions.from_knobs(model, knobs)
        # allow_outside_images rides along for ModelOptions.from_recorded; the stage leaves it out of the
        # recorded options (it is operational: it never changes a result).
        return {**benchmark_options, "images": str(Path(images).resolve()), "model_fingerprint": source.fingerprint(),
                **mopts.recorded(), "allow_outside_images": mopts.allow_outside_images}

    def check_images(self, items: list[EvalItem], options: dict, label: str) -> None:
        """Every item's image allowed and on disk, the first one readable: checked before the stage
        starts, so a bad path costs one line and leaves the output folder as it was."""
        if not self.rescore:
            check_images(items, Path(options["images"]), label, what="item",
                         allow_outside=options.get("allow_outside_images", False))

    @contextmanager
    def stage(self, options: dict, inputs: dict) -> Iterator[StageRun]:
        if self.rescore:
            # Checked before the stage starts, so a refused rescore leaves the finished run as it was.
            from hallu.manifest import artifact_digest

            recorded = {k: a["digest"] for k, a in self.run.stage_record(self.stage_name).get("inputs", {}).items()}
            changed = [k for k, p in inputs.items()
                       if not Path(p).exists() or recorded.get(k) != artifact_digest(Path(p))]
            if changed or set(recorded) != set(inputs):
                raise HalluError(f"--rescore: {', '.join(changed) or 'the inputs'} changed since the run in "
                                 f"{self.run.dir}; run with --model again")
        with self.run.stage(self.stage_name, options=options, inputs=inputs) as st:
            yield st


def prompt_key(item: EvalItem) -> str:
    """Items with the same images and text share one generation."""
    return digest_json({"images": item.images, "text": item.question})[len("sha256:") :][:24]


def generate(stage: StageRun, items: list[EvalItem], opts: ModelOptions, image_base: Path,
             label: str) -> tuple[dict[str, dict], dict]:
    """Answer every distinct prompt of ``items`` (resumable).

    Returns ``({prompt_key: record}, info)`` where ``info`` records the model fingerprint, the chat
    template's digest and one rendered prompt. When every answer is already stored (a finished run, a
    rescore) the model is not even loaded and ``info`` comes from the earlier attempt.
    """
    from hallu import distributed as D
    from hallu.stages import fold_leftover_shards, run_batched

    if opts.mode not in MODES:
        raise HalluError(f"--mode {opts.mode}: choose one of {', '.join(MODES)}")
    unique: dict[str, EvalItem] = {}
    for it in items:
        unique.setdefault(prompt_key(it), it)
    keys = list(unique)
    out = stage.run.dir / GENERATIONS
    done: set[str] = set()
    if D.is_main() and not stage.fresh:
        fold_leftover_shards(out)  # what the ranks of a killed launch wrote counts as stored
        if out.exists():
            shard = JsonlShard(out)  # also cuts a torn last line left by a killed run
            done = set(shard.open())
            shard.close()
    # Rank 0 decides for every rank whether the model runs: all ranks enter the batch loop, or none.
    if D.share(all(k in done for k in keys), what="rank 0 to read the stored generations"):
        D.leave_if_worker()  # nothing to generate; scoring and results are rank 0's
        info = stage.previous.get("generation") or {}
    else:
        check_images(items, image_base, label, allow_outside=opts.allow_outside_images, what="item")
        engine = _load_engine(opts, image_base)
        first = unique[keys[0]]
        info = {"model": str(opts.model), "model_fingerprint": engine.fingerprint,
                "chat_template_sha256": digest_json(engine.processor.chat_template),
                "chat_template": engine.template.recorded(),  # source (model|packaged:NAME|file:PATH) + sha256
                "prompt_example": engine.render(_request(first))}

        def work(batch: list[str], index: int) -> list[dict]:
            return _answer(engine, [_request(unique[k], k) for k in batch], opts)

        run_batched(stage, out, keys, batch_size=opts.batch_size, record_ids=lambda k: [k], work=work,
                    label=label)
    stage.extra["generation"] = info
    stage.output("generations", out, count=len(keys))
    return load_generations(stage.run.dir), info


def _request(item: EvalItem, key: str | None = None):
    from hallu.engine import GenRequest

    return GenRequest(key or item.id, item.images, item.question)


def _load_engine(opts: ModelOptions, image_base: Path):
    from hallu.distributed import rank_device
    from hallu.engine import Engine

    load = replace(opts.load, device=rank_device(opts.load.device))
    return Engine.load(opts.model, load, batch_size=opts.batch_size, image_base=image_base,
                       allow_outside_images=opts.allow_outside_images)


def _answer(engine, requests, opts: ModelOptions) -> list[dict]:
    from hallu.engine import Decoding

    if opts.mode == "choice":
        return [{"id": c.id, "text": c.pred, "scores": c.scores}
                for chunk in engine.choose(requests, opts.choices) for c in chunk]
    decoding = Decoding(max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams)
    return [{"id": g.id, "text": g.text, "tokens": g.tokens, "finished": g.finished}
            for chunk in engine.generate(requests, decoding) for g in chunk]


def load_generations(out_dir: Path) -> dict[str, dict]:
    path = Path(out_dir) / GENERATIONS
    if not path.exists():
        raise HalluError(f"{path}: no stored generations to rescore (run with --model first)")
    return {rec["id"]: rec for _, rec in iter_jsonl(path)}


def write_results(stage: StageRun, result: dict) -> Path:
    """Write ``results.json``: always the one :class:`~hallu.records.EvalResult` shape."""
    from hallu.evals.result import finish

    result = finish(result)
    path = stage.run.dir / RESULTS
    atomic_write_json(path, result)
    stage.output("results", path, count=len(result.get("items", [])))
    return path
