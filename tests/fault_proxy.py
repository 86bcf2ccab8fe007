"""A loopback HTTP proxy in front of a real OpenAI-compatible server that injects faults and counts what is paid.

Every POST is either forwarded untouched or hit by one fault, drawn at a configurable rate per kind
(or scripted for the next requests with :meth:`FaultProxy.push`):

=================  ==========================================================  =========
kind               what the client sees                                        paid?
=================  ==========================================================  =========
``rate_limit``     HTTP 429 with ``Retry-After`` (not forwarded)                no
``server_error``   HTTP 500 (not forwarded)                                     no
``stall``          the real answer, held back ``stall`` s (past the timeout)    yes
``truncated``      the real answer cut in half (200, invalid JSON)              yes, spoiled
``no_logprobs``    the real answer with every ``logprobs`` set to null (200)    yes, spoiled
=================  ==========================================================  =========

"Paid" means forwarded to the upstream server, which did the work. ``stats()`` reports requests
received, paid, spoiled (paid but delivered unusable), dropped (a stalled answer whose client had
hung up: paid and lost) and ``repaid`` (paid requests whose exact body had been paid and delivered
usable before: money spent twice). GET requests (``/v1/models``) are forwarded without faults.

``latency=(lo, hi)`` (``--latency LO,HI``) holds every forwarded POST answer for a time drawn
uniformly from [lo, hi] seconds per request before it is sent: a hosted API's network and queueing
delay in front of a local server (``benchmarks/bench_mc_overhead.py``). ``stats()["held_s"]`` sums it.

Used by the test suite (``tests/test_reliability.py``) and, as a separate process, by benchmarks:
``python tests/fault_proxy.py --upstream http://127.0.0.1:8080/v1 --rate 0.2`` prints its base URL
and serves until SIGTERM; ``GET /_fault_proxy/stats`` returns the counters as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import random
import select
import signal
import socket
import sys
import threading
from collections import Counter, deque
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULT_KINDS = ("rate_limit", "server_error", "stall", "truncated", "no_logprobs")
OK = "ok"
STATS_PATH = "/_fault_proxy/stats"


def split_rate(rate: float, kinds: tuple[str, ...] = FAULT_KINDS) -> dict[str, float]:
    """``rate`` (the share of requests hit by any fault) spread evenly over ``kinds``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"fault rate must be in [0, 1], got {rate}")
    return {k: rate / len(kinds) for k in kinds}


class _Server(ThreadingHTTPServer):
    """The proxy's listener: a backlog for many clients connecting at once (the default 5 makes the
    sixth wait a SYN retransmit, about 1 s)."""

    request_queue_size = 128


