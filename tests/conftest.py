"""Shared fixtures: a real llama.cpp server on loopback, and a programmable fault-injection HTTP server.

* ``llama_server`` (session): llama-cpp-python's server with smollm2-135m-instruct, served as
  "smollm2"; has ``.base_url`` (ending in /v1) and ``.model``.
* ``fault_server`` (function): a real HTTP server on 127.0.0.1 whose replies are scripted per
  request (see ``fault_http.py``: Reply, chat_body, completion_body), recording every request.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from fault_http import FaultServer

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def llama_server() -> Iterator[Any]:
    """llama-cpp-python's OpenAI-compatible server with SmolLM2-135M-Instruct, model name "smollm2"."""
    from blackbox_proxy.server import LocalServer

    with LocalServer(SMOLLM2, "smollm2", n_ctx=2048, n_threads=2) as server:
        yield server


@pytest.fixture()
def fault_server() -> Iterator[FaultServer]:
    """A fresh scripted fault-injection server on loopback."""
    srv = FaultServer()
    try:
        yield srv
    finally:
        srv.close()


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Tests marked ``pending`` (written this round, not yet run to completion on a quiet machine) run
    only with BLACKBOX_PROXY_PENDING=1; the issues they belong to stay open until they do."""
    if os.environ.get("BLACKBOX_PROXY_PENDING") == "1":
        return
    pending = [i for i in items if i.get_closest_marker("pending")]
    if pending:
        config.hook.pytest_deselected(items=pending)
        items[:] = [i for i in items if not i.get_closest_marker("pending")]
