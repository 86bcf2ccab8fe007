"""A canary key against a server that echoes it back: no exception (cause chain included), log or file holds it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import traceback
from pathlib import Path

import pytest
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
from fault_http import FaultServer, Reply, chat_body

from blackbox_proxy.cli import build_parser, main
from blackbox_proxy.errors import BlackboxProxyError
from blackbox_proxy.transport import Endpoint, Transport, redact, resolve_endpoint

CANARY = "sk-canary-7f3a9c1e5b2d4068aa11bb22"
pytestmark = pytest.mark.timeout(60)


def leaks(text: str) -> bool:
    """The key, or any 8-character run of it, in ``text``."""
    return any(CANARY[i : i + 8] in text for i in range(len(CANARY) - 7))


def chain_text(exc: BaseException) -> str:
    """Everything an exception shows: str, repr and args of it and of every cause and context, and the
    formatted traceback (which prints chained exceptions too)."""
    parts, seen, todo = [], set(), [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        parts += [str(e), repr(e), repr(e.args), repr(getattr(e, "__dict__", {}))]
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    parts.append("".join(traceback.format_exception(exc)))
    return "\n".join(parts)


ECHOES = [
    Reply(401, {"error": {"message": f"Incorrect API key provided: {CANARY}", "code": "invalid_api_key"}}),
    Reply(403, {"error": {"message": f"key {CANARY[:14]}... has no access"}}),  # a partial echo
    Reply(400, {"error": {"message": f"bad request from {CANARY}"}}),
    Reply(404, f"no model for Bearer {CANARY}", content_type="text/plain"),
    Reply(500, {"error": {"message": f"crash while checking {json.dumps(CANARY)}"}}),
    Reply(body='{"error": "' + CANARY + '", "choices": [{"logprobs": '),  # truncated 200
    Reply(body=f"<html>login failed for {CANARY}</html>", content_type="text/html"),
    Reply(body=dict(chat_body(logprobs_null=True), system_fingerprint=CANARY)),  # 200, no log-probs
]


@pytest.mark.parametrize("reply", ECHOES, ids=lambda r: f"{r.status}-{r.content_type.split('/')[1]}")
def test_no_exception_string_holds_the_key(
    reply: Reply, fault_server: FaultServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fault_server.default = reply
    provider = OpenAIChatProvider(
        "m", fault_server.base_url, api_key=CANARY, cache=tmp_path / "c.sqlite", max_retries=1,
        backoff_initial=0.01, backoff_max=0.02,
    )  # fmt: skip
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG):
        for call in (
            lambda: provider.top_logprobs("q", 2),
            lambda: asyncio.run(provider.atop_logprobs("q", 2)),
        ):
            with pytest.raises(BlackboxProxyError) as info:
                call()
            errors.append(info.value)
    assert fault_server.requests[0]["headers"]["authorization"] == f"Bearer {CANARY}"  # it was sent
    for exc in errors:
        text = chain_text(exc)
        assert not leaks(text), text
        assert exc.__cause__ is None and exc.__context__ is None
    assert not leaks(caplog.text)
    provider.close()
    for f in tmp_path.iterdir():  # the cache and its WAL / SHM files
        assert not leaks(f.read_bytes().decode("latin-1")), f


def test_a_200_echoing_the_key_is_used_but_stored_without_it(
    fault_server: FaultServer, tmp_path: Path
) -> None:
    fault_server.default = Reply(body=dict(chat_body(), system_fingerprint=f"fp for {CANARY}"))
    provider = OpenAIChatProvider("m", fault_server.base_url, api_key=CANARY, cache=tmp_path / "c.sqlite")
    assert provider.top_logprobs("q", 2).chosen is not None
    assert provider.top_logprobs("q", 2).usage.cached  # type: ignore[union-attr]
    provider.close()
    raw = b"".join(f.read_bytes() for f in tmp_path.iterdir())
    assert b"chatcmpl-test" in raw and b"fp for ***" in raw
    assert not leaks(raw.decode("latin-1"))


def test_the_key_from_the_environment_is_redacted_too(
    fault_server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    fault_server.default = Reply(401, {"error": {"message": f"invalid key {CANARY}"}})
    with pytest.raises(BlackboxProxyError) as info:
        OpenAIChatProvider("m", fault_server.base_url).top_logprobs("q", 2)
    assert "OPENAI_API_KEY" in str(info.value) and not leaks(chain_text(info.value))


def test_the_endpoint_dataclass_does_not_give_the_key_away() -> None:
    ep = resolve_endpoint("http://127.0.0.1:9/v1", CANARY)
    assert ep.api_key == CANARY  # still usable by the client
    assert dataclasses.asdict(ep) == {"base_url": "http://127.0.0.1:9/v1"}
    assert [f.name for f in dataclasses.fields(ep)] == ["base_url"]
    for text in (
        repr(ep),
        str(ep),
        repr(vars(ep)),
        json.dumps(dataclasses.asdict(ep)),
        repr(dataclasses.astuple(ep)),
    ):
        assert not leaks(text), text
    assert (
        ep == Endpoint("http://127.0.0.1:9/v1", CANARY) != Endpoint("http://127.0.0.1:9/v1", "sk-other-key")
    )
    t = Transport("http://127.0.0.1:9/v1", CANARY)
    provider = OpenAIChatProvider("m", "http://127.0.0.1:9/v1", api_key=CANARY)
    for obj in (t, provider, provider.transport):
        assert not leaks(repr(obj)) and not leaks(str(obj))


def test_redact_covers_escaped_and_partial_forms() -> None:
    text = f"a {CANARY} b {json.dumps(CANARY)} c {CANARY[5:17]} d sk-canar"
    out = redact(text, CANARY)
    assert not leaks(out) and out.startswith("a *** b")
    assert "sk-canar" not in out  # 8 characters of the key are enough to be redacted
    assert redact("nothing here", CANARY) == "nothing here"
    assert redact("short xyz", "xyz") == "short xyz"  # keys under 4 characters are not redacted


def test_redact_leaves_no_run_of_eight() -> None:
    out = redact(f"x{CANARY[:8]}!{CANARY[-7:]}", CANARY)
    assert out == f"x***!{CANARY[-7:]}"  # 7 characters alone are not redacted (too common to be a key)


# -- no abbreviated long options: `--api-key sk-...` is not `--api-key-env` --------------------------
def _parsers(p: argparse.ArgumentParser, path: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _parsers(sp, (*path, name))


def test_no_parser_accepts_abbreviations() -> None:
    found = list(_parsers(build_parser()))
    assert len(found) >= 10
    for path, p in found:
        assert p.allow_abbrev is False, path


def test_api_key_is_refused_not_taken_for_api_key_env(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [
        (path, p)
        for path, p in _parsers(build_parser())
        if any("--api-key-env" in a.option_strings for a in p._actions)
    ]
    assert commands, "no command has --api-key-env"
    for path, p in commands:
        positionals = []
        for a in p._actions:
            value = str(next(iter(a.choices))) if a.choices else "x"
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction) and a.nargs != "?":
                positionals.append(value)
            elif a.option_strings and a.required:
                positionals += [a.option_strings[-1], value]
        with pytest.raises(SystemExit) as info:
            main([*path, *positionals, "--api-key", CANARY])
        err = capsys.readouterr().err
        assert info.value.code == 2, path
        assert "error:" in err and ("--api-key" in err or "sk-***" in err), (path, err)
        assert not leaks(err), err
