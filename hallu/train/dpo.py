"""`hallu dpo`: preference optimisation with our loss and the shared-prompt pair forward.

The training loop is a transformers ``Trainer`` configured by TRL's ``DPOConfig`` (so every DPOConfig
field is settable with ``--set``); the forward and the loss are ours:

* each prompt (and its images) is encoded once and continued with every answer the method scores
  (``hallu.train.pair_forward``): DPO continues with chosen and rejected, OPA-DPO with GT, original and
  revised, plus a second prefill on the masked image for GT and revised;
* reference log-probs are per-token and come either from a pass of the frozen starting model over the
  data before training, stored beside the output (``reference_logps.jsonl``: no second model in memory,
  reused by a resumed run), or from the same weights with the LoRA adapter disabled (``adapter-off``);
* the loss is the method's (``hallu.train.losses``), logged like TRL (loss, rewards/*, logps/*, each extra
  term by name) into ``OUT/log_history.jsonl``;
* the processor work (images, pixel values, token ids) happens in the data collator, so a training step
  is the model's forward, backward and optimizer step only;
* HA-DPO's LM term trains on SFT samples dealt one per pair (``--sft-data``, else the run's prepared
  prompts with references), and its ``online`` policy redraws the style variants each epoch.

The reference pass uses this module's own forward rather than ``Engine.score`` so the policy and the
reference numbers come from the very same computation: at step 0 every reward is exactly 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.methods import MethodSpec, get_method, split_set_items
from hallu.records import PreferencePair, is_held_out, load_image, read_records, resolve_image

REFERENCES = ("precomputed", "adapter-off")


@dataclass
class DpoOptions:
    method: str = "dpo"
    lora: bool = True
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    save_steps: int = 200
    logging_steps: int = 10
    seed: int = 0
    dtype: str = "auto"
    reference: str | None = None  # None: the method's
    report_to: str = "none"
    trust_remote_code: bool = False
    chat_template: str | None = None
    set_items: list[str] = field(default_factory=list)
    sft_data: Path | None = None  # the LM term's data (HA-DPO, §2.4); None: the run's prepared prompts


@dataclass
class Example:
    """One training item, tokenised: a prompt and the answers the method scores."""

    id: str
    images: list[str]
    prompt_text: str  # rendered by the chat template
    answers: list[list[int]]  # dpo: [chosen, rejected]; opa: [gt, original, revised]
    weights: dict[str, list[float]] = field(default_factory=dict)  # opa: score_w/img_w per answer
    ref: list[list[float]] | None = None  # per-token reference log-probs, one list per scored sequence
    sft: Example | None = None  # the LM term's sample (one answer), when the method has SFT data
    variant_of: str | None = None  # HA-DPO online: the pair this is a view of
    n_variants: tuple[int, int] | None = None  # HA-DPO online: (chosen, rejected) variants of that pair


# --------------------------------------------------------------------------------------------------
# Options


def resolve(spec: MethodSpec, opts: DpoOptions):
    """(DPOConfig overrides, method options, reference mode) after the method's defaults and --set."""
    from trl import DPOConfig

    from hallu.train.common import parse_set

    config_items, own_items = split_set_items(opts.set_items, spec.name)
    overrides = dict(spec.config)
    if "warmup_ratio" in overrides and "warmup_ratio" not in {f.name for f in dataclasses.fields(DPOConfig)}:
        overrides["warmup_steps"] = overrides.pop("warmup_ratio")  # transformers 5: a float < 1 is a ratio
    overrides.update(parse_set(config_items, DPOConfig))
    method_opts = spec.options(**parse_set(own_items, spec.options))
    reference = opts.reference or spec.reference
    if reference not in REFERENCES:
        raise HalluError(f"--reference {reference}: choose one of {', '.join(REFERENCES)}")
    if reference == "adapter-off" and not opts.lora:
        raise HalluError("--reference adapter-off needs a LoRA policy (drop --full, or use --reference precomputed)")
    for key in ("gradient_checkpointing", "activation_checkpointing"):
        if overrides.get(key):
            raise HalluError(f"--set {key}=true: the shared-prompt forward needs the KV cache, "
                             "which activation checkpointing turns off")
    return overrides, method_opts, reference


# --------------------------------------------------------------------------------------------------
# Data


