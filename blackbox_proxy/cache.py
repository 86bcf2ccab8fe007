"""On-disk cache of provider responses (SQLite), keyed by what was asked, never by who asked.

The key is the sha256 of the canonical JSON of (base_url, endpoint, model, request params): API
keys and HTTP headers never enter it, and only the response body is stored. SQLite in WAL mode with
a busy timeout makes one file safe to share between threads and processes (parallel evaluation).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InputError

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
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._timeout = timeout
        self._local = threading.local()
        self._counter_lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(_SCHEMA)
        conn.commit()

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
        """The stored response for ``key``, or None (counted as a hit or a miss)."""
        row = self._conn().execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        with self._counter_lock:
            if row is None:
                self.misses += 1
            else:
                self.hits += 1
        return None if row is None else json.loads(row[0])

    def put(self, key: str, response: Mapping[str, Any], *, endpoint: str = "", model: str = "") -> None:
        """Store a JSON-serialisable response under ``key`` (last write wins)."""
        text = json.dumps(response, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        conn = self._conn()
        with conn:
            conn.execute(
                "INSERT OR REPLACE INTO responses (key, endpoint, model, response, created) VALUES (?, ?, ?, ?, ?)",
                (key, endpoint, model, text, time.time()),
            )

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
            conn.close()
            self._local.conn = None

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r}, hits={self.hits}, misses={self.misses})"
