"""On-disk cache of provider responses (SQLite), keyed by what was asked, never by who asked.

The key is the sha256 of the canonical JSON of (base_url, endpoint, model, request params): API
keys and HTTP headers never enter it, and only the response body is stored. SQLite in WAL mode with
a busy timeout makes one file safe to share between threads and processes (parallel evaluation).
A path that cannot hold the cache (a folder, a file that is not SQLite or holds other tables, a
read-only place) is one :class:`~blackbox_proxy.errors.CacheError` when the cache is opened, before
any request is paid for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CacheError, InputError

log = logging.getLogger(__name__)

_COLUMNS = {"key", "endpoint", "model", "response", "created"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(base_url: str, endpoint: str, model: str, params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a request (sorted keys, no whitespace); secrets are not inputs."""
    payload = {"base_url": base_url.rstrip("/"), "endpoint": endpoint, "model": model, "params": params}
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"request parameters are not JSON-serialisable, cannot cache them: {exc}") from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResponseCache:
    """SQLite cache of JSON responses: ``get(key)`` / ``put(key, response)`` with hit/miss counters."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise CacheError(f"cache must be a file path, got {path!r}")
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise CacheError(
                f"cache {self.path} is a directory; give a file name, e.g. {self.path / 'responses.sqlite'}"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"cache {self.path}: cannot create folder {self.path.parent} ({exc.strerror or exc})"
            ) from None
        self._timeout = timeout
        self._local = threading.local()
        self._counter_lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        try:
            conn = self._conn()
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
            conn.commit()
            columns = {row[1] for row in conn.execute("PRAGMA table_info(responses)")}
        except sqlite3.DatabaseError as exc:
            self.close()
            raise CacheError(self._explain(exc)) from None
        if not columns >= _COLUMNS:
            self.close()
            raise CacheError(
                f"cache {self.path} is an SQLite file with another 'responses' table (columns "
                f"{sorted(columns)}): give a new file name"
            )

    def _explain(self, exc: sqlite3.Error) -> str:
        """One line for an SQLite failure on this cache file."""
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            return f"cache {self.path} is not an SQLite database ({text}): give a new file name, or delete it"
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            return f"cache {self.path} cannot be written ({text}): check the folder's permissions"
        return f"cache {self.path}: {text}"

    def _conn(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections must not cross threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=self._timeout)
            conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def key(self, base_url: str, endpoint: str, model: str, params: Mapping[str, Any]) -> str:
        """The cache key of one request (see :func:`cache_key`)."""
        return cache_key(base_url, endpoint, model, params)

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored response for ``key``, or None (counted as a hit or a miss; an unreadable row is a miss)."""
        try:
            row = self._conn().execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        except sqlite3.DatabaseError as exc:
            raise CacheError(self._explain(exc)) from None
        value: dict[str, Any] | None = None
        if row is not None:
            try:
                loaded = json.loads(row[0])
            except (TypeError, ValueError):
                loaded = None
            if isinstance(loaded, dict):
                value = loaded
            else:
                log.warning(
                    "cache %s: entry %s is not a JSON object; asking the server again", self.path, key[:12]
                )
        with self._counter_lock:
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
        return value

    def put(self, key: str, response: Mapping[str, Any], *, endpoint: str = "", model: str = "") -> None:
        """Store a JSON-serialisable response under ``key`` (last write wins); committed before returning."""
        try:
            text = json.dumps(response, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise CacheError(f"cache {self.path}: the response is not JSON-serialisable ({exc})") from None
        conn = self._conn()
        try:
            with conn:
                conn.execute(
                    "INSERT OR REPLACE INTO responses (key, endpoint, model, response, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (key, endpoint, model, text, time.time()),
                )
        except sqlite3.DatabaseError as exc:
            raise CacheError(self._explain(exc)) from None

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def stats(self) -> dict[str, int]:
        """Hit and miss counts of this object, and the number of stored responses."""
        return {"hits": self.hits, "misses": self.misses, "entries": len(self)}

    def clear(self) -> None:
        """Delete every stored response."""
        conn = self._conn()
        with conn:
            conn.execute("DELETE FROM responses")

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            self._local.conn = None

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r}, hits={self.hits}, misses={self.misses})"