def default_pairs(run) -> Path:
    return run.dir / "revise" / "pairs.jsonl"


def load_pairs(path: Path, spec: MethodSpec, method_opts) -> list[tuple[PreferencePair, str]]:
    """Pairs with the line they came from; HA-DPO's variants expanded by its pair policy."""
    if not path.exists():
        raise HalluError(f"--pairs {path}: no such file (run `hallu revise` first, or pass --pairs FILE)")
    pairs = read_records(path, PreferencePair)
    if not pairs:
        raise HalluError(f"--pairs {path}: no pairs in the file")
    if all(is_held_out(p.meta) for p in pairs):
        raise HalluError(f"--pairs {path}: every pair is on a held-out split (meta.split), and those are never "
                         "trained on")
    out = []
    for line, p in enumerate(pairs, 1):
        where = f"{path}:{line}"
        if is_held_out(p.meta):
            continue  # built on a held-out image, which the evals score: never trained on
        if spec.name == "ha-dpo":
            from hallu.methods.ha_dpo import expand_variants

            d = p.to_dict()
            views = expand_variants(d, method_opts.pair_policy, method_opts.seed)
            for suffix, c, r in views:
                meta = p.meta
                if method_opts.pair_policy == "online":  # the dataset draws from these views each epoch
                    counts = [len(p.meta.get(f"{k}_variants") or [None]) for k in ("chosen", "rejected")]
                    meta = {**p.meta, "variant_of": p.id, "n_variants": counts}
                out.append((dataclasses.replace(p, id=p.id + suffix, chosen=c, rejected=r, meta=meta), where))
        else:
            if spec.loss == "opa" and not isinstance(p.meta.get("revised"), str):
                raise HalluError(f"{where}: pair {p.id!r} has no meta.revised answer, which opa-dpo needs")
            out.append((p, where))
    return out


def build_examples(pairs, base: Path, processor, spec: MethodSpec, method_opts, max_length: int | None):
    from hallu.train.pair_forward import check_fits, completion_ids, render_prompt

    tokenizer = getattr(processor, "tokenizer", processor)
    image_token_id = _image_token_id(processor)
    examples = []
    for pair, where in pairs:
        images = [str(resolve_image(i, base)) for i in pair.images]
        text = render_prompt(processor, pair.prompt, len(images))
        pil = [load_image(i, where) for i in images]
        enc = processor(text=[text], images=pil or None, return_tensors="pt") if pil else processor(text=[text])
        ids = enc["input_ids"][0].tolist()
        n_image = sum(1 for t in ids if t == image_token_id)
        if pil and image_token_id is not None and n_image == 0:
            raise HalluError(f"{where}: pair {pair.id!r}: the rendered prompt has no image placeholder for "
                             f"its {len(pil)} image(s)")
        check_fits(len(ids), n_image, max_length, f"{where}: pair {pair.id!r}")
        if spec.loss == "opa" and method_opts.image_coef and pil and _patch_pixels(enc):
            raise HalluError(f"{where}: opa-dpo draws a masked image from [..., C, H, W] pixels, but this model's "
                             "processor gives flattened patches; set --set opa-dpo.image_coef=0 (no image-focus "
                             "pairs and no anchor) or use a LLaVA-family model")
        room = None if max_length is None else max_length - len(ids)
        answers_text = [pair.chosen, pair.rejected]
        if spec.loss == "opa":
            answers_text.append(pair.meta["revised"])
        answers = []
        for a in answers_text:
            a_ids = completion_ids(processor, pair.prompt, len(images), a, text)
            answers.append(a_ids[:room] if room is not None else a_ids)
        ex = Example(pair.id, images, text, answers, variant_of=pair.meta.get("variant_of"),
                     n_variants=tuple(pair.meta["n_variants"]) if "n_variants" in pair.meta else None)
        if spec.loss == "opa":
            ex.weights = _opa_weights(tokenizer, processor, pair, text, answers, method_opts)
        examples.append(ex)
    return examples


