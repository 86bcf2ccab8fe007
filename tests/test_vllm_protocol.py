"""The vLLM adapters' checks against scripted loopback servers (fast: no model, no vLLM).

A server that ignores ``logprob_token_ids`` answers 200 anyway; one without ``/tokenize`` answers
404. Both must end in a CapabilityError naming ``exact``, never in a silently incomplete answer.
Replicas: requests fan out over two real HTTP servers within each one's budget.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from blackbox_proxy.adapters.base import ProviderOptions, create_provider
from blackbox_proxy.adapters.continuation import CapabilityError
from blackbox_proxy.adapters.replicas import ReplicatedProvider, split_base_urls
from blackbox_proxy.adapters.vllm import (
    EXACT,
    VLLMChatProvider,
    VLLMCompletionsProvider,
    require_exact,
    served_model_from_spec,
    server_root,
)
from fault_http import FaultServer, Reply, chat_body

from blackbox_proxy.candidates import match_candidates
from blackbox_proxy.errors import InputError

MSGS = [{"role": "user", "content": "Pick A or B."}]


def tok(*ids: int) -> Reply:
    return Reply(body={"count": len(ids), "max_model_len": 2048, "tokens": list(ids), "token_strs": None})


def exact_chat(sampled: int, pairs: list[tuple[int, float]]) -> Reply:
    top = [(f"token_id:{i}", v) for i, v in pairs]
    chosen = (f"token_id:{sampled}", dict(pairs).get(sampled, -0.1))
    return Reply(body=chat_body(top, chosen))


def provider(srv: FaultServer, **kw: Any) -> VLLMChatProvider:
    return VLLMChatProvider("m", srv.base_url, timeout=5, max_retries=0, variants=("{}", " {}"), **kw)


def test_exact_entries_carry_every_variant_with_its_id(fault_server: FaultServer) -> None:
    # tokenize "A", " A", "B", " B"; then the top-k request; then the exact request
    fault_server.push(tok(49), tok(330), tok(50), tok(389))
    fault_server.push(Reply(body=chat_body([("A", -0.3), ("C", -1.5)])))
    fault_server.push(exact_chat(49, [(49, -0.3), (330, -4.0), (50, -2.0), (389, -6.0)]))
    top = provider(fault_server).top_logprobs(MSGS, 2, candidates=("A", "B"))
    assert top.k == 2 and [e.token for e in top.top_entries()] == ["A", "C"]
    assert {(e.token, e.id) for e in top.entries if e.id is not None} == {
        ("A", 49),
        (" A", 330),
        ("B", 50),
        (" B", 389),
    }
    m = match_candidates(top, ("A", "B"))
    assert m["B"] == pytest.approx(-1.9821, abs=1e-3)  # logsumexp(-2, -6): never missing
    sent = fault_server.requests[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["json"]["logprob_token_ids"] == [49, 330, 50, 389] and sent["json"]["logprobs"] is True
    assert [r["path"] for r in fault_server.requests[:4]] == ["/tokenize"] * 4
    assert fault_server.requests[0]["json"] == {"model": "m", "prompt": "A", "add_special_tokens": False}


def test_a_server_that_ignores_logprob_token_ids_is_a_capability_error(fault_server: FaultServer) -> None:
    fault_server.push(tok(49), tok(330), tok(50), tok(389))
    fault_server.push(Reply(body=chat_body([("A", -0.3), ("B", -1.5)])))  # plain answer, HTTP 200
    p = provider(fault_server, with_top_k=False)
    with pytest.raises(CapabilityError, match="exact"):
        p.top_logprobs(MSGS, 1, candidates=("A", "B"))


def test_a_partial_answer_names_the_lost_ids(fault_server: FaultServer) -> None:
    fault_server.push(tok(49), tok(330), tok(50), tok(389))
    fault_server.push(exact_chat(49, [(49, -0.3), (330, -4.0), (50, -2.0)]))  # 389 dropped
    with pytest.raises(CapabilityError, match=r"389"):
        provider(fault_server, with_top_k=False).top_logprobs(MSGS, 1, candidates=("A", "B"))


def test_no_tokenize_route_is_a_capability_error(fault_server: FaultServer) -> None:
    fault_server.push(Reply(status=404, body={"detail": "Not Found"}))
    with pytest.raises(CapabilityError, match="/tokenize.*exact|exact.*tokenize"):
        provider(fault_server).top_logprobs(MSGS, 1, candidates=("A",))


def test_async_exact_splits_ids_over_requests(fault_server: FaultServer) -> None:
    fault_server.push(tok(49), tok(330), tok(50), tok(389))
    fault_server.push(exact_chat(49, [(49, -0.3), (330, -4.0)]), exact_chat(49, [(50, -2.0), (389, -6.0)]))
    # one request at a time: the scripted replies follow the order the requests arrive in
    p = provider(fault_server, with_top_k=False, max_ids=2, max_concurrency=1)
    top = asyncio.run(p.atop_logprobs(MSGS, 1, candidates=("A", "B")))
    assert top.usage is not None and top.usage.requests == 2
    assert top.chosen is not None and top.chosen.token == "A" and top.chosen.id == 49
    assert sorted(r["json"].get("logprob_token_ids") or [] for r in fault_server.requests[4:]) == [
        [49, 330],
        [50, 389],
    ]


def test_capabilities_merge_and_require_exact() -> None:
    assert {EXACT, "continue"} <= VLLMChatProvider.capabilities
    assert {EXACT, "continue", "continue_ids"} <= VLLMCompletionsProvider.capabilities
    from blackbox_proxy.adapters.openai_completions import OpenAICompletionsProvider

    with pytest.raises(CapabilityError, match="'exact'"):
        require_exact(OpenAICompletionsProvider("m", "http://127.0.0.1:9/v1"))


def test_helpers() -> None:
    assert (
        server_root("http://h:8000/v1") == "http://h:8000"
        and server_root("http://h:8000/v1/") == "http://h:8000"
    )
    assert split_base_urls("http://a/v1, http://b/v1") == ["http://a/v1", "http://b/v1"]
    with pytest.raises(InputError, match="twice"):
        split_base_urls("http://a/v1,http://a/v1")
    assert served_model_from_spec("smollm2-135m-instruct") is None
    m = served_model_from_spec("vllm:expert@http://127.0.0.1:8001/v1")
    assert m is not None and m.model == "expert" and m.base_url == "http://127.0.0.1:8001/v1"
    with pytest.raises(InputError, match="vllm:NAME@"):
        served_model_from_spec("vllm:expert")


def test_replicas_fan_out_within_each_budget() -> None:
    a, b = FaultServer(), FaultServer()
    try:
        for srv in (a, b):
            srv.default = Reply(body=chat_body([("A", -0.2), ("B", -1.9)]), delay=0.2)
        reps = ReplicatedProvider(
            [VLLMChatProvider("m", s.base_url, timeout=5, max_concurrency=2) for s in (a, b)]
        )
        assert reps.max_concurrency == 4 and EXACT in reps.capabilities and reps.kind == "vllm-chatx2"

        async def many() -> list[Any]:
            return await asyncio.gather(*(reps.atop_logprobs(MSGS, 2) for _ in range(8)))

        tops = asyncio.run(many())
        assert all(t.top_entries()[0].token == "A" for t in tops)
        assert a.count == 4 and b.count == 4  # least-loaded first: an even split
        assert a.peak_in_flight <= 2 and b.peak_in_flight <= 2
        assert [s["requests"] for s in reps.stats()] == [4, 4]
        reps.close()
    finally:
        a.close()
        b.close()


def test_registry_comma_separated_urls_make_replicas() -> None:
    import blackbox_proxy.adapters.vllm  # noqa: F401  (registers the vllm providers)

    p = create_provider("vllm", ProviderOptions("m", base_url="http://127.0.0.1:9/v1,http://127.0.0.1:10/v1"))
    assert isinstance(p, ReplicatedProvider) and len(p.replicas) == 2
    assert p.max_concurrency == 2 * ProviderOptions("m").max_concurrency
    with pytest.raises(InputError, match="one model"):
        ReplicatedProvider([VLLMChatProvider("a", "http://x/v1"), VLLMChatProvider("b", "http://y/v1")])


def test_serve_engine_vllm_rejects_a_missing_model_file(tmp_path: Any) -> None:
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).with_name("blackbox-proxy"))
    r = subprocess.run(
        [cli, "serve", str(tmp_path / "nope.gguf"), "--engine", "vllm"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stdout == ""
    r = subprocess.run([cli, "serve", "x", "--engine", "bogus"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_vllm_python_names_the_install_script(monkeypatch: Any, tmp_path: Any) -> None:
    from blackbox_proxy.vllm_server import VLLM_PYTHON_ENV, vllm_python

    monkeypatch.setenv(VLLM_PYTHON_ENV, str(tmp_path / "no-python"))
    with pytest.raises(InputError, match="install_vllm.sh"):
        vllm_python()
