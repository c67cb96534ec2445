"""`hallu demo`: the hallucination-reduction loop, end to end, on the offline shapes world.

Layout of the demo folder ``DIR`` (every stage is a real hallu stage with its manifest record)::

    DIR/demo.json                 the DemoConfig and seed this folder was made with (a rerun must match)
    DIR/manifest.json             top run: prepare (the world), vision (the tower tag-pretrained) and sft
                                  (the base: full SFT on the noisy labels, the tower frozen)
    DIR/data/                     the shapes world, plus demo-train-prompts.jsonl (rollout's input: caption
                                  prompts and yes/no questions of train images) and demo/heldout-images/
    DIR/models/init/              the tiny random LLaVA; models/vision/ the same with its tower pretrained
    DIR/pope/                     POPE questions (random / popular / adversarial) on held-out images
    DIR/eval/base/{pope,chair}    the base's evaluations (eval runs with their own manifests)
    DIR/methods/NAME/             one sub-run per method: rollout, revise, [sft, merge-lora.sft], dpo,
                                  merge-lora (the merge stages recorded by the demo) and eval/{pope,chair}
    DIR/methods/NAME/control/     the SFT-only control: same start, same revised pairs, same steps
    DIR/report.json, report.md, report.png, timings.json

A rerun reads each manifest and skips every stage that is done and not stale, so a demo killed
anywhere resumes where it stopped (rollout and evals resume item by item from their shards; a training
stage that was cut trains again from its start, see :func:`fresh_training`) and ends with the same
report. Wall times live in ``timings.json`` and ``report.md``, never in ``report.json``, so two runs
with one seed give byte-identical report.json.

Every number the demo uses comes from one :class:`DemoConfig`.

Why the world and the base look the way they do (each measured on seed 0; figures in the README):

- *Hallucinations of the real kind.* The base's train captions are over-long (``pad_p``): after the true
  objects they often name one more, absent object of the scene's group, and the yes/no data written from
  them answers "yes" about it. The base then keeps listing and says "yes" to co-occurring absent objects:
  ~90 % of its hallucinated CHAIR mentions are co-occurrence ones, and POPE-adversarial F1 trails
  POPE-random by ~9 points, as with real LVLMs. Earlier noise (one absent object slipped in at a random
  place in 30 % of captions) was learned but greedy decoding rarely voiced it: the base's hallucinations
  were then mostly perception errors, which preference data does not fix any faster than SFT.
- *A tower that sees.* Trained through the caption loss alone, the random tower reached CHAIR recall ~61 %;
  tag-pretrained first (:mod:`hallu.vision_pretrain`, as LLaVA starts from CLIP) and frozen during the
  base SFT (LLaVA-1.5's second stage), recall 89.5 % and POPE-random F1 89.6 at the same cost.
- *Both answer kinds in the preference data.* Rollouts cover the train images' yes/no questions as well
  as their captions (the annotations judge judges an answer by the asked object), so POPE can move.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hallu.errors import HalluError

METHOD_NAMES = ("opa-dpo", "ha-dpo")
CONFIG_FILE = "demo.json"
TRAIN_PROMPTS_FILE = "demo-train-prompts.jsonl"  # in the world's folder, so its image paths stay inside it


@dataclass(frozen=True)
class DemoConfig:
    """The world, the model and the recipe of the demo: the one place its numbers live."""

    # -- the shapes world (16,000 images build in ~30 s; the tower needs that many to generalise, measured)
    images: int = 16000  # 12,800 train images, 3,200 held out
    caption_noise_p: float = 0.0  # share of train captions with one absent same-group object slipped in
    qa_noise_p: float = 0.0  # share of adversarial train yes/no labels flipped to "yes"
    in_group_p: float = 0.85  # chance an object comes from the scene's group (co-occurrence strength)
    # Over-long captions: share of train captions (of scenes missing some group member) that go on to name
    # one more, absent object of the group; that image's same-group question is then answered "yes". Above
    # 0.5, greedy decoding reproduces it (at 0.3 the base learned it but greedy rarely said it).
    pad_p: float = 0.6
    base_questions: int = 4  # yes/no questions per train image in the base's SFT data (2 present, 2 absent)
    # -- the model
    model_size: str = "demo"  # hallu.tiny size of the LLaVA-architecture model
    # torch threads: on 2 shared cores one thread trains ~3x faster than two (notes: cpu-stack, shapes-recipe)
    threads: int = 1
    # -- vision pretraining (the stand-in for CLIP: the tower learns to tag the train images' objects)
    vision_steps: int = 1500  # 0: the base SFT starts from the random tower
    vision_batch: int = 64
    vision_lr: float = 1e-3
    # -- base SFT (full fine-tuning on the noisy train labels, the pretrained tower frozen)
    base_steps: int = 1500
    base_lr: float = 1e-3
    base_freeze_vision: bool = True  # LLaVA-1.5's stage 2; measured: CHAIR recall 89.5 % frozen, 70.3 % not
    base_batch: int = 32
    base_overrides: tuple[tuple[str, Any], ...] = (  # SFTConfig settings (`hallu sft --set`)
        ("weight_decay", 0.01), ("adam_beta2", 0.98), ("warmup_steps", 0.05), ("max_grad_norm", 1.0))
    # -- evaluation on held-out images
    eval_images: int = 400  # CHAIR captions; POPE uses at most this many images per split
    caption_tokens: int = 24
    eval_batch: int = 64
    # -- rollout and revise
    rollout_images: int = 600  # train images whose caption prompt and yes/no questions are rolled out (0: all)
    rollout_questions: int = 4  # yes/no questions per image, in the world's order (present, absent, ...)
    rollout_n: int = 2
    rollout_temperature: float = 1.0
    revise_mode: str = "rewrite"  # the annotations judge's mode (rewrite keeps recall: wrong -> right)
    train_batch: int = 16
    # -- OPA-DPO: OPA LoRA-SFT, merge, DPO with the OPA loss, merge
    opa_sft_steps: int = 60
    opa_sft_lr: float = 2e-4
    opa_dpo_steps: int = 200  # measured: POPE-adversarial F1 +3.4 at 120 steps, +7.2 at 200
    opa_dpo_lr: float = 2e-4
    # --set items for `hallu dpo --method opa-dpo`: an LM term on the clean answers (measured on this world:
    # without it OPA's pair terms teach the model to stop listing early, recall -20 to -40 %)
    opa_dpo_set: tuple[str, ...] = ("opa-dpo.sft_weight=1.0",)
    # -- HA-DPO: DPO with its loss (LM term on the clean train answers, its default gamma 0.5), merge
    ha_dpo_steps: int = 200  # measured: POPE-adversarial F1 +4.4 at 120 steps, +6.1 at 200
    ha_dpo_lr: float = 2e-4
    ha_dpo_set: tuple[str, ...] = ()
    # -- the SFT-only control: the method's revised pairs, its total steps, plain LoRA SFT
    control_lr: float = 2e-4
    methods: tuple[str, ...] = METHOD_NAMES

    @classmethod
    def quick(cls) -> DemoConfig:
        """The integration test's variant: the same world and base, 120 instead of 200 DPO steps (measured,
        seed 0: CHAIR_i -62 % / -66 %, POPE-adversarial F1 +3.4 / +4.4 for OPA-DPO / HA-DPO; ~11 min).

        Why not smaller: on a 4,000-image world with a 1,500-step base the tower saw too few images to
        ground its yes/no answers, and POPE-adversarial F1 fell (-1.4) or stood still (+0.5) after DPO."""
        return cls(opa_dpo_steps=120, ha_dpo_steps=120)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples become lists, as demo.json holds them

    @classmethod
    def from_dict(cls, d: dict) -> DemoConfig:
        """The config :meth:`to_dict` wrote (demo.json's ``config``); an unknown key is named."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise HalluError(f"demo config: unknown setting {unknown[0]!r}")

        def tupled(v):
            return tuple(tupled(x) for x in v) if isinstance(v, list) else v

        return cls(**{k: tupled(v) for k, v in d.items()})

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown:
            raise HalluError(f"demo: unknown method {unknown[0]!r} (known: {', '.join(METHOD_NAMES)})")

    def method_steps(self, method: str) -> int:
        """Training steps a method takes from the base (the control takes as many)."""
        return self.opa_sft_steps + self.opa_dpo_steps if method == "opa-dpo" else self.ha_dpo_steps


@dataclass
class Demo:
    """One demo folder being run: the config, the seed, and the stages this process found done."""

    out: Path
    config: DemoConfig
    seed: int = 0
    say: Callable[[str], None] = lambda msg: None
    skipped: list[str] = field(default_factory=list)

    # -- paths
    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def heldout(self) -> Path:
        return self.data / "demo" / "heldout-images"

    @property
    def train_prompts(self) -> Path:
        return self.data / TRAIN_PROMPTS_FILE

    @property
    def base_model(self) -> Path:
        return self.out / "base" / "model"

    # -- stage bookkeeping

    def step(self, label: str, run_dir: Path, stage: str, work: Callable[[], None],
             model: Path | None = None) -> None:
        """Run ``work`` unless ``stage`` of the run in ``run_dir`` is already done and not stale (a stage
        that is running, failed or stale runs again, and resumes what its last attempt left). ``model``:
        an evaluation, done only while it was made of this model's current weights (eval stages record
        the model's fingerprint among their options, not as an input, so staleness alone misses it)."""
        from hallu.manifest import Run, dir_fingerprint

        run = Run(run_dir)
        if run.path.exists():
            views = {v.name: v for v in run.views()}
            if stage in views and views[stage].status == "done":
                recorded = views[stage].record.get("options", {}).get("model_fingerprint")
                if model is None or recorded == dir_fingerprint(model):
                    self.skipped.append(label)
                    return
        self.say(label)
        work()


def check_config_file(out: Path, config: DemoConfig, seed: int) -> None:
    """A demo folder belongs to one config and seed: a rerun with others would mix two demos' stages."""
    from hallu.fileio import atomic_write_json, read_json

    want = {"seed": seed, "config": config.to_dict()}
    path = out / CONFIG_FILE
    if path.exists():
        have = read_json(path)
        if have != want:
            old = have.get("config", {}) if isinstance(have, dict) else {}
            diff = sorted(k for k in set(old) | set(want["config"]) if old.get(k) != want["config"].get(k))
            if isinstance(have, dict) and have.get("seed") != seed:
                diff.insert(0, "seed")
            raise HalluError(f"--out {out}: made by a demo with other settings ({', '.join(diff[:5])} differ); "
                             "use a new --out folder or the same settings")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, want)


