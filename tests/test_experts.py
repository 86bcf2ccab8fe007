"""ExpertPair / CausalScorer against real small models (SmolLM2-135M, Qwen2.5-Coder-0.5B), CPU.

Ground truth is recomputed here with plain, unbatched forward passes of the same models, so each
test checks the batching, padding, variant pooling and string scoring of experts.py.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from blackbox_proxy.candidates import logsumexp
from blackbox_proxy.errors import CandidateError, InputError, MissingLogprobsError
from blackbox_proxy.experts import CausalScorer, ExpertPair
from blackbox_proxy.models import load_model
from blackbox_proxy.prompts import mc_messages, mc_text
from blackbox_proxy.types import MCQuestion

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SMOLLM2 = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
#: largest letter log-prob difference accepted between llama.cpp (4-bit weights) and transformers
#: (the same weights dequantised to float32); measured here, see the closing note
LLAMA_CPP_TOLERANCE = 0.5

QUESTIONS = [
    MCQuestion("capital", "What is the capital of France?", ("Berlin", "Paris", "Rome")),
    MCQuestion("sum", "2+2=?", ("3", "4", "5", "22")),
    MCQuestion(
        "fruit",
        "Which of these is a fruit? Think about botany, not cooking, and pick the best option among them.",
        ("Carrot", "Apple"),
    ),
    MCQuestion(
        "planet", "Which planet is known as the Red Planet?", ("Venus", "Jupiter", "Mars", "Saturn", "Pluto")
    ),
]


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def smol() -> Any:
    return load_model(SMOLLM2, "transformers")


@pytest.fixture(scope="module")
def qwen() -> Any:
    return load_model(QWEN, "transformers")


def reference_next_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of the next-token logits for one unpadded sequence (no mask, no batching)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)


def test_chat_template_is_each_models_own(smol: Any, qwen: Any) -> None:
    q = QUESTIONS[0]
    s_ids = CausalScorer(smol).render(q)
    q_ids = CausalScorer(qwen).render(q)
    s_text, q_text = smol.tokenizer.decode(s_ids), qwen.tokenizer.decode(q_ids)
    assert s_text.endswith("<|im_start|>assistant\n") and "SmolLM" in s_text
    assert q_text.endswith("<|im_start|>assistant\n") and "Qwen" in q_text
    assert mc_messages(q)[0]["content"] in s_text and mc_messages(q)[0]["content"] in q_text
    plain = CausalScorer(smol, chat_template=False).render(q)
    assert smol.tokenizer.decode(plain) == mc_text(q)
    assert mc_text(q).endswith("Answer:")


def test_single_token_candidates_pool_both_variants(smol: Any) -> None:
    model, tok = smol.model, smol.tokenizer
    scorer = CausalScorer(smol)
    q = QUESTIONS[1]
    got = scorer.score([q], [q.labels])[0]
    ref = reference_next_logprobs(model, scorer.render(q))
    for lab in q.labels:
        ids = {
            tok.encode(lab, add_special_tokens=False)[0],
            tok.encode(" " + lab, add_special_tokens=False)[0],
        }
        assert len(ids) == 2  # "A" and " A" are different tokens in SmolLM2
        want = logsumexp(float(ref[i]) for i in ids)
        assert got[lab] == pytest.approx(want, abs=1e-4)
        assert got[lab] > max(float(ref[i]) for i in ids)  # pooling adds mass


def test_batched_equals_one_at_a_time(qwen: Any) -> None:
    scorer = CausalScorer(qwen, batch_size=4)
    batched = scorer.score(QUESTIONS, [q.labels for q in QUESTIONS])
    assert len({len(scorer.render(q)) for q in QUESTIONS}) > 1  # lengths differ: left padding is exercised
    for q, b in zip(QUESTIONS, batched, strict=True):
        alone = scorer.score([q], [q.labels])[0]
        assert list(b) == list(q.labels)
        for lab in q.labels:
            assert math.isfinite(b[lab]) and b[lab] <= 0
            assert b[lab] == pytest.approx(alone[lab], abs=2e-4), (q.id, lab)


def test_multi_token_candidate_scored_as_string(smol: Any) -> None:
    model, tok = smol.model, smol.tokenizer
    scorer = CausalScorer(smol, batch_size=3)
    prompts = ["The longest common English word is", "A word meaning opposition to disestablishment:"]
    word = "antidisestablishmentarianism"
    got = scorer.score(prompts, [[word, "Paris"]] * 2)
    for prompt, g in zip(prompts, got, strict=True):
        ids = tok(prompt)["input_ids"]
        totals = []
        for text in (word, " " + word):
            cont = tok.encode(text, add_special_tokens=False)
            assert len(cont) > 1
            with torch.inference_mode():
                lp = torch.log_softmax(model(input_ids=torch.tensor([ids + cont])).logits[0].float(), -1)
            totals.append(sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(cont)))
        assert g[word] == pytest.approx(logsumexp(totals), abs=2e-4)
        assert g["Paris"] > -30
    with pytest.raises(CandidateError, match="antidisestablishmentarianism"):
        CausalScorer(smol, strict_single_token=True).score(prompts[:1], [[word]])


def test_pair_with_different_tokenizers(smol: Any, qwen: Any) -> None:
    pair = ExpertPair(QWEN, SMOLLM2, batch_size=4)
    assert pair.expert.tokenizer.vocab_size != pair.anti_expert.tokenizer.vocab_size
    scores = pair.score(QUESTIONS, [q.labels for q in QUESTIONS])
    alone_q = CausalScorer(qwen, batch_size=4).score(QUESTIONS, [q.labels for q in QUESTIONS])
    alone_s = CausalScorer(smol, batch_size=4).score(QUESTIONS, [q.labels for q in QUESTIONS])
    for s, eq, es in zip(scores, alone_q, alone_s, strict=True):
        assert s.expert == pytest.approx(eq, abs=1e-9)
        assert s.anti_expert == pytest.approx(es, abs=1e-9)
        assert s.string_scored == ()
        off = s.offsets(2.0)
        assert off == pytest.approx({k: 2.0 * (eq[k] - es[k]) for k in eq})
    assert any(abs(v) > 0.1 for s in scores for v in s.offsets().values())  # the models really differ


def test_same_expert_and_anti_expert_gives_zero_offsets() -> None:
    pair = ExpertPair(SMOLLM2, SMOLLM2)
    assert pair.anti_expert is pair.expert
    for s in pair.score(QUESTIONS, [q.labels for q in QUESTIONS]):
        assert set(s.offsets().values()) == {0.0}


def test_shared_candidate_list_and_input_errors(smol: Any) -> None:
    pair = ExpertPair(smol, smol)
    shared = pair.score(["Q: 1+1? A. 2 B. 3\nAnswer:", "Q: 5-3? A. 1 B. 2\nAnswer:"], ["A", "B"])
    assert [list(s.expert) for s in shared] == [["A", "B"], ["A", "B"]]
    with pytest.raises(InputError, match="2 prompts but 1"):
        pair.score(["a", "b"], [["A"]])
    with pytest.raises(InputError, match="not distinct"):
        pair.score(["a"], [["A", " A"]])
    with pytest.raises(InputError, match="empty prompt"):
        pair.score(["   "], [["A", "B"]])


def test_nan_output_is_an_error(smol: Any) -> None:
    """Fault injection: a forward hook makes the real model's logits NaN for one call."""
    model = smol.model
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _i, out: out * float("nan"))
    try:
        with pytest.raises(MissingLogprobsError, match="NaN"):
            CausalScorer(smol).score([QUESTIONS[0]], [QUESTIONS[0].labels])
    finally:
        handle.remove()
    ok = CausalScorer(smol).score([QUESTIONS[0]], [QUESTIONS[0].labels])[0]
    assert all(math.isfinite(v) for v in ok.values())


