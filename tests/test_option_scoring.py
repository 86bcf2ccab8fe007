"""Option-text scoring: exact calibration arithmetic, and real SmolLM2 scores checked against a
plain teacher-forced forward pass; a pair with two tokenizers is refused."""

from __future__ import annotations

import math

import pytest
import torch

from blackbox_proxy.errors import InputError, VocabularyMismatchError
from blackbox_proxy.experts import ExpertPair
from blackbox_proxy.models import load_model
from blackbox_proxy.option_scoring import CONTENT_FREE, OptionScores, cloze_prompt, option_text
from blackbox_proxy.rerank import derive, record_for
from blackbox_proxy.types import MCQuestion, TokenLogprob, TopLogprobs

SMOLLM2 = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
Q = MCQuestion("cap", "What is the capital of France?", ("Berlin", "Paris", "Rome of the Caesars"), 1)


def test_calibrations_exact() -> None:
    s = OptionScores(
        expert={"A": -6.0, "B": -2.0},
        anti_expert={"A": -8.0, "B": -9.0},
        n_tokens={"A": 2, "B": 4},
        expert_cf={"A": -5.0, "B": -4.0},
        anti_cf={"A": -7.0, "B": -6.0},
        calibration="sum",
    )
    assert s.offsets() == {"A": 2.0, "B": 7.0}
    assert s.with_calibration("mean").offsets() == {"A": 1.0, "B": 1.75}
    # pmi: (e - e_cf) - (a - a_cf)
    assert s.with_calibration("pmi").offsets() == {"A": (-1.0) - (-1.0), "B": 2.0 - (-3.0)}
    assert s.with_calibration("pmi-mean").offsets() == {"A": 0.0, "B": 5.0 / 4}
    assert OptionScores.from_json(s.to_json()) == s
    with pytest.raises(InputError, match="unknown option calibration"):
        s.with_calibration("zscore")


def test_derive_steers_with_option_offsets() -> None:
    top = TopLogprobs((TokenLogprob("A", math.log(0.7)), TokenLogprob("B", math.log(0.3))), 2)
    q = MCQuestion("q", "Which?", ("x", "y"), 1)
    scores = OptionScores({"A": -9.0, "B": -1.0}, {"A": -5.0, "B": -5.0}, {"A": 1, "B": 1}, calibration="sum")
    ans = derive(record_for(q, top, [scores]), 1.0)
    assert ans.base_letter == "A" and ans.letter == "B"
    assert ans.offsets == pytest.approx({"A": -4.0, "B": 4.0})


@pytest.mark.integration
def test_raw_scores_match_a_plain_forward_pass() -> None:
    torch.set_num_threads(2)
    smol = load_model(SMOLLM2, "transformers")
    (s,) = ExpertPair(SMOLLM2, SMOLLM2, batch_size=2).score_options([Q], calibration="sum")
    tok, model = smol.tokenizer, smol.model

    def ref(prompt: str, text: str) -> tuple[float, int]:
        ids = tok(prompt)["input_ids"]
        cont = tok.encode(text, add_special_tokens=False)
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids + cont])).logits[0].float(), -1)
        return sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(cont)), len(cont)

    for lab, choice in zip(Q.labels, Q.choices, strict=True):
        want, n = ref(cloze_prompt(Q), option_text(choice))
        assert s.expert[lab] == pytest.approx(want, abs=2e-4) and s.n_tokens[lab] == n
        assert s.expert_cf[lab] == pytest.approx(ref(CONTENT_FREE, option_text(choice))[0], abs=2e-4)
    assert set(s.offsets().values()) == {0.0}  # expert == anti-expert
    assert s.expert["B"] > s.expert["A"]  # even the small model knows Paris


@pytest.mark.integration
def test_pair_with_two_tokenizers_is_refused() -> None:
    with pytest.raises(VocabularyMismatchError, match=f"{QWEN}.*{SMOLLM2}"):
        ExpertPair(QWEN, SMOLLM2).score_options([Q])


def test_unknown_modes_are_clear() -> None:
    from blackbox_proxy.rerank import Reranker

    class P:
        model, kind, endpoint, max_k, max_concurrency, capabilities = "m", "p", "chat", None, 1, frozenset()

    with pytest.raises(InputError, match="unknown expert scoring 'text'"):
        Reranker(P(), (), expert_scoring="text")
    with pytest.raises(InputError, match="unknown option calibration"):
        Reranker(P(), (), option_calibration="z")
