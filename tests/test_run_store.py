"""The run store and the runner with one bad question or one damaged line (fast; loopback HTTP base).

* a 400 for one question is an error row naming that question; the run goes on, a resume asks it again;
* a garbage line in the middle of ``base.jsonl`` is reported with file and line, and only that
  answer is bought again;
* a run directory that is a file is one line before any request;
* the loaders refuse a truncated expert folder before any weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
from fault_http import FaultServer, Reply, chat_body

from blackbox_proxy.cli import main
from blackbox_proxy.errors import InputError, ModelSpecError
from blackbox_proxy.evaluation.runner import BASE_FILE, RESULTS_FILE, EvaluationRunner
from blackbox_proxy.files import JsonlStore
from blackbox_proxy.types import MCQuestion

pytestmark = pytest.mark.timeout(60)

QS = [MCQuestion(f"q{i}", f"Question {i}?", ("x", "y", "z"), answer=0) for i in range(5)]


def _provider(server: FaultServer) -> OpenAIChatProvider:
    return OpenAIChatProvider("fake", server.base_url, "sk-unused", max_retries=2, max_concurrency=1,
                              backoff_initial=0.01, backoff_max=0.02)  # fmt: skip


def _runner(server: FaultServer, run_dir: Path) -> EvaluationRunner:
    return EvaluationRunner(
        _provider(server), k=3, concurrency=1, chunk_size=1, run_dir=run_dir, progress=False
    )


def _asked(server: FaultServer) -> list[str]:
    return [r["json"]["messages"][-1]["content"] for r in server.requests]


def test_a_rejected_question_is_an_error_row_naming_it_and_the_run_goes_on(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    fault_server.push(
        Reply(body=chat_body()),
        Reply(400, {"error": {"message": "the prompt is too long for this model"}}),
        *[Reply(body=chat_body()) for _ in range(3)],
    )
    res = _runner(fault_server, tmp_path / "run").run(QS)
    t = res.table().set_index("id")
    assert fault_server.count == 5  # the 400 is not retried
    err = t.loc["q1", "error"]
    assert "RequestRejectedError" in err and "HTTP 400" in err and "too long" in err and "\n" not in err
    assert all(t.loc[q, "error"] == "" and t.loc[q, "base_letter"] == "A" for q in ("q0", "q2", "q3", "q4"))
    # a resume asks the rejected question again (the server may accept it now), nothing else
    fault_server.requests.clear()
    again = _runner(fault_server, tmp_path / "run").run(QS).table().set_index("id")
    assert len(fault_server.requests) == 1 and "Question 1?" in _asked(fault_server)[0]
    assert again.loc["q1", "error"] == "" and again.loc["q1", "base_letter"] == "A"


def test_a_garbage_line_in_base_jsonl_repays_only_that_answer(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    first = _runner(fault_server, run).run(QS).table()
    assert fault_server.count == 5
    base = run / BASE_FILE
    lines = base.read_text(encoding="utf-8").splitlines()
    lines[2] = '{"id": "q2", "top": {garbage'
    base.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (run / RESULTS_FILE).unlink()  # every record must be rebuilt from the stored base answers
    fault_server.requests.clear()
    res = _runner(fault_server, run).run(QS)
    assert len(fault_server.requests) == 1 and "Question 2?" in _asked(fault_server)[0]
    assert any(f"{base}:3: corrupt record skipped" in p for p in res.problems), res.problems
    assert list(res.table()["base_letter"]) == list(first["base_letter"])
    assert sorted(JsonlStore(run / RESULTS_FILE).load()) == [q.id for q in QS]


def test_a_run_directory_that_is_a_file_is_one_line_before_any_request(
    fault_server: FaultServer, tmp_path: Path, capsys: Any
) -> None:
    (tmp_path / "run").write_text("x")
    with pytest.raises(InputError, match="is a file; give a folder"):
        _runner(fault_server, tmp_path / "run").run(QS)
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"id": x.id, "question": x.question, "choices": list(x.choices)}) + "\n"
                         for x in QS), encoding="utf-8")  # fmt: skip
    argv = ["eval", "jsonl", "--data", str(q), "--base-url", fault_server.base_url, "--model", "m", "-q"]
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "is a file; give a folder" in err and "Traceback" not in err
    assert fault_server.count == 0


def test_loaders_refuse_a_truncated_expert_folder_before_reading_weights(tmp_path: Path) -> None:
    from blackbox_proxy.models import load_causal_lm

    folder = tmp_path / "expert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 100)
    with pytest.raises(ModelSpecError, match="model.safetensors is truncated"):
        load_causal_lm(folder)
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16384)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelSpecError, match="has no tokenizer"):
        load_causal_lm(folder)


def test_writers_are_atomic_a_failed_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import pandas as pd

    from blackbox_proxy.files import write_table

    out = tmp_path / "r.csv"
    write_table(pd.DataFrame({"id": ["a"], "x": [1]}), out)
    before = out.read_bytes()

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(InputError, match=r"cannot write .*r\.csv: No space left on device"):
        write_table(pd.DataFrame({"id": ["b"], "x": [2]}), out)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


def test_a_record_without_id_gets_its_line_and_a_store_line_without_id_is_named(tmp_path: Path) -> None:
    from blackbox_proxy.evaluation.datasets import read_questions_jsonl

    q = tmp_path / "q.jsonl"
    q.write_text(
        '{"question": "Which?", "choices": ["a", "b"]}\n{"id": null, "question": "Q", "choices": ["a"]}\n'
    )
    qs, errors = read_questions_jsonl(q, lenient=True)
    assert [x.id for x in qs] == ["line1"]
    assert len(errors) == 1 and errors[0].startswith(f"{q}:2: 'id' must be a non-empty string")
    store = tmp_path / "results.jsonl"
    store.write_text('{"id": "a", "x": 1}\n{"x": 2}\n{"id": "b", "x": 3}\n')
    s = JsonlStore(store)
    assert sorted(s.load()) == ["a", "b"]
    assert s.problems == [f"{store}:2: corrupt record skipped (not a record with an id); it will be redone"]
