"""Bad input and unusable outputs in mc / eval / sweep / demo: one clear line, nothing lost, nothing
overwritten, and a resume that notices what changed. No model is loaded: the base is a registered
test provider that answers from the letters in the prompt."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from blackbox_proxy.adapters.base import register_provider, unregister_provider

from blackbox_proxy.cli import main
from blackbox_proxy.types import TokenLogprob, TopLogprobs


class FirstLetter:
    """Always prefers "B" a little over "A" and the rest."""

    kind, endpoint, max_k, max_concurrency, capabilities = "first", "chat", None, 2, frozenset()

    def __init__(self, model: str) -> None:
        self.model = model

    def top_logprobs(self, prompt: Any, k: int) -> TopLogprobs:
        e = (
            TokenLogprob("B", math.log(0.5)),
            TokenLogprob("A", math.log(0.3)),
            TokenLogprob("C", math.log(0.1)),
        )
        return TopLogprobs(e[:k], k, e[0], self.model, self.kind)

    async def atop_logprobs(self, prompt: Any, k: int) -> TopLogprobs:
        return self.top_logprobs(prompt, k)

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _provider() -> Any:
    register_provider("test-first", lambda o: FirstLetter(o.model))
    yield
    unregister_provider("test-first")


def _write(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


QS = [{"id": f"q{i}", "question": f"Q{i}?", "choices": ["a", "b", "c"], "answer": i % 3} for i in range(4)]
MC = ["mc", "--provider", "test-first", "--model", "m", "-q"]


def _rc(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse refuses a flag value itself
        return int(exc.code or 0)


def _one_line(capsys: Any, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1, err
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in err
    return lines[0]


def test_output_equal_to_input_is_refused(tmp_path: Path, capsys: Any) -> None:
    q = _write(tmp_path / "q.csv", QS)  # a questions file that happens to end in .csv
    before = q.read_bytes()
    assert _rc([*MC, str(q), "--out", str(q)]) == 2
    _one_line(capsys, "also an input file")
    assert q.read_bytes() == before


@pytest.mark.parametrize(
    ("out", "needle"),
    [("r.txt", "use a .csv or .parquet"), (".", "is a directory")],
)
def test_unusable_out_is_refused_before_any_work(tmp_path: Path, capsys: Any, out: str, needle: str) -> None:
    q = _write(tmp_path / "q.jsonl", QS)
    assert _rc([*MC, str(q), "--out", str(tmp_path / out)]) == 2
    _one_line(capsys, needle)
    assert not (tmp_path / (out + ".run")).exists()


def test_missing_out_folder_is_created_first(tmp_path: Path) -> None:
    assert (
        _rc([*MC, str(_write(tmp_path / "q.jsonl", QS)), "--out", str(tmp_path / "new" / "dir" / "r.csv")])
        == 0
    )
    assert len(pd.read_csv(tmp_path / "new" / "dir" / "r.csv")) == 4


def test_out_under_a_file_is_refused(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "notadir").write_text("x")
    assert (
        _rc([*MC, str(_write(tmp_path / "q.jsonl", QS)), "--out", str(tmp_path / "notadir" / "r.csv")]) == 2
    )
    _one_line(capsys, "is a file, not a folder")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--limit", "0"], "at least 1"),
        (["--limit", "-1"], "at least 1"),
        (["--timeout", "nan"], "finite number above 0"),
        (["--timeout", "-5"], "finite number above 0"),
        (["--threads", "0"], "at least 1"),
        (["--top-logprobs", "0"], "at least 1"),
        (["--alpha", "1"], "--alpha needs --expert"),
        (["--sweep", "x"], "'x' is not a number"),
        (["--debias", "pride", "--debias-fraction", "2"], "debias fraction"),
    ],
)
def test_bad_flags_are_one_line(tmp_path: Path, capsys: Any, extra: list[str], needle: str) -> None:
    q = _write(tmp_path / "q.jsonl", QS)
    assert _rc([*MC, str(q), "--out", str(tmp_path / "r.csv"), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_non_utf8_and_folder_inputs(tmp_path: Path, capsys: Any) -> None:
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"question": "caf\xe9?", "choices": ["a", "b"]}\n'.encode("latin-1"))
    assert _rc([*MC, str(bad), "--out", str(tmp_path / "r.csv")]) == 2
    _one_line(capsys, "not UTF-8")
    assert (
        _rc(["eval", "jsonl", "--data", str(tmp_path), "--provider", "test-first", "--model", "m", "-q"]) == 2
    )
    _one_line(capsys, "is a directory")


def test_resume_refreshes_gold_and_redoes_only_a_corrupt_record(tmp_path: Path) -> None:
    q = _write(tmp_path / "q.jsonl", QS)
    out = tmp_path / "r.csv"
    assert _rc([*MC, str(q), "--out", str(out)]) == 0
    first = pd.read_csv(out, keep_default_na=False)
    assert list(first["gold_letter"]) == ["A", "B", "C", "A"]
    # the answer key changes (gold is not what was paid for), and one stored record is damaged
    _write(q, [{**r, "answer": 1} for r in QS])
    res = tmp_path / "r.csv.run" / "results.jsonl"
    lines = res.read_text().splitlines()
    lines[1] = "{garbage"
    res.write_text("\n".join(lines) + "\n")
    base_before = (tmp_path / "r.csv.run" / "base.jsonl").read_text()
    assert _rc([*MC, str(q), "--out", str(out)]) == 0
    again = pd.read_csv(out, keep_default_na=False)
    assert list(again["gold_letter"]) == ["B"] * 4
    assert list(again["base_letter"]) == list(first["base_letter"])
    # the damaged record was redone from the stored base answer: no new base request
    assert (tmp_path / "r.csv.run" / "base.jsonl").read_text() == base_before
    # a question whose text changed under the same id is refused, naming it
    _write(q, [{**QS[0], "question": "Something else?"}, *QS[1:]])
    assert _rc([*MC, str(q), "--out", str(out)]) == 2


def test_damaged_run_json_is_one_line(tmp_path: Path, capsys: Any) -> None:
    q = _write(tmp_path / "q.jsonl", QS)
    run = tmp_path / "r.csv.run"
    run.mkdir()
    (run / "run.json").write_text("")
    assert _rc([*MC, str(q), "--out", str(tmp_path / "r.csv")]) == 2
    _one_line(capsys, "run.json is damaged")


def test_sweep_plot_into_a_missing_folder_and_demo_limit(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "file").write_text("x")
    assert _rc(["sweep", "--from-run", str(tmp_path), "--plot", str(tmp_path / "file" / "p.png")]) == 2
    _one_line(capsys, "is a file, not a folder")
    assert _rc(["demo", "--limit", "100"]) == 2
    _one_line(capsys, "the shipped sample has 40 questions")


def test_exact_policy_needs_the_capability(tmp_path: Path, capsys: Any) -> None:
    q = _write(tmp_path / "q.jsonl", QS)
    assert _rc([*MC, str(q), "--missing", "exact", "--out", str(tmp_path / "r.csv")]) == 2
    _one_line(capsys, "lacks the 'exact' capability", "vLLM")
