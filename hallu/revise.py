"""The revise stage: a judge's verdict on every rollout response, then the method's preference pairs.

Inputs: ``RUN/rollout/responses.jsonl`` (or ``--responses``) and the prompts the rollout answered (the
rollout stage's recorded prompts, the run's prepared prompts, or ``--prompts``). Responses are grouped
by prompt (a :class:`~hallu.judges.base.JudgeGroup` holds all K samples, so rankers compare them) and
judged in fixed batches of groups through :func:`hallu.stages.run_batched`: a killed or stopped stage
(an endpoint that refuses, ``--max-cost`` reached) keeps every finished batch and resumes from there.

Outputs: ``RUN/revise/revisions.jsonl`` (one :class:`~hallu.records.Revision` per judged response,
id = the response id) and ``RUN/revise/pairs.jsonl`` (the method's
:class:`~hallu.records.PreferencePair` records, built by :mod:`hallu.pairs`; image paths absolute).
A prompt whose images are missing is skipped and counted (``--strict``: an error instead).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hallu.errors import HalluError
from hallu.manifest import Run
from hallu.records import Prompt, Response, Revision, read_records, resolve_image

# Judge options that never change a verdict: left out of the recorded options (so changing one
# resumes the stage). ``cache_path`` None means RUN/revise/judge_cache.jsonl.
RUNTIME_KEYS = ("cache_path", "concurrency", "timeout_s", "max_cost", "api_key_env", "base_url")


@dataclass
class ReviseOptions:
    judge: str = "annotations"
    method: str | None = None  # None: the judge's usual method (hallu.pairs.DEFAULT_METHOD)
    judge_options: dict = field(default_factory=dict)
    batch_size: int = 8  # prompts (each with all its samples) per batch
    strict: bool = False
    limit: int | None = None
    allow_outside_images: bool = False


def resolve_judge_options(module, given: dict, judge: str) -> dict:
    """The judge's OPTIONS with ``given`` on top; an unknown key names the judge and its options."""
    defaults = dict(getattr(module, "OPTIONS", {}))
    unknown = sorted(k for k in given if k not in defaults)
    if unknown:
        raise HalluError(f"--option {unknown[0]}: not an option of the {judge} judge "
                         f"(its options: {', '.join(defaults) or 'none'})")
    return {**defaults, **given}


def default_inputs(run: Run) -> tuple[Path, Path | None]:
    """(responses, prompts) a finished rollout stage of this run recorded."""
    rec = run.stage_record("rollout")
    if not rec or rec.get("status") != "done" or "responses" not in rec.get("outputs", {}):
        raise HalluError(f"--run {run.dir}: no finished rollout stage in this run; run `hallu rollout` first "
                         "or pass --responses FILE")
    prompts = rec.get("inputs", {}).get("prompts")
    return run.resolve(rec["outputs"]["responses"]["path"]), run.resolve(prompts["path"]) if prompts else None


def read_responses(path: Path, prompt_ids: set[str], prompts_path: Path) -> list[Response]:
    """Responses, each checked to answer a known prompt (file:line of the first that does not)."""
    from hallu.fileio import iter_jsonl

    out, seen = [], set()
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        resp = Response.from_dict(obj, where)
        if resp.id in seen:
            raise HalluError(f"{where}: duplicate response id {resp.id!r}")
        seen.add(resp.id)
        if resp.prompt_id not in prompt_ids:
            raise HalluError(f"{where}: response {resp.id!r} answers prompt {resp.prompt_id!r}, which is not in "
                             f"{prompts_path} (wrong --prompts for these responses?)")
        out.append(resp)
    if not out:
        raise HalluError(f"{path}: no responses in the file")
    return out


