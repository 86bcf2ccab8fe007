"""A local OpenAI-compatible server: llama-cpp-python's server on a GGUF model, as a subprocess.

``with LocalServer("smollm2-135m-instruct", "smollm2") as srv:`` starts
``python -m llama_cpp.server`` on a free loopback port, waits until ``GET /v1/models`` answers and
exposes ``srv.base_url`` (ending in ``/v1``) and ``srv.model`` for the OpenAI adapters.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from .errors import InputError, ProviderError
from .models import gguf_path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:]) or "(empty log)"


class LocalServer:
    """llama-cpp-python's OpenAI-compatible server serving one GGUF model under the name ``name``."""

    def __init__(
        self,
        spec: str | os.PathLike[str],
        name: str,
        port: int | None = None,
        host: str = "127.0.0.1",
        n_ctx: int = 2048,
        n_threads: int = 2,
        *,
        startup_timeout: float = 120.0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not name or not str(name).strip():
            raise InputError("the served model name must not be empty")
        for label, value, low in (("port", port, 1), ("n_ctx", n_ctx, 16), ("n_threads", n_threads, 1)):
            if value is None and label == "port":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{label} must be an integer >= {low}, got {value!r}")
        if port is not None and port > 65535:
            raise InputError(f"port must be in 1..65535, got {port}")
        self.spec = str(spec)
        self.model = str(name)
        self.gguf = gguf_path(spec)
        self.host = host
        self.port = int(port) if port is not None else free_port(host)
        self.n_ctx = int(n_ctx)
        self.n_threads = int(n_threads)
        self.startup_timeout = startup_timeout
        self._own_log = log_path is None
        if log_path is None:
            fd, tmp = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            log_path = tmp
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ending in /v1."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The server's command line."""
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.gguf), "--model_alias", self.model,
            "--host", self.host, "--port", str(self.port),
            "--n_ctx", str(self.n_ctx), "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
        ]  # fmt: skip

    def start(self) -> LocalServer:
        """Start the server and wait until /v1/models lists the model; ProviderError if it does not."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex((self.host, self.port)) == 0:
                raise ProviderError(f"port {self.port} on {self.host} is already in use: pick another --port")
        log = self.log_path.open("wb")
        try:
            self._proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise ProviderError(
                    f"llama.cpp server for {self.gguf.name} exited with code {code} during start-up; "
                    f"log tail ({self.log_path}):\n{_tail(self.log_path)}"
                )
            if self._ready():
                return self
            time.sleep(0.2)
        tail = _tail(self.log_path)
        self._own_log = False  # keep the log of a failed start for inspection
        self.stop()
        raise ProviderError(
            f"llama.cpp server at {self.base_url} did not answer /v1/models within {self.startup_timeout:g} s; "
            f"log tail ({self.log_path}):\n{tail}"
        )

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as resp:
                data = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return any(m.get("id") == self.model for m in data.get("data", []))

    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the server, SIGKILL it after ``grace`` seconds; returns its exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_log:  # a temporary log is only worth keeping when start-up failed
            self.log_path.unlink(missing_ok=True)
        return proc.returncode

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"LocalServer({self.spec!r}, name={self.model!r}, base_url={self.base_url!r}, {state})"
