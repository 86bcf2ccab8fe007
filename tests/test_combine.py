"""Exact-number tests of the proxy-tuning arithmetic, policies and fusion strategies (hand-computed)."""

import math

import pytest

from blackbox_proxy.combine import combine, entropy_ratio, fill_missing, pair_offsets, softmax
from blackbox_proxy.errors import InputError, MissingCandidateError

LN2, LN3 = math.log(2), math.log(3)


def test_softmax_of_log_probs_renormalises_over_candidates():
    p = softmax({"A": math.log(0.2), "B": math.log(0.6)})
    assert p == pytest.approx({"A": 0.25, "B": 0.75}, abs=1e-12)


def test_proxy_single_pair_hand_computed():
    # base 1:1:2 ; expert prefers B by factor 2 over its anti-expert -> 1:2:2
    base = {"A": math.log(0.2), "B": math.log(0.2), "C": math.log(0.4)}
    exp = {"A": -1.0, "B": -1.0 + LN2, "C": -3.0}
    anti = {"A": -1.0, "B": -1.0, "C": -3.0}
    c = combine(base, [(exp, anti)], 1.0)
    assert c.steered_probs == pytest.approx({"A": 0.2, "B": 0.4, "C": 0.4}, abs=1e-12)
    assert c.base_probs == pytest.approx({"A": 0.25, "B": 0.25, "C": 0.5}, abs=1e-12)
    assert c.offsets == pytest.approx({"A": 0.0, "B": LN2, "C": 0.0}, abs=1e-12)
    assert c.base_letter == "C"
    assert c.letter == "B"  # tie between B and C at 0.4: earliest label wins deterministically


def test_alpha_scales_the_offset():
    base = {"A": 0.0, "B": 0.0}
    pair = ({"A": LN3, "B": 0.0}, {"A": 0.0, "B": 0.0})
    c = combine(base, [pair], 2.0)  # A gets 2*ln3 -> 9:1
    assert c.steered_probs["A"] == pytest.approx(0.9, abs=1e-12)
    c0 = combine(base, [pair], 0.0)
    assert c0.steered_probs == c0.base_probs


def test_several_pairs_compose_with_their_own_alpha():
    base = {"A": 0.0, "B": 0.0, "C": 0.0}
    p1 = ({"A": LN2, "B": 0.0, "C": 0.0}, {"A": 0.0, "B": 0.0, "C": 0.0})
    p2 = ({"A": 0.0, "B": LN2, "C": 0.0}, {"A": 0.0, "B": 0.0, "C": -LN2})
    c = combine(base, [p1, p2], [1.0, 2.0])
    # scores: A ln2, B 2ln2, C 2ln2 -> weights 2:4:4
    assert c.steered_probs == pytest.approx({"A": 0.2, "B": 0.4, "C": 0.4}, abs=1e-12)
    assert pair_offsets([p1, p2], [1.0, 2.0], "ABC") == pytest.approx({"A": LN2, "B": 2 * LN2, "C": 2 * LN2})


def test_identical_expert_and_anti_expert_is_exactly_the_base():
    base = {"A": -0.3, "B": -1.7, "C": -2.2}
    same = {"A": -5.0, "B": -0.1, "C": -9.0}
    c = combine(base, [(same, same)], 3.0)
    assert c.steered_probs == c.base_probs
    assert set(c.offsets.values()) == {0.0}


def test_floor_policy_fills_with_bound_and_reports_it():
    base = {"A": math.log(0.5), "B": None, "C": math.log(0.25)}
    bound = math.log(0.25)
    c = combine(base, [], policy="floor", bound=bound)
    assert c.missing == ("B",)
    assert c.filled == {"B": bound}
    assert c.base_probs == pytest.approx({"A": 0.5, "B": 0.25, "C": 0.25}, abs=1e-12)


def test_exclude_policy_drops_the_missing_candidate():
    base = {"A": math.log(0.3), "B": None, "C": math.log(0.1)}
    c = combine(base, [], policy="exclude")
    assert set(c.steered_probs) == {"A", "C"}
    assert c.steered_probs["A"] == pytest.approx(0.75, abs=1e-12)
    assert c.missing == ("B",) and not c.excluded


def test_exclude_with_every_candidate_missing_excludes_the_question():
    c = combine({"A": None, "B": None}, [], policy="exclude")
    assert c.excluded and c.letter is None and c.steered_probs == {}


def test_error_policy_raises_naming_the_candidate():
    with pytest.raises(MissingCandidateError, match="'B'"):
        fill_missing({"A": -1.0, "B": None}, "error", -5.0)


def test_unknown_policy_and_strategy_are_rejected():
    with pytest.raises(InputError, match="policy"):
        combine({"A": 0.0}, [], policy="guess")
    with pytest.raises(InputError, match="strategy"):
        combine({"A": 0.0}, [], strategy="magic")


def test_nan_scores_are_rejected_with_the_label():
    with pytest.raises(InputError, match="'B'"):
        combine({"A": -1.0, "B": float("nan")}, [])
    with pytest.raises(InputError, match="expert"):
        combine({"A": -1.0, "B": -1.0}, [({"A": float("nan"), "B": 0.0}, {"A": 0.0, "B": 0.0})])


def test_expert_additive_ignores_the_anti_expert():
    base = {"A": 0.0, "B": 0.0}
    pair = ({"A": math.log(0.75), "B": math.log(0.25)}, {"A": 99.0, "B": -99.0})
    c = combine(base, [pair], 1.0, strategy="expert_additive")
    assert c.steered_probs == pytest.approx({"A": 0.75, "B": 0.25}, abs=1e-12)


def test_interpolate_mixes_probabilities():
    base = {"A": math.log(0.8), "B": math.log(0.2)}
    pair = ({"A": math.log(0.1), "B": math.log(0.3)}, {"A": 0.0, "B": 0.0})  # expert over C: 0.25/0.75
    c = combine(base, [pair], 0.5, strategy="interpolate")
    assert c.steered_probs == pytest.approx(
        {"A": 0.5 * 0.8 + 0.5 * 0.25, "B": 0.5 * 0.2 + 0.5 * 0.75}, abs=1e-12
    )
    with pytest.raises(InputError, match="weights"):
        combine(base, [pair], 1.5, strategy="interpolate")


def test_entropy_gated_alpha_scales_with_base_uncertainty():
    pair = ({"A": 0.0, "B": LN3}, {"A": 0.0, "B": 0.0})
    uniform = combine({"A": 0.0, "B": 0.0}, [pair], 1.0, strategy="entropy_gated")
    assert uniform.alphas == (pytest.approx(1.0),)
    assert uniform.steered_probs["B"] == pytest.approx(0.75, abs=1e-12)
    peaked = {"A": math.log(0.9), "B": math.log(0.1)}
    g = entropy_ratio({"A": 0.9, "B": 0.1})
    c = combine(peaked, [pair], 1.0, strategy="entropy_gated")
    assert c.alphas[0] == pytest.approx(g)
    expected_b = 0.1 * 3**g / (0.9 + 0.1 * 3**g)
    assert c.steered_probs["B"] == pytest.approx(expected_b, abs=1e-12)


def test_pair_missing_a_label_is_an_error():
    with pytest.raises(InputError, match="'B'"):
        combine({"A": 0.0, "B": 0.0}, [({"A": 0.0}, {"A": 0.0, "B": 0.0})])
