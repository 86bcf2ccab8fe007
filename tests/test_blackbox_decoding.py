"""Open-ended black-box proxy-tuned generation (blackbox_decoding) and the ``continue`` capability.

Unit tests of the sampling maths and of the providers' refusals need no model; fault tests talk
HTTP to the loopback fault server; integration tests run the real llama.cpp server (SmolLM2,
"smollm2") and the same GGUF in-process, with a SmolLM2 pair that really changes tokens (the
expert reads the prompt in its chat template, the anti-expert as plain text).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import openai
import pytest
from blackbox_proxy.adapters.continuation import CapabilityError, check_block_size
from blackbox_proxy.adapters.llama_cpp_inprocess import LlamaCppTopKProvider
from blackbox_proxy.adapters.llama_cpp_server import LlamaCppServerProvider
from blackbox_proxy.adapters.openai_chat import ContinueChatProvider, OpenAIChatProvider
from blackbox_proxy.adapters.openai_completions import OpenAICompletionsProvider
from fault_http import FaultServer, Reply

from blackbox_proxy.blackbox_decoding import (
    BlackBoxProxyGenerator,
    speculative_sample,
    steered_distribution,
)
from blackbox_proxy.errors import InputError, MissingLogprobsError, ProviderError
from blackbox_proxy.sampling import GenerationConfig

SMOLLM2 = "smollm2-135m-instruct"
#: llama-cpp-python's server applies repeat_penalty=1.1 by default, so its "greedy" token is not the
#: top of its own log-probs; plain greedy needs the penalty off
NO_PENALTY = {"extra_body": {"repeat_penalty": 1.0}}
PROMPTS = [
    "The three most important inventions of the nineteenth century were",
    "Once upon a time, a dragon who loved to bake bread",
    "def fibonacci(n):",
]


# ----------------------------------------------------------------------------- unit: the maths


def test_speculative_rejection_sampling_is_exact_in_distribution() -> None:
    probs = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}
    rng = random.Random(0)
    n = 40_000
    for draft in ("a", "c", "d"):
        counts = Counter(speculative_sample(probs, draft, rng) for _ in range(n))
        chi2 = sum((counts[c] - n * p) ** 2 / (n * p) for c, p in probs.items())
        assert chi2 < 16.3, (draft, counts)  # chi-square, 3 d.o.f., p = 0.001
    # a draft the target rules out is never emitted
    assert all(speculative_sample({"a": 0.6, "b": 0.4, "x": 0.0}, "x", rng) != "x" for _ in range(500))


def test_steered_distribution_applies_temperature_top_k_and_top_p_on_candidates() -> None:
    scores = {"a": 0.0, "b": -1.0, "c": -2.0}
    p = steered_distribution(scores, GenerationConfig(temperature=1.0))
    assert p["a"] / p["b"] == pytest.approx(2.718281828, rel=1e-9) and sum(p.values()) == pytest.approx(1.0)
    assert set(steered_distribution(scores, GenerationConfig(temperature=1.0, top_k=2))) == {"a", "b"}
    assert set(steered_distribution(scores, GenerationConfig(temperature=1.0, top_p=0.5))) == {"a"}
    hot = steered_distribution(scores, GenerationConfig(temperature=2.0))
    assert hot["a"] / hot["b"] == pytest.approx(2.718281828**0.5, rel=1e-9)


def test_block_size_zero_is_refused_never_sent() -> None:
    with pytest.raises(InputError, match=">= 1"):
        check_block_size(0, "x")


def test_plain_openai_chat_cannot_continue_and_names_what_to_use() -> None:
    chat = OpenAIChatProvider("gpt-4o-mini", "http://127.0.0.1:9/v1")
    with pytest.raises(CapabilityError, match="Completions endpoint.*continue_final_message"):
        chat.continue_prefix("Once upon", 4, 5, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(CapabilityError, match="lacks the 'continue' capability.*Completions"):
        BlackBoxProxyGenerator(chat)
    with pytest.raises(CapabilityError, match="Completions endpoint"):
        ContinueChatProvider("gpt-4o-mini", "https://api.openai.com/v1", api_key="sk-x")


# ----------------------------------------------------------------------------- faults (loopback)


def block_body(tokens: Sequence[str], finish: str = "length", *, logprobs: bool = True) -> dict[str, Any]:
    """A legacy Completions answer with one position per token (each the top of its own row)."""
    lp: Any = None
    if logprobs:
        lp = {
            "tokens": list(tokens),
            "token_logprobs": [-0.1] * len(tokens),
            "top_logprobs": [{t: -0.1, " else": -2.5, " other": -3.0} for t in tokens],
            "text_offset": [0] * len(tokens),
        }
    return {
        "id": "cmpl",
        "object": "text_completion",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "text": "".join(tokens), "finish_reason": finish, "logprobs": lp}],
        "usage": {"prompt_tokens": 5, "completion_tokens": len(tokens), "total_tokens": 5 + len(tokens)},
    }


def fault_provider(srv: FaultServer, retries: int = 3) -> OpenAICompletionsProvider:
    return OpenAICompletionsProvider(
        "fake",
        srv.base_url,
        max_k=None,
        timeout=5.0,
        max_retries=retries,
        backoff_initial=0.01,
        backoff_max=0.02,
    )


def prompts_sent(srv: FaultServer) -> list[str]:
    return [r["json"]["prompt"] for r in srv.requests]


def test_a_block_cut_short_continues_from_what_arrived(fault_server: FaultServer) -> None:
    fault_server.push(
        Reply(body=block_body([" one", " two", " three"])),  # 4 asked, 3 came, finish_reason "length"
        Reply(body=block_body([" four", " five"], finish="stop")),
    )
    gen = BlackBoxProxyGenerator(fault_provider(fault_server), top_logprobs=3, block_size=4)
    out = gen.generate("Count:", max_new_tokens=10)
    assert out.text == " one two three four five" and out.finish_reason == "eos"
    assert prompts_sent(fault_server) == ["Count:", "Count: one two three"]
    assert [r["json"]["max_tokens"] for r in fault_server.requests] == [4, 6]
    assert out.accounting.api_calls == 2 and out.accounting.tokens_received == 5


def test_a_text_only_server_is_asked_how_it_tokenises_and_a_block_is_cut_where_it_reads_otherwise(
    fault_server: FaultServer,
) -> None:
    """llama-cpp-server: " a" + "b" read back as one token cuts the block before the position that
    follows them; the next request re-sends the text from there. No /extras/tokenize: a clear error."""
    fault_server.push(
        Reply(body=block_body([" a", "b", " c"])),
        Reply(body={"tokens": [7, 8]}),  # "Say:"
        Reply(body={"tokens": [7, 8, 9]}),  # "Say: a": one token more, as generated
        Reply(body={"tokens": [7, 8, 10]}),  # "Say: ab": " a" and "b" merge into one token
        Reply(body=block_body([" c", " d"])),
        Reply(body={"tokens": [7, 8, 10, 11]}),  # "Say: ab c"
    )
    provider = LlamaCppServerProvider("fake", fault_server.base_url, timeout=5.0, max_retries=0)
    out = BlackBoxProxyGenerator(provider, top_logprobs=3, block_size=3).generate("Say:", max_new_tokens=4)
    assert out.text == " ab c d" and out.accounting.retokenization_cuts == (2,)
    assert prompts_sent_any(fault_server) == ["Say:", "Say:", "Say: a", "Say: ab", "Say: ab", "Say: ab c"]
    assert [r["path"] for r in fault_server.requests][1] == "/extras/tokenize"
    assert out.accounting.tokenize_requests == 4 and out.accounting.api_calls == 2
    assert fault_server.requests[0]["json"]["repeat_penalty"] == 1.0  # plain greedy on this server
    fault_server.push(Reply(body=block_body([" a", "b"])), Reply(status=404, body={"detail": "Not Found"}))
    with pytest.raises(CapabilityError, match="/extras/tokenize"):
        BlackBoxProxyGenerator(provider, top_logprobs=3, block_size=2).generate("Hi:", max_new_tokens=4)


def prompts_sent_any(srv: FaultServer) -> list[str]:
    """The prompt of every request: Completions' ``prompt``, tokenize's ``input``."""
    return [r["json"].get("prompt", r["json"].get("input")) for r in srv.requests]


@pytest.mark.parametrize(
    "fault", [Reply(status=500, body={"error": "boom"}), Reply(status=429, headers={"retry-after": "0"})]
)
def test_a_fault_mid_generation_is_retried_without_buying_a_block_twice(
    fault_server: FaultServer, fault: Reply
) -> None:
    fault_server.push(
        Reply(body=block_body([" a", " b"])),
        fault,
        Reply(body=block_body([" c", " d", " e", " f"])),
    )
    gen = BlackBoxProxyGenerator(fault_provider(fault_server), top_logprobs=3, block_size=2)
    out = gen.generate("X:", max_new_tokens=6)
    assert out.text == " a b c d e f" and out.finish_reason == "length"
    sent = [r["json"] for r in fault_server.requests]
    assert len(sent) == 3 and sent[1] == sent[2]  # the failed request asked again, the first block never
    assert prompts_sent(fault_server) == ["X:", "X: a b", "X: a b"]
    assert out.accounting.api_calls == 2


def test_a_response_without_logprobs_is_asked_again_then_fails_clearly_with_the_partial_text(
    fault_server: FaultServer,
) -> None:
    fault_server.push(Reply(body=block_body([" a", " b"])))
    fault_server.default = Reply(body=block_body([" c"], logprobs=False))
    gen = BlackBoxProxyGenerator(fault_provider(fault_server, retries=2), top_logprobs=3, block_size=2)
    with pytest.raises(MissingLogprobsError, match="no per-token log-probs|no log-probs") as info:
        gen.generate("X:", max_new_tokens=6)
    partial = info.value.partial  # type: ignore[attr-defined]
    assert partial.text == " a b" and partial.accounting.api_calls == 1
    assert prompts_sent(fault_server) == ["X:"] + ["X: a b"] * 3  # first block bought once


def test_a_block_longer_than_asked_is_an_error(fault_server: FaultServer) -> None:
    fault_server.default = Reply(body=block_body([" a", " b", " c"]))
    with pytest.raises(ProviderError, match="3 tokens where 2"):
        fault_provider(fault_server, retries=0).continue_prefix("X:", 2, 3)


# ----------------------------------------------------------------------------- the real server


pytest_integration = pytest.mark.integration


@pytest.fixture(scope="module")
def comp(llama_server: Any) -> OpenAICompletionsProvider:
    return OpenAICompletionsProvider(
        llama_server.model, llama_server.base_url, max_k=None, timeout=60, extra_params=NO_PENALTY
    )


@pytest.fixture(scope="module")
def served(llama_server: Any) -> LlamaCppServerProvider:
    """The same server through the provider that knows its tokenisation (/extras/tokenize)."""
    return LlamaCppServerProvider(llama_server.model, llama_server.base_url, timeout=60)


def fresh_cache(provider: Any) -> None:
    """Empty llama-cpp-python's one prompt cache (an unrelated one-token prompt), so that every
    generation's prompt is evaluated the same way: its numbers move by ~0.01 with how a prompt is split."""
    provider.continue_prefix("\n", 1, 1)