def run_demo(out: Path, config: DemoConfig, seed: int = 0, say: Callable[[str], None] = lambda msg: None) -> dict:
    """The whole loop; returns the report (also written as DIR/report.json, .md, .png)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    config.check()
    import torch

    torch.set_num_threads(config.threads)
    out = Path(out)
    check_config_file(out, config, seed)
    demo = Demo(out, config, seed, say)
    prepare_world(demo)
    pretrain_vision(demo)
    train_base(demo)
    build_pope(demo)
    evaluate(demo, "base", demo.base_model, out / "eval" / "base")
    for method in config.methods:
        run_method(demo, method)
        run_control(demo, method)
    if demo.skipped:
        say(f"resumed: {len(demo.skipped)} finished stages were not run again")
    from hallu import report

    return report.write(demo)


# --------------------------------------------------------------------------------------------------
# Training stages


def fresh_training(out_dir: Path) -> Path:
    """Drop an interrupted training stage's checkpoints, so it trains again from its start.

    Why: resuming the Trainer from a checkpoint does not give the uninterrupted run's weights byte for
    byte here (measured: the base resumed from its step-24 checkpoint, at an epoch boundary, changed the
    report), and the demo promises the same report after a kill. Stages that finished are skipped, and
    rollout and evaluations still resume item by item; only the one training stage that was cut repeats.
    `hallu sft` / `hallu dpo` used on their own keep resuming from checkpoints.
    """
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------------
# The world, the initial model, the base


def prepare_world(demo: Demo) -> None:
    """`hallu prepare shapes` with the config's noise, plus the demo's two derived files."""
    from hallu.data import shapes as world
    from hallu.fileio import StagedDir
    from hallu.manifest import Run

    c = demo.config
    noise = world.WorldNoise(caption_noise_p=c.caption_noise_p, qa_noise_p=c.qa_noise_p, in_group_p=c.in_group_p,
                             pad_p=c.pad_p)
    noise.check()

    def build() -> None:
        run = Run(demo.out, flag="--out")
        options = {"dataset": "shapes", "images": c.images, "seed": demo.seed, "world_version": world.WORLD_VERSION,
                   "noise": noise.to_dict(), "base_questions": c.base_questions}
        with run.stage("prepare", options=options) as st:
            if demo.data.exists():
                shutil.rmtree(demo.data)  # this folder is the demo's own: its config file pins the settings
            with StagedDir(demo.data) as tmp:
                summary = world.build_world(tmp, n_images=c.images, seed=demo.seed, noise=noise,
                                            base_questions=c.base_questions)
                _derived_files(tmp, c.rollout_images, c.rollout_questions)
            st.output("prompts", demo.data / world.PROMPTS_FILE, count=summary["prompts"])
            st.output("images", demo.data / "images", count=summary["images"])
            st.output("annotations", demo.data / "annotations")
            st.output("base_sft", demo.data / world.BASE_SFT_FILE, count=summary["base_sft"])
            st.output("train_prompts", demo.train_prompts)
            st.output("heldout_images", demo.data / "demo" / "heldout-images")
            st.extra["summary"] = summary

    demo.step("prepare: the shapes world", demo.out, "prepare", build)
    init = demo.out / "models" / "init"
    if not (init / "config.json").exists():
        from hallu import tiny

        with StagedDir(init) as tmp:
            tiny.build_tiny_model("llava", tmp, corpus=world.tokenizer_corpus(), seed=demo.seed, size=c.model_size)


def _derived_files(data: Path, rollout_images: int = 0, questions: int = 2) -> None:
    """Rollout's input: the caption prompt and the first ``questions`` yes/no questions (a present object,
    then an absent one of the scene's group first: the world's order) of the first ``rollout_images`` train
    images (all when 0; never a held-out image), questions with their clean answers as references; and a
    folder of only the held-out images (CHAIR samples its captions from the folder it is given)."""
    from hallu.data import shapes as world
    from hallu.fileio import atomic_write_text, iter_jsonl

    (data / "demo").mkdir(parents=True, exist_ok=True)
    held = data / "demo" / "heldout-images"
    held.mkdir(exist_ok=True)
    captions, picked = [], set()
    for _, obj in iter_jsonl(data / world.PROMPTS_FILE):
        split = obj.get("meta", {}).get("split")
        if split == "train" and (not rollout_images or len(picked) < rollout_images):
            captions.append(obj)
            picked.add(obj["meta"]["image_id"])
        elif split == "val":
            for img in obj["images"]:
                shutil.copyfile(data / img, held / Path(img).name)
    asked: dict[int, int] = {}
    qa = []
    for _, obj in iter_jsonl(data / world.QA_FILE):
        image = obj["meta"]["image_id"]
        if image in picked and asked.get(image, 0) < questions:
            asked[image] = asked.get(image, 0) + 1
            qa.append(obj)
    lines = [json.dumps(obj, sort_keys=True) for obj in captions + qa]
    atomic_write_text(data / TRAIN_PROMPTS_FILE, "".join(line + "\n" for line in lines))


def pretrain_vision(demo: Demo) -> None:
    """Tag-pretrain the random model's vision tower on the train images (:mod:`hallu.vision_pretrain`), as a
    real LLaVA starts from a CLIP tower that already sees objects; recorded as the top run's ``vision``."""
    from hallu.data import shapes as world
    from hallu.fileio import StagedDir, read_json
    from hallu.manifest import Run
    from hallu.vision_pretrain import pretrain_vision_tower

    c = demo.config
    if not c.vision_steps:
        return
    init, out = demo.out / "models" / "init", demo.out / "models" / "vision"

    def work() -> None:
        inst = read_json(demo.data / "annotations" / "instances_train2014.json")
        index = {cat.id: i for i, cat in enumerate(world.CATEGORIES)}
        files = {im["id"]: im["file_name"] for im in inst["images"]}
        present: dict[int, set[int]] = {i: set() for i in files}
        for ann in inst["annotations"]:
            present[ann["image_id"]].add(index[ann["category_id"]])
        ids = sorted(files)
        run = Run(demo.out)
        options = {"steps": c.vision_steps, "batch_size": c.vision_batch, "learning_rate": c.vision_lr,
                   "seed": demo.seed, "objective": "multi-label tags, max over patch features"}
        with run.stage("vision", options=options, inputs={"model": init}) as st:
            if out.exists():
                shutil.rmtree(out)
            with StagedDir(out) as tmp:
                summary = pretrain_vision_tower(
                    init, tmp, [demo.data / "images" / files[i] for i in ids], [sorted(present[i]) for i in ids],
                    steps=c.vision_steps, batch_size=c.vision_batch, learning_rate=c.vision_lr, seed=demo.seed,
                    progress=lambda step, loss: st.progress(step, c.vision_steps))
            st.output("model", out)
            st.extra["summary"] = summary

    demo.step("vision: tag-pretrain the vision tower", demo.out, "vision", work)


