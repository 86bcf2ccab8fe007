"""The fault proxy itself, in front of the scripted loopback server (fast): what it injects and counts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
from fault_http import FaultServer, Reply, chat_body
from fault_proxy import FAULT_KINDS, STATS_PATH, FaultProxy, split_rate

pytestmark = pytest.mark.timeout(60)


def provider(url: str, **kw: object) -> OpenAIChatProvider:
    opts: dict = {"timeout": 0.5, "late_wait": 3.0, "backoff_initial": 0.01, "backoff_max": 0.02}
    opts.update(kw)
    return OpenAIChatProvider("m", url, **opts)


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_kind_reaches_the_client_as_described(kind: str, fault_server: FaultServer) -> None:
    with FaultProxy(fault_server.base_url, retry_after=0.2, stall=0.8) as fp:
        fp.push(kind)
        p = provider(fp.base_url)
        t0 = time.monotonic()
        assert p.top_logprobs("q", 3).chosen is not None
        elapsed = time.monotonic() - t0
        stats = fp.stats()
    forwarded = kind in ("stall", "truncated", "no_logprobs")
    assert stats["faults"] == {kind: 1}
    assert fault_server.count == stats["paid"] == (2 if kind in ("truncated", "no_logprobs") else 1)
    assert stats["requests"] == (1 if kind == "stall" else 2)
    assert stats["spoiled"] == (1 if kind in ("truncated", "no_logprobs") else 0)
    assert stats["repaid"] == 0 and stats["dropped"] == 0
    assert forwarded or fault_server.count == 1  # 429 and 500 never reach the server
    if kind == "rate_limit":
        assert elapsed >= 0.18
    if kind == "stall":
        assert elapsed >= 0.75


def test_paying_again_for_a_delivered_answer_is_counted_as_repaid(fault_server: FaultServer) -> None:
    with FaultProxy(fault_server.base_url) as fp:
        p = provider(fp.base_url)
        p.top_logprobs("q", 3)
        p.top_logprobs("q", 3)  # no cache: the same request bought twice
        assert fp.stats()["repaid"] == 1 and fp.stats()["unique_paid"] == 1


def test_rates_are_drawn_reproducibly(fault_server: FaultServer) -> None:
    fault_server.default = Reply(body=chat_body())
    seen = []
    for _ in range(2):
        with FaultProxy(
            fault_server.base_url, rates=split_rate(0.5), seed=3, retry_after=0.01, stall=0.01
        ) as fp:
            p = provider(fp.base_url, max_retries=10)
            for i in range(20):
                p.top_logprobs(f"q{i}", 3)
            seen.append(fp.stats()["faults"])
    assert seen[0] == seen[1] and sum(seen[0].values()) >= 8
    with pytest.raises(ValueError):
        FaultProxy(fault_server.base_url, rates={"bogus": 0.1})
    with pytest.raises(ValueError):
        split_rate(1.5)


def test_it_runs_as_a_process_for_benchmarks(fault_server: FaultServer) -> None:
    script = Path(__file__).with_name("fault_proxy.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--upstream", fault_server.base_url, "--rate", "0", "--seed", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        provider(url).top_logprobs("q", 3)
        port = url.split(":")[2].split("/")[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{STATS_PATH}", timeout=5) as r:
            stats = json.loads(r.read())
        assert stats["paid"] == 1 and stats["requests"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and json.loads(err.strip().splitlines()[-1])["paid"] == 1