def revise(run: Run, opts: ReviseOptions, responses_path: Path | None = None,
           prompts_path: Path | None = None) -> dict:
    from hallu import pairs as P
    from hallu.judges import load_judge
    from hallu.judges.base import JudgeGroup

    judge = load_judge(opts.judge)
    judge_opts = resolve_judge_options(judge, opts.judge_options, opts.judge)
    method = opts.method or (judge.default_method(judge_opts) if hasattr(judge, "default_method")
                             else P.DEFAULT_METHOD.get(opts.judge, "dpo"))
    P.check_method(method)
    judge.check(judge_opts)  # a missing API key, a bad threshold: before anything is read or loaded

    if responses_path is None:
        responses_path, recorded_prompts = default_inputs(run)
        prompts_path = prompts_path or recorded_prompts
    if prompts_path is None:
        from hallu.rollout import default_prompts

        prompts_path = default_prompts(run)
    responses_path, prompts_path = Path(responses_path), Path(prompts_path)
    prompts = {p.id: p for p in read_records(prompts_path, Prompt)}
    responses = read_responses(responses_path, set(prompts), prompts_path)

    by_prompt: dict[str, list[Response]] = {}
    for r in responses:
        by_prompt.setdefault(r.prompt_id, []).append(r)
    groups, skipped, image_paths = [], Counter(), {}
    base = prompts_path.parent
    for pid, resps in by_prompt.items():
        prompt = prompts[pid]
        files = [resolve_image(i, base, allow_outside=opts.allow_outside_images,
                               where=f"{prompts_path}: prompt {pid!r}") for i in prompt.images]
        missing = [f for f in files if not f.is_file()]
        if missing:
            if opts.strict:
                raise HalluError(f"{prompts_path}: prompt {pid!r}: image {missing[0]} not found (--strict)")
            skipped["prompt images missing"] += 1
            continue
        image_paths[pid] = [str(f.resolve()) for f in files]
        groups.append(JudgeGroup(prompt=prompt, responses=sorted(resps, key=lambda r: r.sample),
                                 images=[f.resolve() for f in files]))
    if opts.limit is not None:
        groups = groups[: opts.limit]
    if not groups:
        raise HalluError(f"{prompts_path}: none of the {len(by_prompt)} answered prompts has its images "
                         "(every one was skipped)")

    recorded = {k: v for k, v in judge_opts.items() if k not in RUNTIME_KEYS}
    options = {"judge": opts.judge, "judge_options": recorded, "method": method,
               "judge_version": getattr(judge, "VERSION", None), "strict": opts.strict, "limit": opts.limit,
               "batch_size": opts.batch_size}
    after = ("rollout",) if run.stage_record("rollout") else ()
    with run.stage("revise", options=options, inputs={"responses": responses_path, "prompts": prompts_path},
                   after=after) as st:
        from hallu.stages import run_batched

        st.dir.mkdir(parents=True, exist_ok=True)
        # Runtime keys reach only the judges that declare them (the openai judge's reply cache).
        runtime = {**judge_opts}
        if "cache_path" in judge_opts and not judge_opts["cache_path"]:
            runtime["cache_path"] = str(st.dir / "judge_cache.jsonl")
        out = st.dir / "revisions.jsonl"
        usage: dict = {}
        if hasattr(judge, "reset"):  # judges with state (a client and its cost meter) start afresh
            judge.reset()
        try:
            count = run_batched(
                st, out, groups, batch_size=opts.batch_size,
                record_ids=lambda g: [r.id for r in g.responses],
                work=lambda batch, index: judge.judge_groups(batch, runtime),
                label=f"revise ({opts.judge})",
            )
        finally:
            # Spend is recorded even when the stage stops (--max-cost, a refusing endpoint).
            usage = judge.usage() if hasattr(judge, "usage") else {}
            if usage:
                st.extra["usage"] = usage
        st.output("revisions", out, count=count)

        revisions = read_records(out, Revision)
        kept = {r.id for g in groups for r in g.responses}
        pairs, why = P.build_pairs(method, prompts, [r for r in responses if r.id in kept], revisions,
                                   recorded, image_paths=image_paths)
        skipped.update(why)
        pairs_path = st.dir / "pairs.jsonl"
        from hallu.records import write_records

        write_records(pairs_path, pairs)
        st.output("pairs", pairs_path, count=len(pairs), method=method)
        st.extra["skipped"] = dict(skipped)
    return {"revisions": count, "pairs": len(pairs), "method": method, "skipped": dict(skipped),
            "path": str(pairs_path), "usage": usage}
