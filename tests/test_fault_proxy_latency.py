"""The fault proxy's hosted-latency option, in front of the scripted loopback server (fast)."""

from __future__ import annotations

import asyncio
import time

import pytest
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
from fault_http import FaultServer
from fault_proxy import FaultProxy

pytestmark = pytest.mark.timeout(60)


def test_each_answer_is_held_within_the_range_and_requests_overlap(fault_server: FaultServer) -> None:
    n, lo, hi = 8, 0.3, 0.5
    with FaultProxy(fault_server.base_url, latency=(lo, hi), seed=3) as fp:
        p = OpenAIChatProvider("m", fp.base_url, timeout=5.0, max_concurrency=n)

        async def one() -> float:
            t = time.perf_counter()
            await p.atop_logprobs("q", 3)
            return time.perf_counter() - t

        async def many() -> list[float]:
            return list(await asyncio.gather(*(one() for _ in range(n))))

        t0 = time.perf_counter()
        each = asyncio.run(many())
        wall = time.perf_counter() - t0
        stats = fp.stats()
    assert stats["paid"] == stats["delivered"] == n and stats["faults"] == {}
    assert n * lo <= stats["held_s"] <= n * hi
    assert min(each) >= lo
    assert wall < n * lo  # held concurrently, as a hosted API answers several requests at once
    assert len({round(t, 2) for t in each}) > 1  # drawn per request


def test_no_latency_by_default_and_bad_ranges_refused(fault_server: FaultServer) -> None:
    with FaultProxy(fault_server.base_url) as fp:
        t = time.perf_counter()
        OpenAIChatProvider("m", fp.base_url, timeout=5.0).top_logprobs("q", 3)
        assert time.perf_counter() - t < 0.3
        assert fp.stats()["held_s"] == 0.0
    for bad in ((0.6, 0.3), (-0.1, 0.2)):
        with pytest.raises(ValueError, match="latency"):
            FaultProxy(fault_server.base_url, latency=bad)
