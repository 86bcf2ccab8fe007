"""Letter-bias correction (blackbox_proxy.debias): exact numbers computed by hand.

The worked example: three options a, b, c; a letter prior pi = (1/2, 1/4, 1/4) over positions
A, B, C; a content preference d = (1/2, 1/4, 1/4) for options a, b, c. A model that observes
p(position i) ∝ pi_i * d(option shown at i) gives, under the cyclic shifts 0, 1, 2:

    shift 0 shows a, b, c:  (1/4, 1/16, 1/16) -> (2/3, 1/6, 1/6)
    shift 1 shows b, c, a:  (1/8, 1/16, 1/8)  -> (2/5, 1/5, 2/5)
    shift 2 shows c, a, b:  (1/8, 1/8, 1/16)  -> (2/5, 2/5, 1/5)

Geometric means per position: A (8/75)^(1/3), B and C (1/75)^(1/3), i.e. 2 : 1 : 1 = pi; per
option (letters mapped back): a 8/75, b 1/75, c 1/75 under the cube root, i.e. d.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from blackbox_proxy import debias as db
from blackbox_proxy.debias import DebiasError
from blackbox_proxy.types import MCQuestion

ABC = ("A", "B", "C")
SHIFT_OBS = {
    0: {"A": 2 / 3, "B": 1 / 6, "C": 1 / 6},
    1: {"A": 2 / 5, "B": 1 / 5, "C": 2 / 5},
    2: {"A": 2 / 5, "B": 2 / 5, "C": 1 / 5},
}


def logs(p: dict[str, float], const: float = 0.0) -> dict[str, float]:
    """Log-probs, shifted by a constant (the functions must not care)."""
    return {k: math.log(v) + const for k, v in p.items()}


def close(a: dict[str, float] | None, b: dict[str, float], tol: float = 1e-12) -> bool:
    assert a is not None
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) < tol for k in b)


def q3(qid: str = "q1") -> MCQuestion:
    return MCQuestion(qid, "Which?", ("a", "b", "c"), 0)


# -- pure helpers ----------------------------------------------------------------------------------


def test_normalize_and_divide_prior_exact() -> None:
    assert close(db.normalize(logs({"A": 0.5, "B": 0.25, "C": 0.25}, 7.0)), {"A": 0.5, "B": 0.25, "C": 0.25})
    # (0.6, 0.2, 0.2) / (0.5, 0.25, 0.25) = (1.2, 0.8, 0.8) -> (3/7, 2/7, 2/7)
    got = db.divide_prior(logs({"A": 0.6, "B": 0.2, "C": 0.2}, -3.0), {"A": 0.5, "B": 0.25, "C": 0.25})
    assert close(got, {"A": 3 / 7, "B": 2 / 7, "C": 2 / 7})
    # -inf for a letter is a zero probability, not an error
    assert close(db.normalize({"A": 0.0, "B": -math.inf}), {"A": 1.0, "B": 0.0})


def test_normalize_rejects_unusable_scores() -> None:
    with pytest.raises(DebiasError, match="unusable"):
        db.normalize({"A": float("nan"), "B": 0.0})
    with pytest.raises(DebiasError, match="-inf"):
        db.normalize({"A": -math.inf, "B": -math.inf})
    with pytest.raises(DebiasError, match="no score for letter 'C'"):
        db.normalize({"A": 0.0, "B": 0.0}, ABC)
    with pytest.raises(DebiasError, match="positive"):
        db.divide_prior({"A": 0.0, "B": 0.0}, {"A": 1.0, "B": 0.0})


def test_cyclic_shift_and_unshift() -> None:
    q = MCQuestion("x", "Q?", ("a", "b", "c", "d"), 0, {"k": 1})
    s1 = db.cyclic_shift(q, 1)
    assert s1.choices == ("b", "c", "d", "a") and s1.answer == 3 and s1.id == "x#cyc1"
    assert s1.meta == {"k": 1, "source_id": "x", "shift": 1}
    s3 = db.cyclic_shift(q, 3)
    assert s3.choices == ("d", "a", "b", "c") and s3.answer == 1
    assert db.cyclic_shift(q, 4) is q and db.cyclic_shift(q, 0) is q
    # scores on s1's letters, keyed back to q's options: s1 shows a at D
    back = db.unshift({"A": 1.0, "B": 2.0, "C": 3.0, "D": 4.0}, 1, q.labels)
    assert back == {"A": 4.0, "B": 1.0, "C": 2.0, "D": 3.0}


def test_question_prior_and_permutation_average_recover_the_factors() -> None:
    shifted = {s: logs(p, const=s) for s, p in SHIFT_OBS.items()}
    assert close(db.question_prior(shifted, ABC), {"A": 0.5, "B": 0.25, "C": 0.25})
    assert close(db.permutation_average(shifted, ABC), {"A": 0.5, "B": 0.25, "C": 0.25})
    # two options: shift 0 (0.8, 0.2), shift 1 (0.5, 0.5): option a sqrt(0.8*0.5), b sqrt(0.2*0.5)
    two = {0: logs({"A": 0.8, "B": 0.2}), 1: logs({"A": 0.5, "B": 0.5})}
    assert close(db.permutation_average(two, ("A", "B")), {"A": 2 / 3, "B": 1 / 3})
    with pytest.raises(DebiasError, match="all 3 cyclic shifts"):
        db.question_prior({0: shifted[0], 1: shifted[1]}, ABC)


def test_mean_prior_is_arithmetic() -> None:
    got = db.mean_prior([{"A": 0.5, "B": 0.3, "C": 0.2}, {"A": 0.3, "B": 0.3, "C": 0.4}], ABC)
    assert close(got, {"A": 0.4, "B": 0.3, "C": 0.3})


# -- plans -----------------------------------------------------------------------------------------


def test_plans_count_extra_calls() -> None:
    qs = [MCQuestion(f"q{i}", "Q?", tuple("abcd"), 0) for i in range(25)]
    qs += [MCQuestion(f"f{i}", "Q?", tuple("abcde"), 0) for i in range(3)]
    assert db.plan("none", qs).extra_calls == 0
    perm = db.plan("permute", qs)
    assert perm.extra_calls == 25 * 3 + 3 * 4
    assert [e.key for e in perm.extra[:3]] == ["q0#cyc1", "q0#cyc2", "q0#cyc3"]
    assert perm.extra[0].question.choices == ("b", "c", "d", "a") and perm.extra[0].source_id == "q0"
    # 10% per option count: round(2.5) = 2 of the 4-option group, at least 1 of the 5-option group
    pride = db.plan("pride", qs, fraction=0.1, seed=3)
    n4 = sum(1 for i in pride.estimation_ids if i.startswith("q"))
    n5 = sum(1 for i in pride.estimation_ids if i.startswith("f"))
    assert (n4, n5) == (2, 1) and pride.extra_calls == 2 * 3 + 1 * 4
    assert db.plan("pride", qs, fraction=0.1, seed=3).estimation_ids == pride.estimation_ids
    seeds = {db.plan("pride", qs, fraction=0.1, seed=s).estimation_ids for s in range(6)}
    assert len(seeds) > 1
    cal = db.plan("calibrate", qs)
    assert cal.extra_calls == 4  # ("N/A", "[MASK]") x option counts {4, 5}
    cf = cal.extra[0].question
    assert cf.question == "N/A" and cf.choices == ("N/A",) * 4 and cf.id.startswith(db.CONTENT_FREE_PREFIX)
    assert pride.to_dict()["extra_calls"] == 10


def test_plan_errors() -> None:
    qs = [q3("a"), q3("b")]
    with pytest.raises(DebiasError, match="unknown debias method 'median'"):
        db.plan("median", qs)
    with pytest.raises(DebiasError, match=r"fraction must be in \(0, 1\]"):
        db.plan("pride", qs, fraction=0.0)
    with pytest.raises(DebiasError, match="duplicate question id 'a'"):
        db.plan("none", [q3("a"), q3("a")])
    with pytest.raises(DebiasError, match="no questions"):
        db.plan("permute", [])
    with pytest.raises(DebiasError, match="unknown"):
        db.plan("pride", qs, estimation_ids=["zzz"])
    with pytest.raises(DebiasError, match="non-empty"):
        db.plan("calibrate", qs, content_free=[" "])


# -- apply -----------------------------------------------------------------------------------------


def test_pride_end_to_end_exact() -> None:
    qs = [q3("q1"), q3("q2"), q3("q3")]
    p = db.plan("pride", qs, estimation_ids=["q1"])
    assert [e.key for e in p.extra] == ["q1#cyc1", "q1#cyc2"]
    observed = {"q1": logs(SHIFT_OBS[0]), "q2": logs({"A": 0.6, "B": 0.2, "C": 0.2}, 2.0), "q3": None}
    extra = {"q1#cyc1": logs(SHIFT_OBS[1]), "q1#cyc2": logs(SHIFT_OBS[2])}
    r = db.apply(p, observed, extra)
    assert close(r.prior["by_n_options"]["3"], {"A": 0.5, "B": 0.25, "C": 0.25})
    assert close(r.probs["q1"], {"A": 0.5, "B": 0.25, "C": 0.25})  # estimation question: permutation average
    assert close(r.probs["q2"], {"A": 3 / 7, "B": 2 / 7, "C": 2 / 7})
    assert r.probs["q3"] is None and r.letter("q3") is None
    assert r.extra_calls == 2 and r.estimation_ids == ("q1",)
    assert r.letters() == {"q1": "A", "q2": "A", "q3": None}
    d = r.to_dict()
    assert d["method"] == "pride" and d["extra_calls"] == 2 and d["prior"]["estimation_questions"] == 1


def test_pride_averages_question_priors_and_flips_an_answer() -> None:
    # q1 has prior (1/2, 1/4, 1/4) (the worked example); q2 is content-free-like: the same
    # distribution (0.3, 0.3, 0.4) under every shift, so its question prior is (0.3, 0.3, 0.4).
    qs = [q3("q1"), q3("q2"), q3("q3")]
    p = db.plan("pride", qs, estimation_ids=["q1", "q2"])
    flat = logs({"A": 0.3, "B": 0.3, "C": 0.4})
    observed = {"q1": logs(SHIFT_OBS[0]), "q2": flat, "q3": logs({"A": 0.44, "B": 0.32, "C": 0.24})}
    extra = {"q1#cyc1": logs(SHIFT_OBS[1]), "q1#cyc2": logs(SHIFT_OBS[2]), "q2#cyc1": flat, "q2#cyc2": flat}
    r = db.apply(p, observed, extra)
    prior = {"A": 0.4, "B": 0.275, "C": 0.325}
    assert close(r.prior["by_n_options"]["3"], prior)
    # q3: (0.44/0.4, 0.32/0.275, 0.24/0.325) = (1.1, 1.163636.., 0.738461..): A -> B
    raw = {"A": 0.44 / 0.4, "B": 0.32 / 0.275, "C": 0.24 / 0.325}
    z = sum(raw.values())
    assert close(r.probs["q3"], {k: v / z for k, v in raw.items()})
    assert r.letter("q3") == "B"
    # q2 is an estimation question: its option average under shifts is (0.4*0.3*0.3)^(1/3) each -> uniform
    assert close(r.probs["q2"], {"A": 1 / 3, "B": 1 / 3, "C": 1 / 3})


def test_pride_needs_a_prior_for_each_option_count_and_all_scores() -> None:
    qs = [q3("q1"), MCQuestion("two", "Q?", ("x", "y"), 0)]
    p = db.plan("pride", qs, estimation_ids=["q1"])
    extra = {"q1#cyc1": logs(SHIFT_OBS[1]), "q1#cyc2": logs(SHIFT_OBS[2])}
    obs = {"q1": logs(SHIFT_OBS[0]), "two": {"A": 0.0, "B": -1.0}}
    with pytest.raises(DebiasError, match="no prior for 2-option questions"):
        db.apply(p, obs, extra)
    with pytest.raises(DebiasError, match="no score for extra prompt 'q1#cyc2'"):
        db.apply(p, obs, {"q1#cyc1": extra["q1#cyc1"]})
    with pytest.raises(DebiasError, match="no observed letter scores for question 'two'"):
        db.apply(p, {"q1": obs["q1"]}, extra)
    # an excluded shift makes the estimation question unusable: noted, and no prior remains
    with pytest.raises(DebiasError, match="no prior for 3-option"):
        db.apply(db.plan("pride", [q3("q1"), q3("q2")], estimation_ids=["q1"]),
                 {"q1": obs["q1"], "q2": obs["q1"]}, {"q1#cyc1": None, "q1#cyc2": extra["q1#cyc2"]})  # fmt: skip


def test_calibrate_exact() -> None:
    qs = [q3("q1"), MCQuestion("q4", "Q?", tuple("abcd"), 0)]
    p = db.plan("calibrate", qs)
    keys = [e.key for e in p.extra]
    assert len(keys) == 4
    na3, mask3 = db.content_free_question(3, "N/A").id, db.content_free_question(3, "[MASK]").id
    na4, mask4 = db.content_free_question(4, "N/A").id, db.content_free_question(4, "[MASK]").id
    assert set(keys) == {na3, mask3, na4, mask4}
    extra = {
        na3: logs({"A": 0.5, "B": 0.25, "C": 0.25}),
        mask3: logs({"A": 0.3, "B": 0.35, "C": 0.35}, 5.0),
        na4: logs({"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25}),
        mask4: None,  # excluded by the policy: the other content-free prompt still gives a prior
    }
    obs = {"q1": logs({"A": 0.4, "B": 0.4, "C": 0.2}), "q4": logs({"A": 0.1, "B": 0.2, "C": 0.3, "D": 0.4})}
    r = db.apply(p, obs, extra)
    assert close(r.prior["by_n_options"]["3"], {"A": 0.4, "B": 0.3, "C": 0.3})
    # (0.4/0.4, 0.4/0.3, 0.2/0.3) = (1, 4/3, 2/3), sum 3
    assert close(r.probs["q1"], {"A": 1 / 3, "B": 4 / 9, "C": 2 / 9})
    assert close(r.probs["q4"], {"A": 0.1, "B": 0.2, "C": 0.3, "D": 0.4})
    assert r.extra_calls == 4 and r.prior["content_free"] == ["N/A", "[MASK]"]
    with pytest.raises(DebiasError, match="every content-free prompt for 4 options was excluded"):
        db.apply(p, obs, {**extra, na4: None})


def test_permute_exact_and_incomplete() -> None:
    qs = [q3("q1"), MCQuestion("two", "Q?", ("x", "y"), 1)]
    p = db.plan("permute", qs)
    assert p.extra_calls == 3
    obs = {"q1": logs(SHIFT_OBS[0]), "two": logs({"A": 0.8, "B": 0.2})}
    extra = {
        "q1#cyc1": logs(SHIFT_OBS[1]),
        "q1#cyc2": logs(SHIFT_OBS[2]),
        "two#cyc1": logs({"A": 0.5, "B": 0.5}),
    }
    r = db.apply(p, obs, extra)
    assert close(r.probs["q1"], {"A": 0.5, "B": 0.25, "C": 0.25})
    assert close(r.probs["two"], {"A": 2 / 3, "B": 1 / 3})
    assert r.notes == ()
    # one shift excluded: the remaining ones are averaged and the run says so
    r2 = db.apply(p, obs, {**extra, "q1#cyc2": None})
    # option a: shift 0 at A (2/3), shift 1 at C (2/5); b: B 1/6, A 2/5; c: C 1/6, B 1/5
    raw = {"A": math.sqrt(2 / 3 * 2 / 5), "B": math.sqrt(1 / 6 * 2 / 5), "C": math.sqrt(1 / 6 * 1 / 5)}
    z = sum(raw.values())
    assert close(r2.probs["q1"], {k: v / z for k, v in raw.items()})
    assert "1 question(s)" in r2.notes[0] and r2.prior["incomplete"] == 1


def test_none_renormalises() -> None:
    p = db.plan("none", [q3("q1")])
    r = db.apply(p, {"q1": logs({"A": 0.2, "B": 0.2, "C": 0.1}, 1.0)})
    assert close(r.probs["q1"], {"A": 0.4, "B": 0.4, "C": 0.2})
    assert r.letter("q1") == "A" and r.extra_calls == 0  # a tie goes to the first letter


# -- the whole loop with a scorer that follows the factorisation exactly ---------------------------

PI = {3: (0.5, 0.25, 0.25), 4: (0.55, 0.15, 0.15, 0.15)}


def factored_scorer(prefs: dict[str, float]):
    """Letter log-probs ∝ prior(position) * preference(option text); content-free text scores 1."""

    def score(questions: Sequence[MCQuestion]) -> list[dict[str, float]]:
        out = []
        for q in questions:
            pi = PI[len(q.choices)]
            out.append(
                {
                    lab: math.log(pi[i] * prefs.get(c, 1.0))
                    for i, (lab, c) in enumerate(zip(q.labels, q.choices, strict=True))
                }
            )
        return out

    return score


def test_every_method_removes_a_factored_prior() -> None:
    prefs = {"right": 3.0, "wrong1": 1.0, "wrong2": 1.0, "wrong3": 1.0}
    qs = []
    for i in range(12):  # gold at every position in turn, 4 options
        ch = ["wrong1", "wrong2", "wrong3"]
        ch.insert(i % 4, "right")
        qs.append(MCQuestion(f"q{i}", f"Question {i}?", tuple(ch), i % 4))
    score = factored_scorer(prefs)
    none = db.debias("none", qs, score)
    assert [none.letter(q.id) for q in qs].count("A") == 12  # the prior wins: always "A"
    for method in ("pride", "calibrate", "permute"):
        r = db.debias(method, qs, score, fraction=0.2, seed=1)
        assert [r.letter(q.id) for q in qs] == [q.gold_letter for q in qs], method
        for q in qs:  # the exact content preference 3 : 1 : 1 : 1 is recovered
            assert abs(r.probs[q.id][q.gold_letter] - 0.5) < 1e-12, method
    assert db.debias("calibrate", qs, score).prior["by_n_options"]["4"] == pytest.approx(
        dict(zip("ABCD", PI[4], strict=True))
    )
    assert db.debias("pride", qs, score, fraction=0.2).extra_calls == 2 * 3
    assert db.debias("permute", qs, score).extra_calls == 12 * 3


def test_letter_stats_exact() -> None:
    st = db.letter_stats(["A", "A", "A", "B"], ["A", "B", "C", "D"])
    # answers + 0.5: (3.5, 1.5, 0.5, 0.5)/6; gold + 0.5: 0.25 each
    kl = 7 / 12 * math.log(7 / 3) + 2 * (1 / 12) * math.log(1 / 3)
    assert st.accuracy == 0.25 and st.top_share == 0.75 and abs(st.kl_from_gold - kl) < 1e-12
    assert st.answer_counts == {"A": 3, "B": 1, "C": 0, "D": 0} and st.gold_counts == dict.fromkeys("ABCD", 1)
    even = db.letter_stats(["A", "B", "C", "D"], ["D", "C", "B", "A"])
    assert even.kl_from_gold == 0.0 and even.accuracy == 0.0 and even.top_share == 0.25
    none = db.letter_stats([None, None, "E"], ["A", "B", "E"], labels="ABCDE")
    assert none.accuracy == 1 / 3 and none.top_share == 1 / 3
    with pytest.raises(DebiasError, match="2 answers but 1"):
        db.letter_stats(["A", "B"], ["A"])
