"""Candidate matching by text and the top-k bound on missing tokens."""

import math

import pytest

from blackbox_proxy.candidates import match_candidates, normalize_label, tiktoken_single_token_ids
from blackbox_proxy.errors import CandidateError, InputError, MissingLogprobsError
from blackbox_proxy.types import MCQuestion, TokenLogprob, TopLogprobs


def tl(*pairs, k=None, chosen=None):
    return TopLogprobs(tuple(TokenLogprob(t, lp) for t, lp in pairs), k or len(pairs), chosen=chosen)


@pytest.mark.parametrize("text", ["A", " A", "A.", "(A)", "A:", "\u2581A", "\u0120A", " A)"])
def test_variants_normalise_to_the_letter(text):
    assert normalize_label(text) == "A"


def test_variants_are_pooled_and_absent_candidates_are_none():
    top = tl(("A", math.log(0.3)), (" A", math.log(0.1)), ("B", math.log(0.2)), ("Answer", math.log(0.3)))
    m = match_candidates(top, ["A", "B", "C"])
    assert m["A"] == pytest.approx(math.log(0.4))
    assert m["B"] == pytest.approx(math.log(0.2))
    assert m["C"] is None


def test_chosen_token_outside_top_k_is_known_exactly_but_not_used_for_the_bound():
    # llama.cpp appends the emitted token as entry k+1: known exactly, but not part of the top k
    top = tl(("A", math.log(0.5)), ("B", math.log(0.3)), ("D", math.log(0.01)), k=2)
    assert match_candidates(top, ["A", "B", "C", "D"])["D"] == pytest.approx(math.log(0.01))
    # bound: min(kth = log 0.3, log(1 - 0.8) = log 0.2) = log 0.2
    assert top.missing_bound() == pytest.approx(math.log(0.2))


def test_bound_uses_kth_logprob_when_it_is_smaller():
    top = tl(("A", math.log(0.5)), ("B", math.log(0.05)))
    assert top.missing_bound() == pytest.approx(math.log(0.05))


def test_unsorted_entries_are_handled():
    top = tl(("B", math.log(0.05)), ("A", math.log(0.5)), ("C", math.log(0.2)), k=2)
    assert [e.token for e in top.top_entries()] == ["A", "C"]


def test_bad_provider_values_are_rejected():
    with pytest.raises(MissingLogprobsError):
        TopLogprobs((), 5)
    with pytest.raises(MissingLogprobsError, match="non-numeric"):
        TokenLogprob("A", float("nan"))
    with pytest.raises(MissingLogprobsError, match="positive"):
        TokenLogprob("A", 0.5)


def test_duplicate_labels_are_rejected():
    with pytest.raises(InputError, match="distinct"):
        match_candidates({"A": -1.0}, ["A", " A"])


def test_tiktoken_ids_for_letters_and_multi_token_error():
    ids = tiktoken_single_token_ids(["A", "B", "C", "D"], "gpt-3.5-turbo")
    assert len(set(ids.values())) == 4
    with pytest.raises(CandidateError, match="not one"):
        tiktoken_single_token_ids(["supercalifragilistic"], "gpt-3.5-turbo")


def test_question_validation_messages():
    with pytest.raises(InputError, match="at least 2 choices"):
        MCQuestion("q1", "Why?", ())
    with pytest.raises(InputError, match="letters"):
        MCQuestion("q2", "Why?", tuple(str(i) for i in range(27)))
    with pytest.raises(InputError, match="empty question"):
        MCQuestion("q3", "  ", ("a", "b"))
    with pytest.raises(InputError, match="out of range"):
        MCQuestion("q4", "Why?", ("a", "b"), answer=2)
    q = MCQuestion("q5", "Why?", ["x", "y", "z"], answer=2)
    assert q.labels == ("A", "B", "C") and q.gold_letter == "C"
