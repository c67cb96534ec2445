"""Batched generation and choice scoring with shared-prefix reuse — the engine of rollout and eval.

Most of a VLM prompt is the image: 576 of ~600 tokens for LLaVA-1.5. POPE asks ~6-18 questions of each
image and a rollout samples one prompt ``n`` times, so the engine groups requests by image, encodes
each image and prefills the tokens the group has in common **once**, then continues every question
from a copy of that cache:

    row layout   [left pads | shared prefix of its group | middle pads | own suffix]
    prefill      prefixes only, all groups of the batch in one forward (left padded, pixel values)
    branch       the cache rows are repeated for each request of the group
    continue     stock ``generate()`` (or one forward for choice scoring) from that cache

The pads sit *between* prefix and suffix so the positions (attention-mask cumsum) of every real token
equal those of the one-at-a-time prompt and the cache needs no shifting; ``generate`` feeds only the
uncached columns, so no pixel values are passed a second time. Text is expanded with the processor's
own image replacement strings and checked once per engine against the processor's output; models
whose positions are not 1-D (Qwen2-VL's M-RoPE) or whose image features depend on the question
(InstructBLIP's Q-Former) use the plain batched path instead. ``notes/prefix-sharing.md`` in the
design notes records why this layout and no other.

Given completions (``score``: log-probs; ``attention``: per-image attention shares) ride the same prefill:
each completion is the row's target, kept whole in the suffix with the prompt token before it, and one
continuation forward yields every target's logits. The plain path re-lays the processor's rows as
``[prompt | target | right pads]``. The cache goes in as ``cache=`` (``past_key_values=`` is deprecated).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.records import assistant_message, conversation_messages, load_image, resolve_image, user_messages

# Model types whose text positions are plain 1-D and whose image features depend on the image alone.
PREFIX_SHARING_TYPES = frozenset({"llava", "llava_next"})


@dataclass
class GenRequest:
    """One prompt: images (paths or PIL images) and the user's text (``<image>`` tags optional)."""

    id: str
    images: Sequence[Any]
    text: str
    image_key: tuple | None = None  # requests with equal keys share an image prefix; default: the paths
    # Earlier turns of a multi-turn conversation ({"role": "user"|"assistant", "text"}); ``text`` is the last
    # user turn, the one answered. Images sit at the ``<image>`` tags of the user turns, else in the first.
    history: Sequence[dict] = ()

    def key(self) -> tuple:
        if self.image_key is not None:
            return self.image_key
        return tuple(str(i) if isinstance(i, (str, os.PathLike)) else id(i) for i in self.images)


@dataclass
class ScoreRequest(GenRequest):
    """A prompt and the answers to score against it (each rendered as the assistant turn)."""

    completions: Sequence[str] = ()


@dataclass
class Generation:
    id: str
    sample: int
    text: str
    tokens: int
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    logprobs: list[float] | None = None  # per kept token, from the raw logits (Decoding.logprobs)
    token_ids: list[int] | None = None  # the kept tokens themselves


@dataclass
class Choice:
    id: str
    scores: dict[str, float]  # first-token logit of each choice
    pred: str  # the choice with the highest logit


