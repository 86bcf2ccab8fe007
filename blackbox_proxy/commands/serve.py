"""``blackbox-proxy serve NAME --port P``: serve a model over the OpenAI protocol (llama.cpp or vLLM)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType
from typing import Any

from ..errors import InputError
from ..server import LocalServer
from .options import positive_int


def _port(text: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    v = positive_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {v}")
    return v


def _serve(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    engine = getattr(args, "engine", "llama.cpp")
    server: Any
    if engine == "vllm":
        from ..vllm_server import VLLMServer

        server = VLLMServer(
            args.model or args.name,
            args.name,
            port=args.port,
            host=args.host,
            max_model_len=args.n_ctx,
            dtype=args.dtype,
            aliases=args.alias or (),
            extra_args=args.engine_arg or (),
        )
        weights = server.model_path
    else:
        if args.alias or args.engine_arg:
            raise InputError("--alias and --engine-arg are for --engine vllm")
        server = LocalServer(
            args.model or args.name,
            args.name,
            port=args.port,
            host=args.host,
            n_ctx=args.n_ctx,
            n_threads=args.threads,
        )
        weights = server.gguf.name
    try:
        server.start()
        print(server.base_url, flush=True)
        print(
            f"serving {weights} with {engine} as model {server.model!r}; log: {server.log_path}",
            file=sys.stderr,
        )
        while not stop.is_set():
            if not server.running():
                print(f"blackbox-proxy: error: the {engine} server exited unexpectedly", file=sys.stderr)
                return 1
            stop.wait(0.5)
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over the OpenAI protocol with llama.cpp or vLLM (prints the base URL when ready)",
        description="Serve a packaged model, GGUF file or model folder with llama-cpp-python's "
        "OpenAI-compatible server (default) or vLLM's (--engine vllm). Prints the base URL (ending in /v1) "
        "once /v1/models answers; stops cleanly on SIGTERM or Ctrl-C.",
    )
    p.add_argument(
        "name", help="model name to serve under; also the weights (packaged name or .gguf) unless --model"
    )
    p.add_argument("--model", default=None, help="weights to serve (packaged model name or .gguf path)")
    p.add_argument("--port", type=_port, default=None, help="TCP port (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument(
        "--n-ctx", type=positive_int, default=2048, help="context length in tokens (default: 2048)"
    )
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads (default: 2)")
    p.add_argument(
        "--engine",
        choices=("llama.cpp", "vllm"),
        default="llama.cpp",
        help="serving engine (default: llama.cpp; vllm runs from .venv-vllm, see scripts/install_vllm.sh, "
        "and serves packaged models and GGUF files from their converted safetensors folder)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16", "auto"),
        default="float32",
        help="vLLM only: weight dtype (default: float32, log-probs equal to transformers')",
    )
    p.add_argument(
        "--alias",
        action="append",
        metavar="NAME",
        help="vLLM only: a further name the model answers to (repeatable)",
    )
    p.add_argument(
        "--engine-arg",
        action="append",
        metavar="ARG",
        help="vLLM only: one argument appended to vLLM's command line, e.g. --engine-arg=--tensor-parallel-size "
        "--engine-arg=2 (repeatable)",
    )
    p.set_defaults(func=_serve)