class FaultProxy:
    """A fault-injecting proxy on 127.0.0.1 forwarding to ``upstream`` (a base URL ending in /v1)."""

    def __init__(
        self,
        upstream: str,
        *,
        rates: Mapping[str, float] | None = None,
        seed: int = 0,
        retry_after: float = 1.0,
        stall: float = 2.0,
        port: int = 0,
        upstream_timeout: float = 600.0,
        latency: tuple[float, float] | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://HOST:PORT/..., got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self._up_host, self._up_port = parts.hostname, parts.port
        self.rates = dict(rates or {})
        unknown = set(self.rates) - set(FAULT_KINDS)
        if unknown or sum(self.rates.values()) > 1.0 + 1e-9 or any(v < 0 for v in self.rates.values()):
            raise ValueError(f"rates must map kinds of {FAULT_KINDS} to shares summing to <= 1, got {rates}")
        self.retry_after = retry_after
        self.stall = stall
        self.upstream_timeout = upstream_timeout
        if latency is not None:
            lo, hi = (float(x) for x in latency)
            if not 0.0 <= lo <= hi:
                raise ValueError(f"latency must be (lo, hi) seconds with 0 <= lo <= hi, got {latency}")
            latency = (lo, hi)
        self.latency = latency
        self._latency_rng = random.Random(seed + 1)
        self.held_s = 0.0
        self._rng = random.Random(seed)
        self._script: deque[str] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.requests = 0
        self.paid = 0
        self.spoiled = 0
        self.dropped = 0
        self.delivered = 0
        self.faults: Counter[str] = Counter()
        self._paid_by_body: Counter[str] = Counter()
        self._usable_bodies: set[str] = set()
        self.repaid = 0
        self._httpd = _Server(("127.0.0.1", port), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    # -- configuration -------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """The proxy's base URL: same path as the upstream's (e.g. .../v1)."""
        return f"http://127.0.0.1:{self.port}{urlsplit(self.upstream).path}"

    def push(self, *kinds: str) -> FaultProxy:
        """Script the next requests' fate (a kind of FAULT_KINDS, or "ok"), in order, before random draws."""
        for k in kinds:
            if k not in FAULT_KINDS and k != OK:
                raise ValueError(f"unknown fault kind {k!r}; choose from {FAULT_KINDS} or 'ok'")
        with self._lock:
            self._script.extend(kinds)
        return self

    def stats(self) -> dict[str, Any]:
        """Counters so far (see the module docstring)."""
        with self._lock:
            return {
                "requests": self.requests,
                "paid": self.paid,
                "spoiled": self.spoiled,
                "dropped": self.dropped,
                "delivered": self.delivered,
                "repaid": self.repaid,
                "unique_paid": len(self._paid_by_body),
                "faults": dict(self.faults),
                "held_s": self.held_s,
            }

    def _hold(self) -> None:
        """Wait the drawn latency of one answer (none without ``latency``)."""
        if self.latency is None:
            return
        with self._lock:
            delay = self._latency_rng.uniform(*self.latency)
            self.held_s += delay
        self._closing.wait(delay)

    def _draw(self) -> str:
        with self._lock:
            if self._script:
                return self._script.popleft()
            x = self._rng.random()
        acc = 0.0
        for kind in FAULT_KINDS:
            acc += self.rates.get(kind, 0.0)
            if x < acc:
                return kind
        return OK

    # -- forwarding ----------------------------------------------------------------------------------
    def _forward(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection(self._up_host, self._up_port, timeout=self.upstream_timeout)
        try:
            keep = {
                k: v for k, v in headers.items() if k.lower() in ("content-type", "authorization", "accept")
            }
            conn.request(method, path, body=body or None, headers=keep)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheader("content-type") or "application/json", data
        finally:
            conn.close()

    @staticmethod
    def _strip_logprobs(data: bytes) -> bytes:
        try:
            obj = json.loads(data)
        except ValueError:
            return data
        for choice in obj.get("choices") or []:
            if isinstance(choice, dict):
                choice["logprobs"] = None
        return json.dumps(obj).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def _reply(
                self, status: int, data: bytes, ctype: str = "application/json", **headers: str
            ) -> bool:
                try:
                    self.send_response(status)
                    self.send_header("content-type", ctype)
                    self.send_header("content-length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k.replace("_", "-"), v)
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                    return True
                except (BrokenPipeError, ConnectionResetError):
                    return False

            def _client_gone(self) -> bool:
                """True when the client has closed its side (it gave up waiting)."""
                sock = self.connection
                try:
                    readable, _, _ = select.select([sock], [], [], 0)
                    return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def do_GET(self) -> None:
                if self.path == STATS_PATH:
                    self._reply(200, json.dumps(proxy.stats()).encode())
                    return
                status, ctype, data = proxy._forward("GET", self.path, b"", dict(self.headers))
                self._reply(status, data, ctype)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                digest = hashlib.sha256(self.path.encode() + b"\0" + body).hexdigest()
                kind = proxy._draw()
                with proxy._lock:
                    proxy.requests += 1
                    if kind != OK:
                        proxy.faults[kind] += 1
                if kind == "rate_limit":
                    err = {"error": {"message": "rate limited by the fault proxy", "type": "rate_limit"}}
                    self._reply(429, json.dumps(err).encode(), retry_after=f"{proxy.retry_after:g}")
                    return
                if kind == "server_error":
                    self._reply(500, json.dumps({"error": {"message": "injected server error"}}).encode())
                    return
                status, ctype, data = proxy._forward("POST", self.path, body, dict(self.headers))
                with proxy._lock:
                    proxy.paid += 1
                    if digest in proxy._usable_bodies:
                        proxy.repaid += 1
                    proxy._paid_by_body[digest] += 1
                usable = status == 200
                if kind == "truncated" and status == 200:
                    data, usable = data[: max(len(data) // 2, 1)], False
                elif kind == "no_logprobs" and status == 200:
                    data, usable = proxy._strip_logprobs(data), False
                proxy._hold()
                if kind == "stall":
                    proxy._closing.wait(proxy.stall)
                    if self._client_gone():
                        with proxy._lock:
                            proxy.dropped += 1
                        return
                if not self._reply(status, data, ctype):
                    with proxy._lock:
                        proxy.dropped += 1
                    return
                with proxy._lock:
                    proxy.delivered += 1
                    if usable:
                        proxy._usable_bodies.add(digest)
                    elif status == 200:
                        proxy.spoiled += 1

        return Handler

    def close(self) -> None:
        """Stop serving (stalled replies are cut short)."""
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """Run a proxy until SIGTERM / Ctrl-C; prints its base URL on the first line of stdout."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--upstream", required=True, help="upstream base URL, e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--rate", type=float, default=0.2, help="share of requests hit by a fault (all kinds)")
    ap.add_argument("--kinds", default=",".join(FAULT_KINDS), help="comma-separated fault kinds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of injected 429s (s)")
    ap.add_argument("--stall", type=float, default=2.0, help="how long a stalled answer is held (s)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", help="hold each answer LO,HI seconds (uniform per request), e.g. 0.3,0.6")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    latency = None
    if args.latency:
        try:
            lo, hi = (float(x) for x in args.latency.split(","))
        except ValueError:
            ap.error(f"--latency must be LO,HI seconds, got {args.latency!r}")
        latency = (lo, hi)
    proxy = FaultProxy(
        args.upstream,
        rates=split_rate(args.rate, kinds),
        seed=args.seed,
        retry_after=args.retry_after,
        stall=args.stall,
        port=args.port,
        latency=latency,
    )
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    print(proxy.base_url, flush=True)
    stop.wait()
    print(json.dumps(proxy.stats()), file=sys.stderr, flush=True)
    proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
