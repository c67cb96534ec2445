"""Score speed: ``Engine.score`` against one full forward per (prompt, completion), on one model.

The baseline is how reference log-probs are usually computed (TRL's DPO precompute, perplexity filters):
for each completion, render prompt + answer, run the processor, one forward over the whole sequence,
gather the answer's log-probs. hallu's ``Engine.score`` encodes each image and prefills each image
group's common prefix once, then scores every completion of the group in one continuation forward.
A third column runs the engine with prefix sharing off (the batched plain path Qwen2-VL takes).

All sides score the same completions; the script fails unless every log-prob agrees to 1e-3 (the
batched forward reorders fp32 sums) and prints the ratios.

    python benchmarks/score_speed.py [--images 20] [--questions 3] [--completions 4] [--batch-size 16]

Defaults: ``hallu.tiny``'s "bench" LLaVA (4 text layers, hidden 128, 256 image tokens per image) with
random weights, 224x224 images, answers of 4-20 words.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = "a dog cat fork knife spoon bowl person car pizza cup on the near red blue small big table".split()


def build_requests(n_images: int, n_questions: int, n_completions: int, seed: int):
    from PIL import Image

    from hallu.engine import ScoreRequest

    rng = random.Random(seed)
    questions = ["Describe the image.", "Is there a dog in the image?", "What is on the table?",
                 "How many objects are there?", "Is there a fork in the image?"]
    reqs = []
    for i in range(n_images):
        img = Image.new("RGB", (224, 224), tuple(rng.randrange(256) for _ in range(3)))
        for j in range(n_questions):
            answers = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))).capitalize() + "."
                       for _ in range(n_completions)]
            reqs.append(ScoreRequest(f"{i}-{j}", [img], questions[j % len(questions)], image_key=(i,),
                                     completions=answers))
    return reqs


def baseline(lm, engine, reqs) -> dict:
    """One processor call and one unpadded forward per (prompt, completion)."""
    import torch

    out = {}
    for r in reqs:
        prompt = engine.render(r)
        for k, text in enumerate(r.completions):
            target = engine.completion_ids(r, text)
            enc = lm.processor(images=list(r.images), text=[prompt], return_tensors="pt")
            ids = torch.cat([enc["input_ids"], torch.tensor([target])], 1)
            mask = torch.ones_like(ids)
            with torch.inference_mode():
                logits = lm.model(input_ids=ids, attention_mask=mask, pixel_values=enc["pixel_values"]).logits
            n = enc["input_ids"].shape[1]
            lp = logits[0, n - 1 : n - 1 + len(target)].float().log_softmax(-1)
            out[(r.id, k)] = lp.gather(-1, torch.tensor(target)[:, None])[:, 0].tolist()
    return out


def engine_scores(engine, reqs) -> dict:
    return {(s.id, s.completion): s.logprobs for b in engine.score(reqs) for s in b}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--completions", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", type=Path, help="a model folder (default: a tiny 'bench' LLaVA)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from hallu import tiny
    from hallu.engine import Engine
    from hallu.models import load_model

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(tmp) / "llava"
            tiny.build_tiny_model("llava", model_dir, seed=args.seed, size="bench")
        lm = load_model(model_dir)
        reqs = build_requests(args.images, args.questions, args.completions, args.seed)
        rows = sum(len(r.completions) for r in reqs)
        shared = Engine(lm.model, lm.processor, batch_size=args.batch_size)
        plain = Engine(lm.model, lm.processor, batch_size=args.batch_size, share_prefix=False)
        engine_scores(shared, reqs[:2])  # warm-up: first-call costs (template, allocator) out of the timing
        timings, results = {}, {}
        for name, fn in (("one-at-a-time", lambda: baseline(lm, shared, reqs)),
                         ("engine, plain batched", lambda: engine_scores(plain, reqs)),
                         ("engine, shared prefix", lambda: engine_scores(shared, reqs))):
            t0 = time.perf_counter()
            results[name] = fn()
            timings[name] = time.perf_counter() - t0
        if not shared.share_prefix:
            print("the shared path fell back to the plain one", file=sys.stderr)
            return 1
    ref = results["one-at-a-time"]
    for name, got in results.items():
        worst = max(abs(a - b) for key in ref for a, b in zip(ref[key], got[key], strict=True))
        if worst > 1e-3:
            print(f"{name}: log-probs differ from the baseline by {worst:.2e}", file=sys.stderr)
            return 1
    print(f"{rows} completions ({args.images} images x {args.questions} questions x {args.completions}), "
          f"batch size {args.batch_size}")
    base = timings["one-at-a-time"]
    for name, t in timings.items():
        print(f"  {name:24s} {t:7.2f} s   {base / t:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