def attach_sft(examples: list[Example], sft_path: Path, processor, max_length: int | None, seed: int) -> int:
    """Give every training example one SFT sample for the LM term, as HA-DPO's items carry one (§2.4).

    The samples (T1's SFT reader: pairs' chosen answers, prompts with references, or SFT records) are
    shuffled once with ``seed`` and dealt round-robin; returns how many there were.
    """
    import random

    from hallu.train.pair_forward import check_fits, completion_ids, render_prompt
    from hallu.train.sft import load_examples

    if not sft_path.is_file():
        raise HalluError(f"--sft-data {sft_path}: no such file")
    samples = load_examples(sft_path)
    random.Random(seed).shuffle(samples)
    image_token_id = _image_token_id(processor)
    built: dict[str, Example] = {}
    for i, ex in enumerate(examples):
        s = samples[i % len(samples)]
        if s.id not in built:
            text = render_prompt(processor, s.prompt, len(s.images))
            pil = [load_image(im, f"{sft_path}: sample {s.id!r}") for im in s.images]
            enc = processor(text=[text], images=pil) if pil else processor(text=[text])
            ids = list(enc["input_ids"][0])
            n_image = sum(1 for t in ids if t == image_token_id)
            check_fits(len(ids), n_image, max_length, f"{sft_path}: sample {s.id!r}")
            answer = completion_ids(processor, s.prompt, len(s.images), s.completion, text)
            room = None if max_length is None else max_length - len(ids)
            built[s.id] = Example(s.id, list(s.images), text, [answer[:room] if room is not None else answer])
        ex.sft = built[s.id]
    return len(samples)


def sft_source(run, opts: DpoOptions) -> Path | None:
    """The LM term's data: --sft-data, else the run's prepared prompts (their reference answers), else None."""
    if opts.sft_data is not None:
        return Path(opts.sft_data)
    rec = run.stage_record("prepare") or {}
    if rec.get("status") == "done" and "prompts" in rec.get("outputs", {}):
        return run.resolve(rec["outputs"]["prompts"]["path"])
    return None


def _patch_pixels(enc) -> bool:
    pv = enc.get("pixel_values")
    return pv is not None and len(getattr(pv, "shape", ())) < 4 and not isinstance(pv, list)


def _image_token_id(processor):
    tokenizer = getattr(processor, "tokenizer", processor)
    token = getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None)
    if token is None:
        return None
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid if isinstance(tid, int) else None


def _opa_weights(tokenizer, processor, pair, rendered_prompt, answers, method_opts) -> dict[str, list[float]]:
    """Score and image-relation weights per token of the original and revised answers (§5.3)."""
    from hallu.methods import opa_dpo

    out = {}
    for key, text, ids, eos_rule in (("original", pair.rejected, answers[1], "zero"),
                                     ("revised", pair.meta["revised"], answers[2], "previous")):
        sentences = pair.meta.get(f"sentences_{key}") or []
        if not method_opts.token_weights or not sentences:
            out[f"score_w_{key}"] = out[f"img_w_{key}"] = [1.0] * len(ids)
            continue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        # the answer ids carry the template's separator first; align the bare answer's tokens to their tail
        lead = max(0, len(ids) - len(offsets) - 1)
        for kind, name in (("score", "score_w"), ("image", "img_w")):
            spans = opa_dpo.char_weights(text, sentences, kind)
            w = opa_dpo.token_weights(offsets, spans, len(ids) - lead, eos_rule)
            out[f"{name}_{key}"] = ([1.0] * lead + w)[: len(ids)]
    return out


# --------------------------------------------------------------------------------------------------
# Forward and loss


