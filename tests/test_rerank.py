"""The reranker end to end: a real llama.cpp server (SmolLM2, top-k only) steered by real local pairs."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import torch
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
from blackbox_proxy.adapters.openai_completions import OpenAICompletionsProvider

from blackbox_proxy.candidates import match_candidates
from blackbox_proxy.errors import InputError, MissingCandidateError
from blackbox_proxy.experts import ExpertPair
from blackbox_proxy.prompts import mc_messages, mc_text
from blackbox_proxy.rerank import Reranker, steer
from blackbox_proxy.types import MCQuestion

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SMOLLM2 = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"

QUESTIONS = [
    MCQuestion("mars", "Which planet is known as the Red Planet?", ("Venus", "Jupiter", "Mars", "Saturn"), 2),
    MCQuestion("paris", "What is the capital of France?", ("Berlin", "Paris", "Rome"), 1),
    MCQuestion("sum", "What is 2 + 2?", ("3", "4", "5", "22"), 1),
    MCQuestion("water", "What is the chemical formula of water?", ("CO2", "NaCl", "H2O", "O2", "CH4"), 2),
]


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def chat(llama_server: Any) -> OpenAIChatProvider:
    return OpenAIChatProvider(llama_server.model, llama_server.base_url, max_k=None, timeout=120)


@pytest.fixture(scope="module")
def pair() -> ExpertPair:
    """Different models (and tokenizers): Qwen2.5-Coder-0.5B as expert, SmolLM2 as anti-expert."""
    return ExpertPair(QWEN, SMOLLM2, batch_size=4)


@pytest.fixture(scope="module")
def tops(chat: OpenAIChatProvider) -> dict[tuple[str, int], Any]:
    """The base's top-k for each question at k=20 and k=1 (fetched once; steer() is pure)."""
    return {(q.id, k): chat.top_logprobs(mc_messages(q), k) for q in QUESTIONS for k in (20, 1)}


@pytest.fixture(scope="module")
def scores(pair: ExpertPair) -> dict[str, Any]:
    return dict(
        zip([q.id for q in QUESTIONS], pair.score(QUESTIONS, [q.labels for q in QUESTIONS]), strict=True)
    )


def test_alpha_zero_gives_the_base_choice(tops: dict, scores: dict) -> None:
    for q in QUESTIONS:
        top = tops[(q.id, 20)]
        ans = steer(q, top, [scores[q.id]], 0.0)
        base = match_candidates(top, q.labels)
        assert ans.missing == ()  # all letters in SmolLM2's top 20 with this prompt
        want = max(q.labels, key=lambda lab: base[lab])
        assert ans.base_letter == want and ans.letter == want
        assert ans.steered_probs == pytest.approx(ans.base_probs, abs=1e-12)
        assert set(ans.offsets.values()) == {0.0}
        assert ans.gold_letter == q.gold_letter and ans.alpha == (0.0,)


def test_expert_equal_to_anti_expert_gives_the_base_choice(chat: OpenAIChatProvider) -> None:
    same = ExpertPair(SMOLLM2, SMOLLM2)
    rr = Reranker(chat, same, alpha=3.0, k=20)
    for q in QUESTIONS[:2]:
        ans = rr.answer(q)
        assert set(ans.offsets.values()) == {0.0}
        assert ans.letter == ans.base_letter
        assert ans.steered_probs == ans.base_probs
        assert ans.expert_logprobs == ans.anti_expert_logprobs


def test_offsets_move_the_distribution_in_their_direction(tops: dict, scores: dict) -> None:
    moved = 0.0
    for q in QUESTIONS:
        top = tops[(q.id, 20)]
        ans = steer(q, top, [scores[q.id]], 1.0)
        s = scores[q.id]
        for lab in q.labels:
            assert ans.offsets[lab] == pytest.approx(s.expert[lab] - s.anti_expert[lab], abs=1e-12)
        log_ratio = {lab: math.log(ans.steered_probs[lab] / ans.base_probs[lab]) for lab in q.labels}
        # the steered/base ratio is ordered exactly like the offsets (they differ by a constant)
        by_ratio = sorted(q.labels, key=lambda lab: log_ratio[lab])
        by_offset = sorted(q.labels, key=lambda lab: ans.offsets[lab])
        assert by_ratio == by_offset
        for a in q.labels:
            for b in q.labels:
                want = ans.offsets[a] - ans.offsets[b]
                assert log_ratio[a] - log_ratio[b] == pytest.approx(want, abs=1e-9)
        up = max(q.labels, key=lambda lab: ans.offsets[lab])
        assert ans.steered_probs[up] > ans.base_probs[up]
        stronger = steer(q, top, [s], 2.0)
        assert stronger.steered_probs[up] > ans.steered_probs[up]  # larger alpha, further in that direction
        moved = max(moved, 0.5 * sum(abs(ans.steered_probs[k] - ans.base_probs[k]) for k in q.labels))
    assert moved > 0.05  # the pair measurably changes the distribution


def test_missing_candidates_follow_the_policy(tops: dict, scores: dict) -> None:
    for q in QUESTIONS:
        top = tops[(q.id, 1)]
        bound = top.missing_bound()
        present = {lab for lab, v in match_candidates(top, q.labels).items() if v is not None}
        assert len(present) <= 1 < len(q.labels)
        floor = steer(q, top, [scores[q.id]], 1.0, policy="floor")
        assert set(floor.missing) == set(q.labels) - present
        assert floor.filled == dict.fromkeys(floor.missing, bound)
        assert all(floor.base_logprobs[lab] == bound for lab in floor.missing)
        assert set(floor.steered_probs) == set(q.labels) and not floor.excluded
        excl = steer(q, top, [scores[q.id]], 1.0, policy="exclude")
        assert set(excl.steered_probs) == present
        assert excl.excluded == (not present)
        assert excl.letter == (next(iter(present)) if present else None)
        with pytest.raises(MissingCandidateError, match="not in the base's top"):
            steer(q, top, [scores[q.id]], 1.0, policy="error")


