"""The real ``blackbox-proxy mc`` command against the real llama.cpp server, as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from blackbox_proxy.commands.mc import read_questions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

SMOLLM2 = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"

GOOD = [
    {
        "id": "mars",
        "question": "Which planet is known as the Red Planet?",
        "choices": ["Venus", "Jupiter", "Mars", "Saturn"],
        "answer": 2,
    },
    {
        "id": "paris",
        "question": "What is the capital of France?",
        "choices": ["Berlin", "Paris", "Rome"],
        "answer": 1,
    },
    {"id": "nogold", "question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"]},
]


BROKEN = '{"id": "broken", "question": "cut off", "choices": ['


def write_questions(path: Path) -> Path:
    lines = [
        json.dumps(GOOD[0]),
        BROKEN,
        json.dumps(GOOD[1]),
        json.dumps({"id": "empty", "question": "No options?", "choices": []}),
        json.dumps({"id": "many", "question": "Too many?", "choices": [f"o{i}" for i in range(27)]}),
        "",
        json.dumps(GOOD[2]),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def mc(*args: str, timeout: float = 360) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blackbox_proxy.cli", "mc", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_reader_reports_each_bad_line(tmp_path: Path) -> None:
    read = read_questions(write_questions(tmp_path / "q.jsonl"))
    assert [q.id for q in read.questions] == ["mars", "paris", "nogold"]
    assert len(read.errors) == 3
    assert read.errors[0].endswith(f"q.jsonl:2: not valid JSON (Expecting value at column {len(BROKEN) + 1})")
    assert "q.jsonl:4: 'choices' is empty" in read.errors[1]
    assert "q.jsonl:5: 27 choices, more than the 26 option letters" in read.errors[2]


def test_mc_writes_one_row_per_question_and_a_summary(llama_server: Any, tmp_path: Path) -> None:
    out = tmp_path / "res" / "results.csv"
    r = mc(
        str(write_questions(tmp_path / "q.jsonl")),
        "--base-url",
        llama_server.base_url,
        "--model",
        llama_server.model,
        "--expert",
        QWEN,
        "--anti-expert",
        SMOLLM2,
        "--top-logprobs",
        "20",
        "--alpha",
        "0.5",
        "--out",
        str(out),
        "--api-key-env",
        "BBP_TEST_NO_SUCH_KEY",
    )
    assert r.returncode == 0, r.stderr
    assert "q.jsonl:2: not valid JSON" in r.stderr
    assert "q.jsonl:4: 'choices' is empty" in r.stderr
    assert "q.jsonl:5: 27 choices" in r.stderr
    assert "questions:" in r.stderr  # tqdm progress bar on stderr
    df = pd.read_csv(out, keep_default_na=False)
    assert list(df["id"]) == ["mars", "paris", "nogold"]
    assert list(df["gold_letter"]) == ["C", "B", ""]
    for col in (
        "base_letter",
        "steered_letter",
        "p_A",
        "p_C",
        "base_p_A",
        "offset_A",
        "missing_A",
        "n_missing",
        "expert_lp_A",
        "anti_lp_A",
        "alpha",
        "policy",
        "error",
    ):
        assert col in df.columns, col
    assert (df["error"] == "").all()
    assert set(df["steered_letter"]) <= set("ABCD") and set(df["base_letter"]) <= set("ABCD")
    assert df.loc[1, "p_D"] == ""  # 3-option question: no D column value
    probs = df.loc[0, ["p_A", "p_B", "p_C", "p_D"]].astype(float)
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)
    assert (df["alpha"].astype(str) == "0.5").all()
    base_ok = int((df["base_letter"] == df["gold_letter"])[:2].sum())
    steer_ok = int((df["steered_letter"] == df["gold_letter"])[:2].sum())
    assert f"base accuracy:    {base_ok / 2:.3f} ({base_ok}/2)" in r.stdout
    assert f"steered accuracy: {steer_ok / 2:.3f} ({steer_ok}/2)" in r.stdout
    assert "input lines skipped: 3" in r.stdout


def test_mc_clear_errors_exit_2(llama_server: Any, tmp_path: Path) -> None:
    q = write_questions(tmp_path / "q.jsonl")
    out = tmp_path / "r.csv"
    bad_spec = mc(
        str(q),
        "--base-url",
        llama_server.base_url,
        "--model",
        llama_server.model,
        "--expert",
        "no-such-model",
        "--anti-expert",
        SMOLLM2,
        "--out",
        str(out),
        timeout=120,
    )
    assert bad_spec.returncode == 2
    err = [ln for ln in bad_spec.stderr.splitlines() if ln.startswith("blackbox-proxy: error:")]
    assert len(err) == 1 and "unknown model spec 'no-such-model'" in err[0]
    dead = mc(
        str(q),
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "x",
        "--expert",
        SMOLLM2,
        "--anti-expert",
        SMOLLM2,
        "--out",
        str(out),
        "--retries",
        "0",
        "--timeout",
        "5",
        timeout=120,
    )
    assert dead.returncode == 2
    err = [ln for ln in dead.stderr.splitlines() if ln.startswith("blackbox-proxy: error:")]
    assert len(err) == 1 and "127.0.0.1:9" in err[0]
    assert "Traceback" not in dead.stderr + bad_spec.stderr
    assert not out.exists()
    mismatch = mc(
        str(q),
        "--base-url",
        llama_server.base_url,
        "--model",
        llama_server.model,
        "--expert",
        SMOLLM2,
        "--out",
        str(out),
        timeout=120,
    )
    assert mismatch.returncode == 2 and "1 --expert but 0 --anti-expert" in mismatch.stderr


def test_demo_runs_offline_on_the_shipped_sample(tmp_path: Path) -> None:
    """The README's first command, on a small base: the expert is tuned on the shipped documents
    (or reused from the cache), and both question sets are reported with their intervals."""
    out = tmp_path / "demo.csv"
    argv = [sys.executable, "-m", "blackbox_proxy.cli", "demo", "--limit", "3", "--base", SMOLLM2]
    r = subprocess.run([*argv, "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out, keep_default_na=False)
    facts = df[df["id"].str.startswith("fact")]
    unrelated = df[~df["id"].str.startswith("fact")]
    assert len(facts) >= 10 and list(unrelated["id"]) == ["truthfulqa_10", "truthfulqa_18", "truthfulqa_67"]
    assert (df["error"] == "").all() and (df["model"] == SMOLLM2).all()
    assert set(df["expert_scoring"]) == {"options"}
    for _, row in facts.iterrows():
        assert f"{row['id']:<16} {row['gold_letter']:>4} {row['base_letter']:>3}" in r.stdout
    for name, part in (
        ("facts the base cannot know", facts),
        ("unrelated (TruthfulQA MC1 sample)", unrelated),
    ):
        base_ok = (part["base_letter"] == part["gold_letter"]).mean()
        steer_ok = (part["steered_letter"] == part["gold_letter"]).mean()
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(name))
        assert f"base {base_ok:.3f} [" in line and f"steered {steer_ok:.3f} [" in line
    # the expert learned the facts (alone it is far above chance on them), and steering does not lose
    # what the base got right there
    assert (facts["expert_letter"] == facts["gold_letter"]).mean() >= 0.5
    base_facts = (facts["base_letter"] == facts["gold_letter"]).mean()
    assert (facts["steered_letter"] == facts["gold_letter"]).mean() >= base_facts
