"""The rollout stage: the policy's answers to every prompt, ``n`` samples each, resumable.

Output: ``RUN/rollout/responses.jsonl``, one :class:`~hallu.records.Response` per (prompt, sample), in
prompt order. Each batch of prompts is generated with its own seed, so a killed rollout resumes to
exactly the file an uninterrupted one writes.

Decoding is sampled (``n`` per prompt), greedy or beam search (``num_beams``; both one answer per
prompt). A multi-image prompt places its images at its ``<image>`` tags. A multi-turn prompt
(``meta["turns"]`` with several user turns) is answered at its last user turn, the earlier turns
given as the conversation so far (``meta["turn"]`` of the response: the index of the user turn
answered); ``turn="first"`` answers the first question instead, the turn a prompt's ``question`` and
``reference`` are (MIA-DPO builds its pairs from it). On request each response also carries:

- ``logprobs``: the log-prob of each generated token under the model (raw logits, before temperature
  and top-p), one per ``meta["tokens"]``;
- ``meta["attention"]`` (``capture_attention``, MIA-DPO §4.4): where the answer's tokens look at one
  decoder layer (the middle one unless ``attention_layer``): each image's share, MIA's sequence ratios,
  and for a single-image prompt the per-token map that grid and pic-in-pic selection split; plus
  ``meta["perplexity"]``, exp(-mean log-prob) of the answer's tokens and end-of-turn token, which for a
  greedy answer is MIA's greedy-confidence perplexity. Both are computed by
  :meth:`~hallu.engine.Engine.attention` / :meth:`~hallu.engine.Engine.score` over the same input the
  answer was generated from;
- with ``corrupted_images``, grid and pic-in-pic prompts are answered from their noisy copy
  (``meta["mia"]["corrupted_image"]``), as MIA-DPO induces its rejected answers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from hallu.errors import HalluError
from hallu.manifest import Run
from hallu.models import LoadOptions
from hallu.records import Prompt, Response, check_images, read_records


@dataclass
class RolloutOptions:
    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    batch_size: int = 8
    seed: int = 0
    limit: int | None = None
    allow_outside_images: bool = False
    load: LoadOptions = field(default_factory=LoadOptions)  # device, dtype, attn, remote code, chat template
    num_beams: int = 1
    logprobs: bool = False
    capture_attention: bool = False
    attention_layer: int | None = None  # None: the middle decoder layer (16 of LLaVA-7B's 32, MIA-DPO's)
    corrupted_images: bool = False
    turn: str = "last"  # which user turn of a multi-turn prompt to answer: last | first

    def recorded(self) -> dict:
        """The stage's options: sampling knobs and load options side by side in one flat dict (the keys
        runs have always recorded, plus chat_template when a file is given). The later knobs appear
        only when set, so a run made before they existed is not stale for it."""
        later = {f: getattr(self, f) for f, default in _LATER_DEFAULTS.items() if getattr(self, f) != default}
        base = {k: v for k, v in asdict(self).items() if k != "load" and k not in _LATER_DEFAULTS}
        return {**base, **later, **self.load.recorded()}


_LATER_DEFAULTS = {"num_beams": 1, "logprobs": False, "capture_attention": False, "attention_layer": None,
                   "corrupted_images": False, "turn": "last"}
TURNS = ("last", "first")


def request_of(p: Prompt, corrupted: bool = False, turn: str = "last"):
    """The engine request answering ``p``: its last user turn after the earlier ones (``turn="last"``), or its
    first question."""
    from hallu.engine import GenRequest

    images = list(p.images)
    mia = p.meta.get("mia") if isinstance(p.meta.get("mia"), dict) else {}
    if corrupted and isinstance(mia.get("corrupted_image"), str) and len(images) == 1:
        images = [mia["corrupted_image"]]
    turns = p.meta.get("turns")
    users = [i for i, t in enumerate(turns or []) if isinstance(t, dict) and t.get("role") == "user"]
    if len(users) < 2 or turn == "first":
        return GenRequest(p.id, images, p.question)
    last = users[-1]
    history = [{"role": t["role"], "text": str(t.get("text", ""))} for t in turns[:last]]
    return GenRequest(p.id, images, str(turns[last].get("text", "")), history=history)


def check_turns(prompts: list[Prompt], where: str) -> None:
    """Multi-turn prompts: every turn a {role: user|assistant, text} object, tags matching the images."""
    for p in prompts:
        turns = p.meta.get("turns")
        if turns is None:
            continue
        if not isinstance(turns, list) or not all(
                isinstance(t, dict) and t.get("role") in ("user", "assistant") and isinstance(t.get("text"), str)
                for t in turns):
            raise HalluError(f"{where}: prompt {p.id!r}: meta.turns must be a list of "
                             "{'role': 'user'|'assistant', 'text': ...} objects")
        tags = sum(t["text"].count("<image>") for t in turns if t["role"] == "user")
        if tags and tags != len(p.images):
            raise HalluError(f"{where}: prompt {p.id!r}: {tags} <image> tags over its turns but "
                             f"{len(p.images)} images")


def default_prompts(run: Run) -> Path:
    """The prompts a `prepare` stage wrote into this run, if any."""
    rec = run.stage_record("prepare")
    if rec and rec.get("status") == "done" and "prompts" in rec.get("outputs", {}):
        return run.resolve(rec["outputs"]["prompts"]["path"])
    raise HalluError(
        f"--run {run.dir}: no prompts given and no finished 'prepare' stage in this run; pass --prompts FILE"
    )


def rollout(run: Run, model: str | Path, prompts_path: Path | None, opts: RolloutOptions) -> dict:
    """``model``: a folder, a Hub id or a PEFT adapter (see :mod:`hallu.hub`)."""
    from hallu.models import check_model

    opts.load.validate()  # typos and a bad --chat-template fail before anything is read or written
    if opts.turn not in TURNS:
        raise HalluError(f"--turn {opts.turn}: expected one of {', '.join(TURNS)}")
    prompts_path = Path(prompts_path) if prompts_path else default_prompts(run)
    prompts = read_records(prompts_path, Prompt)
    if not prompts:
        raise HalluError(f"{prompts_path}: no prompts in the file")
    if opts.limit is not None:
        prompts = prompts[: opts.limit]
    check_images(prompts, prompts_path.parent, str(prompts_path), allow_outside=opts.allow_outside_images)
    check_turns(prompts, str(prompts_path))
    if opts.corrupted_images:
        corrupted = [Prompt(id=p.id, images=[r.images[0]], question="") for p in prompts
                     if (r := request_of(p, True)).images != p.images]
        check_images(corrupted, prompts_path.parent, str(prompts_path), allow_outside=opts.allow_outside_images,
                     what="prompt (corrupted image)")
    source = check_model(model, opts.load.trust_remote_code)
    if opts.greedy and opts.n > 1:
        raise HalluError("--greedy with --n > 1 would repeat one answer n times; sample instead")
    if opts.num_beams > 1 and (opts.n > 1 or opts.logprobs):
        raise HalluError(f"--num-beams {opts.num_beams}: beam search returns one answer per prompt (--n 1) and "
                         "no per-token log-probs (drop --logprobs)")

    options = opts.recorded()  # the stage leaves out what never changes a result (OPERATIONAL_OPTIONS)
    after = ("prepare",) if run.stage_record("prepare") else ()
    with run.stage("rollout", options=options, inputs={"prompts": prompts_path, **source.folders()},
                   after=after) as st:
        from hallu.distributed import rank_device
        from hallu.engine import Decoding, Engine
        from hallu.stages import batch_seed, run_batched

        opts.load.device = rank_device(opts.load.device)  # under N ranks: cuda:LOCAL_RANK each

        st.extra["model"] = {**source.recorded(), "fingerprint": None}
        engine = Engine.load(model, opts.load, batch_size=opts.batch_size * opts.n, image_base=prompts_path.parent,
                             allow_outside_images=opts.allow_outside_images)
        st.extra["chat_template"] = engine.template.recorded()

        beam = opts.num_beams > 1
        layer = None
        if opts.capture_attention:
            layer = resolve_attention_layer(engine, opts.attention_layer)
            st.extra["attention_layer"] = layer

        def work(batch: list[Prompt], index: int) -> list[dict]:
            decoding = Decoding(max_new_tokens=opts.max_new_tokens, do_sample=not (opts.greedy or beam),
                                temperature=opts.temperature, top_p=opts.top_p, n=opts.n,
                                num_beams=opts.num_beams, logprobs=opts.logprobs,
                                seed=batch_seed(opts.seed, index))
            requests = [request_of(p, opts.corrupted_images, opts.turn) for p in batch]
            turn_of = {r.id: sum(t["role"] == "user" for t in r.history) for r in requests if r.history}
            gens = [g for chunk in engine.generate(requests, decoding) for g in chunk]
            extra = capture(engine, requests, gens, layer) if layer is not None else {}
            out = []
            for g in gens:
                meta = {"tokens": g.tokens, "finished": g.finished, **extra.get((g.id, g.sample), {})}
                if g.id in turn_of:
                    meta["turn"] = turn_of[g.id]
                out.append(Response(id=Response.make_id(g.id, g.sample), prompt_id=g.id, sample=g.sample,
                                    text=g.text, model=engine.fingerprint, logprobs=g.logprobs, meta=meta).to_dict())
            return out

        st.extra["model"]["fingerprint"] = engine.fingerprint
        out = st.dir / "responses.jsonl"
        count = run_batched(
            st, out, prompts, batch_size=opts.batch_size,
            record_ids=lambda p: [Response.make_id(p.id, s) for s in range(opts.n)],
            work=work, label="rollout",
        )
        st.output("responses", out, count=count)
    return {"responses": count, "path": str(out)}


def resolve_attention_layer(engine, layer: int | None) -> int:
    """The 0-based decoder layer to read: ``layer`` (negative counts from the end) or the middle one."""
    n = engine.model.config.get_text_config().num_hidden_layers
    if layer is None:
        return n // 2
    k = layer + n if layer < 0 else layer
    if not 0 <= k < n:
        raise HalluError(f"--attention-layer {layer}: the model has {n} decoder layers (0..{n - 1})")
    return k


def capture(engine, requests: list, gens: list, layer: int) -> dict[tuple[str, int], dict]:
    """MIA-DPO's statistics of every non-empty answer, keyed by (prompt id, sample): ``attention`` and
    ``perplexity`` (see the module docstring). An empty answer has neither (nothing to attend from)."""
    from hallu.engine import ScoreRequest

    by_id = {r.id: r for r in requests}
    texts: dict[str, list] = {}
    for g in gens:
        if g.text:
            texts.setdefault(g.id, []).append(g)
    reqs = [ScoreRequest(rid, by_id[rid].images, by_id[rid].text, image_key=by_id[rid].image_key,
                         history=by_id[rid].history, completions=[g.text for g in gs]) for rid, gs in texts.items()]
    if not reqs:
        return {}
    sample = {(rid, k): g.sample for rid, gs in texts.items() for k, g in enumerate(gs)}
    out: dict[tuple[str, int], dict] = {}
    single = {r.id for r in reqs if len(r.images) == 1}
    for chunk in engine.attention(reqs, layers=[layer], maps=True):
        for a in chunk:
            stats = {"layer": a.layers[0], "image_tokens": a.image_tokens, "image_shares": a.image_shares[0],
                     "text_share": a.text_shares[0], "ratios": a.ratios()}
            if a.id in single:  # grid and pic-in-pic selection split the one image's map
                stats["map"] = a.image_maps[0][0]
            out[(a.id, sample[(a.id, a.completion)])] = {"attention": stats}
    for chunk in engine.score(reqs, include_eos=True):
        for s in chunk:
            out[(s.id, sample[(s.id, s.completion)])]["perplexity"] = s.perplexity
    return out
