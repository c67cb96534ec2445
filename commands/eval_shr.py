"""`hallu eval shr`: score model responses with SHR (HA-DPO's GPT-judged sentence hallucination ratio).

Thin: parse options, read the inputs, build the judge, call :func:`hallu.evals.shr.evaluate` (or
:func:`~hallu.evals.shr.rescore`), write the JSON atomically and print the metrics. Judge replies are
cached in a JSONL file (default: ``judge_cache.jsonl`` next to ``--json``), so a rerun after a crash or
with the same inputs makes no new calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hallu.commands._common import (
    AllowOutsideImagesOpt,
    AttnOpt,
    BatchOpt,
    ChatTemplateOpt,
    DeviceOpt,
    DtypeOpt,
    GpusOpt,
    NprocOpt,
    TrustOpt,
    boundary,
    err_console,
    out_console,
    relaunch_if_asked,
    template_arg,
)

_METRIC_ROWS = (
    ("shr", "SHR (hal_sents_ratio)"),
    ("hal_words_ratio", "hallucinated words ratio"),
    ("sents_per_image", "sentences / image"),
    ("words_per_image", "words / image"),
    ("hal_sents_per_image", "hallucinated sentences / image"),
    ("hal_words_per_image", "hallucinated words / image"),
    ("gram_1_repetition", "1-gram repetition"),
    ("gram_2_repetition", "2-gram repetition"),
    ("gram_3_repetition", "3-gram repetition"),
    ("gram_4_repetition", "4-gram repetition"),
)


@boundary
def shr(
    ctx: typer.Context,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Where to write the result JSON (with --model: also OUT/results.json)."),
    ] = None,
    responses: Annotated[Path | None, typer.Option(help='Responses: JSON {"<image_id>": "text"}.')] = None,
    vg: Annotated[
        Path | None, typer.Option(help="Visual Genome folder: image_data.json, region_descriptions.json.")
    ] = None,
    facts: Annotated[
        list[Path] | None, typer.Option(help="SHR factual JSONL (repeat: shr_factual_part1/part2.jsonl).")
    ] = None,
    image_list: Annotated[
        Path | None, typer.Option(help="SHR val_images_final.json: score exactly these images, in order.")
    ] = None,
    judge_model: Annotated[
        str, typer.Option(help="Judge model id (HA-DPO: gpt-4). The id the API returns is recorded.")
    ] = "gpt-4",
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint. Default: $OPENAI_BASE_URL, else OpenAI.")
    ] = None,
    api_key_env: Annotated[str, typer.Option(help="Variable holding the API key.")] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option(min=1, help="Judge requests in flight at once.")] = 8,
    max_cost: Annotated[
        float | None, typer.Option(min=0.0, help="Stop cleanly once the judge has cost this many USD.")
    ] = None,
    price: Annotated[
        str | None, typer.Option(help="Judge price IN,OUT in USD per million prompt, completion tokens.")
    ] = None,
    timeout: Annotated[float, typer.Option(min=1.0, help="Seconds per judge request.")] = 120.0,
    max_attempts: Annotated[
        int, typer.Option(min=1, help="HTTP attempts per request (429, 5xx, timeouts are retried).")
    ] = 6,
    format_attempts: Annotated[
        int, typer.Option(min=1, help="Judge samples per image while a reply has no 'Judgement:' line.")
    ] = 3,
    cache: Annotated[
        Path | None, typer.Option(help="Judge reply cache (JSONL). Default: judge_cache.jsonl by --json.")
    ] = None,
    no_judge: Annotated[
        bool, typer.Option("--no-judge", help="Repetition only, no API calls (the official --no-gpt-judge).")
    ] = False,
    rescore: Annotated[
        Path | None, typer.Option(help="Recompute from a stored result or HA-DPO judgement.json; no calls.")
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Describe the images with this model first (beam 5).")
    ] = None,
    images: Annotated[
        Path | None, typer.Option("--images", help="Visual Genome image root (VG_100K*/) or a flat image folder.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder for generations.jsonl, the judge cache, results.json.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest description, in tokens.")] = 512,
    num_beams: Annotated[int, typer.Option(min=1, help="Beams (HA-DPO: 5).")] = 5,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "sdpa",
    trust_remote_code: TrustOpt = False,
    allow_outside_images: AllowOutsideImagesOpt = False,
    chat_template: ChatTemplateOpt = None,
    nproc: NprocOpt = None,
    gpus: GpusOpt = None,
) -> None:
    """Score responses with SHR: a GPT judge checks each sentence against Visual Genome regions and facts."""
    relaunch_if_asked(ctx, nproc, gpus, with_model=model is not None)
    from hallu.errors import HalluError
    from hallu.evals import shr as bench
    from hallu.evals.generation import check_model_knobs
    from hallu.fileio import atomic_write_json, read_json, sha256_file

    # Choice-valued options first: a typo costs one line, before any judge, file or model is touched.
    check_model_knobs(dict(device=device, dtype=dtype, attn=attn, chat_template=template_arg(chat_template)))
    if model is not None and responses is not None:
        raise HalluError("--responses scores responses made elsewhere; it cannot be combined with --model")
    if model is not None and out is None:
        raise HalluError("--out DIR is required with --model (it holds the responses, judge cache and results)")
    if json_out is None and out is None:
        raise HalluError("--json OUT.json is required (where to write the result)")
    if rescore is not None:
        if json_out is None:
            raise HalluError("--json OUT.json is required with --rescore")
        result = bench.rescore(read_json(rescore))
        result["settings"]["rescored_from"] = str(rescore)
        atomic_write_json(json_out, result)
        _print(result, json_out)
        return
    if (responses is None and model is None) or vg is None:
        raise HalluError("eval shr: give --responses (or --model) and --vg (or --rescore FILE)")
    if not no_judge and not facts:
        raise HalluError("eval shr: give the SHR facts with --facts (once per JSONL file), or use --no-judge")
    image_data, regions = vg / "image_data.json", vg / "region_descriptions.json"
    for p in (image_data, regions):
        if not p.is_file():
            raise HalluError(f"--vg {vg}: no {p.name} in this folder")

    # Build the judge first: a missing key or price fails here, before reading gigabytes of VG.
    judge = None
    if not no_judge:
        from hallu.judges.openai import DEFAULT_PRICES, JudgeConfig, OpenAIJudge, parse_price

        prices = dict(DEFAULT_PRICES)
        if price is not None:
            prices[judge_model] = parse_price(price)
        config = JudgeConfig(
            model=judge_model, base_url=base_url, api_key_env=api_key_env, concurrency=concurrency,
            timeout_s=timeout, max_attempts=max_attempts, max_cost=max_cost, prices=prices,
        )
        default_cache = (out if model is not None else json_out.parent) / "judge_cache.jsonl"
        judge = OpenAIJudge(config, cache if cache is not None else default_cache)

    if model is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        knobs = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size, device=device,
                     dtype=dtype, attn=attn, trust_remote_code=trust_remote_code,
                     chat_template=template_arg(chat_template), allow_outside_images=allow_outside_images)
        ids = bench.load_image_list(image_list) if image_list is not None else None
        with Progress(TextColumn("judging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True, disable=judge is None) as bar:
            task = bar.add_task("judge", total=None)
            result, path = bench.evaluate_model(
                model, images, vg, facts or [], ids, out, knobs, judge, format_attempts=format_attempts,
                on_progress=lambda done, total: bar.update(task, completed=done, total=total))
        if json_out is not None:
            atomic_write_json(json_out, result)
        _print(result, json_out or path)
        return

    resp = bench.load_responses(responses)
    ids = bench.load_image_list(image_list) if image_list is not None else None
    wanted = ids if ids is not None else [int(k) for k in resp]
    fact_map = bench.load_facts(facts or [])
    err_console.print(f"reading Visual Genome from {vg} ...", soft_wrap=True, markup=False)
    vgdata = bench.load_visual_genome(image_data, regions, keep=wanted)
    inputs = {
        "responses": {"path": str(responses), "sha256": sha256_file(responses)},
        "facts": [{"path": str(p), "sha256": sha256_file(p)} for p in facts or []],
        "image_data": {"path": str(image_data), "sha256": sha256_file(image_data)},
        "region_descriptions": {"path": str(regions), "sha256": sha256_file(regions)},
    }
    if image_list is not None:
        inputs["image_list"] = {"path": str(image_list), "sha256": sha256_file(image_list)}

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("judging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True, disable=judge is None,
    ) as bar:
        task = bar.add_task("judge", total=None)
        result = bench.evaluate(
            resp, vgdata, fact_map, judge, image_ids=ids, format_attempts=format_attempts, inputs=inputs,
            on_progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    atomic_write_json(json_out, result)
    _print(result, json_out)


def _print(result: dict, json_out: Path) -> None:
    from rich.table import Table

    table = Table(title="SHR", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in _METRIC_ROWS:
        value = result["metrics"].get(key)
        table.add_row(label, "n/a" if value is None else f"{value:.3f}")
    out_console.print(table)
    c = result["counts"]
    err_console.print(
        f"{c['images']} images, {c['sentences']} sentences; count mismatches {c['count_mismatch']}, "
        f"judge format failures {c['judge_format_failures']}, API failures {c['judge_api_failures']}, "
        f"empty responses {c['empty_responses']}",
        soft_wrap=True,
    )
    usage = result.get("usage") or {}
    if usage:
        cost = usage.get("cost_usd")
        err_console.print(
            f"judge {result['settings'].get('judge_model')}: {usage['new_replies']} new replies, "
            f"{usage['cached_replies']} cached, {usage['retries']} retries, "
            f"{usage['prompt_tokens']}+{usage['completion_tokens']} tokens, "
            f"cost {'unknown' if cost is None else f'{cost:.4f} USD'}",
            soft_wrap=True, markup=False,
        )
    if c["judge_api_failures"]:
        err_console.print(
            f"[yellow]warning:[/] {c['judge_api_failures']} images got no judgement (API errors); their "
            "sentences count as unclassified. Rerun the same command to retry them (cached replies are kept).",
            soft_wrap=True,
        )
    err_console.print(f"wrote {json_out}", soft_wrap=True, markup=False)
