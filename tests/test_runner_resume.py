"""Kill an evaluation run mid-way, resume it, and check the server saw no request twice.

A loopback HTTP proxy stands in front of the real llama.cpp server and records every request it
forwards. For the interrupted run it holds back (never forwards) the request after the Nth, so the
CLI is SIGKILLed while waiting on a request the server never received; the resumed run must then
send exactly the remaining requests, none twice, and produce the same table as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest

from blackbox_proxy.evaluation.runner import BASE_FILE, RESULTS_FILE
from blackbox_proxy.files import JsonlStore

N_QUESTIONS = 8
HOLD_AFTER = 5  # the interrupted run gets 5 requests through, the 6th is held until the kill
EXPERT, ANTI = "smollm2-135m-instruct", "gemma-3-270m"


class CountingProxy:
    """Loopback HTTP proxy that forwards to ``upstream`` and records each forwarded request body."""

    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.host, self.port = u.hostname, u.port
        self.forwarded: list[str] = []
        self.held = 0
        self.hold_after: int | None = None
        self.release = threading.Event()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    hold = proxy.hold_after is not None and len(proxy.forwarded) >= proxy.hold_after
                    if hold:
                        proxy.held += 1
                    elif self.command == "POST":
                        proxy.forwarded.append(hashlib.sha256(self.path.encode() + body).hexdigest())
                if hold:  # never reaches the server; the client is killed while waiting
                    proxy.release.wait(120)
                    with contextlib.suppress(OSError):  # the client is gone by now
                        self.send_error(503)
                    return
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_POST = _relay
            do_GET = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def reset(self, hold_after: int | None = None) -> None:
        with self.lock:
            self.forwarded.clear()
            self.held = 0
            self.hold_after = hold_after

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def proxy(llama_server):
    p = CountingProxy(llama_server.base_url)
    yield p
    p.close()


def _cmd(proxy: CountingProxy, model: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "blackbox_proxy.cli", "eval", "realtimeqa",
        "--weeks", "2025-01..2025-06", "--limit", str(N_QUESTIONS),
        "--base-url", proxy.base_url, "--model", model,
        "--expert", EXPERT, "--anti-expert", ANTI, "--sweep", "0.5,1,2",
        "--top-logprobs", "10", "--concurrency", "2", "--chunk-size", "2",
        "--out", str(out), "--quiet",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OPENAI_BASE_URL", None)
    env["OPENAI_API_KEY"] = "sk-test-not-a-secret"
    return env


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _compare(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    assert list(a["id"]) == list(b["id"])
    exact = [
        c
        for c in a.columns
        if "letter" in c or "correct" in c or c in ("gold_letter", "n_missing", "missing")
    ]
    pd.testing.assert_frame_equal(a[exact], b[exact])
    for col in [c for c in a.columns if c.startswith(("base_lp_", "expert_lp_", "anti_lp_"))]:
        for x, y in zip(a[col], b[col], strict=True):
            assert (x != x) == (y != y)  # missing (NaN) in both or in neither
            if x == x:
                assert x == pytest.approx(y, abs=1e-4)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_kill_and_resume_repeats_no_request(proxy: CountingProxy, llama_server, tmp_path: Path) -> None:
    model = llama_server.model
    # 1. an uninterrupted reference run
    proxy.reset()
    ref_out = tmp_path / "ref.csv"
    r = subprocess.run(_cmd(proxy, model, ref_out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(proxy.forwarded) == N_QUESTIONS and len(set(proxy.forwarded)) == N_QUESTIONS
    reference = pd.read_csv(ref_out)
    assert len(reference) == N_QUESTIONS
    reference_bodies = set(proxy.forwarded)

    # 2. the same command, killed while waiting on the 6th request (held by the proxy)
    proxy.reset(hold_after=HOLD_AFTER)
    out = tmp_path / "resumed.csv"
    run_dir = Path(str(out) + ".run")
    proc = subprocess.Popen(
        _cmd(proxy, model, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300

    # every answered question's row is stored as soon as its pair scores are in (chunks of 2), so
    # HOLD_AFTER rows are done and the next request waits at the proxy: nothing is in flight at the
    # server when the kill comes
    def settled() -> bool:
        return (
            proxy.held >= 1
            and _lines(run_dir / RESULTS_FILE) >= HOLD_AFTER
            and _lines(run_dir / BASE_FILE) >= HOLD_AFTER
        )

    while time.monotonic() < deadline and not settled():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    assert settled(), "the run never reached the held request"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    first_bodies = list(proxy.forwarded)
    assert len(first_bodies) == HOLD_AFTER
    done_before = JsonlStore(run_dir / RESULTS_FILE).load()
    base_before = JsonlStore(run_dir / BASE_FILE).load()
    assert len(done_before) == HOLD_AFTER and len(base_before) == HOLD_AFTER
    assert not out.exists(), "a killed run must not have written its final table"

    # 3. restart: only the remaining questions are requested, none twice
    proxy.reset()
    r = subprocess.run(_cmd(proxy, model, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    second_bodies = list(proxy.forwarded)
    all_bodies = first_bodies + second_bodies
    dupes = [h for h, c in Counter(all_bodies).items() if c > 1]
    assert not dupes, f"{len(dupes)} requests reached the server twice"
    assert len(second_bodies) == N_QUESTIONS - HOLD_AFTER
    assert set(all_bodies) == reference_bodies  # the same requests as the uninterrupted run
    assert f"base requests sent: {N_QUESTIONS - HOLD_AFTER}" in r.stdout
    assert "mcnemar_p_vs_control" in r.stdout  # the printed summary pairs the proxy with its control

    # no lost or duplicated rows; the earlier rows survived byte for byte
    lines = (run_dir / RESULTS_FILE).read_text().splitlines()
    ids = [json.loads(x)["id"] for x in lines]
    assert len(ids) == N_QUESTIONS == len(set(ids))
    for qid, rec in done_before.items():
        assert json.loads(lines[ids.index(qid)]) == rec
    resumed = pd.read_csv(out)
    _compare(resumed, reference)

    # 4. a third run of the finished command sends nothing and reproduces the table
    proxy.reset()
    r = subprocess.run(_cmd(proxy, model, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert proxy.forwarded == []
    pd.testing.assert_frame_equal(pd.read_csv(out), resumed)
    # the key never reaches the run directory
    for f in run_dir.iterdir():
        assert "sk-test-not-a-secret" not in f.read_text()


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    store = JsonlStore(tmp_path / "r.jsonl")
    store.append({"id": "a", "x": 1})
    store.append({"id": "b", "x": 2})
    with (tmp_path / "r.jsonl").open("a") as fh:
        fh.write('{"id": "c", "x"')  # a write cut by a kill
    assert list(store.load()) == ["a", "b"]
    store.append({"id": "c", "x": 3})
    assert store.load() == {"a": {"id": "a", "x": 1}, "b": {"id": "b", "x": 2}, "c": {"id": "c", "x": 3}}


def test_changed_settings_refused(tmp_path: Path) -> None:
    from blackbox_proxy.errors import InputError
    from blackbox_proxy.evaluation.runner import EvaluationRunner

    class Stub:  # only its identity is read before any request
        model, kind, max_k, endpoint, max_concurrency = "m1", "stub", None, "chat", 1

    EvaluationRunner(Stub(), k=5, run_dir=tmp_path, progress=False)._open_stores()
    with pytest.raises(InputError, match="k: 5 -> 7"):
        EvaluationRunner(Stub(), k=7, run_dir=tmp_path, progress=False)._open_stores()
