"""Stock TRL DPOTrainer vs `hallu dpo --method dpo`: same tiny-but-not-trivial LLaVA, same pairs, same seed.

The model is hallu.tiny's ``bench`` LLaVA (256 image tokens per prompt, answers of ~10 tokens: image tokens
dominate, as in real VLMs). For full fine-tuning and LoRA it prints the first-step logps/chosen and
logps/rejected of both trainers (targets: equal to 1e-4 relative in fp32), the wall time per pair of the
whole training call (TRL: reference forward every step; hallu: one reference pass + the shared-prompt
forward) and the peak-memory ratio (peak RSS growth over the loaded process on CPU; peak CUDA memory on
a GPU). Each measurement runs in its own process so peaks do not mix.

    python benchmarks/dpo_speed.py [--pairs 32] [--steps 8] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OBJECTS = ["dog", "cat", "fork", "knife", "cup", "bowl", "pizza", "car"]


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


def _peak_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_trl(root: Path, lora: bool, steps: int, batch: int) -> dict:
    import torch
    from datasets import Dataset
    from PIL import Image
    from trl import DPOConfig, DPOTrainer

    from hallu.records import PreferencePair, pair_to_trl, read_records
    from hallu.train.common import load_for_training, lora_config, trainer_precision_kwargs

    model, processor = load_for_training(root / "model")
    ref = None if lora else load_for_training(root / "model")[0].eval()
    rows = [pair_to_trl(p, root) for p in read_records(root / "pairs.jsonl", PreferencePair)]
    ds = Dataset.from_list([{"images": [Image.open(r["images"][0]).convert("RGB")], "prompt": r["prompt"],
                             "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    args = DPOConfig(output_dir=str(root / f"trl-{lora}"), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=1e-4, beta=0.1, logging_steps=1, save_strategy="no", report_to="none",
                     activation_checkpointing=False, remove_unused_columns=False, seed=0, data_seed=0,
                     disable_tqdm=True, max_length=1024, **trainer_precision_kwargs())
    base = _peak_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = 0.0
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=processor,
                         peft_config=lora_config(128, 256, 0.0) if lora else None)
    trainer.train()
    seconds = time.perf_counter() - t0
    first = next(h for h in trainer.state.log_history if "logps/chosen" in h)
    return {"logps_chosen": first["logps/chosen"], "logps_rejected": first["logps/rejected"],
            "seconds": seconds, "pairs": steps * batch, "peak_mb": _peak_mb() - base}


def run_hallu(root: Path, lora: bool, steps: int, batch: int) -> dict:
    import torch

    from hallu.manifest import Run
    from hallu.train.dpo import DpoOptions, run_dpo

    out = root / f"hallu-{lora}"
    opts = DpoOptions(method="dpo", lora=lora, max_steps=steps, batch_size=batch, logging_steps=1,
                      save_steps=10**6, seed=0, set_items=["learning_rate=1e-4", "max_length=1024"])
    import resource  # noqa: F401

    from hallu.train.common import load_for_training

    load_for_training(root / "model")  # warm the same imports and file cache as the TRL run
    base = _peak_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = 0.0
    t0 = time.perf_counter()
    run_dpo(Run(out / "run"), root / "model", root / "pairs.jsonl", out / "dpo", opts)
    seconds = time.perf_counter() - t0
    log = [json.loads(x) for x in (out / "dpo" / "log_history.jsonl").read_text().splitlines()]
    first = next(h for h in log if "logps/chosen" in h)
    return {"logps_chosen": first["logps/chosen"], "logps_rejected": first["logps/rejected"],
            "seconds": seconds, "pairs": steps * batch, "peak_mb": _peak_mb() - base}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--one", nargs=3, metavar=("WHO", "LORA", "ROOT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.one:
        who, lora, root = a.one[0], a.one[1] == "1", Path(a.one[2])
        fn = run_trl if who == "trl" else run_hallu
        print("RESULT " + json.dumps(fn(root, lora, a.steps, a.batch_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_world(root, a.pairs)
        for lora in (False, True):
            res = {}
            for who in ("trl", "hallu"):
                cmd = [sys.executable, __file__, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                       "--one", who, "1" if lora else "0", str(root)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode or not line:
                    print(f"{who} {'lora' if lora else 'full'} failed:\n{p.stderr[-3000:]}")
                    return
                res[who] = json.loads(line[0][7:])
            t, h = res["trl"], res["hallu"]
            mode = "lora" if lora else "full"
            rel_c = abs(h["logps_chosen"] - t["logps_chosen"]) / abs(t["logps_chosen"])
            rel_r = abs(h["logps_rejected"] - t["logps_rejected"]) / abs(t["logps_rejected"])
            time_ratio = (h["seconds"] / h["pairs"]) / (t["seconds"] / t["pairs"])
            mem_ratio = h["peak_mb"] / t["peak_mb"] if t["peak_mb"] > 0 else float("nan")
            print(f"[{mode}] first-step logps/chosen   trl {t['logps_chosen']:.6f}  hallu {h['logps_chosen']:.6f}"
                  f"  rel diff {rel_c:.2e} ({'ok' if rel_c <= 1e-4 else 'MISMATCH'})")
            print(f"[{mode}] first-step logps/rejected trl {t['logps_rejected']:.6f}  hallu {h['logps_rejected']:.6f}"
                  f"  rel diff {rel_r:.2e} ({'ok' if rel_r <= 1e-4 else 'MISMATCH'})")
            print(f"[{mode}] time per pair: trl {t['seconds'] / t['pairs'] * 1e3:.1f} ms, hallu "
                  f"{h['seconds'] / h['pairs'] * 1e3:.1f} ms, ratio {time_ratio:.2f} (target <= 0.6: "
                  f"{'met' if time_ratio <= 0.6 else 'NOT met'})")
            print(f"[{mode}] peak memory: trl {t['peak_mb']:.0f} MB, hallu {h['peak_mb']:.0f} MB, ratio "
                  f"{mem_ratio:.2f} (target <= 0.8: {'met' if mem_ratio <= 0.8 else 'NOT met'})")


if __name__ == "__main__":
    main()
