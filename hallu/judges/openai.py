"""One client for every OpenAI-compatible chat endpoint hallu talks to (SHR's judge, the revise stage).

What it adds on top of the ``openai`` package (used as ``AsyncOpenAI(max_retries=0)``, so every retry
is ours to count and to time):

- **Key from the environment only.** ``OPENAI_API_KEY`` by default, or another variable named in
  :class:`JudgeConfig`; a missing key raises :class:`~hallu.errors.HalluError` when the judge is built,
  before any request or any other work. The key is held in memory only: it is never part of a cache
  key, a cache record, a log line, an error message (server messages are scrubbed) or a result.
- **Concurrency limit**: an ``asyncio.Semaphore`` around each HTTP call.
- **Bounded retries** with exponential backoff and jitter on 429, 408, 409, 5xx, timeouts, connection
  errors and malformed reply bodies. ``Retry-After`` (seconds, or an HTTP date; ``retry-after-ms`` too)
  is honoured: that request waits at least as long, and a 429 also pauses every other request of the
  client until then, so a rate-limited endpoint is not hammered by the rest of the batch. 401, 403
  and 404 (bad key, no access, unknown model) stop the whole batch with one clear error, because
  every further request would fail the same way. Other 4xx (400, 422: an over-long prompt, a content
  filter) fail that request only, without retries, unless the first three requests all fail so
  (then the request shape is wrong, e.g. a parameter the endpoint does not support, and the batch
  stops).
- **Per-request timeout** (the whole call, not just one socket read).
- **A content-addressed reply cache** (:class:`ReplyCache`): the key is a digest of the
  endpoint-independent request (model, messages, decoding parameters, prompt version, sample index);
  the value is the reply text, the model id the endpoint reported and the token usage. It is an
  append-only JSONL file, fsynced per record, so a crash loses at most the line being written and a
  torn last line is skipped on load. A rerun of the same requests makes no HTTP calls.
- **A cost meter** (:class:`CostMeter`): prompt/completion tokens from ``usage``, priced from a table
  (USD per million tokens; replace or extend it); for a model without a price the tokens are still
  counted and the cost is reported as unknown. ``max_cost`` stops dispatching new requests once the
  spend reaches it: requests already in flight finish (so the overshoot is at most ``concurrency``
  replies), the rest come back with ``error_kind == "max_cost"``, and everything done is cached.

Callers use the sync facade :meth:`OpenAIJudge.chat_many` (requests in, results in the same order
out) or the async :meth:`OpenAIJudge.achat_many`.

Sampled requests (temperature > 0) are cached too: the ``sample`` index of a request is part of its
key, so "the first sample for this prompt" is reproducible across reruns, and a caller that wants a
fresh sample (e.g. SHR re-asking after a reply without a verdict) asks for ``sample=1, 2, ...``.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import email.utils
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hallu.errors import HalluError
from hallu.fileio import digest_json

log = logging.getLogger("hallu")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
CACHE_SCHEMA = 1

# List prices in USD per million tokens (prompt, completion) as published by OpenAI for these ids.
# Prices change and other endpoints price differently: callers pass their own table or --price.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4": (30.0, 60.0),
    "gpt-4-0613": (30.0, 60.0),
    "gpt-4-32k": (60.0, 120.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4-turbo-2024-04-09": (10.0, 30.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-2024-08-06": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4o-mini-2024-07-18": (0.15, 0.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.1-nano": (0.1, 0.4),
    "gpt-3.5-turbo": (0.5, 1.5),
}

# Status codes worth another try: timeouts, conflicts, rate limits and server-side failures.
_RETRY_STATUS = frozenset({408, 409, 429})
# Refusals that hold for every request (bad key, no access, unknown model): stop the batch at once.
_FATAL_STATUS = frozenset({401, 403, 404})
# Other 4xx (400, 422: an over-long prompt, a content filter) may concern one request only; but when
# this many come before any success, the request shape itself is wrong (e.g. an unsupported parameter).
_REJECTIONS_BEFORE_ABORT = 3


@dataclass(frozen=True)
class JudgeConfig:
    """How to reach the endpoint and how hard to try. Holds no secret: only the key's variable name."""

    model: str = "gpt-4"
    base_url: str | None = None  # None: $OPENAI_BASE_URL, else the OpenAI API
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout_s: float = 120.0
    max_attempts: int = 6  # HTTP attempts per request, the first one included
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 300.0  # a longer Retry-After is waited this long, then retried
    max_cost: float | None = None  # USD; None: no limit
    prices: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))

    def resolved_base_url(self) -> str:
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to make. ``tag`` names it in errors and progress; it is not in the key."""

    messages: Sequence[Mapping[str, Any]]
    params: Mapping[str, Any] = field(default_factory=dict)  # temperature, top_p, max_tokens, stop ...
    prompt_version: str = ""
    model: str | None = None  # None: the judge's configured model
    sample: int = 0
    tag: str = ""


@dataclass
class ChatResult:
    """The outcome of one request: ``text`` on success, else ``error`` / ``error_kind``."""

    tag: str
    key: str
    text: str | None = None
    model: str | None = None  # the model id the endpoint reported
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str | None = None
    cached: bool = False
    attempts: int = 0  # HTTP attempts made for it in this run (0 for a cache hit)
    error: str | None = None
    error_kind: str | None = None  # "retries_exhausted" | "rejected" | "max_cost"

    @property
    def ok(self) -> bool:
        return self.error is None


def request_key(model: str, req: ChatRequest) -> str:
    """The cache key: a digest of everything that decides the reply, and nothing about the endpoint."""
    return digest_json(
        {
            "schema": CACHE_SCHEMA,
            "model": model,
            "messages": [dict(m) for m in req.messages],
            "params": dict(req.params),
            "prompt_version": req.prompt_version,
            "sample": req.sample,
        }
    )


def endpoint_host(base_url: str) -> str:
    """``host[:port]`` of an endpoint URL: no scheme, user info, path or query (they can hold secrets)."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP date; else None."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                return max(value, 0.0)
        except ValueError:
            pass
    raw = lower.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return max(value, 0.0) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # HTTP dates are GMT; a naive parse means the zone was left out
        when = when.replace(tzinfo=_dt.timezone.utc)
    now = time.time() if now is None else now
    return max(when.timestamp() - now, 0.0)