def test_answer_many_records_errors_per_question(chat: OpenAIChatProvider, pair: ExpertPair) -> None:
    qs = QUESTIONS[:3]
    df = Reranker(chat, pair, 1.0, policy="error", k=1).answer_many(qs, progress=False)
    assert list(df["id"]) == [q.id for q in qs]
    assert (df["error"].str.startswith("MissingCandidateError")).all()  # k=1 cannot hold every letter
    assert list(df["gold_letter"]) == [q.gold_letter for q in qs]
    ok = Reranker(chat, pair, 1.0, policy="floor", k=20).answer_many(qs, progress=False)
    assert (ok["error"] == "").all()
    for col in (
        "id",
        "base_letter",
        "steered_letter",
        "gold_letter",
        "p_A",
        "base_p_A",
        "offset_A",
        "missing_A",
        "expert_lp_A",
        "anti_lp_A",
        "n_missing",
        "prompt_tokens",
    ):
        assert col in ok.columns
    assert list(ok.columns)[:5] == ["id", "base_letter", "steered_letter", "gold_letter", "excluded"]
    assert ok.loc[1, "p_D"] != ok.loc[1, "p_D"]  # the 3-option question has no D (NaN)


def test_batch_async_and_single_agree(chat: OpenAIChatProvider, pair: ExpertPair, scores: dict) -> None:
    rr = Reranker(chat, pair, 1.0, k=20)
    qs = QUESTIONS[1:3]
    df = rr.answer_many(qs, progress=False)
    for i, q in enumerate(qs):
        one = rr.answer(q)
        aone = asyncio.run(rr.aanswer(q))
        for lab in q.labels:
            assert df.loc[i, f"offset_{lab}"] == pytest.approx(one.offsets[lab], abs=2e-4)
            assert aone.offsets[lab] == pytest.approx(one.offsets[lab], abs=2e-4)
            assert one.offsets[lab] == pytest.approx(scores[q.id].offsets()[lab], abs=2e-4)
            # llama.cpp's log-probs move by a few hundredths with KV-cache reuse
            assert df.loc[i, f"base_p_{lab}"] == pytest.approx(one.base_probs[lab], abs=0.05)


def test_several_pairs_with_their_own_alpha(chat: OpenAIChatProvider, pair: ExpertPair) -> None:
    reverse = ExpertPair(SMOLLM2, QWEN)
    rr = Reranker(chat, [pair, reverse], alpha=[1.0, 0.25], k=20)
    q = QUESTIONS[0]
    ans = rr.answer(q)
    s1 = pair.score([q], q.labels)[0]
    for lab in q.labels:
        d = s1.expert[lab] - s1.anti_expert[lab]
        assert ans.offsets[lab] == pytest.approx(1.0 * d - 0.25 * d, abs=2e-4)
    assert ans.alpha == (1.0, 0.25)


FEW_SHOT = "Question: What is 1 + 1?\nA. 3\nB. 2\nC. 11\nAnswer: B\n\n"


def test_completions_endpoint_uses_text_prompts(llama_server: Any, pair: ExpertPair) -> None:
    comp = OpenAICompletionsProvider(llama_server.model, llama_server.base_url, max_k=None, timeout=120)
    rr = Reranker(comp, pair, 1.0, k=20)
    assert rr.endpoint == "completions"
    q = QUESTIONS[1]
    assert rr.base_prompt(q) == mc_text(q) and rr.pair_prompt(q) == mc_text(q)
    # SmolLM2 ends the zero-shot text with end-of-text, for which llama.cpp returns no log-probs:
    # a one-shot prefix (a custom template, read by the pair too) makes it answer with a letter
    shot = Reranker(comp, pair, 1.0, k=20, prompt=lambda q: FEW_SHOT + mc_text(q))
    assert shot.pair_prompt(q) == shot.base_prompt(q) == FEW_SHOT + mc_text(q)
    ans = shot.answer(q)
    want = pair.score([FEW_SHOT + mc_text(q)], q.labels)[0]
    assert ans.offsets == pytest.approx(want.offsets(), abs=2e-4)
    assert ans.model == "smollm2" and ans.missing == ()
    assert sum(ans.steered_probs.values()) == pytest.approx(1.0)


def test_bad_configuration_is_rejected(chat: OpenAIChatProvider, llama_server: Any, pair: ExpertPair) -> None:
    limited = OpenAIChatProvider(llama_server.model, llama_server.base_url)  # OpenAI's limit: 20
    with pytest.raises(InputError, match="max_k=20"):
        Reranker(limited, pair, k=21)
    with pytest.raises(InputError, match="policy"):
        Reranker(chat, pair, policy="guess")
    with pytest.raises(InputError, match="interpolate"):
        Reranker(chat, pair, alpha=2.0, strategy="interpolate")
    with pytest.raises(InputError, match="2 alphas"):
        Reranker(chat, pair, alpha=[1.0, 2.0])
    with pytest.raises(InputError, match="endpoint"):
        Reranker(chat, pair, endpoint="edits")
