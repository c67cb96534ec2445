"""The rollout stage: the policy's answers to every prompt, ``n`` samples each, resumable.

Output: ``RUN/rollout/responses.jsonl``, one :class:`~hallu.records.Response` per (prompt, sample), in
prompt order. Each batch of prompts is generated with its own seed, so a killed rollout resumes to
exactly the file an uninterrupted one writes.
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

    def recorded(self) -> dict:
        """The stage's options: sampling knobs and load options side by side in one flat dict (the keys
        runs have always recorded, plus chat_template when a file is given)."""
        return {**{k: v for k, v in asdict(self).items() if k != "load"}, **self.load.recorded()}


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
    prompts_path = Path(prompts_path) if prompts_path else default_prompts(run)
    prompts = read_records(prompts_path, Prompt)
    if not prompts:
        raise HalluError(f"{prompts_path}: no prompts in the file")
    if opts.limit is not None:
        prompts = prompts[: opts.limit]
    check_images(prompts, prompts_path.parent, str(prompts_path), allow_outside=opts.allow_outside_images)
    source = check_model(model, opts.load.trust_remote_code)
    if opts.greedy and opts.n > 1:
        raise HalluError("--greedy with --n > 1 would repeat one answer n times; sample instead")

    options = opts.recorded()  # the stage leaves out what never changes a result (OPERATIONAL_OPTIONS)
    after = ("prepare",) if run.stage_record("prepare") else ()
    with run.stage("rollout", options=options, inputs={"prompts": prompts_path, **source.folders()},
                   after=after) as st:
        from hallu.distributed import rank_device
        from hallu.engine import Decoding, Engine, GenRequest
        from hallu.stages import batch_seed, run_batched

        opts.load.device = rank_device(opts.load.device)  # under N ranks: cuda:LOCAL_RANK each

        st.extra["model"] = {**source.recorded(), "fingerprint": None}
        engine = Engine.load(model, opts.load, batch_size=opts.batch_size * opts.n, image_base=prompts_path.parent,
                             allow_outside_images=opts.allow_outside_images)
        st.extra["chat_template"] = engine.template.recorded()

        def work(batch: list[Prompt], index: int) -> list[dict]:
            decoding = Decoding(max_new_tokens=opts.max_new_tokens, do_sample=not opts.greedy,
                                temperature=opts.temperature, top_p=opts.top_p, n=opts.n,
                                seed=batch_seed(opts.seed, index))
            requests = [GenRequest(p.id, p.images, p.question) for p in batch]
            gens = [g for chunk in engine.generate(requests, decoding) for g in chunk]
            return [
                Response(id=Response.make_id(g.id, g.sample), prompt_id=g.id, sample=g.sample, text=g.text,
                         model=engine.fingerprint, meta={"tokens": g.tokens, "finished": g.finished}).to_dict()
                for g in gens
            ]

        st.extra["model"]["fingerprint"] = engine.fingerprint
        out = st.dir / "responses.jsonl"
        count = run_batched(
            st, out, prompts, batch_size=opts.batch_size,
            record_ids=lambda p: [Response.make_id(p.id, s) for s in range(opts.n)],
            work=work, label="rollout",
        )
        st.output("responses", out, count=count)
    return {"responses": count, "path": str(out)}
