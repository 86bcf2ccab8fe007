"""``blackbox-proxy serve`` as a real subprocess: it serves, answers /v1/models, and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from blackbox_proxy.errors import InputError, ModelSpecError, ProviderError
from blackbox_proxy.server import LocalServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CLI = [str(Path(sys.executable).with_name("blackbox-proxy"))]  # the installed console script


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def models_at(base_url: str) -> list[str]:
    with urllib.request.urlopen(f"{base_url}/models", timeout=10) as resp:
        return [m["id"] for m in json.loads(resp.read())["data"]]


def test_serve_prints_base_url_serves_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "tiny", "--model", "smollm2-135m-instruct", "--port", str(port), "--n-ctx", "512"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # printed only once /v1/models answers
        assert line == f"http://127.0.0.1:{port}/v1", proc.stderr.read() if proc.stderr else ""
        assert models_at(line) == ["tiny"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert port_is_free(port)  # the llama.cpp child went away with it


def test_serve_rejects_a_missing_model_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    r = subprocess.run([*CLI, "serve", str(missing)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "nope.gguf" in r.stderr
    assert r.stdout == ""


def test_serve_refuses_a_busy_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [*CLI, "serve", "smollm2-135m-instruct", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 2 and f"port {port}" in r.stderr and "already in use" in r.stderr


def test_local_server_context_manager_and_crash_report(tmp_path: Path) -> None:
    with LocalServer("smollm2-135m-instruct", "named", n_ctx=256) as srv:
        assert srv.running() and srv.base_url.endswith("/v1")
        assert models_at(srv.base_url) == ["named"]
        port = srv.port
    assert not srv.running() and port_is_free(port)
    # a file that is not a GGUF model is refused before any server starts, naming the file
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"not a model" * 100)
    with pytest.raises(ModelSpecError, match=r"broken.gguf is not a GGUF model file"):
        LocalServer(fake, "broken").start()
    with pytest.raises(InputError):
        LocalServer("smollm2-135m-instruct", "")


def test_local_server_start_timeout_stops_the_child_and_keeps_the_log() -> None:
    srv = LocalServer("smollm2-135m-instruct", "slow", startup_timeout=0.05)
    with pytest.raises(ProviderError, match=r"did not answer /v1/models within 0.05 s"):
        srv.start()
    assert not srv.running() and port_is_free(srv.port)
    assert srv.log_path.exists()
    srv.log_path.unlink()


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_serve_stops_on_sigint() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "smollm2-135m-instruct", "--port", str(port), "--n-ctx", "256"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip().endswith(f":{port}/v1")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert port_is_free(port)
