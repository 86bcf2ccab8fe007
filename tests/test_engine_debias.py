"""Letter-bias correction through the engine and the `mc` command: a base with a strong prior for "A"
and a weak preference for the true option; every method must recover the option, count its calls,
and store its prior with the run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from blackbox_proxy.adapters.base import ProviderOptions, register_provider, unregister_provider

from blackbox_proxy.cli import main
from blackbox_proxy.types import TokenLogprob, TopLogprobs

PRIOR = {"A": 3.0, "B": 1.0, "C": 0.5, "D": 0.0}


class BiasedBase:
    """Letter score = prior of the letter + 1.5 for the option whose text says 'right'."""

    kind, endpoint, max_k, max_concurrency, capabilities = "biased", "chat", None, 4, frozenset()

    def __init__(self, model: str) -> None:
        self.model = model
        self.calls = 0

    def top_logprobs(self, prompt: Any, k: int) -> TopLogprobs:
        self.calls += 1
        text = prompt[0]["content"] if not isinstance(prompt, str) else prompt
        opts = re.findall(r"^([A-Z])\. (.*)$", text, flags=re.M)
        scores = {lab: PRIOR.get(lab, 0.0) + (1.5 if "right" in t else 0.0) for lab, t in opts}
        z = math.log(sum(math.exp(v) for v in scores.values()))
        e = tuple(TokenLogprob(lab, v - z - 0.01) for lab, v in scores.items())
        return TopLogprobs(e, k, e[0], self.model, self.kind)

    async def atop_logprobs(self, prompt: Any, k: int) -> TopLogprobs:
        return self.top_logprobs(prompt, k)

    def close(self) -> None:
        pass


@pytest.fixture()
def biased() -> Any:
    made: list[BiasedBase] = []

    def make(o: ProviderOptions) -> BiasedBase:
        made.append(BiasedBase(o.model))
        return made[-1]

    register_provider("test-biased", make)
    yield made
    unregister_provider("test-biased")


def _questions(tmp_path: Path, n: int = 20) -> Path:
    lines = []
    for i in range(n):
        gold = i % 4
        choices = [f"wrong {i}-{j}" if j != gold else f"right {i}" for j in range(4)]
        lines.append(
            json.dumps({"id": f"q{i}", "question": f"Question {i}?", "choices": choices, "answer": gold})
        )
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


@pytest.mark.parametrize(
    ("method", "extra"), [("none", 0), ("permute", 60), ("pride", None), ("calibrate", None)]
)
def test_debias_methods_through_mc(method: str, extra: int | None, biased: Any, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    rc = main(
        ["mc", str(_questions(tmp_path)), "--provider", "test-biased", "--model", "m", "--top-logprobs", "4"]
        + ["--debias", method, "--debias-fraction", "0.2", "--out", str(out), "-q"]
    )
    assert rc == 0
    df = pd.read_csv(out, keep_default_na=False)
    acc = float((df["base_letter"] == df["gold_letter"]).mean())
    calls = biased[0].calls
    if method == "none":
        assert calls == 20 and acc == 0.25  # the prior wins everywhere: always "A"
        assert set(df["base_letter"]) == {"A"}
        return
    assert acc == 1.0, (method, df["base_letter"].tolist())
    assert set(df["raw_base_letter"]) == {"A"}  # what the base said before the correction
    if extra is not None:
        assert calls == 20 + extra
    assert calls > 20
    stored = json.loads((tmp_path / "r.csv.run" / "debias.json").read_text())
    assert stored["plan"]["method"] == method and stored["result"]["extra_calls"] == calls - 20
    # a re-run resumes: no new base call, same answers
    before = calls
    assert (
        main(
            [
                "mc",
                str(_questions(tmp_path)),
                "--provider",
                "test-biased",
                "--model",
                "m",
                "--top-logprobs",
                "4",
            ]
            + ["--debias", method, "--debias-fraction", "0.2", "--out", str(out), "-q"]
        )
        == 0
    )
    assert biased[-1].calls == 0 and before == calls
    assert pd.read_csv(out, keep_default_na=False)["base_letter"].tolist() == df["base_letter"].tolist()


def test_prompt_template_file_reaches_the_base(biased: Any, tmp_path: Path, capsys: Any) -> None:
    """`--prompt-template FILE` with named placeholders is what the base is sent; a bad file is one line."""
    tpl = tmp_path / "mine.txt"
    tpl.write_text("Quiz item: {question}\n{options}\nPick one of {letters}.", encoding="utf-8")
    seen: list[str] = []
    real = BiasedBase.top_logprobs

    def spy(self: BiasedBase, prompt: Any, k: int) -> TopLogprobs:
        seen.append(prompt[-1]["content"])
        return real(self, prompt, k)

    BiasedBase.top_logprobs = spy  # type: ignore[method-assign]
    try:
        out = tmp_path / "r.csv"
        argv = ["mc", str(_questions(tmp_path, 4)), "--provider", "test-biased", "--model", "m", "-q"]
        assert main([*argv, "--prompt-template", str(tpl), "--out", str(out)]) == 0
    finally:
        BiasedBase.top_logprobs = real  # type: ignore[method-assign]
    assert len(seen) == 4 and all(s.startswith("Quiz item: Question ") for s in seen)
    assert "Pick one of A, B, C or D." in seen[0] and "\nA. " in seen[0]
    bad = tmp_path / "bad.txt"
    bad.write_text("Quiz: {question} {optoins}", encoding="utf-8")
    assert main([*argv, "--prompt-template", str(bad), "--out", str(tmp_path / "b.csv")]) == 2
    err = capsys.readouterr().err
    assert "optoins" in err and "Traceback" not in err
