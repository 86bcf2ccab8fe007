"""Statistics on hand-made tables whose CIs and p-values were worked out by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from blackbox_proxy.errors import InputError
from blackbox_proxy.evaluation import stats

# A paired table of 12 questions: base right on 5, proxy right on 10.
# Discordant pairs: base-only right = 1 (q3), proxy-only right = 6 (q6..q11).
BASE = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
PROXY = [1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0]


def test_wilson_by_hand() -> None:
    # 7/10 at z = 1.959964: centre = (0.7 + z^2/20) / (1 + z^2/10) = 0.644491,
    # half-width = z sqrt(0.021 + z^2/400) / (1 + z^2/10) = 0.247714: [0.3968, 0.8922]
    # (the Wald interval would be [0.416, 0.984]).
    lo, hi = stats.wilson_interval(7, 10)
    assert lo == pytest.approx(0.3968, abs=5e-5)
    assert hi == pytest.approx(0.8922, abs=5e-5)


def test_wilson_edges() -> None:
    # 0/10: lower bound exactly 0, upper = z^2 / (n + z^2) = 3.841459 / 13.841459.
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(3.841459 / 13.841459, abs=1e-6)
    lo, hi = stats.wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 3.841459 / 13.841459, abs=1e-6)
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(InputError, match="correct"):
        stats.wilson_interval(11, 10)


def test_accuracy_object() -> None:
    acc = stats.accuracy([True] * 7 + [False] * 3, "x")
    assert (acc.correct, acc.n, acc.accuracy) == (7, 10, 0.7)
    assert acc.ci_low == pytest.approx(0.3968, abs=5e-5)
    assert acc.to_dict()["name"] == "x"
    # a 90% interval is narrower than the 95% one
    acc90 = stats.accuracy([True] * 7 + [False] * 3, "x", level=0.90)
    assert acc.ci_low < acc90.ci_low < acc90.ci_high < acc.ci_high


def test_mcnemar_exact_by_hand() -> None:
    # b = 1, c = 6, n = 7: P(X <= 1) = (C(7,0) + C(7,1)) / 2^7 = 8/128, two-sided p = 0.125.
    r = stats.mcnemar_exact(BASE, PROXY)
    assert (r.b, r.c, r.n) == (1, 6, 12)
    assert r.p_value == pytest.approx(0.125, abs=1e-12)
    # symmetric in the two systems
    assert stats.mcnemar_exact(PROXY, BASE).p_value == pytest.approx(0.125, abs=1e-12)
    # b = 0, c = 8: p = 2 / 256
    assert stats.mcnemar_exact([0] * 8, [1] * 8).p_value == pytest.approx(2 / 256)
    # no discordant pairs: p = 1
    assert stats.mcnemar_exact([1, 0], [1, 0]).p_value == 1.0
    # balanced discordance: capped at 1
    assert stats.mcnemar_exact([1, 0], [0, 1]).p_value == 1.0


def test_mcnemar_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="length"):
        stats.mcnemar_exact([1, 0], [1])
    with pytest.raises(InputError, match="missing"):
        stats.mcnemar_exact([1, None], [1, 0])


def test_paired_bootstrap() -> None:
    r = stats.paired_bootstrap(BASE, PROXY, n_boot=4000, seed=3)
    assert r.diff == pytest.approx(5 / 12)
    assert r.ci_low < r.diff < r.ci_high
    # the difference is clearly positive on resampling: the CI excludes 0 and p is small
    assert r.ci_low > 0 and r.p_value < 0.05
    # seeded: identical on repeat, different seed -> (almost surely) different interval
    assert stats.paired_bootstrap(BASE, PROXY, n_boot=4000, seed=3) == r
    # identical systems: difference 0, p = 1
    same = stats.paired_bootstrap(BASE, BASE, n_boot=500)
    assert same.diff == 0 and same.p_value == 1.0 and same.ci_low == same.ci_high == 0
    with pytest.raises(InputError):
        stats.paired_bootstrap([], [], n_boot=10)


def test_breakdown_per_week() -> None:
    df = pd.DataFrame(
        {
            "week": ["w1"] * 4 + ["w2"] * 8,
            "base_correct": [bool(x) for x in BASE],
            "proxy": [bool(x) for x in PROXY],
        }
    )
    out = stats.breakdown(df, "week", ["base_correct", "proxy"])
    assert len(out) == 4
    w1 = out[(out.week == "w1") & (out.name == "base_correct")].iloc[0]
    assert (w1.correct, w1.n) == (4, 4)
    w2p = out[(out.week == "w2") & (out.name == "proxy")].iloc[0]
    assert (w2p.correct, w2p.n) == (7, 8)
    lo, hi = stats.wilson_interval(7, 8)
    assert (w2p.ci_low, w2p.ci_high) == (lo, hi)
    with pytest.raises(InputError, match="group by"):
        stats.breakdown(df, "source", ["proxy"])


def test_missing_rates() -> None:
    df = pd.DataFrame({"n_missing": [0, 1, 4, 0], "n_choices": [4, 4, 4, 2]})
    r = stats.missing_rates(df)
    assert r["any_missing"] == 0.5 and r["all_missing"] == 0.25 and r["mean_missing"] == 1.25
    assert math.isnan(stats.missing_rates(df.iloc[:0])["any_missing"])
