"""A scripted OpenAI-compatible model on 127.0.0.1, for driving the real OpenClaw gateway in tests.

OpenClaw talks to it as a custom provider (``models.providers.<name>`` with
``api: "openai-completions"``): ``POST /v1/chat/completions``, streamed as
server-sent events. It answers from a script, not from a language model:

* A new user turn whose text contains a scripted *marker* is answered with the
  tool calls scripted for that marker (all in one assistant message).
* A turn whose tool calls have all been answered is closed with a plain text
  reply that repeats every tool result word for word, so a test can read what
  the tool (or a plugin's ``blockReason``) said in the reply ``openclaw agent``
  prints.
* Anything else gets ``ok``.
* A prompt holding ``GATE:<name>`` is answered only once the test opens that
  gate (``open_gate``): a sub-agent whose model call waits there stays alive
  for as long as the test needs, with no sleep anywhere.

OpenClaw appends an internal-context user message (``<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>``)
after the user's own message; it is not the user's turn and is skipped when
looking for the prompt. Every request is recorded; ``wait_for`` blocks until one
matches, under a timeout.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

INTERNAL_CONTEXT = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>"
GATE = re.compile(r"GATE:([A-Za-z0-9_-]+)")
GATE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class Request:
    """One chat completion request as OpenClaw sent it, and what it was answered."""

    body: dict[str, Any]
    prompt: str
    tool_results: list[str]
    received_at: float = field(default_factory=time.monotonic)
    answer: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def split_turn(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The user's own prompt of the current turn, and the messages after it (assistant and tool)."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.get("role") != "user":
            continue
        text = text_of(message.get("content"))
        if INTERNAL_CONTEXT in text:
            continue  # OpenClaw's own context, not the user's turn
        rest = [m for m in messages[index + 1 :] if INTERNAL_CONTEXT not in text_of(m.get("content"))]
        return text, rest
    return "", []


class FakeModel:
    """The scripted model; ``with FakeModel() as model:`` serves it on ``model.base_url``."""

    def __init__(self) -> None:
        self._script: list[tuple[str, Callable[[str], list[ToolCall]]]] = []
        self._gates: dict[str, threading.Event] = {}
        self._changed = threading.Condition()
        self.requests: list[Request] = []
        self._server: ThreadingHTTPServer | None = None

    # --- the script ---------------------------------------------------------------------------

    def on(self, marker: str, *calls: ToolCall | Callable[[str], list[ToolCall]]) -> None:
        """A user turn containing ``marker`` is answered with ``calls`` (or what a callable makes of the prompt)."""
        if len(calls) == 1 and callable(calls[0]) and not isinstance(calls[0], ToolCall):
            make = calls[0]
        else:
            fixed = [call for call in calls if isinstance(call, ToolCall)]

            def make(_prompt: str) -> list[ToolCall]:
                return fixed

        with self._changed:
            self._script.append((marker, make))

    def open_gate(self, name: str) -> None:
        self._gate(name).set()

    def _gate(self, name: str) -> threading.Event:
        with self._changed:
            return self._gates.setdefault(name, threading.Event())

    # --- answers ------------------------------------------------------------------------------

    def answer(self, body: dict[str, Any]) -> Request:
        prompt, after = split_turn(body.get("messages", []))
        tool_results = [text_of(m.get("content")) for m in after if m.get("role") == "tool"]
        request = Request(body=body, prompt=prompt, tool_results=tool_results)
        gate = GATE.search(prompt)
        if gate and not after:
            with self._changed:
                self.requests.append(request)
                self._changed.notify_all()
            if not self._gate(gate.group(1)).wait(GATE_TIMEOUT_S):
                raise TimeoutError(f"gate {gate.group(1)} was never opened")
            request.answer = f"gate {gate.group(1)} passed"
            return request
        if any(m.get("role") == "assistant" and m.get("tool_calls") for m in after):
            request.answer = "Tool results: " + " | ".join(tool_results)
        else:
            with self._changed:
                script = list(self._script)
            for marker, make in script:
                if marker in prompt:
                    request.tool_calls = make(prompt)
                    break
            else:
                request.answer = "ok"
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()
        return request

    def wait_for(self, matches: Callable[[Request], bool], timeout_s: float = 60.0, count: int = 1) -> list[Request]:
        """Block until ``count`` recorded requests match; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = [request for request in self.requests if matches(request)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    prompts = [request.prompt[:80] for request in self.requests]
                    raise TimeoutError(f"no {count} matching model request(s) within {timeout_s} s; got {prompts}")
                self._changed.wait(left)

    # --- serving ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeModel:
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._json({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                request = model.answer(body)
                try:
                    if body.get("stream"):
                        self._stream(request)
                    else:
                        self._json(completion(request))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the gateway went away (killed by a test) while its call waited at a gate

            def _json(self, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, request: Request) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("connection", "close")
                self.end_headers()
                for chunk in chunks(request):
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-model", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for gate in list(self._gates.values()):
            gate.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def _tool_call_wire(index: int, call: ToolCall) -> dict[str, Any]:
    return {
        "index": index,
        "id": f"call_{uuid.uuid4().hex[:12]}",
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
    }


def chunks(request: Request) -> Iterator[dict[str, Any]]:
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:8]}", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    if request.tool_calls:
        calls = [_tool_call_wire(index, call) for index, call in enumerate(request.tool_calls)]
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": calls}}]}
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}], "usage": USAGE}
        return
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": request.answer}}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": USAGE}


def completion(request: Request) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": request.answer or None}
    if request.tool_calls:
        message["tool_calls"] = [
            {key: value for key, value in _tool_call_wire(i, call).items() if key != "index"}
            for i, call in enumerate(request.tool_calls)
        ]
    finish = "tool_calls" if request.tool_calls else "stop"
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:8]}",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": USAGE,
    }
