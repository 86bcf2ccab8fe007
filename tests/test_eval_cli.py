"""The runner's derived answers, and the eval / sweep commands on stored runs and bad flags (no models)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from blackbox_proxy.cli import main
from blackbox_proxy.evaluation.runner import RESULTS_FILE, EvalResult, load_run
from blackbox_proxy.experts import PairScores
from blackbox_proxy.files import JsonlStore
from blackbox_proxy.rerank import MCRecord, record_row, steer
from blackbox_proxy.types import MCQuestion, TokenLogprob, TopLogprobs, Usage


def _top(entries: dict[str, float], k: int) -> TopLogprobs:
    return TopLogprobs(
        tuple(TokenLogprob(t, v) for t, v in entries.items()), k, None, "m", "test", Usage(10, 1)
    )


# base prefers A; the pair pushes towards C, which is missing from the base's top-3
TOP = _top({"A": math.log(0.6), "B": math.log(0.25), " The": math.log(0.1)}, 3)
EXPERT = {"A": math.log(0.1), "B": math.log(0.2), "C": math.log(0.7)}
ANTI = {"A": math.log(0.5), "B": math.log(0.3), "C": math.log(0.2)}
Q = MCQuestion("q1", "Which?", ("a", "b", "c"), answer=2, meta={"week": "2025-01-03", "source": "CNN"})


def _record(qid: str = "q1", gold: str = "C", top: TopLogprobs = TOP) -> MCRecord:
    return MCRecord(
        qid, ("A", "B", "C"), gold, top, (PairScores(EXPERT, ANTI),), {"week": "2025-01-03", "source": "CNN"}
    )


def test_record_row_matches_steer() -> None:
    alphas = (0.0, 0.5, 1.0, 2.0)
    row = record_row(_record(), (1.0,), sweep=alphas)
    assert row["base_letter"] == "A" and row["base_correct"] is False
    assert row["expert_letter"] == "C" and row["anti_letter"] == "A"
    assert row["n_missing"] == 1 and row["missing"] == "C" and not row["all_missing"]
    for a in alphas:
        ans = steer(Q, TOP, [(EXPERT, ANTI)], alpha=a)
        assert row[f"steered_letter@{a:g}"] == ans.letter
    assert row["steered_letter@0"] == "A"  # alpha 0 is the base
    assert row["steered_letter@2"] == "C"  # a strong push overturns it
    assert row["steered_letter"] == steer(Q, TOP, [(EXPERT, ANTI)], alpha=1.0).letter
    # the exclude policy drops C instead of flooring it
    ex = record_row(_record(), (2.0,), policy="exclude", sweep=(1.0,))
    assert ex["steered_letter@1"] in ("A", "B")
    # the sweep scales the per-pair alphas: --alpha 2 with --sweep 1 is alpha 2
    assert record_row(_record(), (2.0,), sweep=(1.0,))["steered_letter@1"] == "C"


def test_top_json_roundtrip() -> None:
    top = TopLogprobs(
        (TokenLogprob("A", -0.5, 32), TokenLogprob("B", -1.5)),
        2,
        TokenLogprob("A", -0.5),
        "m",
        "p",
        Usage(3, 1, 1, True),
    )
    assert TopLogprobs.from_json(top.to_json()) == top
    rec = _record()
    assert MCRecord.from_json(rec.to_json()) == rec


def _write_run(run_dir: Path, n: int = 6) -> None:
    run_dir.mkdir(parents=True)
    store = JsonlStore(run_dir / RESULTS_FILE)
    for i in range(n):
        store.append(_record(f"q{i}", "C" if i % 2 == 0 else "A").to_json())


def test_summary_and_sweep_from_stored_records(tmp_path: Path) -> None:
    _write_run(tmp_path / "run")
    res = load_run(tmp_path / "run", (0.0, 2.0))
    s = res.summary().set_index("system")
    # gold alternates C / A; base always says A, proxy at alpha 2 always says C
    assert s.loc["base", "accuracy"] == 0.5 and s.loc["proxy a=2", "accuracy"] == 0.5
    assert s.loc["proxy a=2", "only_base"] == 3 and s.loc["proxy a=2", "only_system"] == 3
    assert s.loc["proxy a=2", "mcnemar_p"] == 1.0
    assert s.loc["proxy a=0", "only_base"] == 0
    sw = res.sweep([0.0, 2.0])
    assert list(sw["alpha"]) == [0.0, 2.0] and set(sw.columns) >= {"base", "proxy", "expert", "anti_expert"}


def test_all_missing_questions_are_excluded() -> None:
    none_top = _top({" The": -0.1, " It": -3.0}, 2)
    recs = [
        _record("q0"),
        _record("q1", "C", none_top),
    ]
    res = EvalResult(recs, (1.0,))
    t = res.table()
    assert list(t["all_missing"]) == [False, True]
    s = res.summary().set_index("system")
    assert s.loc["base", "n"] == 1 and s.loc["base", "excluded"] == 1
    assert res.summary(exclude_all_missing=False).set_index("system").loc["base", "n"] == 2


def test_sweep_cli_from_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "run")
    png, csv = tmp_path / "sweep.png", tmp_path / "sweep.csv"
    rc = main(
        [
            "sweep",
            "--from-run",
            str(tmp_path / "run"),
            "--sweep",
            "0,0.5,1,2",
            "--plot",
            str(png),
            "--out",
            str(csv),
        ]
    )
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = pd.read_csv(csv)
    assert list(table["alpha"]) == [0.0, 0.5, 1.0, 2.0]
    assert "proxy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "mmlu", "--weeks", "2025-01..2025-02"], "--weeks applies to realtimeqa only"),
        (["eval", "arc-easy", "--expert", "smollm2-135m-instruct"], "1 --expert but 0 --anti-expert"),
        (["eval", "arc-easy", "--alpha", "1"], "--alpha needs --expert"),
        (
            [
                "eval",
                "arc-easy",
                "--expert",
                "a",
                "--expert",
                "b",
                "--anti-expert",
                "c",
                "--anti-expert",
                "d",
            ],
            "unknown model spec",
        ),
        (["eval", "arc-easy", "--out", "x.txt"], "use a .csv or .parquet"),
        (["eval", "arc-easy", "--limit", "0"], "must be at least 1"),
        (
            ["eval", "arc-easy", "--expert", "a", "--anti-expert", "b", "--alpha", "0.5,1,2"],
            "use --sweep 0.5,1,2",
        ),
        (["eval", "jsonl"], "needs --data FILE"),
        (["eval", "realtimeqa", "--weeks", "2025-13"], "invalid month"),
        (["eval", "arc-easy", "--base-url", "http://127.0.0.1:9/v1"], "--model is required"),
        (["sweep", "--from-run", "/nonexistent/run"], "holds no results.jsonl"),
    ],
)
def test_cli_errors_are_clear(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        rc = main(argv)
    except SystemExit as exc:  # a flag argparse itself refuses
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_error_policy_names_the_question() -> None:
    from blackbox_proxy.errors import MissingCandidateError

    res = EvalResult(
        [_record("q7"), _record("q8", top=_top({"A": -0.5, "B": -1.2, "C": -2.0}, 3))], (1.0,), policy="error"
    )
    t = res.table().set_index("id")
    assert t.loc["q7", "error"].startswith("MissingCandidateError") and "['C']" in t.loc["q7", "error"]
    assert t.loc["q8", "error"] == "" and t.loc["q8", "base_letter"] == "A"
    assert MissingCandidateError


def test_results_written_as_csv_or_parquet(tmp_path: Path) -> None:
    from blackbox_proxy.files import write_table

    t = EvalResult([_record("q0"), _record("q1", "A")], (0.5, 2.0)).table()
    write_table(t, tmp_path / "r.csv")
    write_table(t, tmp_path / "r.parquet")
    pq = pd.read_parquet(tmp_path / "r.parquet")
    pd.testing.assert_frame_equal(pq, t)
    assert list(pd.read_csv(tmp_path / "r.csv")["steered_letter@2"]) == list(t["steered_letter@2"])


def test_base_without_logprobs_is_an_error_row_that_resume_retries(fault_server, tmp_path: Path) -> None:
    """A request that carries no log-probs becomes an error row (the run goes on); a resume re-asks
    that question alone and keeps every answer already received."""
    from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
    from fault_http import Reply, chat_body

    from blackbox_proxy.evaluation.runner import EvaluationRunner

    qs = [MCQuestion(f"q{i}", f"Question {i}?", ("x", "y", "z"), answer=0) for i in range(3)]
    fault_server.push(
        Reply(body=chat_body()), Reply(body=chat_body(logprobs_null=True)), Reply(body=chat_body())
    )
    provider = OpenAIChatProvider(
        "fake", fault_server.base_url, "sk-unused", max_retries=0, max_concurrency=1
    )
    runner = EvaluationRunner(
        provider, k=3, concurrency=1, chunk_size=1, run_dir=tmp_path / "run", progress=False
    )
    res = runner.run(qs)
    assert fault_server.count == 3 and runner.requests == 3
    t = res.table().set_index("id")
    assert t.loc["q1", "all_missing"] and "no log-probs" in t.loc["q1", "error"]
    assert t.loc["q0", "base_letter"] == "A" and t.loc["q0", "error"] == ""
    s = res.summary().set_index("system")
    assert s.loc["base", "n"] == 2 and s.loc["base", "excluded"] == 1 and s.loc["base", "accuracy"] == 1.0
    fault_server.push(Reply(body=chat_body()))
    again = EvaluationRunner(provider, k=3, run_dir=tmp_path / "run", progress=False)
    t2 = again.run(qs).table().set_index("id")
    assert fault_server.count == 4 and again.requests == 1
    assert t2.loc["q1", "error"] == "" and t2.loc["q1", "base_letter"] == "A"
    assert t2.loc[["q0", "q2"]].equals(t.loc[["q0", "q2"]])


def test_controls_carry_no_question_knowledge() -> None:
    """The mean-offset control gives every question the same offsets; with all questions alike it
    equals the proxy, and the shuffled control keeps the multiset of offsets."""
    from blackbox_proxy.evaluation.runner import control_records

    recs = [_record(f"q{i}", "C") for i in range(4)]
    mean = control_records(recs, (2.0,), "mean")
    for m in mean:
        want = {k: 2.0 * (EXPERT[k] - ANTI[k]) for k in EXPERT}
        assert m.pairs[0].offsets() == pytest.approx(want)
    res = EvalResult(recs, (0.5, 1.0), alphas=(2.0,))
    s = res.summary().set_index("system")
    assert s.loc["mean-offset control a=1", "accuracy"] == s.loc["proxy a=1", "accuracy"]
    assert s.loc["shuffled-offset control a=0.5", "accuracy"] == s.loc["proxy a=0.5", "accuracy"]
    assert res.table()["alpha"].tolist() == ["2"] * 4  # the main columns are at --alpha, not the sweep


def test_summary_pairs_the_proxy_with_its_mean_offset_control() -> None:
    """A question-specific offset beats the letter prior, and the summary says so with a paired test;
    offsets that are the same for every question tie with their own mean."""
    top = _top({"A": math.log(0.5), "B": math.log(0.3), "C": math.log(0.2)}, 3)
    to_b = {"A": math.log(0.1), "B": math.log(0.8), "C": math.log(0.1)}
    to_c = {"A": math.log(0.1), "B": math.log(0.1), "C": math.log(0.8)}
    flat = {k: math.log(1 / 3) for k in "ABC"}
    # gold alternates B / C and the expert knows it: its offsets point at the gold of each question
    recs = [
        MCRecord(f"q{i}", ("A", "B", "C"), g, top, (PairScores(to_b if g == "B" else to_c, flat),), {})
        for i, g in enumerate("BC" * 6)
    ]
    s = EvalResult(recs, (2.0,), alphas=(1.0,)).summary().set_index("system")
    assert s.loc["proxy a=2", "accuracy"] == 1.0
    # the mean offset lifts B and C alike, so it can only ever pick one of them for every question
    assert s.loc["mean-offset control a=2", "accuracy"] <= 0.5
    assert s.loc["proxy a=2", "delta_vs_control"] >= 0.5
    assert s.loc["proxy a=2", "mcnemar_p_vs_control"] < 0.05
    assert pd.isna(s.loc["base", "mcnemar_p_vs_control"])  # only the proxy rows are paired with a control

    same = EvalResult([_record(f"q{i}", "C") for i in range(4)], (1.0,), alphas=(2.0,))
    t = same.summary().set_index("system")
    assert t.loc["proxy a=1", "delta_vs_control"] == 0.0 and t.loc["proxy a=1", "mcnemar_p_vs_control"] == 1.0
