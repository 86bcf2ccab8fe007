"""The SQLite response cache: round trips, keys without secrets, sharing across threads and processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sqlite3
import threading
from pathlib import Path

import pytest
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
from fault_http import FaultServer, Reply, chat_body

from blackbox_proxy.cache import ResponseCache, cache_key
from blackbox_proxy.errors import CacheError, InputError, ProviderError

SECRET = "sk-cache-SECRET-9f8e7d6c5b4a"
pytestmark = pytest.mark.timeout(60)


def test_round_trip_and_counters(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    key = cache.key("http://h/v1", "chat.completions", "m", {"k": 3})
    assert cache.get(key) is None
    cache.put(key, {"choices": [{"x": 1.5}]})
    assert cache.get(key) == {"choices": [{"x": 1.5}]}
    assert cache.stats() == {"hits": 1, "misses": 1, "entries": 1}
    cache.clear()
    assert len(cache) == 0


def test_key_is_canonical_and_sensitive_to_every_request_field() -> None:
    base = cache_key("http://h/v1", "chat.completions", "m", {"a": 1, "b": [1, 2]})
    assert base == cache_key("http://h/v1/", "chat.completions", "m", {"b": [1, 2], "a": 1})
    variants = [
        cache_key("http://other/v1", "chat.completions", "m", {"a": 1, "b": [1, 2]}),
        cache_key("http://h/v1", "completions", "m", {"a": 1, "b": [1, 2]}),
        cache_key("http://h/v1", "chat.completions", "m2", {"a": 1, "b": [1, 2]}),
        cache_key("http://h/v1", "chat.completions", "m", {"a": 2, "b": [1, 2]}),
        cache_key("http://h/v1", "chat.completions", "m", {"a": 1, "b": [2, 1]}),
    ]
    assert len({base, *variants}) == 6


def test_unserialisable_params_are_an_input_error() -> None:
    with pytest.raises(InputError, match="JSON"):
        cache_key("http://h/v1", "chat.completions", "m", {"x": float("nan")})
    with pytest.raises(InputError, match="JSON"):
        cache_key("http://h/v1", "chat.completions", "m", {"x": object()})


def test_provider_serves_repeats_from_cache_and_never_stores_the_key(
    tmp_path: Path, fault_server: FaultServer
) -> None:
    path = tmp_path / "responses.sqlite"
    fault_server.default = Reply(body=chat_body((("A", -0.7), ("B", -0.9))))
    provider = OpenAIChatProvider("m", fault_server.base_url, api_key=SECRET, cache=path)
    first = provider.top_logprobs("Which?", 2)
    second = provider.top_logprobs("Which?", 2)
    third = asyncio.run(provider.atop_logprobs("Which?", 2))
    assert fault_server.count == 1
    assert first.known() == second.known() == third.known()
    assert first.usage is not None and not first.usage.cached
    assert second.usage is not None and second.usage.cached and third.usage is not None and third.usage.cached
    provider.top_logprobs("Other?", 2)
    assert fault_server.count == 2
    assert provider.transport.cache is not None and provider.transport.cache.stats()["entries"] == 2
    provider.transport.cache.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("responses.sqlite"))
    assert b"chatcmpl-test" in raw  # the response really is stored
    assert SECRET.encode() not in raw
    assert b"Bearer" not in raw and b"authorization" not in raw.lower()


def test_failed_requests_are_not_cached(tmp_path: Path, fault_server: FaultServer) -> None:
    fault_server.push(Reply(400, {"error": {"message": "no"}}))
    provider = OpenAIChatProvider("m", fault_server.base_url, cache=tmp_path / "c.sqlite", max_retries=0)
    with pytest.raises(Exception, match="HTTP 400"):
        provider.top_logprobs("q", 2)
    provider.top_logprobs("q", 2)
    assert fault_server.count == 2


def test_threads_share_one_cache(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(25):
                key = cache.key("u", "e", "m", {"i": i, "j": j})
                cache.put(key, {"v": [i, j]})
                assert cache.get(key) == {"v": [i, j]}
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) == 200 and cache.hits == 200


def _writer(path: str, worker: int) -> None:
    cache = ResponseCache(path)
    for j in range(40):
        cache.put(cache.key("u", "e", "m", {"w": worker, "j": j}), {"w": worker, "j": j})


def test_processes_share_one_cache(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    cache = ResponseCache(path)
    assert len(cache) == 120
    assert cache.get(cache.key("u", "e", "m", {"w": 2, "j": 39})) == {"w": 2, "j": 39}


def test_answers_without_logprobs_are_not_cached(tmp_path: Path, fault_server: FaultServer) -> None:
    fault_server.push(Reply(body=chat_body(logprobs_null=True)))
    provider = OpenAIChatProvider(
        "m", fault_server.base_url, cache=tmp_path / "c.sqlite", backoff_initial=0.01
    )
    assert provider.top_logprobs("q", 2).chosen is not None  # retried; the bad answer was not kept
    assert fault_server.count == 2
    assert provider.top_logprobs("q", 2).usage.cached  # type: ignore[union-attr]
    assert provider.transport.cache is not None and len(provider.transport.cache) == 1


def test_answers_never_carrying_logprobs_raise_and_are_not_cached(
    tmp_path: Path, fault_server: FaultServer
) -> None:
    fault_server.default = Reply(body=chat_body(logprobs_null=True))
    provider = OpenAIChatProvider(
        "m", fault_server.base_url, cache=tmp_path / "c.sqlite", max_retries=1, backoff_initial=0.01
    )
    with pytest.raises(ProviderError, match="log-probs"):
        provider.top_logprobs("q", 2)
    assert provider.transport.cache is not None and len(provider.transport.cache) == 0


# -- a cache path that cannot hold a cache is one clear error, before any request --------------------
def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"is a directory; give a file name"):
        ResponseCache(tmp_path)


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "questions.jsonl"
    bad.write_text('{"question": "not a database"}\n' * 200)
    with pytest.raises(CacheError, match=r"is not an SQLite database.*give a new file name"):
        ResponseCache(bad)
    assert bad.read_text().startswith('{"question"')  # untouched


def test_an_sqlite_file_with_another_table_layout_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE responses (id INTEGER, body BLOB)")
    with pytest.raises(CacheError, match="another 'responses' table"):
        ResponseCache(other)


def test_a_folder_that_cannot_be_made_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="cannot create folder"):
        ResponseCache(blocker / "sub" / "c.sqlite")


def test_provider_with_a_bad_cache_fails_before_any_request(
    tmp_path: Path, fault_server: FaultServer
) -> None:
    with pytest.raises(CacheError):
        OpenAIChatProvider("m", fault_server.base_url, cache=tmp_path)
    assert fault_server.count == 0


def test_a_corrupt_entry_is_a_miss_not_a_crash(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    key = cache.key("u", "e", "m", {"a": 1})
    with cache._conn() as conn:
        conn.execute(
            "INSERT INTO responses (key, endpoint, model, response, created) VALUES (?, '', '', ?, 0)",
            (key, '{"trunc'),
        )
    assert cache.get(key) is None and cache.misses == 1


# -- every answer is stored the moment it arrives: a kill -9 right after loses nothing -----------------
def _ask_then_die(base_url: str, path: str) -> None:
    provider = OpenAIChatProvider("m", base_url, cache=path)
    provider.top_logprobs("Which?", 2)
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no flush: as abrupt as it gets


def test_an_answer_survives_a_kill_9_right_after_it_arrived(
    tmp_path: Path, fault_server: FaultServer
) -> None:
    path = str(tmp_path / "c.sqlite")
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_ask_then_die, args=(fault_server.base_url, path))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert fault_server.count == 1
    provider = OpenAIChatProvider("m", fault_server.base_url, cache=path)
    top = provider.top_logprobs("Which?", 2)
    assert top.usage is not None and top.usage.cached and fault_server.count == 1  # not bought again