def base_start(demo: Demo) -> Path:
    """The model the base SFT starts from: the tag-pretrained one, or the random init without it."""
    return demo.out / "models" / ("vision" if demo.config.vision_steps else "init")


def train_base(demo: Demo) -> None:
    """`hallu sft --full` on the noisy train labels: a captioner/answerer with the co-occurrence prior."""
    from hallu.data import shapes as world
    from hallu.manifest import Run
    from hallu.train.sft import SftOptions, run_sft

    c = demo.config
    data = demo.data / world.BASE_SFT_FILE

    def work() -> None:
        opts = SftOptions(method="sft", lora=False, max_steps=c.base_steps, batch_size=c.base_batch,
                          learning_rate=c.base_lr, max_length=None,
                          save_steps=c.base_steps,
                          logging_steps=max(10, c.base_steps // 20), seed=demo.seed, overrides=dict(c.base_overrides),
                          freeze_vision_tower=c.base_freeze_vision)
        run_sft(Run(demo.out), base_start(demo), data, fresh_training(demo.out / "base"), opts)

    demo.step("sft: the base (full, noisy labels)", demo.out, "sft", work)


def build_pope(demo: Demo) -> None:
    """POPE's three splits from the held-out images' annotations (the official sampler)."""
    from hallu.data import pope as pope_data

    if all((demo.out / "pope" / f"shapes_pope_{s}.json").exists() for s in pope_data.SPLITS):
        return
    entries = pope_data.read_objects_file(demo.data / "pope" / "objects.jsonl")
    eligible = sum(len(e.objects) >= pope_data.DEFAULT_SAMPLE_NUM for e in entries)
    if not eligible:
        raise HalluError(f"demo: no held-out image has {pope_data.DEFAULT_SAMPLE_NUM} objects for POPE; "
                         "use more --images")
    built = pope_data.build(entries, seed=demo.seed, images_per_split=min(demo.config.eval_images, eligible))
    pope_data.write_build(built, demo.out / "pope", dataset="shapes")


def pope_questions(demo: Demo) -> list[Path]:
    from hallu.data import pope as pope_data

    return [demo.out / "pope" / f"shapes_pope_{s}.json" for s in pope_data.SPLITS]


def evaluate(demo: Demo, label: str, model: Path, where: Path) -> None:
    """POPE (three splits) and CHAIR of ``model`` on the held-out images, into ``where/{pope,chair}``."""
    from hallu.data import shapes as world
    from hallu.evals import chair, pope

    c = demo.config
    knobs = dict(batch_size=c.eval_batch, device="auto", dtype="float32", attn="sdpa", trust_remote_code=False)
    demo.step(f"eval pope: {label}", where / "pope", "eval-pope",
               lambda: pope.evaluate_model(pope_questions(demo), model, demo.heldout, where / "pope",
                                           "pope-official", False,
                                           dict(knobs, mode="generate", max_new_tokens=4, answer_suffix="none")),
              model=model)
    demo.step(f"eval chair: {label}", where / "chair", "eval-chair",
               lambda: chair.evaluate_model(model, demo.heldout, demo.data / "annotations", where / "chair", False,
                                            dict(knobs, max_new_tokens=c.caption_tokens), n_images=c.eval_images,
                                            seed=demo.seed, prompt=world.CAPTION_QUESTION),
              model=model)


# --------------------------------------------------------------------------------------------------
# Methods and controls


def method_dir(demo: Demo, method: str) -> Path:
    return demo.out / "methods" / method


def rollout_and_revise(demo: Demo, method: str, run_dir: Path) -> None:
    from hallu.manifest import Run
    from hallu.models import LoadOptions
    from hallu.revise import ReviseOptions, revise
    from hallu.rollout import RolloutOptions, rollout

    c = demo.config
    ropts = RolloutOptions(n=c.rollout_n, max_new_tokens=c.caption_tokens, temperature=c.rollout_temperature,
                           batch_size=64, seed=demo.seed, load=LoadOptions(dtype="float32"))
    demo.step(f"{method}: rollout", run_dir, "rollout",
               lambda: rollout(Run(run_dir), demo.base_model, demo.train_prompts, ropts))
    vopts = ReviseOptions(judge="annotations", method=method, judge_options={"mode": c.revise_mode}, batch_size=64)
    demo.step(f"{method}: revise", run_dir, "revise", lambda: revise(Run(run_dir), vopts))


def merge_step(demo: Demo, label: str, run_dir: Path, stage: str, adapter: Path, out: Path) -> None:
    """`hallu merge-lora`, recorded as a stage of the sub-run (the command itself keeps no manifest)."""
    from hallu.manifest import Run
    from hallu.train.merge import merge_lora

    def work() -> None:
        run = Run(run_dir)
        with run.stage(stage, options={"dtype": "float32", "out": out.name}, inputs={"adapter": adapter}) as st:
            merge_lora(adapter, out, dtype="float32")
            st.output("model", out)

    demo.step(label, run_dir, stage, work)


def run_method(demo: Demo, method: str) -> None:
    from hallu.manifest import Run
    from hallu.train.dpo import DpoOptions, run_dpo
    from hallu.train.sft import SftOptions, run_sft

    c = demo.config
    d = method_dir(demo, method)
    rollout_and_revise(demo, method, d)
    pairs = d / "revise" / "pairs.jsonl"
    start = demo.base_model
    if method == "opa-dpo":
        def opa_sft() -> None:
            sopts = SftOptions(method="opa-dpo", lora=True, max_steps=c.opa_sft_steps, batch_size=c.train_batch,
                               learning_rate=c.opa_sft_lr, max_length=None, seed=demo.seed,
                               save_steps=c.opa_sft_steps)
            run_sft(Run(d), start, None, fresh_training(d / "sft"), sopts)

        demo.step(f"{method}: OPA LoRA-SFT", d, "sft", opa_sft)
        merge_step(demo, f"{method}: merge-lora (OPA)", d, "merge-lora.sft", d / "sft" / "adapter", d / "opa-model")
        start = d / "opa-model"
        steps, lr, items = c.opa_dpo_steps, c.opa_dpo_lr, list(c.opa_dpo_set)
    else:
        steps, lr, items = c.ha_dpo_steps, c.ha_dpo_lr, list(c.ha_dpo_set)
    # The LM term's data, the clean train answers: HA-DPO's γ is on by default, OPA-DPO's only when set.
    lm_term = method == "ha-dpo" or any(i.startswith(f"{method}.sft_weight=") for i in items)
    sft_data = demo.train_prompts if lm_term else None
    set_items = [f"learning_rate={lr}", *items]

    def dpo() -> None:
        dopts = DpoOptions(method=method, lora=True, max_steps=steps, batch_size=c.train_batch,
                           save_steps=steps, seed=demo.seed, dtype="float32", set_items=set_items,
                           sft_data=sft_data)
        run_dpo(Run(d), start, pairs, fresh_training(d / "dpo"), dopts, warn=demo.say)

    demo.step(f"{method}: dpo", d, "dpo", dpo)
    merge_step(demo, f"{method}: merge-lora (DPO)", d, "merge-lora", d / "dpo" / "adapter", d / "model")
    evaluate(demo, method, d / "model", d / "eval")


def run_control(demo: Demo, method: str) -> None:
    """Plain LoRA SFT from the base on the method's revised pairs, for as many steps as the method took."""
    from hallu.manifest import Run
    from hallu.train.sft import PRESETS, SftOptions, run_sft

    c = demo.config
    d = method_dir(demo, method)
    cd = d / "control"
    pairs = d / "revise" / "pairs.jsonl"
    steps = c.method_steps(method)
    preset = method if method in PRESETS else "sft"

    def work() -> None:
        sopts = SftOptions(method=preset, lora=True, max_steps=steps, batch_size=c.train_batch,
                           learning_rate=c.control_lr, max_length=None, seed=demo.seed,
                           save_steps=steps)
        run_sft(Run(cd), demo.base_model, pairs, fresh_training(cd / "sft"), sopts)

    demo.step(f"{method}: control SFT", cd, "sft", work)
    merge_step(demo, f"{method}: control merge-lora", cd, "merge-lora", cd / "sft" / "adapter", cd / "model")
    evaluate(demo, f"{method} control", cd / "model", cd / "eval")
