"""Transport and parsing against a real loopback HTTP server that injects faults (no mocks)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time

import pytest
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
from blackbox_proxy.adapters.openai_completions import OpenAICompletionsProvider
from fault_http import FaultServer, Reply, chat_body, completion_body

from blackbox_proxy.errors import (
    FatalProviderError,
    InputError,
    LogprobsUnsupportedError,
    MissingLogprobsError,
    ProviderError,
    RequestRejectedError,
    TransientMissingLogprobsError,
    TransientProviderError,
)
from blackbox_proxy.transport import DUMMY_API_KEY, Transport, resolve_endpoint

SECRET = "sk-test-SECRET-0123456789abcdef"
pytestmark = pytest.mark.timeout(60)


def chat(srv: FaultServer, **kw: object) -> OpenAIChatProvider:
    opts: dict = {
        "api_key": SECRET,
        "timeout": 5.0,
        "max_retries": 3,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
    }
    opts.update(kw)
    return OpenAIChatProvider("fake-model", srv.base_url, **opts)


# -- request shape ----------------------------------------------------------------------------------
def test_chat_request_asks_one_token_greedy_with_top_logprobs(fault_server: FaultServer) -> None:
    top = chat(fault_server).top_logprobs("Which letter?", 3)
    req = fault_server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    body = req["json"]
    assert body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 3
    assert body["messages"] == [{"role": "user", "content": "Which letter?"}]
    assert req["headers"]["authorization"] == f"Bearer {SECRET}"
    assert top.usage is not None and top.usage.prompt_tokens == 11 and not top.usage.cached


def test_completions_request_never_sends_max_tokens_zero(fault_server: FaultServer) -> None:
    fault_server.default = Reply(body=completion_body())
    p = OpenAICompletionsProvider("fake-model", fault_server.base_url, api_key=SECRET)
    p.top_logprobs("Answer:", 2)
    body = fault_server.requests[0]["json"]
    assert fault_server.requests[0]["path"] == "/v1/completions"
    assert body["max_tokens"] == 1 and body["logprobs"] == 2 and body["prompt"] == "Answer:"


# -- parsing without assumptions ----------------------------------------------------------------------
def test_chat_parsing_trusts_no_order_count_or_bytes(fault_server: FaultServer) -> None:
    # unsorted, first entry is not the best, chosen token outside the list, no bytes field
    top_list = [("C", -2.5), ("A", -0.4), ("B", -1.2), ("A", -0.4)]
    fault_server.default = Reply(body=chat_body(top_list, chosen=("Z", -3.1)))
    top = chat(fault_server).top_logprobs("q", 3)
    assert top.chosen is not None and (top.chosen.token, top.chosen.logprob) == ("Z", -3.1)
    assert [e.token for e in top.top_entries()] == ["A", "A", "B"]
    assert top.known() == {"A": -0.4, "B": -1.2, "C": -2.5, "Z": -3.1}
    assert all(e.bytes is None for e in top.entries)


def test_completions_reads_chat_style_content_when_legacy_fields_are_null(fault_server: FaultServer) -> None:
    fault_server.default = Reply(body=completion_body(((" B", -0.1), (" A", -2.0)), chat_style=True))
    top = OpenAICompletionsProvider("m", fault_server.base_url).top_logprobs("Answer:", 2)
    assert top.chosen is not None and top.chosen.token == " B"
    assert {e.token: e.id for e in top.entries} == {" B": 0, " A": 1}
    assert top.entries[0].bytes == tuple(b" B")


def test_completion_that_ends_at_once_names_the_cause(fault_server: FaultServer) -> None:
    # llama-cpp-python's reply when end-of-text is the first token: no position at all
    body = completion_body()
    body["choices"][0].update(
        text="",
        finish_reason="stop",
        logprobs={"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []},
    )
    fault_server.default = Reply(body=body)
    with pytest.raises(MissingLogprobsError, match="ended its output at once"):
        OpenAICompletionsProvider("m", fault_server.base_url).top_logprobs("Answer:", 2)


def test_a_200_without_logprobs_is_retried_like_a_500(fault_server: FaultServer) -> None:
    fault_server.push(Reply(body=chat_body(logprobs_null=True)))
    provider = chat(fault_server)
    top = provider.top_logprobs("q", 3)
    assert top.chosen is not None and top.chosen.token == "A"
    assert fault_server.count == 2  # asked again, the second answer carried them
    assert provider.transport.stats()["spoiled"] == 1


def test_logprobs_missing_through_every_retry_is_transient_once_the_server_gave_them(
    fault_server: FaultServer,
) -> None:
    provider = chat(fault_server, max_retries=2)
    provider.top_logprobs("first", 3)  # the server does return log-probs ...
    fault_server.default = Reply(body=chat_body(logprobs_null=True))  # ... then stops, for a while
    with pytest.raises(TransientMissingLogprobsError, match="returned no log-probs.*3 attempts") as info:
        provider.top_logprobs("q", 3)
    assert isinstance(info.value, MissingLogprobsError) and isinstance(info.value, TransientProviderError)
    assert info.value.reason == "missing-logprobs" and info.value.attempts == 3
    assert fault_server.count == 1 + 3


def test_a_server_that_never_returns_logprobs_is_fatal(fault_server: FaultServer) -> None:
    fault_server.default = Reply(body=chat_body(logprobs_null=True))
    with pytest.raises(LogprobsUnsupportedError, match="never with them.*support log-probs") as info:
        chat(fault_server, max_retries=2).top_logprobs("q", 3)
    assert info.value.reason == "no-logprobs" and fault_server.count == 3
    assert isinstance(info.value, FatalProviderError) and isinstance(info.value, MissingLogprobsError)


def test_positive_or_missing_logprob_values_are_rejected(fault_server: FaultServer) -> None:
    fault_server.default = Reply(body=chat_body((("A", 0.5), ("B", -1.0))))
    with pytest.raises(FatalProviderError, match="positive"):
        chat(fault_server, max_retries=1).top_logprobs("q", 2)
    assert fault_server.count == 2


# -- retries ------------------------------------------------------------------------------------------
def test_429_honours_retry_after_seconds(fault_server: FaultServer) -> None:
    fault_server.push(Reply(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "1"}))
    t0 = time.monotonic()
    top = chat(fault_server).top_logprobs("q", 3)
    elapsed = time.monotonic() - t0
    assert fault_server.count == 2
    assert elapsed >= 0.95, f"Retry-After: 1 was not honoured (retried after {elapsed:.2f} s)"
    assert top.chosen is not None and top.chosen.token == "A"


def test_503_honours_retry_after_ms(fault_server: FaultServer) -> None:
    fault_server.push(Reply(503, {"error": {"message": "busy"}}, headers={"retry-after-ms": "400"}))
    t0 = time.monotonic()
    chat(fault_server).top_logprobs("q", 3)
    assert fault_server.count == 2 and time.monotonic() - t0 >= 0.38


def test_5xx_is_retried_until_success(fault_server: FaultServer) -> None:
    fault_server.push(
        Reply(500, {"error": {"message": "boom"}}), Reply(502, "bad gateway", content_type="text/plain")
    )
    top = chat(fault_server).top_logprobs("q", 3)
    assert fault_server.count == 3 and top.chosen is not None


def test_persistent_5xx_gives_up_with_a_clear_error(fault_server: FaultServer) -> None:
    fault_server.default = Reply(500, {"error": {"message": "llama_decode failed"}})
    with pytest.raises(TransientProviderError) as info:
        chat(fault_server, max_retries=2).top_logprobs("q", 3)
    msg = str(info.value)
    assert fault_server.count == 3
    assert "HTTP 500" in msg and "3 attempts" in msg and "llama_decode failed" in msg
    assert fault_server.base_url in msg and "fake-model" in msg
    assert info.value.status == 500  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("status", "cls", "reason"),
    [
        (400, RequestRejectedError, "rejected"),
        (422, RequestRejectedError, "rejected"),
        (401, FatalProviderError, "auth"),
        (403, FatalProviderError, "auth"),
        (404, FatalProviderError, "not-found"),
    ],
)
def test_other_4xx_are_not_retried_and_are_permanent(
    fault_server: FaultServer, status: int, cls: type, reason: str
) -> None:
    fault_server.default = Reply(status, {"error": {"message": f"nope {status}"}})
    with pytest.raises(cls, match=f"HTTP {status}.*nope {status}") as info:
        chat(fault_server).top_logprobs("q", 3)
    assert fault_server.count == 1
    assert isinstance(info.value, FatalProviderError) and not isinstance(info.value, TransientProviderError)
    assert info.value.reason == reason and info.value.status == status
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert "\n" not in str(info.value)


def test_401_names_the_key_setting_but_never_the_key(
    fault_server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    fault_server.default = Reply(401, {"error": {"message": f"invalid key {SECRET}"}})
    with caplog.at_level(logging.DEBUG), pytest.raises(ProviderError) as info:
        chat(fault_server).top_logprobs("q", 3)
    assert "OPENAI_API_KEY" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in caplog.text
    assert fault_server.count == 1


def test_retry_is_logged_without_the_key(fault_server: FaultServer, caplog: pytest.LogCaptureFixture) -> None:
    fault_server.push(Reply(500, {"error": {"message": f"echoing {SECRET}"}}))
    with caplog.at_level(logging.WARNING, logger="blackbox_proxy.transport"):
        chat(fault_server).top_logprobs("q", 3)
    assert "retrying" in caplog.text and "attempt 1" in caplog.text
    assert SECRET not in caplog.text


def test_hanging_server_is_fatal_within_the_deadline(fault_server: FaultServer) -> None:
    # timeout 0.3 s + 0.3 s waiting for a late answer per attempt; deadline 2 x 0.6 s for the request
    fault_server.default = Reply(body=chat_body(), delay=5.0)
    provider = chat(fault_server, timeout=0.3, max_retries=5)
    t0 = time.monotonic()
    with pytest.raises(FatalProviderError, match=r"has answered nothing for 1 s \(after 2 attempts") as info:
        provider.top_logprobs("q", 3)
    elapsed = time.monotonic() - t0
    assert info.value.reason == "hanging"
    assert fault_server.count == 2  # the deadline, not max_retries, ended it
    assert 1.1 < elapsed < 2.0
    assert provider.transport.stats()["abandoned"] == 2


@pytest.mark.parametrize(
    ("deadline", "expected"),
    [
        (5.0, "timed out after 0.6 s (0.3 s timeout + 0.3 s waiting for a late answer), after 2 attempts"),
        (0.85, "used up its 0.85 s deadline after 2 attempts (the last one had 0.2 s left"),
    ],
)
def test_timeouts_while_the_server_answers_others_are_transient(
    fault_server: FaultServer, deadline: float, expected: str
) -> None:
    fault_server.default = Reply(body=chat_body(), delay=5.0)
    provider = chat(fault_server, timeout=0.3, max_retries=1, deadline=deadline)
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(error=_catch(provider, "slow")))
    th.start()
    time.sleep(0.15)
    fault_server.push(Reply(body=chat_body()))
    assert provider.top_logprobs("fast", 3).chosen is not None  # the server answers this one meanwhile
    th.join()
    err = box["error"]
    assert type(err) is TransientProviderError and err.reason == "timeout"
    assert expected in str(err)


def _catch(provider: OpenAIChatProvider, prompt: str) -> BaseException | None:
    try:
        provider.top_logprobs(prompt, 3)
    except ProviderError as exc:
        return exc
    return None


def test_a_late_answer_is_used_not_bought_twice(fault_server: FaultServer) -> None:
    fault_server.push(Reply(body=chat_body(), delay=0.8))
    provider = chat(fault_server, timeout=0.3, late_wait=1.5)
    assert provider.top_logprobs("q", 3).chosen is not None
    assert fault_server.count == 1  # not re-sent at 0.3 s while the server was still working
    assert provider.transport.stats()["late_answers"] == 1


def test_an_answer_later_than_the_late_wait_is_abandoned_and_asked_once_more(
    fault_server: FaultServer,
) -> None:
    fault_server.push(Reply(body=chat_body(), delay=3.0))
    provider = chat(fault_server, timeout=0.2, late_wait=0.2)
    t0 = time.monotonic()
    assert provider.top_logprobs("q", 3).chosen is not None
    assert fault_server.count == 2 and time.monotonic() - t0 < 1.5
    assert provider.transport.stats() == {"attempts": 2, "late_answers": 0, "abandoned": 1, "spoiled": 0}


def test_the_deadline_bounds_every_attempt_and_wait(fault_server: FaultServer) -> None:
    fault_server.default = Reply(500, {"error": {"message": "down"}})
    provider = chat(fault_server, max_retries=50, backoff_initial=0.2, backoff_max=0.2, deadline=1.0)
    t0 = time.monotonic()
    with pytest.raises(TransientProviderError, match="HTTP 500"):
        provider.top_logprobs("q", 3)
    assert time.monotonic() - t0 < 1.3
    assert 2 <= fault_server.count <= 6


def test_a_retry_after_beyond_the_deadline_gives_up_at_once(fault_server: FaultServer) -> None:
    fault_server.default = Reply(429, {"error": {"message": "later"}}, headers={"Retry-After": "30"})
    t0 = time.monotonic()
    with pytest.raises(TransientProviderError, match="HTTP 429") as info:
        chat(fault_server, deadline=3.0).top_logprobs("q", 3)
    assert time.monotonic() - t0 < 1.0 and fault_server.count == 1
    assert info.value.reason == "rate-limited"


def test_slow_but_in_time_reply_succeeds(fault_server: FaultServer) -> None:
    fault_server.push(Reply(body=chat_body(), delay=0.5))
    assert chat(fault_server, timeout=3.0).top_logprobs("q", 3).chosen is not None
    assert fault_server.count == 1


@pytest.mark.parametrize(
    "reply",
    [
        Reply(body='{"choices": [{"logprobs": '),  # truncated
        Reply(body=""),  # empty 200
        Reply(body="<html>proxy login</html>", content_type="text/html"),  # not JSON
        Reply(body="[1, 2]"),  # JSON, not an object
        Reply(body='{"object": "chat.completion"}'),  # an object without choices
    ],
    ids=["truncated", "empty", "html", "list", "no-choices"],
)
def test_a_malformed_200_is_retried_like_a_500(fault_server: FaultServer, reply: Reply) -> None:
    fault_server.push(reply)
    provider = chat(fault_server)
    assert provider.top_logprobs("q", 3).chosen is not None
    assert fault_server.count == 2 and provider.transport.stats()["spoiled"] == 1


def test_persistent_malformed_bodies_end_in_a_transient_error(fault_server: FaultServer) -> None:
    fault_server.default = Reply(body='{"choices": [{"logprobs": ')
    with pytest.raises(TransientProviderError, match="malformed response after 4 attempts") as info:
        chat(fault_server).top_logprobs("q", 3)
    assert fault_server.count == 4 and info.value.reason == "malformed"
    fault_server.default = Reply(body="<html>proxy login</html>", content_type="text/html")
    with pytest.raises(TransientProviderError, match="malformed response.*not JSON"):
        chat(fault_server).top_logprobs("q", 3)


def test_a_dropped_connection_is_retried(fault_server: FaultServer) -> None:
    fault_server.push(Reply(body=chat_body(), drop=True))
    provider = chat(fault_server)
    assert provider.top_logprobs("q", 3).chosen is not None
    assert fault_server.count == 2


def test_unreachable_server_says_so() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    p = OpenAIChatProvider(
        "m", f"http://127.0.0.1:{port}/v1", max_retries=1, timeout=2.0, backoff_initial=0.01
    )
    with pytest.raises(
        FatalProviderError,
        match=rf"cannot reach server at http://127.0.0.1:{port}/v1 \(ConnectError\).*is it running",
    ) as info:
        p.top_logprobs("q", 3)
    assert p.transport.attempts == 2 and info.value.reason == "unreachable"


def test_async_retries_and_errors_match_sync(fault_server: FaultServer) -> None:
    fault_server.push(Reply(429, {"error": {"message": "x"}}, headers={"Retry-After": "0.2"}))
    provider = chat(fault_server)
    top = asyncio.run(provider.atop_logprobs("q", 3))
    assert fault_server.count == 2 and top.chosen is not None
    fault_server.default = Reply(400, {"error": {"message": "bad k"}})
    with pytest.raises(ProviderError, match="HTTP 400"):
        asyncio.run(provider.atop_logprobs("q", 3))  # a second event loop works too
    assert fault_server.count == 3


# -- concurrency ---------------------------------------------------------------------------------------
def test_async_concurrency_is_capped(fault_server: FaultServer) -> None:
    fault_server.default = Reply(body=chat_body(), delay=0.3)
    provider = chat(fault_server, max_concurrency=2)

    async def run() -> list:
        return await asyncio.gather(*(provider.atop_logprobs(f"q{i}", 3) for i in range(6)))

    t0 = time.monotonic()
    results = asyncio.run(run())
    assert len(results) == 6 and fault_server.count == 6
    assert fault_server.peak_in_flight == 2  # capped, and the cap is used
    assert time.monotonic() - t0 >= 0.85  # 3 waves of 0.3 s


def test_sync_concurrency_is_capped_across_threads(fault_server: FaultServer) -> None:
    fault_server.default = Reply(body=chat_body(), delay=0.2)
    provider = chat(fault_server, max_concurrency=3)
    threads = [threading.Thread(target=provider.top_logprobs, args=(f"q{i}", 3)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fault_server.count == 8 and fault_server.peak_in_flight == 3


# -- input checks (no request is sent) ----------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -1, 21, True, 2.0])
def test_bad_k_is_an_input_error(fault_server: FaultServer, k: object) -> None:
    with pytest.raises(InputError, match="k"):
        chat(fault_server).top_logprobs("q", k)  # type: ignore[arg-type]
    assert fault_server.count == 0


def test_k_limits_per_provider(fault_server: FaultServer) -> None:
    fault_server.default = Reply(body=completion_body())
    comp = OpenAICompletionsProvider("m", fault_server.base_url)
    with pytest.raises(InputError, match="limit of 5"):
        comp.top_logprobs("q", 6)
    fault_server.default = Reply(body=chat_body())
    unlimited = OpenAIChatProvider("m", fault_server.base_url, max_k=None)
    unlimited.top_logprobs("q", 500)
    assert fault_server.requests[-1]["json"]["top_logprobs"] == 500


@pytest.mark.parametrize("prompt", ["", "   ", [], [{"role": "user", "content": ""}], [{"role": "user"}]])
def test_bad_chat_prompt_is_an_input_error(fault_server: FaultServer, prompt: object) -> None:
    with pytest.raises(InputError):
        chat(fault_server).top_logprobs(prompt, 3)  # type: ignore[arg-type]
    assert fault_server.count == 0


def test_messages_to_completions_is_an_input_error(fault_server: FaultServer) -> None:
    comp = OpenAICompletionsProvider("m", fault_server.base_url)
    with pytest.raises(InputError, match="not chat messages"):
        comp.top_logprobs([{"role": "user", "content": "hi"}], 3)
    assert fault_server.count == 0


# -- configuration -------------------------------------------------------------------------------------
def test_arguments_override_environment(monkeypatch: pytest.MonkeyPatch, fault_server: FaultServer) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fault_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-xyz")
    OpenAIChatProvider("m").top_logprobs("q", 2)
    assert fault_server.requests[-1]["headers"]["authorization"] == "Bearer sk-from-env-xyz"
    OpenAIChatProvider("m", api_key="sk-from-arg-abc").top_logprobs("q", 2)
    assert fault_server.requests[-1]["headers"]["authorization"] == "Bearer sk-from-arg-abc"


def test_local_server_gets_a_dummy_key_but_openai_needs_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert resolve_endpoint("http://127.0.0.1:9/v1").api_key == DUMMY_API_KEY
    with pytest.raises(InputError, match="OPENAI_API_KEY"):
        resolve_endpoint()
    with pytest.raises(InputError, match="not an http"):
        resolve_endpoint("localhost:8000")


def test_repr_redacts_the_key(fault_server: FaultServer) -> None:
    provider = chat(fault_server)
    t = Transport(fault_server.base_url, SECRET)
    for obj in (provider, provider.transport, t, resolve_endpoint(fault_server.base_url, SECRET)):
        assert SECRET not in repr(obj) and "***" in repr(obj)


@pytest.mark.parametrize(
    "kw",
    [
        {"timeout": 0},
        {"timeout": -1.0},
        {"timeout": float("nan")},
        {"timeout": float("inf")},
        {"timeout": "10"},
        {"late_wait": float("nan")},
        {"deadline": -5},
        {"max_retries": -1},
        {"max_retries": True},
        {"max_retries": 1.5},
        {"max_concurrency": 0},
        {"backoff_initial": float("nan")},
    ],
)
def test_bad_transport_settings(kw: dict) -> None:
    name = next(iter(kw))
    with pytest.raises(InputError, match=name):
        Transport("http://127.0.0.1:9/v1", **kw)


def test_default_timeouts_bound_a_request() -> None:
    t = Transport("http://127.0.0.1:9/v1")
    assert (t.timeout, t.late_wait, t.deadline) == (30.0, 30.0, 120.0)
    assert t.client.max_retries == 0  # tenacity alone retries
    assert Transport("http://127.0.0.1:9/v1", timeout=10).deadline == 40.0


# -- echo scoring on an OpenAI-layout server (vLLM / OpenAI: entry i scores token i) -------------------
def echo_body(tokens: list[str], values: list[float | None], rows: list[dict | None], generated: str) -> dict:
    """A legacy echo response: prompt tokens then the generated one, with character offsets."""
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    text = "".join(tokens)
    lp = {"tokens": tokens, "token_logprobs": values, "top_logprobs": rows, "text_offset": offsets}
    body = completion_body()
    body["choices"][0].update(text=text, logprobs=lp)
    assert text.endswith(generated)
    return body


def test_score_text_on_an_aligned_echo_layout(fault_server: FaultServer) -> None:
    from blackbox_proxy.adapters.openai_completions import _PROBE_TEXT, ALIGNED

    words = re.findall(r" ?\w+|,", _PROBE_TEXT) + [" eight"]
    assert "".join(words[:-1]) == _PROBE_TEXT
    rows = [None] + [{w: -0.1 * (i + 1), ",": -3.0 - i} for i, w in enumerate(words[1:], start=1)]
    values = [None] + [-0.1 * (i + 1) for i in range(1, len(words))]
    last = len(words) - 2  # the last prompt token; its row is what a plain request on its prefix returns
    plain = completion_body(tuple(rows[last].items()))
    score_tokens = ["The", " capital", " of", " France", " is", " Paris", "."]
    score_values = [None, -6.0, -1.0, -2.0, -0.5, -0.25, -0.75]
    fault_server.push(
        Reply(body=echo_body(words, values, rows, " eight")),
        Reply(body=plain),
        Reply(body=echo_body(score_tokens, score_values, [None] * len(score_tokens), ".")),
    )
    p = OpenAICompletionsProvider("m", fault_server.base_url)
    score = p.score_text("The capital of France is", " Paris")
    assert p.echo_layout() == ALIGNED and score.layout == ALIGNED
    assert [(t.token, t.logprob) for t in score.tokens] == [(" Paris", -0.25)]
    echo_req = fault_server.requests[2]["json"]
    assert echo_req["echo"] is True and echo_req["max_tokens"] == 1
    assert echo_req["prompt"] == "The capital of France is Paris"
    assert fault_server.count == 3  # the layout probe ran once (two requests), then one echo request


def test_score_text_refuses_a_server_that_ignores_echo(fault_server: FaultServer) -> None:
    # llama.cpp's llama-server answers echo requests with the generated token only (chat-style content)
    fault_server.default = Reply(body=completion_body(chat_style=True))
    with pytest.raises(ProviderError, match="does not support echo scoring"):
        OpenAICompletionsProvider("m", fault_server.base_url).score_text("Answer:", " A")