@pytest.fixture(scope="module")
def inproc() -> Any:
    p = LlamaCppTopKProvider(SMOLLM2, endpoint="completions", n_ctx=1024)
    yield p
    p.close()


@pytest.fixture(scope="module")
def smol() -> Any:
    from blackbox_proxy.models import load_model

    return load_model(SMOLLM2)


@pytest.fixture(scope="module")
def changing_pair(smol: Any) -> Any:
    """A pair that really changes tokens: the expert reads its chat template, the anti-expert plain text."""
    from blackbox_proxy.experts import ExpertPair

    return ExpertPair(smol, smol, alpha=1.0, expert_format="chat", anti_format="plain")


def server_greedy(server: Any, prompt: str, n: int) -> str:
    client = openai.OpenAI(base_url=server.base_url, api_key="x")
    r = client.completions.create(
        model=server.model, prompt=prompt, max_tokens=n, temperature=0, extra_body={"repeat_penalty": 1.0}
    )
    return r.choices[0].text


def first_retokenized(*gens: Any) -> int:
    """The first position where any run reported a re-tokenised text prefix (large if none)."""
    return min([r["position"] for g in gens for r in g.accounting.retokenized] + [10**9])


@pytest_integration
def test_continue_prefix_returns_every_position_with_its_top_k(comp: OpenAICompletionsProvider) -> None:
    c = comp.continue_prefix(PROMPTS[0], 6, 5)
    assert len(c.positions) == 6 and c.finish_reason == "length" and not c.ended
    assert c.text == "".join(c.tokens)
    for p in c.positions:
        assert len(p.top_entries()) == 5 and p.chosen is not None
        assert p.chosen.logprob == pytest.approx(max(e.logprob for e in p.entries), abs=1e-6)  # greedy
    assert c.usage is not None and c.usage.completion_tokens == 6
    # llama-cpp-python's server takes prompt text only: a list of ids is refused, not misread
    with pytest.raises(ProviderError):
        OpenAICompletionsProvider(
            comp.model, comp.base_url, max_k=None, max_retries=0, timeout=30
        ).continue_prefix([1, 2, 3], 2, 3)


