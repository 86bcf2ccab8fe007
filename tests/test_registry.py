"""Providers plug in by name: one registered at run time from this file alone, and one from an
installed package's entry point, both driven through the `mc` command against the real server."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from blackbox_proxy.adapters.base import (
    ProviderOptions,
    create_provider,
    provider_names,
    register_provider,
    unregister_provider,
)
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider

from blackbox_proxy.cli import main
from blackbox_proxy.errors import InputError
from blackbox_proxy.types import TokenLogprob, TopLogprobs

QUESTIONS = [
    {
        "id": "mars",
        "question": "Which planet is known as the Red Planet?",
        "choices": ["Venus", "Mars"],
        "answer": 1,
    },
    {
        "id": "paris",
        "question": "What is the capital of France?",
        "choices": ["Berlin", "Paris", "Rome"],
        "answer": 1,
    },
    {"id": "sum", "question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1},
]


class CountingProvider:
    """A provider defined in a test file: delegates to the real server and counts what it was asked."""

    kind = "test-counting"
    endpoint = "chat"
    max_k: int | None = None
    max_concurrency = 2
    capabilities: frozenset[str] = frozenset()

    def __init__(self, model: str, base_url: str) -> None:
        self.model = model
        self.inner = OpenAIChatProvider(model, base_url, max_k=None, timeout=120)
        self.calls = 0

    def _mark(self, top: TopLogprobs) -> TopLogprobs:
        self.calls += 1
        return TopLogprobs(top.entries, top.k, top.chosen, top.model, self.kind, top.usage)

    def top_logprobs(self, prompt: Any, k: int) -> TopLogprobs:
        return self._mark(self.inner.top_logprobs(prompt, k))

    async def atop_logprobs(self, prompt: Any, k: int) -> TopLogprobs:
        return self._mark(await self.inner.atop_logprobs(prompt, k))

    def close(self) -> None:
        self.inner.close()


def _questions(tmp_path: Path) -> Path:
    p = tmp_path / "q.jsonl"
    p.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    return p


@pytest.mark.integration
def test_a_provider_registered_in_a_test_file_runs_mc_by_name(llama_server: Any, tmp_path: Path) -> None:
    made: list[CountingProvider] = []

    @register_provider("test-counting")
    def _make(options: ProviderOptions) -> CountingProvider:
        p = CountingProvider(options.model, options.resolved_base_url() or "")
        made.append(p)
        return p

    try:
        assert "test-counting" in provider_names()
        out = tmp_path / "r.csv"
        rc = main(
            [
                "mc",
                str(_questions(tmp_path)),
                "--provider",
                "test-counting",
                "--base-url",
                llama_server.base_url,
                "--model",
                llama_server.model,
                "--top-logprobs",
                "10",
                "--out",
                str(out),
                "-q",
            ]
        )
        assert rc == 0
        df = pd.read_csv(out, keep_default_na=False)
        assert list(df["id"]) == ["mars", "paris", "sum"]
        assert made and made[0].calls == 3  # the engine asked our provider, once per question
        assert set(df["base_letter"]) <= set("ABCD") and (df["error"] == "").all()
        # the same questions through the built-in provider give the same answers
        ref = tmp_path / "ref.csv"
        argv = [
            "mc",
            str(_questions(tmp_path)),
            "--base-url",
            llama_server.base_url,
            "--model",
            llama_server.model,
        ]
        assert main([*argv, "--top-logprobs", "10", "--out", str(ref), "-q"]) == 0
        assert list(pd.read_csv(ref, keep_default_na=False)["base_letter"]) == list(df["base_letter"])
    finally:
        unregister_provider("test-counting")
    assert "test-counting" not in provider_names()


def test_unknown_provider_and_protocol_breaches_are_clear(tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(InputError, match="unknown provider 'nope'.*openai"):
        create_provider("nope", ProviderOptions("m"))

    class Incomplete:
        model = "m"

    register_provider("test-incomplete", lambda o: Incomplete())
    try:
        with pytest.raises(InputError, match="does not follow the protocol.*endpoint"):
            create_provider("test-incomplete", ProviderOptions("m"))
    finally:
        unregister_provider("test-incomplete")
    rc = main(
        [
            "mc",
            str(_questions(tmp_path)),
            "--provider",
            "nope",
            "--model",
            "m",
            "--out",
            str(tmp_path / "o.csv"),
        ]
    )
    assert rc == 2 and "unknown provider 'nope'" in capsys.readouterr().err


def test_a_plugin_package_registers_through_its_entry_point(tmp_path: Path, monkeypatch: Any) -> None:
    """An installed distribution (a real .dist-info on sys.path) names a factory in the
    ``blackbox_proxy.providers`` group; create_provider finds it by name without any import first."""
    site = tmp_path / "site"
    (site / "bbp_test_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "bbp_test_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bbp-test-plugin\nVersion: 0.1\n", encoding="utf-8"
    )
    (site / "bbp_test_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[blackbox_proxy.providers]\nfixed-letters = bbp_test_plugin:make\n", encoding="utf-8"
    )
    (site / "bbp_test_plugin.py").write_text(
        textwrap.dedent(
            """
            from blackbox_proxy.types import TokenLogprob, TopLogprobs

            class Fixed:
                kind, endpoint, max_k, max_concurrency, capabilities = "fixed", "chat", None, 1, frozenset()

                def __init__(self, model):
                    self.model = model

                def top_logprobs(self, prompt, k):
                    e = (TokenLogprob("B", -0.2), TokenLogprob("A", -1.9), TokenLogprob("C", -3.0))
                    return TopLogprobs(e[:k], k, e[0], self.model, self.kind)

                async def atop_logprobs(self, prompt, k):
                    return self.top_logprobs(prompt, k)

                def close(self):
                    pass

            def make(options):
                return Fixed(options.model)
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(site))
    assert "fixed-letters" in provider_names()
    provider = create_provider("fixed-letters", ProviderOptions("plugin-model"))
    top = provider.top_logprobs("anything", 2)
    assert isinstance(top, TopLogprobs) and top.entries[0] == TokenLogprob("B", -0.2)
    out = tmp_path / "r.csv"
    rc = main(
        [
            "mc",
            str(_questions(tmp_path)),
            "--provider",
            "fixed-letters",
            "--model",
            "x",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    df = pd.read_csv(out, keep_default_na=False)
    assert list(df["base_letter"]) == ["B", "B", "B"] and list(df["model"]) == ["x"] * 3
    unregister_provider("fixed-letters")
    sys.modules.pop("bbp_test_plugin", None)
