"""Stock TRL DPOTrainer vs `hallu dpo --method dpo`: same small LLaVA, same pairs, same seed, fp32.

The model is hallu.tiny's ``bench`` LLaVA (256 image tokens per prompt, answers of ~10 tokens: image tokens
dominate, as in real VLMs). For full fine-tuning and LoRA it prints

* the tokens each side scores for one pair, and the first-step logps/chosen and logps/rejected of both
  (target: equal to 1e-4 relative);
* the time per pair of **steady-state training steps**: from the trainer's ``on_step_begin`` to its
  ``on_step_end`` (forward, backward, optimizer), after ``--warmup`` untimed steps, median over ``--steps``.
  Excluded on both sides: model loading, data processing (the collators run before ``on_step_begin``) and
  hallu's one reference pass before training. TRL's per-step reference forward is part of its step,
  because that is where TRL computes it (``precompute_ref_log_probs`` is refused for vision data);
* the peak-memory ratio: peak RSS over the process's RSS after the same imports on both sides, on CPU
  (models, TRL's reference copy, hallu's reference pass and activations all count); peak CUDA memory on
  a GPU.

Tokens: hallu tokenises the rendered prompt with the tokenizer's special tokens, as ``hallu.engine``
does when it generates the rollouts, so a Llama-style tokenizer puts its BOS first. TRL tokenises the
rendered prompt with ``add_special_tokens=False``, which for a template that writes no BOS (LLaVA's)
scores the prompt without it. So that both sides score identical tokens, the TRL side gets the same
template with ``{{ bos_token }}`` in front; ``--trl-native-template`` turns that off to show the difference.

Each measurement runs in its own process so peaks do not mix; every process uses ``--threads`` threads.
On a CPU shared with other jobs, wall time swings by 2-3x from step to step; the default clock there is
the process's CPU time with one thread, which counts the work done and not the waiting.

    python benchmarks/dpo_speed.py [--warmup 3] [--steps 10] [--batch-size 4] [--threads 1] [--clock auto]

Measured on the shared 2-core CPU machine (torch 2.13 CPU, transformers 5.24, trl 1.16), defaults, two
runs at load average 2.4-3.6: logps agree to 8e-8 relative in both modes; time per pair (CPU clock) full
0.27 / 0.22 and LoRA 0.42 / 0.35 of TRL's (wall clock the same within 0.01); peak memory full 0.40 / 0.43
and LoRA 0.48 / 0.50. Where the time goes: TRL runs the vision tower and the 269-token prompt twice per
pair with gradients, plus a third time in its reference forward; hallu runs them once, projects only the
last prompt token onto the vocabulary, and its reference pass happens before training.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OBJECTS = ["dog", "cat", "fork", "knife", "cup", "bowl", "pizza", "car"]
BOS_FIRST = "{{ bos_token }}"


def make_world(root: Path, n_pairs: int) -> None:
    from PIL import Image

    from hallu import tiny

    tiny.build_tiny_model("llava", root / "model", seed=0, size="bench")
    rng = random.Random(0)
    (root / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n_pairs):
        Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3))).save(root / "img" / f"{i}.png")
        a, b = rng.sample(OBJECTS, 2)
        rows.append({"id": f"p{i}", "images": [f"img/{i}.png"], "prompt": "Describe the image in detail.",
                     "chosen": f"There is a {a}.", "rejected": f"There is a {a} next to the {b}."})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _warm_imports() -> None:
    """Import what either side needs, so the memory baseline holds the same code on both sides."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    from transformers import LlavaForConditionalGeneration, LlavaProcessor  # noqa: F401
    from trl import DPOConfig, DPOTrainer  # noqa: F401

    import hallu.manifest  # noqa: F401
    import hallu.train.common  # noqa: F401
    import hallu.train.dpo  # noqa: F401
    import hallu.train.sft  # noqa: F401