@pytest_integration
def test_chat_continue_is_refused_on_a_server_that_ignores_continue_final_message(llama_server: Any) -> None:
    chat = ContinueChatProvider(llama_server.model, llama_server.base_url, max_k=None, timeout=60)
    msgs = [{"role": "user", "content": "Name a colour."}]
    first = chat.continue_prefix("", 3, 3, messages=msgs)  # nothing generated yet: a plain request
    assert len(first.positions) >= 1
    with pytest.raises(CapabilityError, match="ignores continue_final_message.*Completions"):
        chat.continue_prefix(first.text, 3, 3, messages=msgs)


def token_at_char(tokens: Sequence[str], char: int) -> int:
    """Index of the token holding character ``char`` of the joined text."""
    pos = 0
    for i, t in enumerate(tokens):
        pos += len(t)
        if char < pos:
            return i
    return len(tokens)


@pytest_integration
def test_identity_alpha_zero_and_equal_pair_reproduce_the_base_greedy_output(
    llama_server: Any, comp: OpenAICompletionsProvider, inproc: Any, smol: Any
) -> None:
    from blackbox_proxy.experts import ExpertPair

    n = 40
    cfg = GenerationConfig(max_new_tokens=n, analysis=True)
    same = ExpertPair(smol, smol, alpha=1.0)  # expert == anti-expert: offsets exactly zero
    off = ExpertPair(smol, smol, alpha=0.0, expert_format="chat")  # alpha = 0: not even scored
    exact = 0
    for prompt in PROMPTS[:2]:
        # in-process through token ids: exactly its own one-call greedy continuation
        own = inproc.continue_prefix(prompt, n, 5)
        for pair in (off, same):
            out = BlackBoxProxyGenerator(inproc, [pair], top_logprobs=5, block_size=4).generate(prompt, cfg)
            assert out.tokens == own.tokens and out.accounting.api_calls > 1 and not out.accounting.changed
        # the HTTP server: its own greedy output (temperature=0, max_tokens=n), except where its numbers
        # moved across a near-tie (llama-cpp-python re-evaluates a cached prompt's last token alone)
        ref = server_greedy(llama_server, prompt, n)
        for pair in (off, same):
            out = BlackBoxProxyGenerator(comp, [pair], top_logprobs=5).generate(prompt, cfg)
            assert not out.accounting.retokenized and not out.accounting.changed
            assert out.accounting.base_not_top1 == 0 and out.accounting.api_calls <= 3
            if out.text == ref:
                exact += 1
                continue
            char = next(i for i, (a, b) in enumerate(zip(out.text, ref, strict=False)) if a != b)
            i = token_at_char(out.tokens, char)
            assert out.trace is not None and out.trace[i].margin < 0.1, (prompt, i, out.trace[i])
    assert exact >= 2