def parse_price(text: str) -> tuple[float, float]:
    """``"IN,OUT"`` in USD per million tokens → a price pair (the ``--price`` option)."""
    try:
        p_in, p_out = (float(x) for x in text.split(","))
    except ValueError:
        msg = f"--price {text!r}: expected IN,OUT in USD per million tokens, e.g. 2.5,10"
        raise HalluError(msg) from None
    if p_in < 0 or p_out < 0 or not (math.isfinite(p_in) and math.isfinite(p_out)):
        raise HalluError(f"--price {text!r}: prices must be finite and not negative")
    return p_in, p_out


class ReplyCache:
    """Append-only JSONL of replies keyed by request digest; safe against crashes and torn lines.

    Each record is one line ``{"key", "text", "model", "usage", "finish_reason", ...}`` written with a
    single ``write`` and fsynced. On load, a line that is not a complete JSON record (a crash mid-write)
    is skipped and counted in ``skipped_lines``; the next append starts on a fresh line. Appends take a
    file lock, so several processes may share one cache file. Later records win over earlier ones.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.skipped_lines = 0
        self._entries: dict[str, dict[str, Any]] = {}
        self._thread_lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except IsADirectoryError:
            raise HalluError(f"{self.path}: is a directory, expected the judge cache file") from None
        except OSError as e:
            raise HalluError(f"{self.path}: cannot read the judge cache ({e.strerror})") from None
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                self.skipped_lines += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("text"), str):
                self._entries[rec["key"]] = rec
            else:
                self.skipped_lines += 1

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, record: dict[str, Any]) -> None:
        from filelock import FileLock

        line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, FileLock(str(self.path) + ".lock"):
            with open(self.path, "a+b") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a torn line from a crash: do not glue onto it
                        line = b"\n" + line
                f.seek(0, os.SEEK_END)
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        self._entries[record["key"]] = record


class CostMeter:
    """Tokens and spend of the HTTP calls made (cache hits are free and counted apart)."""

    def __init__(self, prices: Mapping[str, tuple[float, float]]):
        self.prices = dict(prices)
        self.http_requests = 0  # every attempt that reached for the network
        self.replies = 0  # successful new replies
        self.cached = 0
        self.retries = 0
        self.failures = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.priced_usd = 0.0
        self.unpriced_replies = 0
        self.unpriced_models: set[str] = set()

    def price_for(self, *models: str | None) -> tuple[float, float] | None:
        for m in models:
            if m and m in self.prices:
                return self.prices[m]
        return None

    def add(self, requested: str, returned: str | None, usage: Mapping[str, int]) -> None:
        p_in, p_out = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        self.replies += 1
        self.prompt_tokens += p_in
        self.completion_tokens += p_out
        price = self.price_for(requested, returned)
        if price is None:
            self.unpriced_replies += 1
            self.unpriced_models.add(requested)
        else:
            self.priced_usd += (p_in * price[0] + p_out * price[1]) / 1e6

    @property
    def cost_usd(self) -> float | None:
        """Total spend, or None when some reply came from a model without a price."""
        return None if self.unpriced_replies else self.priced_usd

    def to_dict(self) -> dict[str, Any]:
        cost = self.cost_usd
        return {
            "http_requests": self.http_requests,
            "new_replies": self.replies,
            "cached_replies": self.cached,
            "retries": self.retries,
            "failed_requests": self.failures,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": None if cost is None else round(cost, 6),
            "unpriced_models": sorted(self.unpriced_models),
        }


class _Rejected(Exception):
    pass


class _Retryable(Exception):
    def __init__(self, what: str, retry_after: float | None = None, rate_limited: bool = False):
        super().__init__(what)
        self.what = what
        self.retry_after = retry_after
        self.rate_limited = rate_limited


class OpenAIJudge:
    """An OpenAI-compatible chat client with cache, retries, concurrency limit and cost meter.

    Args:
        config: endpoint, model and retry settings.
        cache: where replies are kept (a :class:`ReplyCache` or a path); None disables caching.

    Raises:
        HalluError: the API key variable is unset or empty, or ``max_cost`` is set for a model that
            has no price.
    """

    def __init__(self, config: JudgeConfig, cache: ReplyCache | str | os.PathLike | None = None):
        key = os.environ.get(config.api_key_env, "").strip()
        if not key:
            raise HalluError(
                f"judge: no API key: set the environment variable {config.api_key_env} (keys are read "
                "from the environment only; for a local server that ignores keys, set it to any value)"
            )
        if config.concurrency < 1 or config.max_attempts < 1:
            raise HalluError("judge: concurrency and max attempts must be at least 1")
        if config.max_cost is not None and config.model not in config.prices:
            raise HalluError(
                f"judge: --max-cost needs a price for model {config.model!r}; give one with --price IN,OUT "
                "(USD per million prompt, completion tokens)"
            )
        self.config = config
        self.base_url = config.resolved_base_url()
        self.cache = cache if isinstance(cache, ReplyCache) or cache is None else ReplyCache(cache)
        self.meter = CostMeter(config.prices)
        self.__key = key  # name-mangled and never logged; see _scrub
        self._pause_until = 0.0
        self._budget_hit = False
        self._rejections = 0

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.config.model!r}, host={endpoint_host(self.base_url)!r})"

    # -- public API ------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """What to record with results: nothing secret, the endpoint as a host only."""
        c = self.config
        return {
            "judge_model_requested": c.model,
            "base_url": endpoint_host(self.base_url),
            "api_key_env": c.api_key_env,
            "concurrency": c.concurrency,
            "timeout_s": c.timeout_s,
            "max_attempts": c.max_attempts,
            "max_cost": c.max_cost,
        }

    def key_for(self, req: ChatRequest) -> str:
        return request_key(req.model or self.config.model, req)

    def chat_many(
        self, requests: Iterable[ChatRequest], on_result: Callable[[ChatResult], None] | None = None
    ) -> list[ChatResult]:
        """Run every request (cache first, then the endpoint); results come back in request order."""
        requests = list(requests)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.achat_many(requests, on_result))
        # Called from inside an event loop (a notebook): run ours on a private thread.
        box: dict[str, Any] = {}

        def runner() -> None:
            try:
                box["out"] = asyncio.run(self.achat_many(requests, on_result))
            except BaseException as e:  # re-raised in the caller's thread
                box["err"] = e

        t = threading.Thread(target=runner, name="hallu-judge")
        t.start()
        t.join()
        if "err" in box:
            raise box["err"]
        return box["out"]

    async def achat_many(
        self, requests: Sequence[ChatRequest], on_result: Callable[[ChatResult], None] | None = None
    ) -> list[ChatResult]:
        import openai

        client = openai.AsyncOpenAI(
            api_key=self.__key, base_url=self.base_url, max_retries=0, timeout=self.config.timeout_s
        )
        sem = asyncio.Semaphore(self.config.concurrency)
        inflight: dict[str, asyncio.Future] = {}  # identical requests in one batch share one call

        async def one(req: ChatRequest) -> ChatResult:
            key = self.key_for(req)
            if key in inflight:
                res = _copy_result(await asyncio.shield(inflight[key]), req.tag)
                self.meter.cached += 1
            else:
                fut: asyncio.Future = asyncio.get_running_loop().create_future()
                inflight[key] = fut
                try:
                    res = await self._run_one(client, sem, req, key)
                except asyncio.CancelledError:
                    fut.cancel()
                    raise
                except BaseException as e:
                    fut.set_exception(e)
                    fut.exception()  # mark it retrieved: there may be no duplicate waiting on it
                    raise
                fut.set_result(res)
            if on_result is not None:
                on_result(res)
            return res

        tasks = [asyncio.ensure_future(one(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            await client.close()

    # -- internals -------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key else text

    def _over_budget(self) -> bool:
        cap = self.config.max_cost
        if cap is not None and self.meter.priced_usd >= cap:
            self._budget_hit = True
        return self._budget_hit

    async def _run_one(self, client, sem: asyncio.Semaphore, req: ChatRequest, key: str) -> ChatResult:
        model = req.model or self.config.model
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.meter.cached += 1
            return ChatResult(
                tag=req.tag, key=key, text=hit["text"], model=hit.get("model"),
                usage=dict(hit.get("usage") or {}), finish_reason=hit.get("finish_reason"), cached=True,
            )
        cfg = self.config
        last = "no attempt made"
        attempts = 0
        for attempt in range(1, cfg.max_attempts + 1):
            if self._over_budget():
                return self._budget_result(req, key, attempts)
            async with sem:
                # Checked after queueing: a 429 or the budget may have come while this request waited.
                await self._wait_for_pause()
                if self._over_budget():
                    return self._budget_result(req, key, attempts)
                attempts += 1
                self.meter.http_requests += 1
                try:
                    text, returned, usage, finish = await self._call(client, model, req)
                except _Rejected as e:
                    return self._rejected(req, key, attempts, str(e))
                except _Retryable as e:
                    last = e.what
                    delay = self._delay(attempt, e.retry_after)
                    if e.rate_limited and e.retry_after is not None:
                        self._pause_until = max(self._pause_until, time.monotonic() + delay)
                else:
                    self.meter.add(model, returned, usage)
                    record = {
                        "key": key, "text": text, "model": returned, "usage": usage, "finish_reason": finish,
                        "request_model": model, "prompt_version": req.prompt_version, "sample": req.sample,
                        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    }
                    if self.cache is not None:
                        self.cache.put(record)
                    return ChatResult(
                        tag=req.tag, key=key, text=text, model=returned, usage=usage, finish_reason=finish,
                        attempts=attempts,
                    )
            if attempt == cfg.max_attempts:
                break
            self.meter.retries += 1
            log.info(
                "judge: %s for %s; retry %d/%d in %.1fs",
                last, req.tag or key[:19], attempt, cfg.max_attempts - 1, delay,
            )
            await asyncio.sleep(delay)
        self.meter.failures += 1
        msg = f"gave up after {attempts} attempts: {last}"
        log.warning("judge: %s: %s", req.tag or key[:19], msg)
        return ChatResult(tag=req.tag, key=key, attempts=attempts, error=msg, error_kind="retries_exhausted")

    def _rejected(self, req: ChatRequest, key: str, attempts: int, what: str) -> ChatResult:
        self._rejections += 1
        if self._rejections >= _REJECTIONS_BEFORE_ABORT and self.meter.replies == 0:
            raise HalluError(
                f"judge endpoint {endpoint_host(self.base_url)} rejected the first {self._rejections} "
                f"requests and accepted none: {what}"
            )
        self.meter.failures += 1
        log.warning("judge: %s: rejected: %s", req.tag or key[:19], what)
        return ChatResult(tag=req.tag, key=key, attempts=attempts, error=f"rejected: {what}", error_kind="rejected")

    def _budget_result(self, req: ChatRequest, key: str, attempts: int) -> ChatResult:
        msg = f"max cost {self.config.max_cost} USD reached (spent {self.meter.priced_usd:.4f} USD)"
        return ChatResult(tag=req.tag, key=key, attempts=attempts, error=msg, error_kind="max_cost")

    async def _wait_for_pause(self) -> None:
        while (wait := self._pause_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        if retry_after is not None:
            # Honour the server's wait as a minimum; a little jitter on top keeps a batch that was
            # throttled together from coming back in the same instant.
            wait = min(retry_after, cfg.max_retry_after_s)
            return wait + random.uniform(0, min(1.0, 0.1 * wait))
        base = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)

    async def _call(
        self, client, model: str, req: ChatRequest
    ) -> tuple[str, str | None, dict[str, int], str | None]:
        import openai

        try:
            resp = await asyncio.wait_for(
                client.chat.completions.create(
                    model=model, messages=[dict(m) for m in req.messages], timeout=self.config.timeout_s,
                    **dict(req.params),
                ),
                timeout=self.config.timeout_s,
            )
        except (asyncio.TimeoutError, openai.APITimeoutError):
            raise _Retryable(f"timeout after {self.config.timeout_s:g}s") from None
        except openai.APIConnectionError as e:
            raise _Retryable(f"connection error ({self._scrub(str(e))})") from None
        except openai.APIStatusError as e:
            status = e.status_code
            detail = self._scrub(_error_message(e))
            if status in _RETRY_STATUS or status >= 500:
                ra = parse_retry_after(dict(e.response.headers))
                raise _Retryable(f"HTTP {status} ({detail})", ra, rate_limited=status == 429) from None
            if status not in _FATAL_STATUS:
                raise _Rejected(f"HTTP {status}: {detail}") from None
            hint = f"; check {self.config.api_key_env}" if status in (401, 403) else ""
            raise HalluError(
                f"judge endpoint {endpoint_host(self.base_url)} refused the request for "
                f"{req.tag or 'a request'}: HTTP {status}: {detail}{hint}"
            ) from None
        except (openai.APIResponseValidationError, ValueError) as e:  # ValueError: a body that is not JSON
            raise _Retryable(f"malformed reply ({type(e).__name__})") from None
        choices = getattr(resp, "choices", None)
        if not choices:
            raise _Retryable("malformed reply (no choices)")
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        if not isinstance(text, str):
            raise _Retryable("malformed reply (no message content)")
        u = getattr(resp, "usage", None)
        usage = {
            "prompt_tokens": int(getattr(u, "prompt_tokens", 0) or 0),
            "completion_tokens": int(getattr(u, "completion_tokens", 0) or 0),
        }
        return text, getattr(resp, "model", None), usage, getattr(choices[0], "finish_reason", None)


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return " ".join(inner["message"].split())[:300]
    return " ".join(str(getattr(e, "message", e)).split())[:300]


def _copy_result(res: ChatResult, tag: str) -> ChatResult:
    # A duplicate of a request made in the same batch: same reply, no call of its own.
    return ChatResult(**{**res.__dict__, "tag": tag, "cached": True, "attempts": 0, "usage": dict(res.usage)})