class _Batch:
    """The processor inputs of a batch of examples, built at collate time (outside the timed training step).

    ``sequences(model)`` moves them to the model's device and runs the forward; the processor work (image
    loading, pixel values, tokenising) happens once here, so the reference pass and a training step pay
    only for the model.
    """

    def __init__(self, examples: list[Example], processor, share: bool, spec: MethodSpec, method_opts,
                 with_sft: bool = True):
        from hallu.train import pair_forward as pf

        self.examples = examples
        self.spec = spec
        self.opts = method_opts
        self.share = share
        self.pad_id = _pad_id(processor)
        self.k = len(examples[0].answers)
        images = [[load_image(i) for i in ex.images] for ex in examples]
        self.enc = pf.encode_prompts(processor, [ex.prompt_text for ex in examples], images,
                                     repeat=1 if share else self.k)
        self.sft_enc = None
        if with_sft and examples[0].sft is not None:  # the reference pass needs no SFT samples
            sft = [ex.sft for ex in examples]
            self.sft_enc = pf.encode_prompts(processor, [x.prompt_text for x in sft],
                                             [[load_image(i) for i in x.images] for x in sft])
        self.masked_pixels = None
        if spec.loss == "opa" and method_opts.image_coef and "pixel_values" in self.enc:
            self.masked_pixels = self._masked_pixels(self.enc["pixel_values"], share, self.k)

    def sequences(self, model, with_sft: bool = False) -> dict[str, Any]:
        """Per-token log-probs [B, T] and masks of every scored sequence, in ``Example.ref`` order.

        ``with_sft``: also the LM term's samples, as ``sft_logps`` / ``sft_mask`` (no reference needed).
        """
        import torch

        from hallu.train import pair_forward as pf

        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        enc = _to_device(self.enc, device, dtype)
        share, k = self.share, self.k
        out = pf.continuation_logps(model, enc, [ex.answers for ex in self.examples], self.pad_id, share)
        seqs = [_rows(out.token_logps, k, j) for j in range(k)]
        masks = [_rows(out.mask, k, j) for j in range(k)]
        if self.masked_pixels is not None:
            masked = dict(enc, pixel_values=self.masked_pixels.to(device, dtype))
            two = [[ex.answers[0], ex.answers[2]] for ex in self.examples]
            if not share:  # the plain path takes each prompt once per answer: drop the original's copies
                masked = _select_repeats(masked, k, [0, 2])
            m = pf.continuation_logps(model, masked, two, self.pad_id, share)
            seqs += [_rows(m.token_logps, 2, 0), _rows(m.token_logps, 2, 1)]
            masks += [_rows(m.mask, 2, 0), _rows(m.mask, 2, 1)]
        width = max(t.shape[1] for t in seqs)  # one width for all, so token t lines up across sequences
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
        out = {"logps": [pad(t) for t in seqs], "masks": [pad(t) for t in masks]}
        if with_sft and self.sft_enc is not None:
            s = pf.continuation_logps(model, _to_device(self.sft_enc, device, dtype),
                                      [[ex.sft.answers[0]] for ex in self.examples], self.pad_id, share)
            out["sft_logps"], out["sft_mask"] = s.token_logps, s.mask
        return out

    def _masked_pixels(self, pixel_values, share: bool, k: int):
        """One masked draw per example, seeded by its id: the policy and reference passes see the same image."""
        import torch

        from hallu.train.pair_forward import mask_pixels

        per_example = pixel_values.shape[0] // (len(self.examples) * (1 if share else k))
        chunks = []
        for i, ex in enumerate(self.examples):
            g = torch.Generator().manual_seed(int(hashlib.sha256(ex.id.encode()).hexdigest()[:12], 16))
            reps = 1 if share else k
            start = i * per_example * reps
            block = pixel_values[start : start + per_example]
            masked = mask_pixels(block, self.opts.mask_ratio, generator=g)
            chunks += [masked] * reps
        return torch.cat(chunks, 0)


def _ref_identity(ex: Example) -> dict:
    """What the reference log-probs of an example depend on (not its SFT sample)."""
    return {k: v for k, v in dataclasses.asdict(ex).items() if k not in ("sft", "ref")}


def _to_device(inputs: dict, device, dtype) -> dict:
    """Tensors to ``device``; floating pixel values to the model's dtype."""
    out = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    for key in ("pixel_values",):
        if key in out and out[key].is_floating_point():
            out[key] = out[key].to(dtype)
    return out


