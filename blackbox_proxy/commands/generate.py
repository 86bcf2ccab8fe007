"""``blackbox-proxy generate PROMPT --base SPEC --expert SPEC --anti-expert SPEC``: proxy-tuned text.

Streams the continuation, and only it, to stdout; model loading and diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from ..errors import InputError

log = logging.getLogger(__name__)


def _loader(backend: str, threads: int, n_ctx: int) -> Any:
    """Load each distinct spec once (an expert and anti-expert may be the same model)."""
    from ..decoding import load_model

    loaded: dict[str, Any] = {}

    def load(spec: str) -> Any:
        if spec not in loaded:
            t0 = time.perf_counter()
            kwargs: dict[str, Any] = {}
            is_llama = (
                backend == "llama-cpp"
                or spec.startswith("llama-cpp:")
                or (
                    backend == "auto"
                    and spec.lower().endswith(".gguf")
                    and not spec.startswith("transformers:")
                )
            )
            if is_llama:
                kwargs = {"n_threads": threads, "n_ctx": n_ctx}
            loaded[spec] = load_model(spec, backend=backend, **kwargs)
            log.info("loaded %s in %.1f s", spec, time.perf_counter() - t0)
        return loaded[spec]

    return load


def _alphas(args: argparse.Namespace, n_pairs: int) -> list[float]:
    alphas = args.alpha or [1.0]
    if len(alphas) == 1:
        return alphas * n_pairs
    if len(alphas) != n_pairs:
        raise InputError(
            f"give one --alpha for all pairs or one per pair: {len(alphas)} alphas for {n_pairs} pairs"
        )
    return alphas


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..decoding import GenerationConfig, ProxyDecoder, ProxyPair

    experts, antis = args.expert or [], args.anti_expert or []
    if len(experts) != len(antis):
        raise InputError(
            f"each --expert needs an --anti-expert: got {len(experts)} experts and {len(antis)} anti-experts"
        )
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise InputError("empty prompt")
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=tuple(args.stop or ()),
        seed=args.seed,
    )
    torch.set_num_threads(args.threads)
    load = _loader(args.backend, args.threads, args.n_ctx)
    base = load(args.base)
    pairs = [
        ProxyPair(
            load(e), load(a), alpha=alpha, expert_format=args.expert_format, anti_format=args.anti_format
        )
        for e, a, alpha in zip(experts, antis, _alphas(args, len(experts)), strict=True)
    ]
    decoder = ProxyDecoder(base, pairs, base_format=args.base_format)
    t0 = time.perf_counter()
    n_chunks = 0
    for chunk in decoder.stream(prompt, config):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        n_chunks += 1
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    log.info("generated %d chunks in %.1f s", n_chunks, time.perf_counter() - t0)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="proxy-tuned generation from a self-hosted base (full logits), streamed to stdout",
        description="Generate from BASE steered by EXPERT - ANTI_EXPERT over the full shared vocabulary. "
        "Greedy unless --temperature is given. Only the continuation is written to stdout.",
    )
    p.add_argument("prompt", help="prompt text ('-' reads it from stdin)")
    p.add_argument("--base", required=True, help="base model spec (packaged name, .gguf, folder, hub id)")
    p.add_argument("--expert", action="append", help="expert model spec (repeat for several pairs)")
    p.add_argument("--anti-expert", action="append", help="anti-expert model spec, one per --expert")
    p.add_argument(
        "--alpha",
        type=float,
        action="append",
        help="pair weight (one for all pairs, or one per pair; default 1)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (needs --temperature)")
    p.add_argument(
        "--top-k", type=int, default=0, help="sample among the k best tokens (needs --temperature)"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", help="stop string (repeatable; not printed)")
    p.add_argument(
        "--base-format", choices=["plain", "chat"], default="plain", help="how the base reads the prompt"
    )
    p.add_argument(
        "--expert-format", choices=["plain", "chat"], default="plain", help="how experts read the prompt"
    )
    p.add_argument(
        "--anti-format", choices=["plain", "chat"], default="plain", help="how anti-experts read the prompt"
    )
    p.add_argument(
        "--backend",
        choices=["auto", "transformers", "llama-cpp"],
        default="auto",
        help="white-box backend (auto: .gguf files on llama.cpp, others on transformers; "
        "a spec may also be prefixed 'llama-cpp:' or 'transformers:')",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context per sequence (default 2048)")
    p.set_defaults(func=_run)
