"""The OpenAI adapters against a real llama.cpp server on loopback (SmolLM2-135M-Instruct, "smollm2").

Ground truth for echo scoring comes from the same GGUF run in-process with full logits.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
from typing import Any

import numpy as np
import pytest
from blackbox_proxy.adapters.base import TopLogprobsProvider
from blackbox_proxy.adapters.llama_cpp_inprocess import LlamaCppTopKProvider
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
from blackbox_proxy.adapters.openai_completions import SHIFTED, OpenAICompletionsProvider

from blackbox_proxy.candidates import match_candidates
from blackbox_proxy.errors import InputError, MissingLogprobsError, ProviderError
from blackbox_proxy.models import gguf_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SMOLLM2 = "smollm2-135m-instruct"
MC_MESSAGES = [
    {
        "role": "user",
        "content": "Which planet is known as the Red Planet?\nA) Venus\nB) Jupiter\nC) Mars\nD) Saturn\nAnswer:",
    }
]
#: llama.cpp's log-probs move by a few hundredths with batch shape and KV-cache reuse
TOL = 0.15


@pytest.fixture(scope="module")
def chat(llama_server: Any) -> OpenAIChatProvider:
    return OpenAIChatProvider(llama_server.model, llama_server.base_url, max_k=None, timeout=60)


@pytest.fixture(scope="module")
def comp(llama_server: Any) -> OpenAICompletionsProvider:
    return OpenAICompletionsProvider(llama_server.model, llama_server.base_url, max_k=None, timeout=60)


@pytest.fixture(scope="module")
def reference_llm() -> Any:
    """The same GGUF in-process with every position's logits kept: the ground truth for scores."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf_path(SMOLLM2)), n_ctx=512, n_threads=2, logits_all=True, verbose=False)


def true_token_logprobs(llm: Any, text: str) -> list[tuple[str, float]]:
    """(token text, log P(token | preceding tokens)) for every token of ``text`` but the first."""
    toks = llm.tokenize(text.encode())
    llm.reset()
    llm.eval(toks)
    logits = np.asarray(llm.scores[: len(toks)], dtype=np.float64)
    logz = logits.max(axis=1) + np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1))
    out = []
    for j in range(1, len(toks)):
        text_j = llm.detokenize([toks[j]], prev_tokens=toks[:j]).decode("utf-8", errors="ignore")
        out.append((text_j, float(logits[j - 1, toks[j]] - logz[j - 1])))
    return out


def plain_generation(llama_server: Any, **kw: Any) -> str:
    """The token the server generates greedily when log-probs are not asked for."""
    import openai

    client = openai.OpenAI(base_url=llama_server.base_url, api_key="none", max_retries=0)
    if "messages" in kw:
        r = client.chat.completions.create(model=llama_server.model, max_tokens=1, temperature=0, **kw)
        return r.choices[0].message.content or ""
    r = client.completions.create(model=llama_server.model, max_tokens=1, temperature=0, **kw)
    return r.choices[0].text


# -- chat -----------------------------------------------------------------------------------------------
def test_chat_top_logprobs_and_chosen_token(chat: OpenAIChatProvider, llama_server: Any) -> None:
    assert isinstance(chat, TopLogprobsProvider)
    top = chat.top_logprobs(MC_MESSAGES, 10)
    assert top.provider == "openai-chat" and top.model == "smollm2" and top.k == 10
    assert 10 <= len(top.entries) <= 11  # llama.cpp appends the chosen token when outside the top 10
    assert all(e.logprob <= 0 for e in top.entries)
    assert top.chosen is not None and top.chosen.token == plain_generation(llama_server, messages=MC_MESSAGES)
    best = top.top_entries()[0]
    assert abs(best.logprob - top.chosen.logprob) < 1e-6  # greedy: the emitted token is the most likely
    assert sum(math.exp(e.logprob) for e in top.top_entries()) <= 1.0 + 1e-6
    assert top.usage is not None and top.usage.prompt_tokens > 10 and top.usage.completion_tokens == 1


