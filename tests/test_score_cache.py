"""Expert-pair scores are cached on disk by weight digest and rendered prompt: a second run with a new
run directory (say, a new debias method) scores nothing again and gives identical answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from blackbox_proxy.cli import main
from blackbox_proxy.experts import ExpertPair

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

QUESTIONS = [
    {
        "id": "mars",
        "question": "Which planet is known as the Red Planet?",
        "choices": ["Venus", "Mars"],
        "answer": 1,
    },
    {"id": "sum", "question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1},
]


def test_second_run_rescores_nothing(llama_server: Any, tmp_path: Path, monkeypatch: Any) -> None:
    calls: list[int] = []
    real = ExpertPair.score

    def counting(self: ExpertPair, prompts: Any, *a: Any, **kw: Any) -> Any:
        calls.append(len(list(prompts)))
        return real(self, prompts, *a, **kw)

    monkeypatch.setattr(ExpertPair, "score", counting)
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in QUESTIONS), encoding="utf-8")
    cache = tmp_path / "scores.sqlite"
    argv = ["mc", str(q), "--base-url", llama_server.base_url, "--model", llama_server.model]
    argv += ["--expert", "qwen2.5-coder-0.5b-instruct", "--anti-expert", "smollm2-135m-instruct"]
    argv += ["--score-cache", str(cache), "-q"]
    assert main([*argv, "--out", str(tmp_path / "a.csv")]) == 0
    assert sum(calls) == 2
    assert main([*argv, "--out", str(tmp_path / "b.csv"), "--alpha", "2"]) == 0  # a new run directory
    assert sum(calls) == 2  # nothing scored again
    a = pd.read_csv(tmp_path / "a.csv", keep_default_na=False)
    b = pd.read_csv(tmp_path / "b.csv", keep_default_na=False)
    for col in ("expert_lp_A", "anti_lp_A", "expert_lp_B", "anti_lp_B", "base_letter"):
        assert a[col].tolist() == b[col].tolist()
    assert main([*argv[:-3], "--no-score-cache", "--out", str(tmp_path / "c.csv")]) == 0
    assert sum(calls) == 4  # without the cache the pair scores again
