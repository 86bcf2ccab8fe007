"""The engine keeps one bad question from blocking a run: an oversized question is refused before any
model sees it, and the rest of the run goes on (real llama.cpp server, real SmolLM2 pair)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from blackbox_proxy.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_a_huge_question_is_an_error_row_and_costs_nothing(llama_server: Any, tmp_path: Path) -> None:
    qs = [
        {
            "id": "ok1",
            "question": "What is the capital of France?",
            "choices": ["Berlin", "Paris"],
            "answer": 1,
        },
        {"id": "huge", "question": "word " * 200_000, "choices": ["yes", "no"], "answer": 0},  # 1 MB
        {"id": "ok2", "question": "What is 2 + 2?", "choices": ["3", "4", "5"], "answer": 1},
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in qs), encoding="utf-8")
    out = tmp_path / "r.csv"
    argv = ["mc", str(path), "--base-url", llama_server.base_url, "--model", llama_server.model]
    argv += ["--expert", "smollm2-135m-instruct", "--anti-expert", "smollm2-135m-instruct"]
    assert main([*argv, "--out", str(out), "-q"]) == 0
    df = pd.read_csv(out, keep_default_na=False).set_index("id")
    assert (
        "more than the" in df.loc["huge", "error"]
        and "refused before any model saw it" in df.loc["huge", "error"]
    )
    assert df.loc["ok1", "error"] == "" and df.loc["ok2", "error"] == ""
    assert df.loc["ok1", "steered_letter"] in ("A", "B")
    base = [json.loads(x) for x in (tmp_path / "r.csv.run" / "base.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in base) == ["ok1", "ok2"]  # no base request for the huge question