def test_chat_string_prompt_equals_one_user_message(chat: OpenAIChatProvider) -> None:
    a = chat.top_logprobs("Name a colour.", 5)
    b = chat.top_logprobs([{"role": "user", "content": "Name a colour."}], 5)
    assert a.chosen is not None and b.chosen is not None and a.chosen.token == b.chosen.token
    assert abs(a.chosen.logprob - b.chosen.logprob) < TOL


def test_chat_async_agrees_with_sync_and_runs_concurrently(chat: OpenAIChatProvider) -> None:
    prompts = ["Say yes or no.", "Pick a number.", "Name a fruit."]
    sync = [chat.top_logprobs(p, 5) for p in prompts]

    async def run() -> list:
        return await asyncio.gather(*(chat.atop_logprobs(p, 5) for p in prompts))

    for s, a in zip(sync, asyncio.run(run()), strict=True):
        assert s.chosen is not None and a.chosen is not None and s.chosen.token == a.chosen.token
        assert abs(s.chosen.logprob - a.chosen.logprob) < TOL


def test_chat_k_limits(llama_server: Any, chat: OpenAIChatProvider) -> None:
    limited = OpenAIChatProvider(llama_server.model, llama_server.base_url)  # OpenAI's limit of 20
    with pytest.raises(InputError, match="limit of 20"):
        limited.top_logprobs("hi", 21)
    assert len(limited.top_logprobs("hi", 20).top_entries()) == 20
    wide = chat.top_logprobs("hi", 60)  # llama.cpp has no limit
    assert len(wide.top_entries()) == 60
    with pytest.raises(InputError):
        chat.top_logprobs("hi", 0)


def test_server_without_logprobs_is_a_clear_error(llama_server: Any) -> None:
    # llama.cpp returns `logprobs: null` when top_logprobs is not given, as a model without log-probs would
    p = OpenAIChatProvider(
        llama_server.model, llama_server.base_url, extra_params={"top_logprobs": None}, max_retries=0
    )
    with pytest.raises(MissingLogprobsError, match="returned no log-probs"):
        p.top_logprobs("hi", 3)


def test_unreachable_server_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = OpenAIChatProvider("smollm2", f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_initial=0.01)
    with pytest.raises(ProviderError, match="cannot reach server.*is it running"):
        p.top_logprobs("hi", 3)


# -- completions -------------------------------------------------------------------------------------------
def test_completions_top_logprobs_and_chosen_token(
    comp: OpenAICompletionsProvider, llama_server: Any
) -> None:
    prompt = "The capital of France is"
    top = comp.top_logprobs(prompt, 5)
    assert top.provider == "openai-completions" and 5 <= len(top.entries) <= 6
    assert top.chosen is not None and top.chosen.token == plain_generation(llama_server, prompt=prompt)
    assert abs(top.top_entries()[0].logprob - top.chosen.logprob) < 1e-6
    atop = asyncio.run(comp.atop_logprobs(prompt, 5))
    assert atop.chosen is not None and atop.chosen.token == top.chosen.token
    with pytest.raises(InputError, match="not chat messages"):
        comp.top_logprobs(MC_MESSAGES, 5)


def test_completions_default_limit_is_openais(llama_server: Any) -> None:
    p = OpenAICompletionsProvider(llama_server.model, llama_server.base_url)
    with pytest.raises(InputError, match="limit of 5"):
        p.top_logprobs("The capital of France is", 6)


# -- echo scoring --------------------------------------------------------------------------------------------
def test_echo_layout_of_smollm2_is_shifted(comp: OpenAICompletionsProvider) -> None:
    # SmolLM2 adds no BOS token: llama-cpp-python's echo entry i then carries the row predicting i+1
    assert comp.echo_layout() == SHIFTED


