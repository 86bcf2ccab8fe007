"""Each fault kind of the loopback fault proxy, in front of the real llama.cpp server: retried, paid once.

The proxy (``fault_proxy.py``) forwards to the session's llama.cpp server and counts "paid" requests
(those forwarded upstream). For every kind, the answer must equal the clean one (asked without the
proxy), and the paid count must be one per question plus the bodies the fault itself spoiled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
from fault_proxy import FAULT_KINDS, FaultProxy, split_rate

from blackbox_proxy.types import TopLogprobs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROMPTS = [
    f"Question {i}: which letter comes first in the alphabet, {a} or {b}? Reply with one letter."
    for i, (a, b) in enumerate([("A", "B"), ("C", "D"), ("B", "C"), ("D", "E"), ("E", "F")] * 6)
]
K = 5


def provider_for(url: str, model: str, **kw: Any) -> OpenAIChatProvider:
    opts: dict[str, Any] = {"max_k": None, "timeout": 20.0, "backoff_initial": 0.01, "backoff_max": 0.05}
    opts.update(kw)
    return OpenAIChatProvider(model, url, **opts)


def same_answer(got: TopLogprobs, clean: TopLogprobs) -> bool:
    """Same emitted token and same best entry; llama.cpp's values move by < 0.1 with cache reuse."""
    assert got.chosen is not None and clean.chosen is not None
    g, c = got.top_entries()[0], clean.top_entries()[0]
    return (
        got.chosen.token == clean.chosen.token
        and g.token == c.token
        and abs(got.chosen.logprob - clean.chosen.logprob) < 0.25
    )


@pytest.fixture(scope="module")
def clean(llama_server: Any) -> dict[str, TopLogprobs]:
    """Every prompt's answer straight from the server (no proxy)."""
    p = provider_for(llama_server.base_url, llama_server.model)
    try:
        return {q: p.top_logprobs(q, K) for q in dict.fromkeys(PROMPTS)}
    finally:
        p.close()


@pytest.fixture()
def proxy(llama_server: Any) -> Iterator[FaultProxy]:
    fp = FaultProxy(llama_server.base_url, retry_after=0.3, stall=1.0)
    try:
        yield fp
    finally:
        fp.close()


# what one question costs under one fault: (requests the proxy sees, requests paid upstream, spoiled)
EXPECTED = {
    "rate_limit": (2, 1, 0),
    "server_error": (2, 1, 0),
    "stall": (1, 1, 0),  # the late answer is waited for and used, not bought again
    "truncated": (2, 2, 1),
    "no_logprobs": (2, 2, 1),
}


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_kind_is_retried_and_paid_once(
    kind: str, proxy: FaultProxy, clean: dict[str, TopLogprobs], llama_server: Any
) -> None:
    q = PROMPTS[0]
    provider = provider_for(proxy.base_url, llama_server.model, timeout=0.5, late_wait=3.0)
    proxy.push(kind)
    t0 = time.monotonic()
    top = provider.top_logprobs(q, K)
    elapsed = time.monotonic() - t0
    assert same_answer(top, clean[q])
    stats = proxy.stats()
    requests, paid, spoiled = EXPECTED[kind]
    assert (stats["requests"], stats["paid"], stats["spoiled"]) == (requests, paid, spoiled), stats
    assert stats["faults"] == {kind: 1} and stats["repaid"] == 0 and stats["dropped"] == 0
    assert provider.transport.stats()["spoiled"] == spoiled
    if kind == "rate_limit":
        assert elapsed >= 0.28  # Retry-After: 0.3 honoured
    if kind == "stall":
        assert elapsed >= 0.95 and provider.transport.late_answers == 1


def test_an_answer_later_than_the_late_wait_costs_one_more_request(
    proxy: FaultProxy, clean: dict[str, TopLogprobs], llama_server: Any
) -> None:
    # the documented bound: past timeout + late_wait the attempt is abandoned and asked again
    q = PROMPTS[1]
    provider = provider_for(proxy.base_url, llama_server.model, timeout=0.3, late_wait=0.3)
    proxy.push("stall")
    assert same_answer(provider.top_logprobs(q, K), clean[q])
    deadline = time.monotonic() + 3.0
    while proxy.stats()["dropped"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # the stalled handler notices the hung-up client when its stall ends
    stats = proxy.stats()
    assert (stats["requests"], stats["paid"], stats["dropped"]) == (2, 2, 1), stats
    assert provider.transport.stats()["abandoned"] == 1


def test_a_run_through_30_percent_faults_matches_the_clean_run_and_pays_nothing_twice(
    llama_server: Any, clean: dict[str, TopLogprobs]
) -> None:
    rates = split_rate(0.3)
    with FaultProxy(llama_server.base_url, rates=rates, seed=7, retry_after=0.1, stall=0.6) as fp:
        provider = provider_for(
            fp.base_url, llama_server.model, timeout=0.3, late_wait=3.0, max_concurrency=4, max_retries=8
        )

        async def run() -> list[TopLogprobs]:
            return await asyncio.gather(*(provider.atop_logprobs(q, K) for q in PROMPTS))

        tops = asyncio.run(run())
        stats = fp.stats()
    print(f"\n30% faults, {len(PROMPTS)} questions: proxy {stats}, transport {provider.transport.stats()}")
    assert all(same_answer(t, clean[q]) for t, q in zip(tops, PROMPTS, strict=True))
    assert sum(stats["faults"].values()) >= 5 and len(stats["faults"]) >= 3, stats  # faults really hit
    # paid: one per question plus what the faults spoiled; nothing bought twice, nothing dropped
    assert stats["paid"] == len(PROMPTS) + stats["spoiled"], stats
    assert stats["repaid"] == 0 and stats["dropped"] == 0
    assert provider.transport.stats()["spoiled"] == stats["spoiled"]