def _peak_mb(base: float) -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step: forward + backward + optimizer, batches already collated."""

        def __init__(self):
            self.seconds: list[float] = []  # wall
            self.cpu_seconds: list[float] = []  # this process's CPU time (all its threads)
            self._t0 = self._c0 = 0.0

        def _sync(self):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kw):
            self._sync()
            self._t0, self._c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self._sync()
            self.seconds.append(time.perf_counter() - self._t0)
            self.cpu_seconds.append(time.process_time() - self._c0)

    return StepTimer()


def _fp32() -> dict:
    return {"bf16": False, "fp16": False}


def _trl_processor(root: Path, native: bool):
    from hallu.train.common import load_for_training

    model, processor = load_for_training(root / "model")
    if not native and not processor.chat_template.startswith(BOS_FIRST):
        processor.chat_template = BOS_FIRST + processor.chat_template
    return model, processor


def _trl_dataset(root: Path):
    from datasets import Dataset
    from PIL import Image

    from hallu.records import PreferencePair, pair_to_trl, read_records

    rows = [pair_to_trl(p, root) for p in read_records(root / "pairs.jsonl", PreferencePair)]
    return Dataset.from_list([{"images": [Image.open(r["images"][0]).convert("RGB")], "prompt": r["prompt"],
                               "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])


def run_trl(root: Path, lora: bool, steps: int, batch: int, native: bool) -> dict:
    from trl import DPOConfig, DPOTrainer

    from hallu.methods import get_method
    from hallu.train.common import lora_config

    _warm_imports()
    base = _rss_mb()
    model, processor = _trl_processor(root, native)
    ref = None if lora else _trl_processor(root, native)[0].eval()
    ds = _trl_dataset(root)
    args = DPOConfig(output_dir=str(root / f"trl-{lora}"), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=1e-4, beta=0.1, logging_steps=1, save_strategy="no", report_to="none",
                     activation_checkpointing=False, remove_unused_columns=False, seed=0, data_seed=0,
                     disable_tqdm=True, max_length=1024, dataloader_num_workers=0, **_fp32())
    lc = get_method("dpo").lora
    timer = _step_timer()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=processor,
                         peft_config=lora_config(lc.r, lc.alpha, lc.dropout, lc.target, lc.include_vision)
                         if lora else None, callbacks=[timer])
    trainer.train()
    first = next(h for h in trainer.state.log_history if "logps/chosen" in h)
    return {"logps_chosen": first["logps/chosen"], "logps_rejected": first["logps/rejected"],
            "step_seconds": timer.seconds, "step_cpu_seconds": timer.cpu_seconds, "peak_mb": _peak_mb(base)}


def run_hallu(root: Path, lora: bool, steps: int, batch: int, native: bool) -> dict:
    from hallu.manifest import Run
    from hallu.train.dpo import DpoOptions, run_dpo

    _warm_imports()
    base = _rss_mb()
    out = root / f"hallu-{lora}"
    opts = DpoOptions(method="dpo", lora=lora, max_steps=steps, batch_size=batch, logging_steps=1,
                      save_steps=10**6, seed=0,
                      set_items=["learning_rate=1e-4", "max_length=1024", "bf16=false", "fp16=false"])
    timer = _step_timer()
    run_dpo(Run(out / "run"), root / "model", root / "pairs.jsonl", out / "dpo", opts, callbacks=[timer])
    log = [json.loads(x) for x in (out / "dpo" / "log_history.jsonl").read_text().splitlines()]
    first = next(h for h in log if "logps/chosen" in h)
    return {"logps_chosen": first["logps/chosen"], "logps_rejected": first["logps/rejected"],
            "step_seconds": timer.seconds, "step_cpu_seconds": timer.cpu_seconds, "peak_mb": _peak_mb(base)}


def scored_tokens(root: Path, native: bool) -> dict:
    """The (prompt, chosen, rejected) tokens each trainer scores for the first pair, compressed for printing."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from hallu.methods import get_method
    from hallu.train.dpo import build_examples, load_pairs
    from hallu.train.pair_forward import encode_prompts

    _, processor = _trl_processor(root, native)
    tok = processor.tokenizer
    row = _trl_dataset(root)[0]
    b = DataCollatorForVisionPreference(processor=processor)([dict(row)])
    names = lambda ids: tok.convert_ids_to_tokens([int(i) for i in ids])  # noqa: E731
    trl = {}
    for j, key in enumerate(("chosen", "rejected")):
        ids, am, cm = b["input_ids"][j], b["attention_mask"][j], b["completion_mask"][j]
        trl["prompt"] = names([i for i, a, c in zip(ids, am, cm, strict=True) if a and not c])
        trl[key] = names([i for i, c in zip(ids, cm, strict=True) if c])
    _, hprocessor = _trl_processor(root, native=True)  # hallu always renders the processor's own template
    spec = get_method("dpo")
    ex = build_examples(load_pairs(root / "pairs.jsonl", spec, spec.options())[:1], root, hprocessor, spec,
                        spec.options(), 1024)[0]
    from hallu.records import load_image

    enc = encode_prompts(hprocessor, [ex.prompt_text], [[load_image(i) for i in ex.images]])
    hallu = {"prompt": names(enc["input_ids"][0]), "chosen": names(ex.answers[0]), "rejected": names(ex.answers[1])}
    return {"trl": {k: _squeeze(v) for k, v in trl.items()}, "hallu": {k: _squeeze(v) for k, v in hallu.items()},
            "identical": trl == hallu}