@pytest.mark.parametrize(
    ("prompt", "continuation"),
    [("The capital of France is", " Paris"), ("One, two, three,", " four, five, six")],
)
def test_score_text_matches_full_logits(
    comp: OpenAICompletionsProvider, reference_llm: Any, prompt: str, continuation: str
) -> None:
    score = comp.score_text(prompt, continuation)
    truth = true_token_logprobs(reference_llm, prompt + continuation)
    expected = truth[len(truth) - len(score.tokens) :]
    assert "".join(t.token for t in score.tokens) == continuation
    assert [t.token for t in score.tokens] == [t for t, _ in expected]
    for got, (_, want) in zip(score.tokens, expected, strict=True):
        assert abs(got.logprob - want) < TOL, (got, want)
    assert abs(score.logprob - sum(v for _, v in expected)) < TOL * len(expected)


def test_score_text_ranks_the_likely_continuation_first(comp: OpenAICompletionsProvider) -> None:
    good, bad = comp.score_many("The capital of France is", [" Paris", " London"])
    assert good.logprob > bad.logprob + 2.0


def test_score_text_says_when_a_shifted_score_cannot_be_recovered(comp: OpenAICompletionsProvider) -> None:
    # on a shifted layout a token's log-prob is only readable from the previous row's top-k
    with pytest.raises(MissingLogprobsError, match="' banana'.*outside the top-1000.*shifted"):
        comp.score_text("The capital of France is", " banana")


def test_score_text_rejects_bad_input(comp: OpenAICompletionsProvider) -> None:
    with pytest.raises(InputError, match="empty continuation"):
        comp.score_text("The capital of France is", "")
    with pytest.raises(InputError, match="empty prompt"):
        comp.score_text("", " Paris")
    with pytest.raises(InputError, match="spans the end of the prompt"):
        comp.score_text("The capital of Fra", "nce is")


# -- the in-process stand-in agrees with the server ----------------------------------------------------------
def test_inprocess_provider_agrees_with_server_on_option_ranking(chat: OpenAIChatProvider) -> None:
    local = LlamaCppTopKProvider(SMOLLM2, n_ctx=512)
    try:
        assert isinstance(local, TopLogprobsProvider) and local.max_k is None
        here = match_candidates(local.top_logprobs(MC_MESSAGES, 40), "ABCD")
        there = match_candidates(chat.top_logprobs(MC_MESSAGES, 40), "ABCD")
        ahere = match_candidates(asyncio.run(local.atop_logprobs(MC_MESSAGES, 40)), "ABCD")
    finally:
        local.close()
    assert all(v is not None for v in [*here.values(), *there.values()]), (here, there)
    for lab in "ABCD":
        assert abs(here[lab] - there[lab]) < TOL and abs(ahere[lab] - here[lab]) < TOL
    compared = 0
    for a, b in itertools.combinations("ABCD", 2):
        if abs(there[a] - there[b]) > TOL:  # a clear order on the server must hold in-process
            compared += 1
            assert (here[a] > here[b]) == (there[a] > there[b]), (a, b, here, there)
    assert compared >= 5
    assert max(here, key=here.get) == max(there, key=there.get)


def test_inprocess_completions_endpoint() -> None:
    local = LlamaCppTopKProvider(SMOLLM2, n_ctx=256, endpoint="completions")
    try:
        top = local.top_logprobs("The capital of France is", 5)
        assert top.provider == "llama-cpp-inprocess" and top.chosen is not None
        assert top.chosen.token.strip() == top.top_entries()[0].token.strip()
        with pytest.raises(InputError, match="not chat messages"):
            local.top_logprobs(MC_MESSAGES, 5)
    finally:
        local.close()
    with pytest.raises(ProviderError, match="closed"):
        local.top_logprobs("The capital of France is", 5)
    with pytest.raises(InputError, match="endpoint"):
        LlamaCppTopKProvider(SMOLLM2, endpoint="embeddings")