@pytest_integration
def test_per_token_text_prefixes_get_retokenised_and_this_is_reported(
    llama_server: Any, comp: OpenAICompletionsProvider
) -> None:
    n = 24
    ref = server_greedy(llama_server, PROMPTS[0], n)
    out = BlackBoxProxyGenerator(comp, top_logprobs=3, speculative=False).generate(
        PROMPTS[0], max_new_tokens=n
    )
    assert out.accounting.api_calls == n
    cut = first_retokenized(out)
    assert cut < n  # " automobile-making" comes back as fewer tokens than the server generated
    assert "".join(out.tokens[:cut]) == ref[: len("".join(out.tokens[:cut]))]


def divergence(a: Any, b: Any) -> int | None:
    """The first position where two generations emitted different tokens (None: one extends the other)."""
    for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=False)):
        if x != y:
            return i
    return None


@pytest_integration
def test_speculative_equals_per_token_with_a_pair_that_changes_tokens(
    served: LlamaCppServerProvider, inproc: Any, changing_pair: Any
) -> None:
    cfg = GenerationConfig(max_new_tokens=32, analysis=True)
    changed = cuts = 0
    for provider in (inproc, served):  # token ids (in-process); text over HTTP, tokenisation checked
        for prompt in PROMPTS:
            if provider is served:
                fresh_cache(served)
            spec = BlackBoxProxyGenerator(provider, [changing_pair], top_logprobs=8).generate(prompt, cfg)
            if provider is served:
                fresh_cache(served)
            slow = BlackBoxProxyGenerator(
                provider, [changing_pair], top_logprobs=8, speculative=False
            ).generate(prompt, cfg)
            assert slow.accounting.api_calls == len(slow.tokens) + (slow.finish_reason == "eos")
            assert spec.accounting.api_calls < slow.accounting.api_calls
            changed += len(spec.accounting.changed)
            assert spec.tokens == slow.tokens and spec.text == slow.text, (provider, prompt)
            assert [(c.position, c.base_token, c.steered_token) for c in spec.accounting.changed] == [
                (c.position, c.base_token, c.steered_token) for c in slow.accounting.changed
            ]
            if provider is inproc:
                assert spec.accounting.sent_ids and not spec.accounting.retokenized
                assert spec.token_ids == slow.token_ids
            else:
                assert not spec.accounting.sent_ids and spec.accounting.tokenize_requests > 0
                cuts += len(spec.accounting.retokenization_cuts)
                assert slow.accounting.tokenize_requests == 0  # one position per call: nothing to check
    assert changed >= 6  # the pair really steers
    assert cuts >= 1  # text that came back re-tokenised was met, and the block cut there


