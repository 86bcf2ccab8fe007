"""Local OpenAI-compatible servers as subprocesses: one lifecycle, two engines.

``with LocalServer("smollm2-135m-instruct", "smollm2") as srv:`` starts llama-cpp-python's server
(``python -m llama_cpp.server``) on a free loopback port, waits until ``GET /v1/models`` lists the
model and exposes ``srv.base_url`` (ending in ``/v1``) and ``srv.model`` for the OpenAI adapters.
:class:`ServerProcess` holds what every engine shares (ports, logs, readiness, a clean stop);
:class:`blackbox_proxy.vllm_server.VLLMServer` is the vLLM engine on the same base.
"""

from __future__ import annotations

import contextlib
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
from typing import Any, ClassVar

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


def check_int(label: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``low..high``, or InputError naming ``label`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
        span = f"in {low}..{high}" if high else f">= {low}"
        raise InputError(f"{label} must be an integer {span}, got {value!r}")
    return int(value)


class ServerProcess:
    """One OpenAI-compatible server subprocess serving one model as ``name``: start, ready, stop.

    Subclasses give :meth:`command` (and optionally :meth:`environment`); the base starts it with its
    output in a log (temporary unless ``log_path`` is given; kept when start-up fails), waits until
    ``/v1/models`` lists the model, and stops it with SIGTERM, then SIGKILL after a grace period.
    """

    #: the engine's name in messages
    engine: ClassVar[str] = "server"
    #: log file prefix for temporary logs
    log_prefix: ClassVar[str] = "server-"
    #: seconds between readiness polls
    poll_interval: ClassVar[float] = 0.2
    #: seconds stop() waits after SIGTERM
    stop_grace: ClassVar[float] = 10.0
    #: start in its own process group and kill the whole group on stop (engines with child processes)
    own_group: ClassVar[bool] = False

    def __init__(
        self,
        spec: str | os.PathLike[str],
        name: str,
        port: int | None,
        host: str,
        *,
        startup_timeout: float,
        log_path: str | os.PathLike[str] | None,
    ) -> None:
        if not name or not str(name).strip():
            raise InputError("the served model name must not be empty")
        self.spec = str(spec)
        self.model = str(name)
        self.host = host
        self.port = check_int("port", port, 1, 65535) if port is not None else free_port(host)
        self.startup_timeout = float(startup_timeout)
        self._own_log = log_path is None
        if log_path is None:
            fd, tmp = tempfile.mkstemp(prefix=self.log_prefix, suffix=".log")
            os.close(fd)
            log_path = tmp
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None
        #: seconds the last start took until /v1/models answered
        self.startup_seconds: float | None = None

    # -- what a subclass says ----------------------------------------------------------------------
    def command(self) -> list[str]:
        """The server's command line."""
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The server's environment (None: this process's)."""
        return None

    def describe(self) -> str:
        """What is served, for messages."""
        return self.spec

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ending in /v1."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Any:
        """Start the server and wait until /v1/models lists the model; ProviderError if it does not."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex((self.host, self.port)) == 0:
                raise ProviderError(f"port {self.port} on {self.host} is already in use: pick another --port")
        t0 = time.monotonic()
        log = self.log_path.open("wb")
        try:
            self._proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=self.own_group,
            )
        finally:
            log.close()
        deadline = t0 + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._kill_group(self._proc.pid)
                self._proc = None
                raise ProviderError(
                    f"{self.engine} server for {self.describe()} exited with code {code} during start-up; "
                    f"log tail ({self.log_path}):\n{_tail(self.log_path)}"
                )
            if self._ready():
                self.startup_seconds = time.monotonic() - t0
                return self
            time.sleep(self.poll_interval)
        tail = _tail(self.log_path)
        self._own_log = False  # keep the log of a failed start for inspection
        self.stop()
        raise ProviderError(
            f"{self.engine} server at {self.base_url} did not answer /v1/models within "
            f"{self.startup_timeout:g} s; log tail ({self.log_path}):\n{tail}"
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

    def _kill_group(self, pgid: int) -> None:
        if self.own_group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM the server, SIGKILL it after ``grace`` seconds; returns its exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_grace if grace is None else grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._kill_group(proc.pid)  # a child left behind, if any
        if self._own_log:  # a temporary log is only worth keeping when start-up failed
            self.log_path.unlink(missing_ok=True)
        return proc.returncode

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return (
            f"{type(self).__name__}({self.spec!r}, name={self.model!r}, base_url={self.base_url!r}, {state})"
        )


class LocalServer(ServerProcess):
    """llama-cpp-python's OpenAI-compatible server serving one GGUF model under the name ``name``."""

    engine = "llama.cpp"
    log_prefix = "llama-server-"

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
        self.n_ctx = check_int("n_ctx", n_ctx, 16)
        self.n_threads = check_int("n_threads", n_threads, 1)
        super().__init__(spec, name, port, host, startup_timeout=startup_timeout, log_path=log_path)
        self.gguf = gguf_path(spec)

    def describe(self) -> str:
        return self.gguf.name

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
        return super().start()

    def __enter__(self) -> LocalServer:
        return self.start()
