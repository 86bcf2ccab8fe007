"""Ctrl-C / SIGTERM stop ``eval`` gracefully: the base answers in flight are awaited and stored, and
a resume pays no request twice; a second Ctrl-C quits at once; the wait is bounded.

The base is a real loopback HTTP server (``fault_http.FaultServer``) that holds its answers back;
``eval`` runs as a subprocess (base only: no model is loaded) and gets real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fault_http import FaultServer, Reply, chat_body

from blackbox_proxy.evaluation.runner import BASE_FILE, RESULTS_FILE, STOP_GRACE
from blackbox_proxy.files import JsonlStore

pytestmark = pytest.mark.timeout(120)

N = 12
FAST = 4  # answered at once; every later request is held by the server


def _questions(tmp_path: Path) -> Path:
    path = tmp_path / "q.jsonl"
    recs = [
        {"id": f"q{i}", "question": f"Question number {i}?", "choices": ["x", "y", "z"], "answer": i % 3}
        for i in range(N)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def _eval(server: FaultServer, tmp_path: Path, command: str = "eval") -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    what = ["eval", "jsonl", "--data"] if command == "eval" else [command]
    cmd = [
        sys.executable, "-m", "blackbox_proxy.cli", *what, str(_questions(tmp_path)),
        "--base-url", server.base_url, "--model", "m", "--top-logprobs", "3", "--concurrency", "2",
        "--retries", "0", "--timeout", "60", "--out", str(tmp_path / "r.csv"), "-q",
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _asked(server: FaultServer) -> list[str]:
    """The question each request carried (its last user message)."""
    return [r["json"]["messages"][-1]["content"] for r in server.requests]


def _wait_until_held(
    server: FaultServer, proc: subprocess.Popen[str], held: int = 2, seen: int = FAST
) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if server.count >= seen + held and server.in_flight >= held:
            return
        time.sleep(0.02)
    raise AssertionError(f"never held {held} requests: {server.count} seen, {server.in_flight} in flight")


def _stored(tmp_path: Path, name: str) -> dict[str, dict]:
    return JsonlStore(tmp_path / "r.csv.run" / name).load()


def test_ctrl_c_keeps_the_answers_in_flight_and_a_resume_pays_nothing_twice(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    fault_server.push(*[Reply(body=chat_body()) for _ in range(FAST)])
    fault_server.default = Reply(body=chat_body(), delay=1.5)
    proc = _eval(fault_server, tmp_path)
    _wait_until_held(fault_server, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=STOP_GRACE + 20)
    assert proc.returncode == 130, err[-2000:]
    assert time.monotonic() - t0 < STOP_GRACE + 5
    line = [ln for ln in err.splitlines() if "stopped (SIGINT)" in ln]
    assert len(line) == 1 and "kept 2 of the 2 base answers in flight" in line[0], err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "r.csv").exists()
    first = _asked(fault_server)
    assert len(first) == FAST + 2  # nothing started after the signal
    assert len(_stored(tmp_path, BASE_FILE)) == FAST + 2  # every answer received was stored
    assert f"{FAST + 2} base answers stored" in line[0]

    fault_server.default = Reply(body=chat_body())
    fault_server.requests.clear()
    resumed = _eval(fault_server, tmp_path)
    out, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err[-2000:]
    second = _asked(fault_server)
    assert len(second) == N - len(first) and not set(first) & set(second)
    assert len(Counter(first + second)) == N and set(Counter(first + second).values()) == {1}
    assert len(_stored(tmp_path, RESULTS_FILE)) == N
    assert f"base requests sent: {N - len(first)}" in out


def test_the_wait_is_bounded_and_a_second_ctrl_c_quits_at_once(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    fault_server.push(*[Reply(body=chat_body()) for _ in range(FAST)])
    fault_server.default = Reply(body=chat_body(), delay=60)
    # SIGTERM once: the held answers never come; the run gives up after the grace and says so
    proc = _eval(fault_server, tmp_path)
    _wait_until_held(fault_server, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=STOP_GRACE + 20)
    took = time.monotonic() - t0
    assert proc.returncode == 143, err[-2000:]
    assert STOP_GRACE - 0.5 <= took < STOP_GRACE + 5
    assert "kept 0 of the 2 base answers in flight, 2 abandoned after 5.0 s" in err, err[-2000:]
    assert len(_stored(tmp_path, BASE_FILE)) == FAST
    # Ctrl-C twice: out at once, without waiting for the grace
    fault_server.requests.clear()
    proc = _eval(fault_server, tmp_path)
    _wait_until_held(fault_server, proc, held=2, seen=0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and time.monotonic() - t0 < 2.5, err[-2000:]
    assert "SIGINT again: stopped at once" in err
    assert len(_stored(tmp_path, BASE_FILE)) == FAST  # the store is intact


def test_mc_stops_gracefully_too(fault_server: FaultServer, tmp_path: Path) -> None:
    """`mc` runs through the same job: SIGTERM keeps the answers in flight, a re-run resumes."""
    fault_server.push(*[Reply(body=chat_body()) for _ in range(FAST)])
    fault_server.default = Reply(body=chat_body(), delay=1.5)
    proc = _eval(fault_server, tmp_path, "mc")
    _wait_until_held(fault_server, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=STOP_GRACE + 20)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped (SIGTERM): kept 2 of the 2 base answers in flight" in err, err[-2000:]
    first = _asked(fault_server)
    fault_server.default = Reply(body=chat_body())
    fault_server.requests.clear()
    resumed = _eval(fault_server, tmp_path, "mc")
    _, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err[-2000:]
    assert not set(first) & set(_asked(fault_server)) and len(first) + len(_asked(fault_server)) == N