@pytest_integration
def test_sampling_is_seeded_and_speculative_blocks_cut_calls(inproc: Any, changing_pair: Any) -> None:
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.7, seed=3)
    gen = BlackBoxProxyGenerator(inproc, [changing_pair], top_logprobs=8)
    a, b = gen.generate(PROMPTS[1], cfg), gen.generate(PROMPTS[1], cfg)
    assert a.text == b.text and a.accounting.sampling
    assert a.accounting.api_calls < len(a.tokens)
    chunks = list(gen.stream(PROMPTS[1], cfg))
    assert "".join(chunks) == a.text


@pytest_integration
def test_generate_command_black_box_writes_the_continuation_and_the_report(
    llama_server: Any, tmp_path: Any
) -> None:
    report = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "blackbox_proxy.cli",
        "generate",
        PROMPTS[0],
        "--base-url",
        llama_server.base_url,
        "--model",
        llama_server.model,
        "--endpoint",
        "completions",
        "--top-logprobs",
        "5",
        "--max-new-tokens",
        "16",
        "--server-param",
        "repeat_penalty=1.0",
        "--report",
        str(report),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == server_greedy(llama_server, PROMPTS[0], 16)
    data = json.loads(report.read_text())
    assert data["accounting"]["generated_tokens"] == 16 and data["accounting"]["mode"] == "speculative"
    # the provider that knows this server's tokenisation: the penalty off by itself, blocks checked
    # (it reproduces one-token-per-call decoding, which re-sends text: where the server reads that text
    # back as other tokens than it generated, that is not the server's own greedy continuation)
    own = cmd[:5] + ["--provider", "llama-cpp-server"] + cmd[5:9] + cmd[11:15] + cmd[17:]
    served = LlamaCppServerProvider(llama_server.model, llama_server.base_url, timeout=60)
    fresh_cache(served)
    out = subprocess.run(own, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    fresh_cache(served)
    slow = BlackBoxProxyGenerator(served, top_logprobs=5, speculative=False).generate(
        PROMPTS[0], max_new_tokens=16
    )
    assert out.stdout == slow.text
    data = json.loads(report.read_text())
    assert data["base"]["provider"] == "llama-cpp-server"
    assert data["accounting"]["tokenize_requests"] > 0 and not data["accounting"]["sent_ids"]
    bad = subprocess.run(cmd[:5] + ["--model", "m"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--base-url" in bad.stderr


class ScoredOverSequences:
    """A served model's scoring contract (``encode`` + ``token_logprobs``: vLLM's ``prompt_logprobs``)
    over a local model, so the served-pair block assembly is checked without a vLLM server."""

    def __init__(self, model: Any) -> None:
        self.m, self.name = model, model.name
        self.calls = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.m.encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(self, messages: Any) -> list[int]:
        return self.m.encode_chat(messages)

    def token_logprobs(self, seqs: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        self.calls += 1
        out = []
        for s, st in zip(seqs, starts, strict=True):
            lp = self.m.logprobs([list(s)], keep=len(s) - st + 1)[0]
            out.append([float(lp[i, s[st + i]]) for i in range(len(s) - st)])
        return out


@pytest_integration
def test_a_pair_scored_as_sequences_steers_like_the_in_process_pair(
    inproc: Any, smol: Any, changing_pair: Any
) -> None:
    from types import SimpleNamespace

    w = ScoredOverSequences(smol)
    served = SimpleNamespace(expert=w, anti_expert=w, alpha=1.0, expert_format="chat", anti_format="plain")
    cfg = GenerationConfig(max_new_tokens=16, analysis=True)
    r = BlackBoxProxyGenerator(inproc, [served], top_logprobs=5).generate(PROMPTS[1], cfg)
    h = BlackBoxProxyGenerator(inproc, [changing_pair], top_logprobs=5).generate(PROMPTS[1], cfg)
    assert r.accounting.changed and 2 * (r.accounting.api_calls - 1) <= w.calls <= 2 * r.accounting.api_calls
    assert r.accounting.pair_requests == w.calls and h.accounting.pair_requests == 0
    i = divergence(r, h)
    if i is not None:  # one unbatched pass per sequence vs the cached tree pass: float noise only
        assert min(r.trace[i].margin, h.trace[i].margin) < 1e-3, (i, r.tokens, h.tokens)
    else:
        assert r.tokens == h.tokens


@pytest_integration
def test_pair_drafting_needs_block_verification_and_says_so(inproc: Any, changing_pair: Any) -> None:
    """draft='pair' on a base that cannot score a given block: one error naming the capability."""
    with pytest.raises(CapabilityError, match="score_block"):
        BlackBoxProxyGenerator(inproc, [changing_pair], draft="pair")
    with pytest.raises(InputError, match="draft must be one of base, pair"):
        BlackBoxProxyGenerator(inproc, [changing_pair], draft="expert")  # type: ignore[arg-type]


def full_logit_greedy(inproc: Any, pair: Any, prompt: str, n: int, k: int) -> tuple[list[int], list[bool]]:
    """Full-vocabulary proxy-tuned greedy decoding on the in-process base (its whole row through
    ``continue_prefix`` with k = the vocabulary) and the pair's full rows; per step, whether the
    choice was inside the base's top-k. Ends on an end-of-generation token, as ``generate`` does."""
    import torch

    from blackbox_proxy.decoding import render_prompt

    vocab = pair.expert.vocab_size
    sessions = [
        pair.expert.open([render_prompt(pair.expert, prompt, pair.expert_format)]),
        pair.anti_expert.open([render_prompt(pair.anti_expert, prompt, pair.anti_format)]),
    ]
    ids = inproc.tokenize(prompt)
    out: list[int] = []
    inside: list[bool] = []
    try:
        for _ in range(n):
            c = inproc.continue_prefix(ids + out, 1, vocab)
            if not c.positions:
                break
            base = torch.full((vocab,), -math.inf, dtype=torch.float64)
            for e in c.positions[0].entries:
                base[e.id] = e.logprob
            e_lp = torch.log_softmax(sessions[0].logits()[0, :vocab].double(), -1)
            a_lp = torch.log_softmax(sessions[1].logits()[0, :vocab].double(), -1)
            tok = int((base + pair.alpha * (e_lp - a_lp)).argmax())
            inside.append(tok in set(torch.topk(base, k).indices.tolist()))
            out.append(tok)
            if inproc.is_end_token(tok):
                break
            for s in sessions:
                s.feed([tok])
    finally:
        for s in sessions:
            s.close()
    return out, inside


@pytest_integration
def test_black_box_greedy_matches_full_logit_greedy_where_the_choice_is_in_the_top_k(
    inproc: Any, changing_pair: Any
) -> None:
    """k = 20 black-box generation = full-vocabulary proxy-tuned greedy, up to a step whose full-logit
    choice lies outside the base's top-20; an end-of-turn token the pair prefers ends both."""
    k, n = 20, 40
    for prompt in PROMPTS:
        full, inside = full_logit_greedy(inproc, changing_pair, prompt, n, k)
        bb = BlackBoxProxyGenerator(inproc, [changing_pair], top_logprobs=k).generate(
            prompt, max_new_tokens=n
        )
        got = list(bb.token_ids) + ([full[-1]] if bb.finish_reason == "eos" else [])
        first = next((i for i, (a, b) in enumerate(zip(full, got, strict=False)) if a != b), None)
        if first is None:
            assert len(got) == len(full), (prompt, bb.finish_reason)
        else:
            assert not inside[first], (prompt, first, full[first], got[first])
    # an end-of-turn token comes as a named candidate (the pair scores it; choosing it ends the text)
    turn = "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\nYes"  # "." first, "<|im_end|>" in the top-20
    entries = inproc.continue_prefix(turn, 1, k).positions[0].entries
    end = [e for e in entries if e.token == "<|im_end|>"]
    assert end and inproc.is_end_token(end[0].id)
    assert changing_pair.expert.encode("<|im_end|>", add_special_tokens=False) == [end[0].id]
