"""The shared OpenAI-compatible client against a real HTTP server on loopback (tests/openai_server.py)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import time

import pytest
from openai_server import FakeOpenAIServer, Raw, Reply, Status

from hallu.errors import HalluError
from hallu.judges.openai import (
    ChatRequest,
    JudgeConfig,
    OpenAIJudge,
    ReplyCache,
    endpoint_host,
    parse_price,
    parse_retry_after,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
KEY = "sk-test-very-secret-0123456789"


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def make_judge(server, tmp_path=None, **kw) -> OpenAIJudge:
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("timeout_s", 5.0)
    cache = kw.pop("cache", None if tmp_path is None else tmp_path / "cache.jsonl")
    return OpenAIJudge(JudgeConfig(base_url=server.base_url, **kw), cache)


def req(text: str, **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], params={"temperature": 0.0},
                       prompt_version="test-v1", tag=text[:20], **kw)


def test_reply_usage_and_model(server, tmp_path):
    server.on("hello", Reply("hi there", usage=(12, 3)))
    judge = make_judge(server, tmp_path)
    [res] = judge.chat_many([req("hello")])
    assert res.ok and res.text == "hi there" and not res.cached
    assert res.model == "gpt-4-0613"  # the id the endpoint reports, not the one asked for
    assert res.usage == {"prompt_tokens": 12, "completion_tokens": 3}
    body = server.requests[0].body
    assert body["model"] == "gpt-4" and body["temperature"] == 0.0
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    m = judge.meter.to_dict()
    assert m["prompt_tokens"] == 12 and m["completion_tokens"] == 3 and m["http_requests"] == 1
    assert m["cost_usd"] == pytest.approx((12 * 30 + 3 * 60) / 1e6)


def test_missing_key_fails_before_any_request(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    server.on("x", Reply("never"))
    with pytest.raises(HalluError, match="OPENAI_API_KEY"):
        make_judge(server)
    monkeypatch.setenv("MY_KEY", "   ")
    with pytest.raises(HalluError, match="MY_KEY"):
        make_judge(server, api_key_env="MY_KEY")
    assert server.requests == []


def test_custom_key_variable(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("OTHER_KEY", "sk-other")
    server.on("x", Reply("ok"))
    [res] = make_judge(server, api_key_env="OTHER_KEY").chat_many([req("x")])
    assert res.ok
    assert server.requests[0].headers["authorization"] == "Bearer sk-other"


def test_retry_after_seconds_is_honoured(server, tmp_path):
    server.on("x", Status(429, {"Retry-After": "1"}), Reply("ok"))
    judge = make_judge(server, tmp_path)
    [res] = judge.chat_many([req("x")])
    assert res.ok and res.attempts == 2
    t0, t1 = (r.time for r in server.requests)
    assert t1 - t0 >= 0.95
    assert judge.meter.retries == 1


def test_retry_after_http_date_is_honoured(server, tmp_path):
    when = email.utils.formatdate(time.time() + 2.5, usegmt=True)  # whole seconds: waits 1.5 to 2.5 s
    server.on("x", Status(503, {"Retry-After": when}), Reply("ok"))
    [res] = make_judge(server, tmp_path).chat_many([req("x")])
    assert res.ok
    t0, t1 = (r.time for r in server.requests)
    assert t1 - t0 >= 1.0


def test_rate_limit_pauses_the_whole_batch(server, tmp_path):
    # One request is throttled with Retry-After; requests sent after that wait out the pause too.
    server.on("first", Status(429, {"Retry-After": "1"}), Reply("ok"))
    server.on("later", Reply("ok", delay=0.0))
    judge = make_judge(server, tmp_path, concurrency=1)
    res = judge.chat_many([req("first"), req("later 1"), req("later 2")])
    assert all(r.ok for r in res)
    t_429 = server.requests[0].time
    assert all(r.time - t_429 >= 0.95 for r in server.requests[1:])


def test_parse_retry_after():
    now = 1_700_000_000.0
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"Retry-After": email.utils.formatdate(now + 7, usegmt=True)}, now=now) == 7.0
    assert parse_retry_after({"Retry-After": email.utils.formatdate(now - 60, usegmt=True)}, now=now) == 0.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


def test_server_errors_are_retried_then_succeed(server, tmp_path):
    server.on("x", Status(500), Status(502), Reply("ok"))
    judge = make_judge(server, tmp_path)
    [res] = judge.chat_many([req("x")])
    assert res.ok and res.attempts == 3 and len(server.requests) == 3


def test_bounded_attempts_then_counted_failure(server, tmp_path):
    server.on("x", Status(500))
    judge = make_judge(server, tmp_path, max_attempts=4)
    [res] = judge.chat_many([req("x")])
    assert not res.ok and res.error_kind == "retries_exhausted" and "HTTP 500" in res.error
    assert res.attempts == 4 and len(server.requests) == 4
    assert judge.meter.failures == 1 and judge.meter.retries == 3
    assert len(judge.cache) == 0  # failures are never cached: a rerun tries again


def test_timeout_is_retried_and_bounded(server, tmp_path):
    server.on("slow", Reply("late", delay=3.0))
    judge = make_judge(server, tmp_path, timeout_s=0.3, max_attempts=2)
    t0 = time.monotonic()
    [res] = judge.chat_many([req("slow")])
    assert time.monotonic() - t0 < 2.5
    assert not res.ok and "timeout" in res.error and len(server.requests) == 2


def test_slow_then_fast_reply_succeeds(server, tmp_path):
    server.on("x", Reply("late", delay=3.0), Reply("fast"))
    [res] = make_judge(server, tmp_path, timeout_s=0.3).chat_many([req("x")])
    assert res.ok and res.text == "fast" and res.attempts == 2


@pytest.mark.parametrize(
    "bad",
    [
        Raw(b'{"choices": [ broken'),
        Raw(b'{"id": "no-choices"}'),
        Raw(b"<html>bad gateway</html>", content_type="text/html"),
        Raw(b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": null}}]}'),
    ],
)
def test_malformed_bodies_are_retried(server, tmp_path, bad):
    server.on("x", bad, Reply("good"))
    [res] = make_judge(server, tmp_path).chat_many([req("x")])
    assert res.ok and res.text == "good" and len(server.requests) == 2


def test_malformed_forever_is_a_counted_failure(server, tmp_path):
    server.on("x", Raw(b"not json"))
    [res] = make_judge(server, tmp_path, max_attempts=3).chat_many([req("x")])
    assert not res.ok and "malformed" in res.error and len(server.requests) == 3


def test_client_errors_stop_the_batch_with_a_clear_scrubbed_error(server, tmp_path, caplog):
    server.on("x", Status(401, message=f"Incorrect API key provided: {KEY}"))
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(HalluError) as e:
            make_judge(server, tmp_path).chat_many([req("x")])
    msg = str(e.value)
    assert "HTTP 401" in msg and "OPENAI_API_KEY" in msg and "127.0.0.1" in msg
    assert KEY not in msg and "***" in msg
    assert len(server.requests) == 1  # not retried
    assert KEY not in caplog.text


def test_bad_request_fails_that_request_only(server, tmp_path):
    server.on("ok", Reply("fine"))
    server.on("too long", Status(400, message="maximum context length exceeded"))
    judge = make_judge(server, tmp_path, concurrency=1)
    res = judge.chat_many([req("ok"), req("too long"), req("ok 2")])
    assert [r.ok for r in res] == [True, False, True]
    assert res[1].error_kind == "rejected" and "HTTP 400" in res[1].error
    assert len(server.requests) == 3  # a 400 is not retried


def test_bad_requests_before_any_success_stop_the_batch(server, tmp_path):
    server.on("q", Status(400, message="Unrecognized request argument supplied: logit_bias"))
    with pytest.raises(HalluError, match="rejected the first 3 requests.*logit_bias"):
        make_judge(server, tmp_path, concurrency=1).chat_many([req(f"q{i}") for i in range(10)])
    assert len(server.requests) == 3


def test_cache_rerun_makes_no_requests(server, tmp_path):
    server.on("a", Reply("reply a"))
    server.on("b", Reply("reply b"))
    first = make_judge(server, tmp_path).chat_many([req("a"), req("b")])
    assert len(server.requests) == 2
    judge = make_judge(server, tmp_path)
    again = judge.chat_many([req("a"), req("b")])
    assert len(server.requests) == 2  # zero new HTTP requests
    assert [r.text for r in again] == [r.text for r in first]
    assert all(r.cached for r in again) and judge.meter.cached == 2 and judge.meter.http_requests == 0
    # Another endpoint with the same request is the same cache entry (the key is endpoint-independent).
    with FakeOpenAIServer() as other:
        other.on("a", Reply("other"))
        [r] = make_judge(other, tmp_path).chat_many([req("a")])
        assert r.text == "reply a" and other.requests == []


def test_cache_key_separates_model_params_prompt_version_and_sample(server, tmp_path):
    server.on("a", Reply("r"))
    judge = make_judge(server, tmp_path)
    base = req("a")
    variants = [
        base,
        ChatRequest(base.messages, {"temperature": 0.7}, "test-v1"),
        ChatRequest(base.messages, base.params, "test-v2"),
        ChatRequest(base.messages, base.params, "test-v1", sample=1),
        ChatRequest(base.messages, base.params, "test-v1", model="gpt-4o"),
    ]
    assert len({judge.key_for(v) for v in variants}) == len(variants)
    assert judge.key_for(base) == judge.key_for(ChatRequest(base.messages, base.params, "test-v1", tag="other"))


def test_cache_survives_a_torn_line(server, tmp_path):
    server.on("a", Reply("reply a"))
    server.on("b", Reply("reply b"))
    make_judge(server, tmp_path).chat_many([req("a")])
    path = tmp_path / "cache.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"key": "sha256:abc", "text": "half a rec')  # a crash mid-write
    cache = ReplyCache(path)
    assert len(cache) == 1 and cache.skipped_lines == 1
    judge = make_judge(server, cache=cache)
    judge.chat_many([req("a"), req("b")])
    assert len(server.requests) == 2  # "a" from the cache, "b" new
    reloaded = ReplyCache(path)
    assert len(reloaded) == 2 and reloaded.skipped_lines == 1
    for line in path.read_text().splitlines()[-1:]:
        assert json.loads(line)["text"] == "reply b"


def test_secret_never_written(server, tmp_path, caplog):
    server.on("x", Status(500, message=f"upstream said {KEY}"), Reply("ok"))
    with caplog.at_level(logging.DEBUG, logger="hallu"):
        judge = make_judge(server, tmp_path)
        judge.chat_many([req("x")])
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in (tmp_path / "cache.jsonl").read_text()
    assert KEY not in json.dumps(judge.settings()) and KEY not in repr(judge)
    assert KEY not in caplog.text


def test_concurrency_limit(server, tmp_path):
    server.on("q", Reply("ok", delay=0.25))
    judge = make_judge(server, tmp_path, concurrency=3)
    res = judge.chat_many([req(f"q{i}") for i in range(10)])
    assert all(r.ok for r in res) and len(server.requests) == 10
    assert server.max_in_flight == 3


def test_results_keep_request_order(server, tmp_path):
    server.on("slow", Reply("slow", delay=0.3))
    server.on("fast", Reply("fast"))
    seen = []
    res = make_judge(server, tmp_path, concurrency=4).chat_many(
        [req("slow"), req("fast")], on_result=lambda r: seen.append(r.text)
    )
    assert [r.text for r in res] == ["slow", "fast"]
    assert seen == ["fast", "slow"]  # the callback fires as replies arrive


def test_identical_requests_share_one_call(server, tmp_path):
    server.on("same", Reply("once", delay=0.1))
    res = make_judge(server, tmp_path).chat_many([req("same"), req("same"), req("same")])
    assert [r.text for r in res] == ["once"] * 3 and len(server.requests) == 1


def test_max_cost_stops_cleanly(server, tmp_path):
    server.on("q", Reply("ok", usage=(1000, 0)))
    prices = {"pricey": (1000.0, 0.0)}  # 1 USD per reply
    judge = make_judge(server, tmp_path, model="pricey", prices=prices, max_cost=2.5, concurrency=1)
    res = judge.chat_many([req(f"q{i}") for i in range(6)])
    assert [r.ok for r in res] == [True, True, True, False, False, False]
    assert {r.error_kind for r in res[3:]} == {"max_cost"}
    assert len(server.requests) == 3 and judge.meter.cost_usd == pytest.approx(3.0)
    # The spend is cached: a rerun with a higher budget only pays for the rest.
    judge2 = make_judge(server, tmp_path, model="pricey", prices=prices, max_cost=10, concurrency=1)
    assert all(r.ok for r in judge2.chat_many([req(f"q{i}") for i in range(6)]))
    assert len(server.requests) == 6 and judge2.meter.cost_usd == pytest.approx(3.0)


def test_max_cost_needs_a_price(server):
    with pytest.raises(HalluError, match="--price"):
        make_judge(server, model="some-local-model", max_cost=1.0)


def test_unknown_model_counts_tokens_but_cost_is_unknown(server, tmp_path):
    server.on("x", Reply("ok", model="local-llm", usage=(7, 5)))
    judge = make_judge(server, tmp_path, model="local-llm")
    judge.chat_many([req("x")])
    m = judge.meter.to_dict()
    assert m["prompt_tokens"] == 7 and m["completion_tokens"] == 5
    assert m["cost_usd"] is None and m["unpriced_models"] == ["local-llm"]


def test_sync_facade_works_inside_a_running_loop(server, tmp_path):
    server.on("x", Reply("ok"))
    judge = make_judge(server, tmp_path)

    async def inside():
        return judge.chat_many([req("x")])

    [res] = asyncio.run(inside())
    assert res.ok


def test_endpoint_host_and_price():
    assert endpoint_host("https://user:pw@api.example.com/v1?api-key=s") == "api.example.com"
    assert endpoint_host("http://127.0.0.1:8000/v1") == "127.0.0.1:8000"
    assert parse_price("2.5,10") == (2.5, 10.0)
    with pytest.raises(HalluError):
        parse_price("cheap")