@dataclass
class Score:
    """Log-probabilities of one given completion: the tokens the model would emit after the prompt."""

    id: str
    completion: int  # index into the request's completions
    token_ids: list[int]
    logprobs: list[float]  # natural log, one per token

    @property
    def sum(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean(self) -> float:
        return self.sum / len(self.logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.mean)


@dataclass
class AttentionShares:
    """Where one completion's tokens look: head-averaged attention on each image's tokens, per chosen layer.

    ``image_shares[l][i]`` is the attention mass the completion's tokens put on image ``i``'s tokens at
    layer ``layers[l]`` (averaged over heads, then over the completion's tokens); ``text_shares[l]`` is
    the mass on every other real token (prompt text, the completion so far), so the two add up to 1.
    ``per_token[l][t][i]``, when asked for, is the same share for completion token ``t`` alone.
    """

    id: str
    completion: int
    layers: list[int]  # resolved decoder layer indices (0-based, never negative)
    image_tokens: list[int]  # how many tokens each image occupies
    image_shares: list[list[float]]
    text_shares: list[float]
    per_token: list[list[list[float]]] | None = None
    # ``image_maps[l][i][j]``, when asked for: the attention on image ``i``'s token ``j`` (heads, then the
    # completion's tokens averaged): MIA-DPO's 24x24 map for grid and pic-in-pic selection.
    image_maps: list[list[list[float]]] | None = None

    def ratios(self, layer: int | None = None) -> list[float]:
        """MIA-DPO's sequence ratio: each image's mean per-token attention over the sum of those means."""
        k = 0 if layer is None else self.layers.index(layer)
        means = [s / n for s, n in zip(self.image_shares[k], self.image_tokens, strict=True)]
        total = sum(means)
        return [m / total if total > 0 else 0.0 for m in means]


@dataclass
class Decoding:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    n: int = 1
    seed: int = 0
    logprobs: bool = False  # also return each generated token's log-prob (raw logits: before temperature/top-p)

    def generate_kwargs(self) -> dict:
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.logprobs:
            if self.num_beams > 1:  # per-step logits follow beams, not the returned sequences
                raise HalluError("token log-probs are not available with beam search (num_beams > 1)")
            kw.update(output_logits=True, return_dict_in_generate=True)
        if self.do_sample:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw


@dataclass
class _Row:
    request: GenRequest
    sample: int  # sample index (generate) or completion index (score)
    ids: list[int] = field(default_factory=list)  # prompt ids, then target
    target: list[int] = field(default_factory=list)  # given completion ids (score, attention), else empty


class Engine:
    """Generation and choice scoring over one loaded model.

    Args:
        model: a transformers image-text-to-text model (eval mode).
        processor: its processor (chat template, tokenizer with left padding).
        batch_size: sequences per forward pass.
        share_prefix: force the shared-prefix path on (True) or off (False); None decides by model type.
        fingerprint: the model folder's digest, recorded by callers with every output.
    """

    def __init__(self, model, processor, *, batch_size: int = 32, share_prefix: bool | None = None,
                 fingerprint: str = "", image_base: str | os.PathLike = ".", allow_outside_images: bool = False):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.batch_size = batch_size
        self.fingerprint = fingerprint
        self.image_base = Path(image_base)
        self.allow_outside_images = allow_outside_images  # see records.resolve_image
        model_type = getattr(model.config, "model_type", "")
        self.share_prefix = (model_type in PREFIX_SHARING_TYPES) if share_prefix is None else share_prefix
        self._verified = False
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id

    template = None  # the ChatTemplate that renders prompts (source + sha256), set by load()

    @classmethod
    def load(cls, model: str | os.PathLike, options=None, **kwargs) -> Engine:
        """An engine over ``hallu.models.load_model(model, options)``: a folder, Hub id or adapter.

        ``options`` is a :class:`~hallu.models.LoadOptions`; its field names (device, dtype, attn,
        trust_remote_code, chat_template) may also be passed one by one. Other ``kwargs`` go to the engine.
        """
        from dataclasses import fields

        from hallu.models import LoadOptions, load_model

        names = {f.name for f in fields(LoadOptions)}
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        lm = load_model(model, options, **overrides)
        engine = cls(lm.model, lm.processor, fingerprint=lm.fingerprint, **kwargs)
        engine.template = lm.template
        return engine

    # -- prompt rendering ------------------------------------------------------------------------------

    def render(self, request: GenRequest) -> str:
        return self.processor.apply_chat_template(self.messages(request), add_generation_prompt=True,
                                                  tokenize=False)

    @staticmethod
    def messages(request: GenRequest) -> list[dict]:
        """The conversation up to the turn to answer, as typed messages (images where they belong)."""
        if not request.history:
            return user_messages(request.text, len(request.images))
        return conversation_messages(request.history, request.text, len(request.images), f"request {request.id}")

    def _images(self, request: GenRequest) -> list:
        out = []
        for img in request.images:
            if isinstance(img, (str, os.PathLike)):
                where = f"request {request.id}"
                p = resolve_image(str(img), self.image_base, allow_outside=self.allow_outside_images, where=where)
                out.append(load_image(p, where=where))
            else:
                out.append(img)
        return out

    # -- public API ------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenRequest], decoding: Decoding | None = None,
                 progress: Callable[[int], None] | None = None) -> Iterator[list[Generation]]:
        """Yield the generations batch by batch (``n`` samples per request, in request order per batch).

        The seed is set once per call, so one call over the same requests is reproducible.
        """
        import torch

        decoding = decoding or Decoding()
        torch.manual_seed(decoding.seed)
        rows = [_Row(r, s) for r in requests for s in range(decoding.n)]
        use_prefix = self.share_prefix and decoding.num_beams == 1
        for batch in self._batches(rows, by_image=use_prefix):
            with torch.inference_mode():
                if use_prefix and self.share_prefix:  # share_prefix turns off if the first check fails
                    out = self._generate_shared(batch, decoding)
                else:
                    out = self._generate_plain(batch, decoding)
            if progress:
                progress(len(batch))  # rows: requests x samples
            yield out

    def choose(self, requests: Sequence[GenRequest], choices: Sequence[str] = ("Yes", "No"),
               progress: Callable[[int], None] | None = None) -> Iterator[list[Choice]]:
        """Score each choice's first answer token in one forward pass per batch."""
        import torch

        choice_ids = self.choice_token_ids(choices)
        rows = [_Row(r, 0) for r in requests]
        for batch in self._batches(rows, by_image=self.share_prefix):
            with torch.inference_mode():
                if self.share_prefix:
                    logits = self._last_logits_shared(batch)
                else:
                    logits = self._last_logits_plain(batch)
            out = []
            for row, lg in zip(batch, logits, strict=True):
                scores = {c: float(lg[i]) for c, i in zip(choices, choice_ids, strict=True)}
                out.append(Choice(row.request.id, scores, max(choices, key=lambda c: scores[c])))
            if progress:
                progress(len(batch))
            yield out

    def choice_token_ids(self, choices: Sequence[str]) -> list[int]:
        """The first token the model would emit for each answer, read off the chat template itself.

        Rendering ``[user, assistant: choice]`` and the bare generation prompt and taking the first token
        where they differ gives the right token whatever the template puts after the assistant tag
        (a space, a newline, nothing).
        """
        msgs = user_messages("Q", 0)
        base = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        base_ids = self.tokenizer(base, add_special_tokens=False)["input_ids"]
        ids = []
        for c in choices:
            full = self.processor.apply_chat_template(
                msgs + [{"role": "assistant", "content": [{"type": "text", "text": c}]}], tokenize=False
            )
            full_ids = self.tokenizer(full, add_special_tokens=False)["input_ids"]
            k = 0
            while k < min(len(base_ids), len(full_ids)) and base_ids[k] == full_ids[k]:
                k += 1
            if k >= len(full_ids):
                raise HalluError(f"choice {c!r}: the chat template renders no answer token for it")
            ids.append(full_ids[k])
        if len(set(ids)) != len(ids):
            raise HalluError(
                f"choices {list(choices)} start with the same token; choice scoring cannot tell them apart"
            )
        return ids

    def score(self, requests: Sequence[ScoreRequest], *, include_eos: bool = True,
              progress: Callable[[int], None] | None = None) -> Iterator[list[Score]]:
        """Yield the log-probs of every given completion, batch by batch (request order, then completion order).

        A completion is scored as the assistant turn of the chat template: the tokens the model would emit
        after the generation prompt, ending with the template's end-of-turn token when ``include_eos``. On
        the shared path each image group's prompt prefix is prefilled once and every completion continues
        from that cache in one forward.
        """
        import torch

        rows = self._target_rows(requests, include_eos)
        for batch in self._batches(rows, by_image=self.share_prefix):
            with torch.inference_mode():
                logits, layout, first = self._target_forward(batch, logits=True)
            out = []
            for row in batch:
                k, q_cols = layout[id(row)]
                lp = logits[k, q_cols - 1 - first].float().log_softmax(-1)
                target = torch.tensor(row.target, device=lp.device)
                picked = lp.gather(-1, target[:, None])[:, 0]
                out.append(Score(row.request.id, row.sample, list(row.target), picked.tolist()))
            if progress:
                progress(len(batch))
            yield out

    def attention(self, requests: Sequence[ScoreRequest], layers: Sequence[int] = (16,), *,
                  include_eos: bool = False, per_token: bool = False, maps: bool = False,
                  progress: Callable[[int], None] | None = None) -> Iterator[list[AttentionShares]]:
        """Yield, per completion, the share of attention its tokens put on each image (MIA-DPO's statistic).

        The rows are the completion's tokens (without the end-of-turn token by default): for a greedy
        answer that ended with EOS these are exactly the tokens fed at decoding steps 1..L-1, MIA-DPO's
        rows. Attention weights exist only in eager attention, so the model's attention implementation
        is switched to ``eager`` for the call and restored after it. Each chosen layer's weights are reduced
        to per-image sums inside a forward hook, so no full attention map outlives its layer.
        """
        import torch

        decoder_layers = self._decoder_layers()
        resolved = []
        for layer in layers:
            k = layer + len(decoder_layers) if layer < 0 else layer
            if not 0 <= k < len(decoder_layers):
                raise HalluError(f"attention layer {layer}: the model has {len(decoder_layers)} decoder layers")
            resolved.append(k)
        rows = self._target_rows(requests, include_eos)
        image_id = self._image_token_id()
        with _eager_attention(self.model):
            for batch in self._batches(rows, by_image=self.share_prefix):
                capture = _AttentionCapture([decoder_layers[k].self_attn for k in resolved], image_id, per_token,
                                            maps=maps)
                with torch.inference_mode():
                    self._target_forward(batch, capture=capture)
                out = []
                for row in batch:
                    shares, text, tokens = capture.result(row)
                    out.append(AttentionShares(
                        row.request.id, row.sample, list(resolved), capture.image_tokens[id(row)],
                        [s.mean(0).tolist() for s in shares], [float(t.mean()) for t in text],
                        [s.tolist() for s in shares] if per_token else None,
                        capture.maps(row) if maps else None))
                if progress:
                    progress(len(batch))
                yield out

    def completion_ids(self, request: GenRequest, completion: str, *, include_eos: bool = True,
                       where: str = "") -> list[int]:
        """The token ids of ``completion`` as the chat template's assistant turn after ``request``'s prompt.

        Tokenizing the prompt alone and the prompt with its answer must agree on the prompt's tokens;
        the tokens after them, up to the first end-of-sequence token (kept when ``include_eos``), are
        what the model would emit. Text the template adds after that token is never generated.
        """
        where = where or f"request {request.id}"
        msgs = self.messages(request)
        base = self.render(request)
        full = self.processor.apply_chat_template(msgs + [assistant_message(completion)], tokenize=False)
        base_ids = self.tokenizer(base, add_special_tokens=False)["input_ids"]
        full_ids = self.tokenizer(full, add_special_tokens=False)["input_ids"]
        if not full.startswith(base) or full_ids[: len(base_ids)] != base_ids:
            raise HalluError(f"{where}: the chat template renders the answer so that the prompt's tokens change; "
                             "it cannot be scored as a continuation of the prompt")
        tail = full_ids[len(base_ids) :]
        eos = self._eos_ids()
        end = next((i for i, t in enumerate(tail) if t in eos), None)
        if end is None:
            if include_eos:
                raise HalluError(f"{where}: the chat template ends the answer with no end-of-sequence token "
                                 f"(ids {sorted(eos)}); score it with include_eos=False")
            ids = tail
        else:
            ids = tail[: end + 1] if include_eos else tail[:end]
        if not ids:
            raise HalluError(f"{where}: the answer {completion!r} renders no tokens to score")
        return ids

    # -- batching ----------------------------------------------------------------------------------------

    def _batches(self, rows: list[_Row], by_image: bool) -> Iterator[list[_Row]]:
        """Fixed-size batches; with prefix sharing, rows of one image are kept together when they fit."""
        if not by_image:
            for i in range(0, len(rows), self.batch_size):
                yield rows[i : i + self.batch_size]
            return
        groups: dict[tuple, list[_Row]] = {}
        for row in rows:
            groups.setdefault(row.request.key(), []).append(row)
        batch: list[_Row] = []
        for group in groups.values():
            for i in range(0, len(group), self.batch_size):
                chunk = group[i : i + self.batch_size]
                if batch and len(batch) + len(chunk) > self.batch_size:
                    yield batch
                    batch = []
                batch.extend(chunk)
        if batch:
            yield batch

    # -- the plain path: the processor on every row, one generate per batch ------------------------------

    def _encode_plain(self, batch: list[_Row]):
        texts = [self.render(r.request) for r in batch]
        images = [img for r in batch for img in self._images(r.request)]
        enc = self.processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        return enc.to(self.model.device)

    def _generate_plain(self, batch: list[_Row], decoding: Decoding) -> list[Generation]:
        enc = self._encode_plain(batch)
        kw = decoding.generate_kwargs()
        out = self.model.generate(**enc, **kw, pad_token_id=self.pad_id)
        seqs, steps = (out.sequences, out.logits) if decoding.logprobs else (out, None)
        new = seqs[:, enc["input_ids"].shape[1] :]
        return self._decode(batch, new, steps)

    def _last_logits_plain(self, batch: list[_Row]):
        enc = self._encode_plain(batch)
        return self.model(**enc, logits_to_keep=1).logits[:, -1, :].float()

    # -- the shared-prefix path -----------------------------------------------------------------------------

    def _encode_shared(self, batch: list[_Row]):
        """Token ids of every row, plus the image inputs of one row per group (the group's first)."""
        groups: dict[tuple, list[_Row]] = {}
        for row in batch:
            groups.setdefault(row.request.key(), []).append(row)
        rendered: dict[int, str] = {}  # n samples of a request share one rendering
        for row in batch:
            if id(row.request) not in rendered:
                rendered[id(row.request)] = self.render(row.request)
        firsts = [g[0] for g in groups.values()]
        images = [img for r in firsts for img in self._images(r.request)]
        enc = self.processor(images=images or None, text=[rendered[id(r.request)] for r in firsts], padding=True,
                             return_tensors="pt", return_text_replacement_offsets=True)
        offsets = enc.pop("text_replacement_offsets", None)
        if offsets is None and images:
            raise _FallBack("processor gives no image replacement strings")
        image_inputs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "token_type_ids",
                                                                  "mm_token_type_ids")}
        image_token = getattr(self.processor, "image_token", None)
        image_token_id = self.tokenizer.convert_tokens_to_ids(image_token) if image_token else None
        # Tokenize the short, unexpanded prompts once each and splice in each image's replacement ids
        # (tokenized once per image): tokenizing 256 image tokens per question costs more than the
        # rest of the encoding. The check below proves the result equals the processor's own ids.
        unique = list(dict.fromkeys(rendered.values()))
        unexpanded = dict(zip(unique, self.tokenizer(unique)["input_ids"], strict=True))
        for group, offs in zip(groups.values(), offsets or [[]] * len(firsts), strict=True):
            replacements = [o["replacement"] for o in offs if o["type"] == "image"]
            runs = self.tokenizer(replacements, add_special_tokens=False)["input_ids"] if replacements else []
            for r in group:
                r.ids = _splice(unexpanded[rendered[id(r.request)]], image_token_id, runs) + r.target
        if not self._verified:
            # Our expansion must equal the processor's own encoding, token for token; checked once.
            am = enc["attention_mask"]
            for k, r in enumerate(firsts):
                real = enc["input_ids"][k][am[k].bool()].tolist()
                if real != r.ids[: len(r.ids) - len(r.target)]:
                    raise _FallBack("the processor's token ids differ from the expanded text's")
            self._verified = True
        return list(groups.values()), image_inputs

    def _prefill(self, batch: list[_Row]):
        """Prefill each group's shared prefix; return the cache expanded to rows and the row layouts."""
        import torch

        groups, image_inputs = self._encode_shared(batch)
        image_id = getattr(self.model.config, "image_token_id", None)
        if image_id is None:
            image_id = getattr(self.model.config, "image_token_index", None)
        prefix_lens = []
        for group in groups:
            seqs = [r.ids for r in group]
            p = _common_prefix_len(seqs)
            # Every row keeps >= 1 prompt token to feed generate; a scored target stays whole in the suffix,
            # with the prompt token whose logits predict its first token.
            p = min(p, min(len(r.ids) - len(r.target) for r in group) - 1)
            last_image = max((i for i, t in enumerate(seqs[0]) if t == image_id), default=-1)
            if last_image >= p:
                raise _FallBack("a group's common prefix ends inside its image tokens")
            prefix_lens.append(p)
        dev = self.model.device
        pmax = max(prefix_lens)
        g_ids = torch.full((len(groups), pmax), self.pad_id, dtype=torch.long)
        g_mask = torch.zeros((len(groups), pmax), dtype=torch.long)
        for g, (group, p) in enumerate(zip(groups, prefix_lens, strict=True)):
            g_ids[g, pmax - p :] = torch.tensor(group[0].ids[:p])
            g_mask[g, pmax - p :] = 1
        g_pos = (g_mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {k: (v.to(dev) if hasattr(v, "to") else v) for k, v in image_inputs.items()}
        # Only the cache is wanted from the prefix: logits_to_keep=1 skips the LM head on every other position.
        out = self.model(input_ids=g_ids.to(dev), attention_mask=g_mask.to(dev), position_ids=g_pos.to(dev),
                         use_cache=True, logits_to_keep=1, **inputs)
        cache = out.cache
        # Rows in batch order, each pointing at its group's cache row.
        rows, owner = [], []
        for g, group in enumerate(groups):
            rows.extend(group)
            owner.extend([g] * len(group))
        smax = max(len(r.ids) - prefix_lens[g] for r, g in zip(rows, owner, strict=True))
        ids = torch.full((len(rows), pmax + smax), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, (r, g) in enumerate(zip(rows, owner, strict=True)):
            p = prefix_lens[g]
            suffix = r.ids[p:]
            ids[k, pmax - p : pmax] = g_ids[g, pmax - p :]
            mask[k, pmax - p : pmax] = 1
            ids[k, pmax + smax - len(suffix) :] = torch.tensor(suffix)
            mask[k, pmax + smax - len(suffix) :] = 1
        return rows, cache, owner, ids.to(dev), mask.to(dev), pmax

    def _generate_shared(self, batch: list[_Row], decoding: Decoding) -> list[Generation]:
        try:
            rows, cache, owner, ids, mask, _ = self._prefill(batch)
        except _FallBack:
            self.share_prefix = False
            return self._generate_plain(batch, decoding)
        cache = _branch_cache(self.model.config, cache, owner, ids.shape[1] + decoding.max_new_tokens)
        out = self.model.generate(input_ids=ids, attention_mask=mask, cache=cache,
                                  **decoding.generate_kwargs(), pad_token_id=self.pad_id)
        seqs, steps = (out.sequences, out.logits) if decoding.logprobs else (out, None)
        gens = self._decode(rows, seqs[:, ids.shape[1] :], steps)
        order = {id(r): k for k, r in enumerate(rows)}
        return [gens[order[id(r)]] for r in batch]

    def _last_logits_shared(self, batch: list[_Row]):
        import torch

        try:
            rows, cache, owner, ids, mask, pmax = self._prefill(batch)
        except _FallBack:
            self.share_prefix = False
            return self._last_logits_plain(batch)
        cache.batch_select_indices(torch.tensor(owner, device=ids.device))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids[:, pmax:], attention_mask=mask, position_ids=pos[:, pmax:],
                         cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        order = {id(r): k for k, r in enumerate(rows)}
        return torch.stack([logits[order[id(r)]] for r in batch])

    # -- given completions: one forward over prompt + target (score, attention) ------------------------------

    def _target_rows(self, requests: Sequence[ScoreRequest], include_eos: bool) -> list[_Row]:
        rows = []
        for r in requests:
            if not r.completions:
                raise HalluError(f"request {r.id}: no completions to score")
            for k, text in enumerate(r.completions):
                target = self.completion_ids(r, text, include_eos=include_eos, where=f"request {r.id} completion {k}")
                rows.append(_Row(r, k, target=target))
        return rows

    def _target_forward(self, batch: list[_Row], *, logits: bool = False, capture: _AttentionCapture | None = None):
        """One forward over every row's prompt and target, shared prefix where possible.

        Returns ``(logits, layout, first)``: per row (by ``id``), ``layout`` holds its batch index and the
        input columns of its target tokens; the logits predicting target token j sit one column earlier
        (prompt and target are contiguous in every layout used here), and ``logits`` covers the input
        columns from ``first`` on. Without ``logits`` the LM head runs on one column only.
        """
        if self.share_prefix:
            try:
                return self._target_forward_shared(batch, logits, capture)
            except _FallBack:
                self.share_prefix = False
        return self._target_forward_plain(batch, logits, capture)

    def _target_forward_shared(self, batch: list[_Row], logits: bool, capture: _AttentionCapture | None):
        import torch

        rows, cache, owner, ids, mask, pmax = self._prefill(batch)
        cache.batch_select_indices(torch.tensor(owner, device=ids.device))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        layout = _target_layout(rows, mask, pmax)
        # Suffixes are right-aligned, so every target and the column before it lie in the last
        # (longest target + 1) columns: the LM head runs on those alone.
        keep = max(len(r.target) for r in rows) + 1 if logits else 1
        with capture.hooks(rows, mask, pmax) if capture else _nothing():
            out = self.model(input_ids=ids[:, pmax:], attention_mask=mask, position_ids=pos[:, pmax:],
                             cache=cache, use_cache=True, logits_to_keep=keep)
        return out.logits, layout, ids.shape[1] - pmax - out.logits.shape[1]

    def _target_forward_plain(self, batch: list[_Row], logits: bool, capture: _AttentionCapture | None):
        """The processor on every prompt, then each row re-laid as [prompt | target | right pads].

        Right padding keeps every real token at its unpadded position whatever the model's position scheme
        (arange, mask cumsum, M-RoPE), and causal attention keeps the trailing pads out of every real token.
        """
        import torch

        enc = self._encode_plain(batch)
        am = enc["attention_mask"].bool()
        prompts = [enc["input_ids"][k][am[k]].tolist() for k in range(len(batch))]
        for r, p in zip(batch, prompts, strict=True):
            r.ids = p + r.target
        width = max(len(r.ids) for r in batch)
        per_token = {"input_ids": self.pad_id, "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0}
        for key, fill in per_token.items():
            if key not in enc:
                continue
            old = enc[key]
            new = torch.full((len(batch), width), fill, dtype=old.dtype, device=old.device)
            for k, r in enumerate(batch):
                n = len(prompts[k])
                new[k, :n] = old[k][am[k]]
                if key == "input_ids":
                    new[k, n : len(r.ids)] = torch.tensor(r.target, dtype=old.dtype)
                elif key == "attention_mask":
                    new[k, n : len(r.ids)] = 1
            enc[key] = new
        mask = enc["attention_mask"]
        layout = _target_layout(batch, mask, 0)
        with capture.hooks(batch, mask, 0) if capture else _nothing():
            out = self.model(**enc, use_cache=False, logits_to_keep=0 if logits else 1)
        return out.logits, layout, width - out.logits.shape[1]

    def _decoder_layers(self):
        decoder = self.model.get_decoder()
        layers = getattr(decoder, "layers", None)
        if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
            raise HalluError(f"attention capture: cannot find the decoder layers of model type "
                             f"{self.model.config.model_type!r}")
        return layers

    def _image_token_id(self) -> int | None:
        image_id = getattr(self.model.config, "image_token_id", None)
        if image_id is None:
            image_id = getattr(self.model.config, "image_token_index", None)
        return image_id

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    # -- decoding ------------------------------------------------------------------------------------------

    def _decode(self, rows: list[_Row], new_tokens, step_logits=None) -> list[Generation]:
        """Text of each row's new tokens (up to EOS, pads dropped); with ``step_logits`` (one (rows x vocab)
        tensor per step) also the log-prob of every kept token."""
        import torch

        eos_ids = self._eos_ids()
        picked = None
        if step_logits:
            steps = torch.stack([s.float() for s in step_logits], 1).log_softmax(-1)  # (rows, steps, vocab)
            picked = steps.gather(-1, new_tokens[:, : steps.shape[1], None].to(steps.device))[..., 0].tolist()
        out = []
        for k_row, (row, toks) in enumerate(zip(rows, new_tokens.tolist(), strict=True)):
            n = len(toks)
            finished = False
            for k, t in enumerate(toks):
                if t in eos_ids:
                    n, finished = k, True
                    break
            keep = [k for k in range(n) if toks[k] != self.pad_id]
            kept = [toks[k] for k in keep]
            text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
            lps = [picked[k_row][k] for k in keep] if picked is not None else None
            out.append(Generation(row.request.id, row.sample, text, len(kept), finished, lps, kept))
        return out


class _FallBack(Exception):
    """The shared-prefix path does not apply to this model/processor; use the plain path."""


def _splice(ids: list[int], image_token_id: int | None, runs: list[list[int]]) -> list[int]:
    """Replace the k-th image token of ``ids`` by the k-th run of expanded image ids."""
    if not runs:
        return list(ids)
    at = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(at) != len(runs):
        raise _FallBack("image tag count differs between prompts of one image group")
    out: list[int] = []
    last = 0
    for pos, run in zip(at, runs, strict=True):
        out += ids[last:pos]
        out += run
        last = pos + 1
    return out + ids[last:]


def _common_prefix_len(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def _branch_cache(config, cache, owner, max_len: int):
    """Copy each group's prefix cache row to every row of the group, in a preallocated static cache.

    A dynamic cache would re-concatenate the whole (rows x prefix) tensor at every decoding step;
    writing into preallocated tensors in place removes that copy, which is most of a decode step on CPU.
    Falls back to the dynamic cache when the model has layers a plain static layer does not describe.
    """
    import torch
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    static = StaticCache(config=config, max_cache_len=max_len)
    if len(static.layers) != len(cache.layers) or any(type(layer) is not StaticLayer for layer in static.layers):
        cache.batch_select_indices(torch.tensor(owner, device=cache.layers[0].keys.device))
        return cache
    # Rows of a group are contiguous (the batch is laid out group by group): copy each group's prefix
    # row into its block of rows with one broadcast copy, no gathered temporary.
    spans = []
    bounds = [0] + [i for i in range(1, len(owner)) if owner[i] != owner[i - 1]] + [len(owner)]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        spans.append((owner[start], start, end))
    for dyn, st in zip(cache.layers, static.layers, strict=True):
        n = dyn.keys.shape[2]
        # Allocate through the layer so its bookkeeping (dtype, device, heads) is its own; the unused
        # tail stays zero, which matters: masked slots are multiplied by 0, and 0 * NaN would leak.
        rows = len(owner)
        st.lazy_initialization(dyn.keys[:1].expand(rows, -1, -1, -1), dyn.values[:1].expand(rows, -1, -1, -1))
        for g, start, end in spans:
            st.keys[start:end, :, :n].copy_(dyn.keys[g : g + 1].expand(end - start, -1, -1, -1))
            st.values[start:end, :, :n].copy_(dyn.values[g : g + 1].expand(end - start, -1, -1, -1))
        st.cumulative_length.fill_(n)
    return static


def _image_runs(ids: list[int], image_token_id: int | None) -> list[tuple[int, int]]:
    """[start, end) of every run of consecutive image tokens: one run per image for LLaVA-style prompts."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate([*ids, None]):
        if t == image_token_id and t is not None:
            start = i if start is None else start
        elif start is not None:
            runs.append((start, i))
            start = None
    return runs


def _target_layout(rows: list[_Row], mask, q_offset: int) -> dict[int, tuple]:
    """Per row (by ``id``): its index in the batch and the input columns of its target tokens.

    The real columns of a row's mask hold its ids in order, whatever the padding layout, so the target's
    key columns are the last ``len(target)`` real ones; minus ``q_offset`` (the cached columns) they are
    the columns of the forward's input.
    """
    out = {}
    for k, r in enumerate(rows):
        real = mask[k].nonzero()[:, 0]
        if len(real) != len(r.ids):
            raise RuntimeError(f"row {r.request.id}: {len(real)} real columns for {len(r.ids)} ids")
        out[id(r)] = (k, real[len(r.ids) - len(r.target) :] - q_offset)
    return out


@contextmanager
def _nothing():
    yield


@contextmanager
def _eager_attention(model):
    """Run with eager attention (the only implementation that materialises weights), then restore.

    The previous implementation is restored per sub-config, so a model whose vision tower and decoder
    were loaded with different implementations gets both back.
    """
    config = model.config
    before = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            before[key] = sub._attn_implementation
    if all(v == "eager" for v in before.values()):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


class _AttentionCapture:
    """Forward hooks on chosen attention modules that reduce each layer's weights on the fly.

    Each hook keeps, per row, the head-averaged attention of the row's target tokens summed over each
    image's key columns and over the remaining real columns: (tokens x images) floats per layer instead
    of the (heads x queries x keys) map, which is dropped as soon as the layer returns.
    """

    def __init__(self, modules: list, image_token_id: int | None, per_token: bool, maps: bool = False):
        self.modules = modules
        self.image_token_id = image_token_id
        self.per_token = per_token
        self.keep_maps = maps
        self.image_tokens: dict[int, list[int]] = {}
        self._shares: dict[int, dict[int, tuple]] = {}
        self._maps: dict[int, dict[int, list]] = {}

    @contextmanager
    def hooks(self, rows: list[_Row], mask, q_offset: int):
        import torch

        plans = []
        for k, r in enumerate(rows):
            real = mask[k].nonzero()[:, 0]  # key column of every id of the row
            n_prompt = len(r.ids) - len(r.target)
            spans = _image_runs(r.ids[:n_prompt], self.image_token_id)
            if len(spans) != len(r.request.images):
                raise HalluError(f"request {r.request.id}: {len(spans)} runs of image tokens for "
                                 f"{len(r.request.images)} images; attention capture cannot tell the images apart")
            is_image = torch.zeros(len(r.ids), dtype=torch.bool)
            for a, b in spans:
                is_image[a:b] = True
            image_cols = [real[a:b] for a, b in spans]
            text_cols = real[~is_image.to(real.device)]
            plans.append((id(r), real[n_prompt:] - q_offset, image_cols, text_cols))
            self.image_tokens[id(r)] = [b - a for a, b in spans]
        handles = [m.register_forward_hook(self._hook(layer, plans)) for layer, m in enumerate(self.modules)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, layer: int, plans: list):
        import torch

        def reduce(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise HalluError("attention capture: the attention layers returned no weights; "
                                 "it needs eager attention")
            for k, (key, queries, image_cols, text_cols) in enumerate(plans):
                w = weights[k][:, queries].float().mean(0)  # (target tokens, keys), averaged over heads
                on_images = torch.stack([w[:, c].sum(-1) for c in image_cols], -1)
                self._shares.setdefault(key, {})[layer] = (on_images.cpu(), w[:, text_cols].sum(-1).cpu())
                if self.keep_maps:
                    self._maps.setdefault(key, {})[layer] = [w[:, c].mean(0).tolist() for c in image_cols]

        return reduce

    def maps(self, row: _Row) -> list[list[list[float]]]:
        """Per layer, per image: the attention on each of its tokens, averaged over the target tokens."""
        return [self._maps[id(row)][k] for k in range(len(self.modules))]

    def result(self, row: _Row):
        """Per layer: (target tokens x images) image shares, (target tokens) text shares."""
        got = self._shares[id(row)]
        layers = range(len(self.modules))
        return [got[k][0] for k in layers], [got[k][1] for k in layers], self.image_tokens[id(row)]