def test_llama_cpp_backend_matches_transformers_within_quantisation() -> None:
    """The same pair on llama.cpp (4-bit GGUF) and on transformers (dequantised float32): letter log-probs
    agree within the quantisation tolerance, and the engine's answer path uses the llama.cpp pair."""
    qs = QUESTIONS
    hf = ExpertPair(QWEN, SMOLLM2, backend="transformers", batch_size=4).score(qs, [q.labels for q in qs])
    ll_pair = ExpertPair(QWEN, SMOLLM2, backend="llama-cpp", batch_size=4, load_options={"n_threads": 2})
    assert ll_pair.expert.kind == "llama-cpp" and ll_pair.anti_expert.kind == "llama-cpp"
    ll = ll_pair.score(qs, [q.labels for q in qs])
    worst = 0.0
    for a, b in zip(hf, ll, strict=True):
        for side in ("expert", "anti_expert"):
            for lab, v in getattr(a, side).items():
                worst = max(worst, abs(v - getattr(b, side)[lab]))
    print(f"largest llama.cpp vs transformers letter log-prob difference: {worst:.4f} nats")
    assert worst < LLAMA_CPP_TOLERANCE
    # the offsets rank the letters the same way on both backends
    for a, b in zip(hf, ll, strict=True):
        oa, ob = a.offsets(), b.offsets()
        assert max(oa, key=oa.get) == max(ob, key=ob.get)


def test_mc_runs_its_pair_on_llama_cpp(llama_server: Any, tmp_path: Any) -> None:
    """Through the CLI: --expert-backend llama-cpp scores the pair on llama.cpp; its offsets agree with
    the transformers run within the quantisation tolerance and the steered letters match."""
    import json

    import pandas as pd

    from blackbox_proxy.cli import main

    q = tmp_path / "q.jsonl"
    q.write_text(
        "".join(
            json.dumps({"id": x.id, "question": x.question, "choices": list(x.choices)}) + "\n"
            for x in QUESTIONS
        )
    )
    argv = ["mc", str(q), "--base-url", llama_server.base_url, "--model", llama_server.model, "-q"]
    argv += ["--expert", QWEN, "--anti-expert", SMOLLM2, "--no-score-cache", "--top-logprobs", "10"]
    tables = {}
    for backend in ("transformers", "llama-cpp"):
        out = tmp_path / f"{backend}.csv"
        assert main([*argv, "--expert-backend", backend, "--out", str(out)]) == 0
        tables[backend] = pd.read_csv(out, keep_default_na=False)
    a, b = tables["transformers"], tables["llama-cpp"]
    worst = max(
        abs(float(x) - float(y))
        for lab in "ABCDE"
        if f"offset_{lab}" in a
        for x, y in zip(a[f"offset_{lab}"], b[f"offset_{lab}"], strict=True)
        if x != "" and y != ""
    )
    assert worst < 2 * LLAMA_CPP_TOLERANCE
    assert list(a["base_letter"]) == list(b["base_letter"])
    assert sum(x == y for x, y in zip(a["steered_letter"], b["steered_letter"], strict=True)) >= len(a) - 1
