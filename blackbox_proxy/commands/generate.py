"""``blackbox-proxy generate PROMPT``: proxy-tuned text from a local base or a black-box server.

* ``--base SPEC`` (a local model): full-logit decoding over the shared vocabulary;
* ``--base-url URL --model NAME``: black-box decoding through the server's top-k log-probs
  (``--endpoint completions|chat``, ``--top-logprobs K``, ``--no-speculative``, ``--report FILE.json``).

Streams the continuation, and only it, to stdout; model loading and diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from ..errors import InputError
from ..files import atomic_write_json, check_output_path
from .options import add_provider_args, positive_int

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


def _server_params(items: list[str] | None) -> dict[str, Any]:
    """``--server-param KEY=VALUE`` (VALUE read as JSON where it parses, else as text)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--server-param takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _black_box_provider(args: argparse.Namespace) -> Any:
    """The base provider for black-box generation: Completions, or chat that continues a partial reply."""
    from dataclasses import replace

    from ..adapters.base import create_provider
    from .options import provider_options

    name, opts = provider_options(args)
    if not args.provider:
        name = "openai-completions" if args.endpoint == "completions" else "openai-chat-continue"
    extra = _server_params(args.server_param)
    if extra:
        opts = replace(opts, extra={"extra_body": extra})
    return create_provider(name, opts)


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..decoding import GenerationConfig, ProxyDecoder, ProxyPair

    experts, antis = args.expert or [], args.anti_expert or []
    if len(experts) != len(antis):
        raise InputError(
            f"each --expert needs an --anti-expert: got {len(experts)} experts and {len(antis)} anti-experts"
        )
    black_box = bool(args.base_url or args.provider)
    if black_box and args.base:
        raise InputError("give either --base SPEC (local, full logits) or --base-url/--provider (black-box)")
    if not black_box and not args.base:
        raise InputError(
            "no base model: give --base SPEC (a local model, full logits) or --base-url URL --model NAME "
            "(a server, through its top-k log-probs)"
        )
    if args.report and not black_box:
        raise InputError("--report records the black-box accounting; it needs --base-url")
    if args.report:
        check_output_path(args.report, what="--report")
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
    provider = _black_box_provider(args) if black_box else None
    base = None if black_box else load(args.base)
    pairs = [
        ProxyPair(
            load(e), load(a), alpha=alpha, expert_format=args.expert_format, anti_format=args.anti_format
        )
        for e, a, alpha in zip(experts, antis, _alphas(args, len(experts)), strict=True)
    ]
    if black_box:
        from ..blackbox_decoding import BlackBoxProxyGenerator

        generator: Any = BlackBoxProxyGenerator(
            provider,
            pairs,
            top_logprobs=args.top_logprobs,
            speculative=not args.no_speculative,
            block_size=args.block_size,
            max_block=max(args.block_size, 32),
            draft=args.draft,
        )
        if provider is not None and provider.endpoint == "chat":
            messages: Any = [{"role": "user", "content": prompt}]
            prompt = messages
    else:
        generator = ProxyDecoder(base, pairs, base_format=args.base_format)
    t0 = time.perf_counter()
    n_chunks = 0
    for chunk in generator.stream(prompt, config):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        n_chunks += 1
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    log.info("generated %d chunks in %.1f s", n_chunks, time.perf_counter() - t0)
    if black_box:
        result = generator.last
        acct = result.accounting
        log.info(
            "black-box: %d calls for %d tokens (%.2f per token), %d prompt tokens sent, %d changed",
            acct.api_calls,
            acct.generated_tokens,
            acct.calls_per_token,
            acct.prompt_tokens_sent,
            len(acct.changed),
        )
        if args.report:
            atomic_write_json(
                args.report,
                {
                    "prompt": result.prompt,
                    "text": result.text,
                    "tokens": list(result.tokens),
                    "finish_reason": result.finish_reason,
                    "base": {"provider": provider.kind, "model": provider.model, "base_url": args.base_url},
                    "pairs": [{"expert": e, "anti_expert": a} for e, a in zip(experts, antis, strict=True)],
                    "alphas": list(result.alphas),
                    "accounting": acct.to_dict(),
                },
            )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="proxy-tuned generation from a self-hosted base (full logits), streamed to stdout",
        description="Generate from BASE steered by EXPERT - ANTI_EXPERT over the full shared vocabulary. "
        "Greedy unless --temperature is given. Only the continuation is written to stdout.",
    )
    p.add_argument("prompt", help="prompt text ('-' reads it from stdin)")
    p.add_argument(
        "--base", help="local base model spec (packaged name, .gguf, folder, hub id): full-logit decoding"
    )
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
    add_provider_args(p)
    g = p.add_argument_group("black-box generation (with --base-url)")
    g.add_argument(
        "--no-speculative",
        action="store_true",
        help="one call per token instead of verifying blocks of the server's greedy tokens",
    )
    g.add_argument(
        "--block-size", type=positive_int, default=8, help="first block length (adapts afterwards; default 8)"
    )
    g.add_argument(
        "--draft",
        choices=("base", "pair"),
        default="base",
        help="who proposes each block: the server's own greedy tokens (base, default), or the first "
        "expert's greedy text, verified by the server in one call (pair: needs --provider vllm with the completions endpoint, "
        "whose prompt_logprobs give the top-k at every drafted position)",
    )
    g.add_argument(
        "--server-param",
        action="append",
        metavar="KEY=VALUE",
        help="extra request field for the server (JSON value), e.g. repeat_penalty=1.0 for "
        "llama-cpp-python's server, whose default penalty 1.1 makes its greedy token differ from its log-probs",
    )
    g.add_argument("--report", metavar="FILE.json", help="write the accounting (calls, tokens, changes) here")
    p.set_defaults(func=_run, endpoint="completions", top_logprobs=20)
