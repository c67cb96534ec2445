"""A real HTTP server on loopback that speaks enough of the chat-completions protocol for tests.

It runs ``http.server`` in a daemon thread on ``127.0.0.1`` with an OS-chosen port, so the client under
test goes through its whole stack (the ``openai`` package, its HTTP client, sockets). Replies are
chosen by rules: the first rule whose matcher accepts the request (a substring of the last message,
or a predicate on the parsed body) answers with its next scripted action. Actions can be a normal
reply, an HTTP error status with headers (429 + Retry-After, 500 ...), a slow reply (to trigger client
timeouts), or a raw body (malformed JSON). Every request is recorded with its arrival time, headers
and body, and the server tracks how many requests were in flight at once.

Usage::

    with FakeOpenAIServer() as server:
        server.on("dog", Status(429, {"Retry-After": "1"}), Reply("Judgement:\\n1. correct: ok"))
        client = ...(base_url=server.base_url)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """A 200 chat completion whose single choice holds ``text``."""

    text: str
    model: str | None = None  # reported model id; defaults to the requested one + "-0613"
    delay: float = 0.0
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens); default: word counts


@dataclass
class Status:
    """An HTTP error with an OpenAI-style error body."""

    code: int
    headers: dict[str, str] = field(default_factory=dict)
    message: str = "injected error"
    delay: float = 0.0


@dataclass
class Raw:
    """Exactly these bytes as the body (e.g. malformed JSON) with the given status."""

    body: bytes
    code: int = 200
    content_type: str = "application/json"
    delay: float = 0.0


Action = Reply | Status | Raw


@dataclass
class RecordedRequest:
    time: float  # time.monotonic() when the request body had been read
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw text when it was not JSON

    @property
    def prompt(self) -> str:
        """The last message's text (the text parts joined, when its content is a list of parts)."""
        try:
            content = self.body["messages"][-1]["content"]
        except (TypeError, KeyError, IndexError):
            return ""
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return content if isinstance(content, str) else ""


class _Rule:
    def __init__(self, match, actions: list[Action], repeat_last: bool):
        self.match = match
        self.actions = list(actions)
        self.repeat_last = repeat_last
        self.used = 0

    def accepts(self, req: RecordedRequest) -> bool:
        if self.used >= len(self.actions) and not self.repeat_last:
            return False
        if callable(self.match):
            return bool(self.match(req))
        return self.match in req.prompt

    def next_action(self) -> Action:
        action = self.actions[min(self.used, len(self.actions) - 1)]
        self.used += 1
        return action


class FakeOpenAIServer:
    """Loopback chat-completions server with scripted replies and fault injection."""

    def __init__(self) -> None:
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._seen: dict[str, int] = {}  # request body -> how many times it arrived (see respond)
        self._thread: threading.Thread | None = None

    # -- scripting -------------------------------------------------------------------------------

    def on(
        self, match: str | Callable[[RecordedRequest], bool], *actions: Action, repeat_last: bool = True
    ) -> FakeOpenAIServer:
        """Answer requests matching ``match`` with ``actions`` in turn (the last one repeats)."""
        if not actions:
            raise ValueError("give at least one action")
        with self._lock:
            self._rules.append(_Rule(match, list(actions), repeat_last))
        return self

    def respond(self, fn: Callable[[RecordedRequest, int], Action]) -> FakeOpenAIServer:
        """Answer every request not matched by an earlier rule with ``fn(request, seen)``, where ``seen``
        counts the earlier requests with the same body: a test can fail a request's first try and
        answer its retry, whatever order concurrent requests arrive in."""
        with self._lock:
            self._rules.append(_Rule(lambda req: True, [fn], repeat_last=True))
        return self

    def reset(self) -> None:
        with self._lock:
            self._rules.clear()
            self.requests.clear()
            self._seen.clear()
            self.max_in_flight = 0

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                server._handle(self)

            def do_GET(self):
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes handlers sleeping in a slow reply
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling ------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        req = RecordedRequest(time.monotonic(), h.path, dict(h.headers.items()), body)
        with self._lock:
            self.requests.append(req)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            rule = next((r for r in self._rules if r.accepts(req)), None)
            action = rule.next_action() if rule is not None else None
            body_key = json.dumps(body, sort_keys=True) if not isinstance(body, str) else body
            seen = self._seen.get(body_key, 0)
            self._seen[body_key] = seen + 1
        if callable(action):
            action = action(req, seen)
        try:
            if action is None:
                err = {"error": {"message": "fake server: no rule matches", "type": "test"}}
                self._send_json(h, 400, err)
                return
            if action.delay and self._stop.wait(action.delay):
                return
            if isinstance(action, Reply):
                self._send_json(h, 200, self._completion(req, action))
            elif isinstance(action, Status):
                err = {"error": {"message": action.message, "type": "injected", "code": str(action.code)}}
                self._send_json(h, action.code, err, action.headers)
            else:
                self._send(h, action.code, action.body, action.content_type)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before we answered
        finally:
            with self._lock:
                self.in_flight -= 1

    @staticmethod
    def _completion(req: RecordedRequest, action: Reply) -> dict:
        requested = req.body.get("model", "unknown") if isinstance(req.body, dict) else "unknown"
        usage = action.usage or (len(req.prompt.split()), len(action.text.split()))
        return {
            "id": f"chatcmpl-test-{len(req.prompt)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": action.model or f"{requested}-0613",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": action.text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": usage[0],
                "completion_tokens": usage[1],
                "total_tokens": usage[0] + usage[1],
            },
        }

    def _send_json(self, h, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(h, code, json.dumps(obj).encode(), "application/json", headers)

    @staticmethod
    def _send(h, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
