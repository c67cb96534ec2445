"""`hallu revise`: a judge's verdict on every rollout response, and the method's preference pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import AllowOutsideImagesOpt, RunOpt, note


def parse_option_items(items: list[str], defaults: dict, judge: str) -> dict:
    """``--option KEY=VALUE`` items, each value read as the type of the judge's default for KEY."""
    from hallu.errors import HalluError

    out: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise HalluError(f"--option {item!r}: expected KEY=VALUE")
        if key not in defaults:
            raise HalluError(f"--option {key}: not an option of the {judge} judge "
                             f"(its options: {', '.join(defaults) or 'none'})")
        out[key] = _coerce(raw.strip(), defaults[key], key)
    return out


def _coerce(raw: str, default, key: str):
    from hallu.errors import HalluError

    if raw.lower() in ("none", "null") and default is None:
        return None
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float) or default is None:
            return float(raw) if default is not None or _numeric(raw) else raw
    except ValueError:
        raise HalluError(f"--option {key}={raw}: expected {type(default).__name__}") from None
    return raw


def _numeric(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


def revise(
    run: RunOpt,
    judge: Annotated[str, typer.Option("--judge", help="openai | annotations (offline) | clip | attention.")]
    = "annotations",
    method: Annotated[
        str | None,
        typer.Option("--method", help="Pairs for: dpo | ha-dpo | opa-dpo | clip-dpo | mia-dpo (default: the "
                                      "judge's own: annotations->dpo, openai->opa-dpo, clip->clip-dpo, "
                                      "attention->mia-dpo)."),
    ] = None,
    responses: Annotated[
        Path | None, typer.Option("--responses", help="Response records (default: the run's rollout output).")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="Prompt records (default: the prompts the rollout answered).")
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="A judge option KEY=VALUE (repeatable), e.g. --option min_score=0.2; "
                                      "see each judge's OPTIONS."),
    ] = None,
    mode: Annotated[
        str | None, typer.Option("--mode", help="annotations: remove (default) or rewrite hallucinated sentences.")
    ] = None,
    judge_model: Annotated[str | None, typer.Option("--judge-model", help="openai: the model (gpt-4o ...).")] = None,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="openai: endpoint URL (default $OPENAI_BASE_URL or OpenAI).")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="openai: environment variable holding the key.")
    ] = None,
    rewrites: Annotated[
        int | None,
        typer.Option("--rewrites", min=0, help="openai: HA-DPO style-consistent rewrites of each side (3).")
    ] = None,
    max_cost: Annotated[
        float | None, typer.Option("--max-cost", min=0.0, help="openai: stop (resumably) at this spend, in USD.")
    ] = None,
    price: Annotated[
        str | None, typer.Option("--price", help="openai: IN,OUT USD per million tokens for --judge-model.")
    ] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", min=1, help="openai: requests at once.")]
    = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per batch (resume unit).")] = 8,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N answered prompts.")] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="A prompt whose image is missing is an error (default: skipped, counted).")
    ] = False,
    allow_outside_images: AllowOutsideImagesOpt = False,
) -> None:
    """Judge every rollout response (RUN/revise/revisions.jsonl) and build preference pairs
    (RUN/revise/pairs.jsonl). Rerunning resumes; the openai judge's replies are cached."""
    from hallu.errors import HalluError
    from hallu.judges import load_judge
    from hallu.manifest import Run
    from hallu.revise import ReviseOptions
    from hallu.revise import revise as run_revise

    module = load_judge(judge)
    defaults = dict(getattr(module, "OPTIONS", {}))
    given = parse_option_items(option or [], defaults, judge)
    flags = {"mode": mode, "model": judge_model, "base_url": base_url, "api_key_env": api_key_env,
             "rewrites": rewrites, "max_cost": max_cost, "price": price, "concurrency": concurrency}
    flag_names = {"model": "--judge-model", "mode": "--mode", "base_url": "--base-url",
                  "api_key_env": "--api-key-env", "max_cost": "--max-cost"}
    for key, value in flags.items():
        if value is None:
            continue
        if key not in defaults:
            name = flag_names.get(key, f"--{key.replace('_', '-')}")
            raise HalluError(f"{name}: not an option of the {judge} judge (its options: {', '.join(defaults)})")
        given[key] = value
    opts = ReviseOptions(judge=judge, method=method, judge_options=given, batch_size=batch_size, strict=strict,
                         limit=limit, allow_outside_images=allow_outside_images)
    result = run_revise(Run(run), opts, responses, prompts)
    skipped = ", ".join(f"{n} {why}" for why, n in result["skipped"].items())
    note("revise", f"{result['revisions']} revisions, {result['pairs']} {result['method']} pairs in "
                   f"{result['path']}" + (f" (skipped: {skipped})" if skipped else ""))
    usage = result.get("usage") or {}
    if usage:
        cost = usage.get("cost_usd")
        note("judge", f"{usage.get('http_requests', 0)} HTTP requests, {usage.get('cached_replies', 0)} cached "
                      f"replies, cost {'unknown' if cost is None else f'{cost:.4f} USD'}")