def _select_repeats(inputs: dict, k: int, keep: list[int]) -> dict:
    """Keep repeats ``keep`` of each prompt's K copies (plain path; batch-dim tensors only)."""
    out = {}
    n = inputs["input_ids"].shape[0]
    rows = [b * k + j for b in range(n // k) for j in keep]
    for key, v in inputs.items():
        if hasattr(v, "shape") and v.shape[:1] == (n,):
            out[key] = v[rows]
        elif key == "pixel_values":
            per = v.shape[0] // n
            idx = [r * per + t for r in rows for t in range(per)]
            out[key] = v[idx]
        else:
            out[key] = v
    return out


def _rows(t, k: int, j: int):
    return t[j::k]


def _pad_id(processor) -> int:
    tok = getattr(processor, "tokenizer", processor)
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def _stack_ref(examples: list[Example], masks: list, device):
    import torch

    out = []
    for j, m in enumerate(masks):
        t = torch.zeros(m.shape, dtype=torch.float32, device=device)
        for i, ex in enumerate(examples):
            r = ex.ref[j]
            t[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        out.append(t)
    return out


def compute_loss(spec: MethodSpec, method_opts, beta: float, label_smoothing: float, policy: dict, ref: list):
    """The method's loss and the TRL-style metrics (floats) of one batch."""
    from hallu.train import losses

    lp, mk = policy["logps"], policy["masks"]
    seq = [losses.masked_sum(lp[j], mk[j]) for j in range(len(lp))]
    ref_seq = [losses.masked_sum(ref[j], mk[j]) for j in range(len(lp))]
    metrics: dict[str, Any] = {}
    if spec.loss == "opa":
        delta = [lp[j] - ref[j] for j in range(len(lp))]
        w = method_opts
        x = losses.OpaInputs(gt=delta[0], gt_mask=mk[0], original=delta[1], original_mask=mk[1],
                             revised=delta[2], revised_mask=mk[2],
                             gt_masked=delta[3] if len(delta) > 3 else None,
                             revised_masked=delta[4] if len(delta) > 4 else None,
                             score_w_original=policy.get("score_w_original"),
                             score_w_revised=policy.get("score_w_revised"),
                             img_w_revised=policy.get("img_w_revised"))
        loss, terms, p1 = losses.opa_dpo_loss(x, beta, w.image_coef, w.anchor_coef, w.anchor_delta,
                                              w.position_wise, w.window or None)
        term = p1
        for name, v in terms.items():
            metrics[f"loss/{name}"] = v.item()
        if w.sft_weight:  # on the SFT samples when there are any, else on the GT answers
            lm = (losses.lm_loss(policy["sft_logps"], policy["sft_mask"]) if "sft_logps" in policy
                  else losses.lm_loss(lp[0], mk[0]))
            metrics["loss/lm"] = lm.item()
            loss = loss + w.sft_weight * lm
    else:
        term = losses.sigmoid_dpo(seq[0], seq[1], ref_seq[0], ref_seq[1], beta, label_smoothing)
        loss = term.loss
        gamma = getattr(method_opts, "sft_weight", 0.0)
        if gamma:  # on the SFT samples when there are any, else on the chosen answers (§2.4)
            lm = (losses.lm_loss(policy["sft_logps"], policy["sft_mask"]) if "sft_logps" in policy
                  else losses.lm_loss(lp[0], mk[0]))
            metrics["loss/lm"] = lm.item()
            metrics["loss/dpo"] = term.loss.item()
            loss = loss + gamma * lm
    rc, rr = term.rewards_chosen, term.rewards_rejected
    metrics.update({
        "rewards/chosen": rc.mean().item(), "rewards/rejected": rr.mean().item(),
        "rewards/accuracies": (rc > rr).float().mean().item(), "rewards/margins": (rc - rr).mean().item(),
        "logps/chosen": seq[0].detach().mean().item(), "logps/rejected": seq[1].detach().mean().item(),
    })
    return loss, metrics


def _trainer_class():
    from transformers import Trainer

    class HalluDPOTrainer(Trainer):
        """A Trainer whose loss is the method's, over the shared-prompt forward."""

        def __init__(self, *a, spec, method_opts, reference: str, processor_obj, **kw):
            super().__init__(*a, **kw)
            self.spec, self.method_opts, self.reference = spec, method_opts, reference
            self.processor_obj = processor_obj
            self._metric_sums: dict[str, list[float]] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            batch = inputs["batch"]
            examples = batch.examples
            policy = batch.sequences(model, with_sft=True)
            device = policy["masks"][0].device
            if self.reference == "adapter-off":
                unwrapped = self.accelerator.unwrap_model(model)
                with torch.no_grad(), unwrapped.disable_adapter():
                    ref = [t.detach() for t in batch.sequences(model)["logps"]]
            else:
                ref = _stack_ref(examples, policy["masks"], device)
            if self.spec.loss == "opa":
                for key in ("score_w_original", "score_w_revised", "img_w_revised"):
                    j = 1 if key.endswith("original") else 2
                    m = policy["masks"][j]
                    t = torch.zeros(m.shape, dtype=m.dtype, device=device)
                    for i, ex in enumerate(examples):
                        w = ex.weights[key]
                        t[i, : len(w)] = torch.tensor(w, dtype=m.dtype)
                    policy[key] = t
            loss, metrics = compute_loss(self.spec, self.method_opts, self.args.beta,
                                         self.args.label_smoothing, policy, ref)
            for k, v in metrics.items():
                self._metric_sums.setdefault(k, []).append(v)
            return (loss, {}) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self._metric_sums:  # a training log: the averages since the last one, as TRL does
                import torch

                keys = sorted(self._metric_sums)  # every rank logs the same terms, in this order
                means = torch.tensor([sum(self._metric_sums[k]) / len(self._metric_sums[k]) for k in keys],
                                     dtype=torch.float64, device=self.accelerator.device)
                if self.accelerator.num_processes > 1:  # every rank calls log at the same step
                    means = self.accelerator.reduce(means, reduction="mean")
                logs.update({k: float(v) for k, v in zip(keys, means.tolist(), strict=True)})
                self._metric_sums = {}
            return super().log(logs, *args, **kwargs)

    return HalluDPOTrainer


class _ListDataset:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _OnlineVariants:
    """HA-DPO's ``online`` policy: one item per pair, its chosen and rejected variants drawn afresh each epoch.

    Every variant was scored by the reference pass (as a view); an item takes the drawn chosen from its
    view and the drawn rejected from its view, answers and reference log-probs alike.
    """

    def __init__(self, examples: list[Example], seed: int):
        self.seed, self.epoch = seed, 0
        self.groups: dict[str, list[Example]] = {}
        for ex in examples:
            self.groups.setdefault(ex.variant_of or ex.id, []).append(ex)
        self.ids = list(self.groups)

    def set_epoch(self, epoch: int) -> None:  # the Trainer's data loader calls this at each epoch's start
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        from hallu.methods.ha_dpo import online_draw

        gid = self.ids[i]
        views = self.groups[gid]
        n_c, n_r = views[0].n_variants or (1, 1)
        ci, ri = online_draw(gid, n_c, n_r, self.seed, self.epoch)
        c, r = views[ci], views[ri]
        ref = None if c.ref is None else [c.ref[0], r.ref[1]]
        return dataclasses.replace(c, id=f"{gid}~c{ci}r{ri}", answers=[c.answers[0], r.answers[1]], ref=ref)


class _Collator:
    """Examples -> {"batch": _Batch}: the processor runs here, in the data loader, not in the training step."""

    def __init__(self, processor, share: bool, spec: MethodSpec, method_opts):
        self.processor, self.share, self.spec, self.opts = processor, share, spec, method_opts

    def __call__(self, items):
        return {"batch": _Batch(list(items), self.processor, self.share, self.spec, self.opts)}


# --------------------------------------------------------------------------------------------------
# Reference log-probs


def load_reference_cache(cache: Path, key: str, examples: list[Example]) -> bool:
    """Fill ``ex.ref`` from a stored reference pass made for this model, data and method; False if there is none."""
    from hallu.fileio import iter_jsonl

    if not cache.exists():
        return False
    rows = {}
    try:
        for _, obj in iter_jsonl(cache):
            rows[obj["id"]] = obj
    except HalluError:
        return False
    if rows.get("__key__", {}).get("key") != key or not all(ex.id in rows for ex in examples):
        return False
    for ex in examples:
        ex.ref = rows[ex.id]["ref"]
    return True


def reference_logps(model, processor, examples: list[Example], spec, method_opts, cache: Path, key: str,
                    batch_size: int, share: bool | None = None) -> None:
    """Fill ``ex.ref`` from the frozen model, once per data set; stored in ``cache`` (keyed) for reruns.

    Under ZeRO-3 every rank runs every batch (the partitioned weights are gathered layer by layer, a
    collective each rank must join); rank 0 writes the file.
    """
    import torch

    from hallu.fileio import atomic_write_jsonl
    from hallu.train.pair_forward import can_share_prompt

    if load_reference_cache(cache, key, examples):
        return
    share = can_share_prompt(model) if share is None else share
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                seqs = _Batch(chunk, processor, share, spec, method_opts, with_sft=False).sequences(model)
                for i, ex in enumerate(chunk):
                    ex.ref = [seqs["logps"][j][i][: int(seqs["masks"][j][i].sum())].tolist()
                              for j in range(len(seqs["logps"]))]
    finally:
        model.train(was_training)
    from hallu.train.common import is_rank_zero

    if is_rank_zero():
        atomic_write_jsonl(cache, [{"id": "__key__", "key": key}] + [{"id": ex.id, "ref": ex.ref} for ex in examples])


# --------------------------------------------------------------------------------------------------
# The stage


def run_dpo(run, model: Path, pairs_path: Path | None, out_dir: Path | None, opts: DpoOptions,
            warn=lambda msg: None, callbacks=()) -> dict:
    """Train; returns a summary (final folder, steps, world facts). A rerun resumes from the last checkpoint.

    ``callbacks``: extra transformers ``TrainerCallback``s (benchmarks time the steps with one).
    """
    from hallu.train import common

    spec = get_method(opts.method)
    overrides, method_opts, reference = resolve(spec, opts)
    pairs_path = Path(pairs_path) if pairs_path is not None else default_pairs(run)
    out_dir = Path(out_dir) if out_dir is not None else run.dir / "dpo"
    pairs = load_pairs(pairs_path, spec, method_opts)
    if spec.recommended_start == "sft" and _stage_state(run, "sft") != "done":
        warn(f"{spec.name} is meant to start from the OPA model (`hallu sft --method {spec.name}`), and this run "
             "has no finished sft stage; training from --model as given")

    from trl import DPOConfig

    args_kwargs = dict(
        output_dir=str(common.checkpoints_dir(out_dir)), per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, save_strategy="steps", save_steps=opts.save_steps,
        logging_steps=opts.logging_steps, seed=opts.seed, data_seed=opts.seed, report_to=opts.report_to,
        remove_unused_columns=False, disable_tqdm=True,
        dataloader_num_workers=0, **common.trainer_precision_kwargs(),
    )
    # the shared-prompt forward needs the KV cache, which activation checkpointing turns off (TRL defaults it on)
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args_kwargs[checkpointing] = False
    if opts.max_steps is not None:
        args_kwargs["max_steps"] = opts.max_steps
    args_kwargs.update(common.distributed_args_kwargs())
    args_kwargs.update(overrides)
    try:
        args = DPOConfig(**args_kwargs)
    except (ValueError, TypeError) as e:
        raise HalluError(f"--set: DPOConfig refused the settings ({' '.join(str(e).split())[:200]})") from None

    model_obj, processor = common.load_for_training(model, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code,
                                                    chat_template=opts.chat_template)
    examples = build_examples(pairs, pairs_path.parent, processor, spec, method_opts, args.max_length)
    sft_path = None
    if getattr(method_opts, "sft_weight", 0.0):
        sft_path = sft_source(run, opts)
        if sft_path is None:
            warn(f"{spec.name}: no SFT data for the LM term (pass --sft-data FILE, or run `hallu prepare`); "
                 "it trains on the chosen answers instead")
        elif opts.sft_data is not None:
            attach_sft(examples, sft_path, processor, args.max_length, opts.seed)
        else:  # the run's prepared prompts: usable only if they carry reference answers
            try:
                attach_sft(examples, sft_path, processor, args.max_length, opts.seed)
            except HalluError as e:
                warn(f"{spec.name}: the run's prepared prompts cannot feed the LM term ({e}); it trains on the "
                     "chosen answers instead (pass --sft-data FILE)")
                sft_path = None
                for ex in examples:
                    ex.sft = None
    elif opts.sft_data is not None:
        warn(f"--sft-data {opts.sft_data} is unused: {spec.name}.sft_weight is 0 (set it with "
             f"--set {spec.name}.sft_weight=0.5)")

    manifest_opts = {k: v for k, v in dataclasses.asdict(opts).items() if k != "trust_remote_code"}
    manifest_opts.update(model=str(Path(model).resolve()), pairs=str(pairs_path.resolve()), out=str(out_dir.resolve()),
                         reference=reference, method_options=dataclasses.asdict(method_opts), config=overrides,
                         sft_data=str(sft_path.resolve()) if sft_path else None)
    final = common.final_dir(out_dir, opts.lora)
    log_path = out_dir / "log_history.jsonl"
    inputs = {"pairs": pairs_path, "model": model, **({"sft_data": sft_path} if sft_path else {})}
    with common.training_stage(run, "dpo", manifest_opts, inputs, out_dir) as ts:
        ref_job = None
        if reference == "precomputed":
            from hallu.fileio import digest_json
            from hallu.manifest import dir_fingerprint

            key = digest_json({"model": dir_fingerprint(Path(model)),
                               "examples": [_ref_identity(e) for e in examples],
                               "method": dataclasses.asdict(method_opts)})
            out_dir.mkdir(parents=True, exist_ok=True)
            ref_job = (out_dir / "reference_logps.jsonl", key)
            if not _zero3():
                reference_logps(model_obj, processor, examples, spec, method_opts, *ref_job, opts.batch_size)
                ref_job = None
        from hallu.train.pair_forward import can_share_prompt

        pf_share = can_share_prompt(model_obj)
        if opts.lora:
            from peft import get_peft_model

            lc = spec.lora
            model_obj = get_peft_model(model_obj, common.lora_config(lc.r, lc.alpha, lc.dropout, lc.target,
                                                                     lc.include_vision))
        elif not spec.train_vision:
            freeze_vision(model_obj)
        online = spec.name == "ha-dpo" and method_opts.pair_policy == "online"
        dataset = _OnlineVariants(examples, method_opts.seed) if online else _ListDataset(examples)
        trainer = _trainer_class()(
            model=model_obj, args=args, train_dataset=dataset,
            data_collator=_Collator(processor, pf_share, spec, method_opts),
            callbacks=[common.LogHistoryCallback(log_path), *callbacks], spec=spec, method_opts=method_opts,
            reference=reference, processor_obj=processor,
        )
        from hallu.train.sft import _manifest_progress, _save_final, _use_rich_progress

        if reference == "precomputed" and ref_job is not None:
            trainer.add_callback(_deferred_reference(trainer, processor, examples, spec, method_opts, ref_job,
                                                     opts.batch_size, opts.lora, pf_share))
        trainer.add_callback(_manifest_progress(ts))
        _use_rich_progress(trainer)
        resume = ts.resume_checkpoint()
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        ts.extra.update(common.world_facts(trainer))
        ts.extra["steps"] = int(trainer.state.global_step)
        ts.extra["method"] = spec.name
        _save_final(trainer, processor, final)
        if common.is_rank_zero():
            ts.output("adapter" if opts.lora else "model", final)
            if log_path.exists():
                ts.output("log_history", log_path)
    return {"final": final, "pairs": len(dataset), **ts.extra}


def _zero3() -> bool:
    """ZeRO-3 is configured: from_pretrained has partitioned the weights, so a bare forward cannot run yet."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def _deferred_reference(trainer, processor, examples, spec, method_opts, job, batch_size: int, lora: bool,
                        share: bool):
    """The reference pass under ZeRO-3: at train begin, through the DeepSpeed engine (which gathers each
    layer's shards for its forward), before the first batch is drawn.

    LoRA: with the adapter disabled, which is the frozen start even in a resumed run. Full fine-tuning: a
    resumed run has trained weights by then, so it needs the stored pass of its first run.
    """
    import contextlib

    from transformers import TrainerCallback

    cache, key = job

    class DeferredReference(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if load_reference_cache(cache, key, examples):
                return
            if not lora and state.global_step > 0:
                raise HalluError(f"{cache}: missing or stale, and this resumed full fine-tuning run no longer "
                                 "holds its starting weights; delete the output folder's checkpoints to start over")
            wrapped = trainer.model_wrapped
            unwrapped = trainer.accelerator.unwrap_model(wrapped)
            ctx = unwrapped.disable_adapter() if lora else contextlib.nullcontext()
            with ctx:
                reference_logps(wrapped, processor, examples, spec, method_opts, cache, key, batch_size, share)

    return DeferredReference()


def freeze_vision(model) -> int:
    """requires_grad off for the vision tower and projector (methods that train the language model only)."""
    from hallu.train.common import VISION_MODULES, freeze_matching

    return freeze_matching(model, VISION_MODULES)


def _stage_state(run, name: str) -> str | None:
    rec = run.stage_record(name)
    return None if rec is None else rec.get("status")