def _squeeze(tokens: list[str]) -> str:
    """Runs of one repeated token as ``<image>×256``."""
    out, i = [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and tokens[j] == tokens[i]:
            j += 1
        out.append(tokens[i] if j - i < 3 else f"{tokens[i]}×{j - i}")
        i = j
    return " ".join(out)


def _child(who: str, lora: bool, root: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size",
           str(a.batch_size), "--threads", str(a.threads), "--one", who, "1" if lora else "0", str(root)]
    if a.trl_native_template:
        cmd.append("--trl-native-template")
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        sys.exit(f"{who} {'lora' if lora else 'full'} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                    help="cpu: the process's CPU time per step (robust on a CPU shared with other jobs; use it with "
                         "--threads 1); wall: elapsed time; auto: wall on a GPU, cpu otherwise")
    ap.add_argument("--trl-native-template", action="store_true",
                    help="give TRL the processor's template as is (its prompts then lack the BOS hallu scores)")
    ap.add_argument("--one", nargs=3, metavar=("WHO", "LORA", "ROOT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    total = a.warmup + a.steps
    if a.one:
        import torch

        torch.set_num_threads(a.threads)
        who, lora, root = a.one[0], a.one[1] == "1", Path(a.one[2])
        fn = run_trl if who == "trl" else run_hallu
        print("RESULT " + json.dumps(fn(root, lora, total, a.batch_size, a.trl_native_template)))
        return
    if a.clock == "auto":
        import torch

        a.clock = "wall" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_world(root, total * a.batch_size)  # one epoch: every timed step sees new pairs
        toks = scored_tokens(root, a.trl_native_template)
        print(f"tokens scored for pair p0 (identical: {toks['identical']}):")
        for who in ("trl", "hallu"):
            for key in ("prompt", "chosen", "rejected"):
                print(f"  {who:5s} {key:8s} {toks[who][key]}")
        print(f"timed: median of {a.steps} steady-state steps (after {a.warmup} warm-up) of {a.batch_size} pairs, "
              f"on_step_begin -> on_step_end (forward + backward + optimizer; TRL's includes its reference "
              f"forward); excluded: loading, collation, hallu's one reference pass; {a.threads} torch threads, fp32, "
              f"{a.clock} clock")
        for lora in (False, True):
            res = {who: _child(who, lora, root, a) for who in ("trl", "hallu")}
            t, h = res["trl"], res["hallu"]
            mode = "lora" if lora else "full"
            for key in ("chosen", "rejected"):
                tv, hv = t[f"logps_{key}"], h[f"logps_{key}"]
                rel = abs(hv - tv) / abs(tv)
                print(f"[{mode}] first-step logps/{key:8s} trl {tv:.6f}  hallu {hv:.6f}  rel diff {rel:.2e} "
                      f"({'ok' if rel <= 1e-4 else 'MISMATCH'})")
            per_pair = {}
            for clock, key in (("cpu", "step_cpu_seconds"), ("wall", "step_seconds")):
                per_pair[clock] = [statistics.median(x[key][a.warmup:]) / a.batch_size for x in (t, h)]
            ts, hs = per_pair[a.clock]
            ratio = hs / ts
            other = "wall" if a.clock == "cpu" else "cpu"
            ot, oh = per_pair[other]
            print(f"[{mode}] time per pair ({a.clock}): trl {ts * 1e3:.1f} ms, hallu {hs * 1e3:.1f} ms, ratio "
                  f"{ratio:.2f} (target <= 0.6: {'met' if ratio <= 0.6 else 'NOT met'});  {other}: trl "
                  f"{ot * 1e3:.1f} ms, hallu {oh * 1e3:.1f} ms, ratio {oh / ot:.2f}")
            mem = h["peak_mb"] / t["peak_mb"] if t["peak_mb"] > 0 else float("nan")
            print(f"[{mode}] peak memory: trl {t['peak_mb']:.0f} MB, hallu {h['peak_mb']:.0f} MB, ratio {mem:.2f} "
                  f"(target <= 0.8: {'met' if mem <= 0.8 else 'NOT met'})")


if __name__ == "__main__":
    main()
