"""A programmable fault-injection HTTP server on loopback, for transport and parsing tests.

Real sockets and HTTP, scripted replies: 429 with Retry-After, 5xx, hanging beyond the client's
timeout, malformed JSON, ``logprobs: null``... It records every request and the peak concurrency.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted HTTP reply: ``body`` is a dict (sent as JSON), str or bytes; ``delay`` in seconds.

    ``drop`` closes the connection without any reply (after ``delay``), like a crashing server.
    """

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    content_type: str = "application/json"
    drop: bool = False


def chat_body(
    top: Sequence[tuple[str, float]] = (("A", -0.2), ("B", -1.9), ("C", -3.0)),
    chosen: tuple[str, float] | None = None,
    *,
    logprobs_null: bool = False,
    extra_entry_fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A Chat Completions response carrying ``top`` as the first token's top_logprobs (order kept)."""
    ch = chosen or max(top, key=lambda t: t[1])
    entries = [{"token": t, "logprob": v, **dict(extra_entry_fields or {})} for t, v in top]
    logprobs = (
        None if logprobs_null else {"content": [{"token": ch[0], "logprob": ch[1], "top_logprobs": entries}]}
    )
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {"role": "assistant", "content": ch[0]},
                "logprobs": logprobs,
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12},
    }


def completion_body(
    top: Sequence[tuple[str, float]] = ((" A", -0.3), (" B", -1.5)),
    chosen: tuple[str, float] | None = None,
    *,
    chat_style: bool = False,
) -> dict[str, Any]:
    """A legacy Completions response; ``chat_style`` mimics llama-server (legacy fields null + content)."""
    ch = chosen or max(top, key=lambda t: t[1])
    if chat_style:
        logprobs: dict[str, Any] = {
            "tokens": None,
            "token_logprobs": None,
            "top_logprobs": None,
            "text_offset": None,
            "content": [
                {
                    "id": 7,
                    "token": ch[0],
                    "logprob": ch[1],
                    "bytes": list(ch[0].encode()),
                    "top_logprobs": [
                        {"id": i, "token": t, "logprob": v, "bytes": list(t.encode())}
                        for i, (t, v) in enumerate(top)
                    ],
                }
            ],
        }
    else:
        logprobs = {
            "tokens": [ch[0]],
            "token_logprobs": [ch[1]],
            "top_logprobs": [dict(top)],
            "text_offset": [0],
        }
    return {
        "id": "cmpl-test",
        "object": "text_completion",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "text": ch[0], "finish_reason": "length", "logprobs": logprobs}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }


class FaultServer:
    """A loopback HTTP server answering POSTs from a script of :class:`Reply` (then ``default``)."""

    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.default = Reply(body=chat_body())
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def count(self) -> int:
        """Number of requests received so far."""
        with self._lock:
            return len(self.requests)

    def push(self, *replies: Reply) -> FaultServer:
        """Queue replies for the next requests, in order."""
        self.script.extend(replies)
        return self

    def _next(self) -> Reply:
        with self._lock:
            return self.script.popleft() if self.script else self.default

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr log
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                with server._lock:
                    server.requests.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "json": json.loads(raw or b"{}"),
                        }
                    )
                    server.in_flight += 1
                    server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
                try:
                    reply = server._next()
                    if reply.delay:
                        server._closing.wait(reply.delay)
                    if reply.drop:
                        self.close_connection = True
                        return
                    body = reply.body
                    data = (
                        json.dumps(body).encode()
                        if isinstance(body, (dict, list))
                        else body.encode()
                        if isinstance(body, str)
                        else (body or b"")
                    )
                    self.send_response(reply.status)
                    self.send_header("content-type", reply.content_type)
                    self.send_header("content-length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): that is the point of a hanging reply
                finally:
                    with server._lock:
                        server.in_flight -= 1

        return Handler

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
