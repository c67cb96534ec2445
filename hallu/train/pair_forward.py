"""Log-probs of several completions of one prompt, with the prompt (and its images) encoded once.

A DPO pair is one prompt and two answers; OPA-DPO continues one prompt with three (GT, original,
revised). In a VLM the prompt is mostly image tokens, so the shared path runs the vision tower and the
prompt **once** per prompt and continues each completion from a copy of its KV cache, with gradients
flowing through the cache into the prompt (notes/prefix-sharing.md, form (c)):

    prefill    model(prompt ids, right padded, pixel values, use_cache)   -> logits at the last prompt token
    branch     cache rows repeated K times (``batch_repeat_interleave``, differentiable)
    continue   model(completion ids[:-1], mask = [prompt mask | completion mask], positions P_b + j)

Prompts are right padded so every real token keeps the position of the one-at-a-time sequence; the pads
left between a prompt and its completion are masked by the 2-D mask, which keeps the kernels that take
no arbitrary mask usable. Models whose positions are not 1-D (Qwen2-VL's M-RoPE) or whose image features
depend on the text (InstructBLIP's Q-Former) take the plain path: K full sequences per prompt, which is
what TRL does. Both paths return the same numbers (tests/test_pair_forward.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hallu.engine import PREFIX_SHARING_TYPES
from hallu.errors import HalluError
from hallu.records import assistant_message, user_messages


def can_share_prompt(model) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") in PREFIX_SHARING_TYPES


def render_prompt(processor, prompt: str, n_images: int) -> str:
    """The prompt as the processor's chat template renders it, ending with the assistant's turn marker."""
    return processor.apply_chat_template(user_messages(prompt, n_images), add_generation_prompt=True,
                                         tokenize=False)


def completion_ids(processor, prompt: str, n_images: int, completion: str, rendered_prompt: str | None = None
                   ) -> list[int]:
    """Token ids of an answer as the template continues the prompt (its end-of-turn text included).

    The full conversation is rendered and the rendered prompt cut off its front, so the separator and the
    end marker are the template's, not a guess; an end-of-sequence id closes the answer if the template's
    end marker is not one.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    text = completion_text(processor, prompt, n_images, completion, rendered_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_text(processor, prompt: str, n_images: int, completion: str, rendered_prompt: str | None = None
                    ) -> str:
    """The text of an answer as the template continues the prompt, ending with the end-of-sequence token.

    One definition for training (DPO's pair forward, SFT's completions), the engine's for scoring: what
    follows the rendered prompt in the rendered conversation, up to and including the first EOS (text the
    template adds after it, such as Qwen's newline, is never generated); the EOS is added if there is none.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    rendered_prompt = rendered_prompt if rendered_prompt is not None else render_prompt(processor, prompt, n_images)
    full = processor.apply_chat_template(user_messages(prompt, n_images) + [assistant_message(completion)],
                                         tokenize=False)
    if full.startswith(rendered_prompt):
        text = full[len(rendered_prompt):]
    else:  # templates that rewrite earlier turns once an answer follows: fall back to the bare answer
        text = " " + completion
    eos = tokenizer.eos_token
    if eos:
        at = text.find(eos)
        text = text[: at + len(eos)] if at >= 0 else text + eos
    return text


def encode_prompts(processor, texts: Sequence[str], images: Sequence[Sequence[Any]], repeat: int = 1,
                   device=None, dtype=None) -> dict:
    """Processor inputs for rendered prompts, right padded; each prompt (and its images) ``repeat`` times."""
    texts_r = [t for t in texts for _ in range(repeat)]
    flat_images = [im for ims in images for _ in range(repeat) for im in ims]
    tokenizer = getattr(processor, "tokenizer", processor)
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        kwargs = {"images": flat_images} if flat_images else {}
        enc = processor(text=texts_r, padding=True, return_tensors="pt", **kwargs)
    finally:
        tokenizer.padding_side = side
    out = dict(enc)
    if device is not None:
        out = {k: v.to(device) if hasattr(v, "to") else v for k, v in out.items()}
    if dtype is not None:
        for key in ("pixel_values",):
            if key in out and out[key].is_floating_point():
                out[key] = out[key].to(dtype)
    return out


@dataclass
class ContinuationLogps:
    """Per-token log-probs of the completions, row b*K + k for completion k of prompt b."""

    token_logps: Any  # [B*K, T] float, 0 on pads
    mask: Any  # [B*K, T] float
    prompt_lengths: Any  # [B] real prompt tokens

    def sequence_logps(self):
        return (self.token_logps * self.mask).sum(-1)


def _pad(rows: list[list[int]], value: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _gather(logits, targets):
    """log softmax(logits)[targets], computed in fp32 (bf16 sums drift)."""
    import torch

    return torch.gather(logits.float().log_softmax(-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def continuation_logps(model, prompt_inputs: dict, completions: Sequence[Sequence[Sequence[int]]],
                       pad_id: int, share_prompt: bool | None = None) -> ContinuationLogps:
    """Per-token log-probs of ``completions[b][k]`` after prompt b.

    ``prompt_inputs`` are ``encode_prompts(..., repeat=1)`` for the shared path and ``repeat=K`` for the
    plain one (``share_prompt`` None: decided by the model type). Every prompt has the same number K of
    completions; each completion is non-empty.
    """

    share = can_share_prompt(model) if share_prompt is None else share_prompt
    k = len(completions[0])
    if any(len(c) != k for c in completions):
        raise ValueError("every prompt needs the same number of completions")
    rows = [list(c) for cs in completions for c in cs]
    if any(not r for r in rows):
        raise ValueError("empty completion")
    device = prompt_inputs["input_ids"].device
    cont_ids, cont_mask = _pad(rows, pad_id)
    cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
    prompt_mask = prompt_inputs["attention_mask"]
    n_prompts = len(completions)
    if share:
        if prompt_mask.shape[0] != n_prompts:
            raise ValueError("the shared path takes each prompt once (encode_prompts(repeat=1))")
        return _shared(model, prompt_inputs, cont_ids, cont_mask, k)
    if prompt_mask.shape[0] != n_prompts * k:
        raise ValueError("the plain path takes each prompt K times (encode_prompts(repeat=K))")
    return _plain(model, prompt_inputs, cont_ids, cont_mask, pad_id)


def _shared(model, prompt_inputs: dict, cont_ids, cont_mask, k: int) -> ContinuationLogps:
    import torch

    prompt_mask = prompt_inputs["attention_mask"]
    lengths = prompt_mask.sum(-1)
    expected = torch.arange(prompt_mask.shape[1], device=lengths.device)[None] < lengths[:, None]
    if not torch.equal(prompt_mask.bool(), expected):
        raise ValueError("prompts must be right padded")
    # only the last real prompt token's logits are needed (they predict completion token 0): projecting the
    # whole prompt (hundreds of image tokens) onto the vocabulary would cost B x L x V for nothing
    out = model(**prompt_inputs, use_cache=True, logits_to_keep=(lengths - 1)[:, None])
    first = out.logits[:, 0]
    first_logps = _gather(first.repeat_interleave(k, 0), cont_ids[:, 0])
    if cont_ids.shape[1] == 1:
        token_logps = first_logps[:, None]
    else:
        cache = _cache_of(out)
        cache.batch_repeat_interleave(k)
        inp = cont_ids[:, :-1]
        steps = inp.shape[1]
        positions = lengths.repeat_interleave(k, 0)[:, None] + torch.arange(steps, device=inp.device)[None]
        mask = torch.cat([prompt_mask.repeat_interleave(k, 0), cont_mask[:, :-1].to(prompt_mask.dtype)], 1)
        logits = model(input_ids=inp, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{_cache_kwarg(model): cache}).logits
        token_logps = torch.cat([first_logps[:, None], _gather(logits, cont_ids[:, 1:])], 1)
    m = cont_mask.to(token_logps.dtype)
    return ContinuationLogps(token_logps * m, m, lengths)


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_kwarg(model) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40)."""
    import inspect

    inner = model
    for _ in range(4):  # DeepSpeed / DDP engines hold .module, peft models a base model
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif hasattr(inner, "module"):
            inner = inner.module
        else:
            break
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _plain(model, prompt_inputs: dict, cont_ids, cont_mask, pad_id: int) -> ContinuationLogps:
    """K full right-padded sequences per prompt: the reference path (and TRL's)."""
    import torch

    prompt_ids, prompt_mask = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]
    lengths = prompt_mask.sum(-1)
    cont_len = cont_mask.sum(-1)
    width = int((lengths + cont_len).max())
    n = prompt_ids.shape[0]
    ids = torch.full((n, width), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    mask = torch.zeros((n, width), dtype=prompt_mask.dtype, device=prompt_ids.device)
    for i in range(n):
        p, c = int(lengths[i]), int(cont_len[i])
        ids[i, :p] = prompt_ids[i, :p]
        ids[i, p : p + c] = cont_ids[i, :c]
        mask[i, : p + c] = 1
    inputs = dict(prompt_inputs, input_ids=ids, attention_mask=mask)
    if "mm_token_type_ids" in inputs or "token_type_ids" in inputs:
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in inputs:
                tt = torch.zeros_like(ids)
                tt[:, : inputs[key].shape[1]] = inputs[key][:, :width]
                inputs[key] = tt
    logits = model(**inputs).logits
    t = cont_ids.shape[1]
    pos = lengths[:, None] - 1 + torch.arange(t, device=ids.device)[None]  # logits predicting token j
    pos = pos.clamp(max=width - 1)
    picked = logits[torch.arange(n, device=ids.device)[:, None], pos]
    token_logps = _gather(picked, cont_ids)
    m = cont_mask.to(token_logps.dtype)
    return ContinuationLogps(token_logps * m, m, lengths)


def mask_pixels(pixel_values, ratio: float, generator=None):
    """OPA-DPO's corrupted image: ``ratio`` of the pixel positions (all channels) set to the tensor's mean.

    Works on any ``[..., C, H, W]`` layout (LLaVA's images, LLaVA-NeXT's tiles); one draw per image, so
    the policy and reference passes share it when they share the generator state.
    """
    import torch

    shape = pixel_values.shape
    keep = torch.rand((*shape[:-3], 1, *shape[-2:]), generator=generator) >= ratio
    keep = keep.to(pixel_values.device)
    return torch.where(keep, pixel_values, pixel_values.mean().to(pixel_values.dtype))


def check_fits(prompt_len: int, image_tokens: int, max_length: int | None, where: str) -> None:
    """A prompt cut by max_length would lose image tokens (or its question): refuse, and say how to fix it."""
    if max_length is not None and prompt_len >= max_length:
        raise HalluError(
            f"{where}: the prompt is {prompt_len} tokens ({image_tokens} of them image tokens) but max_length is "
            f"{max_length}, so truncation would cut image tokens; raise it, e.g. --set max_length={prompt_len + 256}"
        )
