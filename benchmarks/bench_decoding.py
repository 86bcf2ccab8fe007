"""Tokens/s of proxy-tuned generation vs the base alone, against the compute bound.

Proxy-tuning runs three models per token, so its best possible slowdown over the base alone is
``1 + 2 * c`` where ``c`` = (small model's time / base's time) for the same batch and tokens,
measured here from single-model runs. The paper's sequential implementation was 1.5x-2.5x slower
than the base alone.

Run: ``python benchmarks/bench_decoding.py [--new-tokens 128] [--batches 1 8] [--backend transformers]``
(defaults: base qwen2.5-coder-1.5b-instruct, pair = qwen2.5-coder-0.5b-instruct reading its chat
template vs the same model reading the plain prompt). Every ratio comes from this one run.
EOS is ignored so every run generates exactly ``--new-tokens`` tokens per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tqdm import tqdm

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a hash table is.",
    "def quicksort(xs):\n",
    "The three laws of thermodynamics are",
    "Translate to French: the weather is nice today.",
    "List five prime numbers and explain why they are prime.",
    "import numpy as np\n\n# compute the mean of each column\n",
    "Once upon a time, in a small village by the sea,",
]


def timed_generate(decoder: Any, prompts: list[str], new_tokens: int) -> float:
    """Wall seconds to generate ``new_tokens`` tokens for every prompt, as one batch."""
    from blackbox_proxy.decoding import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    t0 = time.perf_counter()
    out = decoder.generate(prompts, cfg)
    elapsed = time.perf_counter() - t0
    assert all(len(g.token_ids) == new_tokens for g in out)
    return elapsed


def combine_seconds(batch: int, vocab: int, steps: int) -> float:
    """Seconds spent on the full-vocabulary arithmetic alone (2 log-softmax + offset + arg-max per step)."""
    import torch

    base, e, a = (torch.randn(batch, vocab) for _ in range(3))
    t0 = time.perf_counter()
    for _ in range(steps):
        offset = torch.log_softmax(e, -1) - torch.log_softmax(a, -1)
        (base + offset).argmax(-1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--small", default="qwen2.5-coder-0.5b-instruct", help="expert and anti-expert model")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--backend", choices=["transformers", "llama-cpp"], default="transformers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    import torch

    from blackbox_proxy.decoding import ProxyDecoder, ProxyPair, load_model

    torch.set_num_threads(args.threads)
    extra = {"n_threads": args.threads, "n_ctx": 1024} if args.backend == "llama-cpp" else {}
    t0 = time.perf_counter()
    base = load_model(args.base, backend=args.backend, **extra)
    small = load_model(args.small, backend=args.backend, **extra)
    print(
        f"loaded models in {time.perf_counter() - t0:.1f} s ({args.backend}, {args.threads} threads)",
        file=sys.stderr,
    )
    pair = ProxyPair(small, small, alpha=1.0, expert_format="chat", anti_format="plain")
    decoders = {
        "base": ProxyDecoder(base),
        "small": ProxyDecoder(small),
        "proxy": ProxyDecoder(base, pair),
    }
    rows = []
    runs = [(b, name) for b in args.batches for name in decoders]
    warm = ProxyDecoder(small).generate(PROMPTS[0], max_new_tokens=2)  # first-call costs out of the timings
    del warm
    seconds: dict[tuple[int, str], float] = {}
    for b, name in tqdm(runs, desc="bench", file=sys.stderr):
        prompts = (PROMPTS * ((b + len(PROMPTS) - 1) // len(PROMPTS)))[:b]
        seconds[(b, name)] = timed_generate(decoders[name], prompts, args.new_tokens)
    for b in args.batches:
        n = b * args.new_tokens
        t_base, t_small, t_proxy = seconds[(b, "base")], seconds[(b, "small")], seconds[(b, "proxy")]
        cost = t_small / t_base
        bound = 1 + 2 * cost
        slowdown = t_proxy / t_base
        arith = combine_seconds(b, decoders["proxy"].vocab_size, args.new_tokens)
        rows.append(
            {
                "backend": args.backend,
                "threads": args.threads,
                "batch": b,
                "new_tokens": args.new_tokens,
                "base_tok_s": n / t_base,
                "small_tok_s": n / t_small,
                "proxy_tok_s": n / t_proxy,
                "small_over_base_cost": cost,
                "bound_slowdown": bound,
                "slowdown": slowdown,
                "slowdown_over_bound": slowdown / bound,
                "arith_share_of_proxy_time": arith / t_proxy,
            }
        )
    print(
        f"{'batch':>5} {'base tok/s':>10} {'small tok/s':>11} {'proxy tok/s':>11} {'c':>6} "
        f"{'bound 1+2c':>10} {'slowdown':>8} {'vs bound':>8} {'arith %':>7}"
    )
    for r in rows:
        print(
            f"{r['batch']:>5} {r['base_tok_s']:>10.2f} {r['small_tok_s']:>11.2f} {r['proxy_tok_s']:>11.2f} "
            f"{r['small_over_base_cost']:>6.2f} {r['bound_slowdown']:>10.2f} {r['slowdown']:>8.2f} "
            f"{r['slowdown_over_bound']:>8.2f} {100 * r['arith_share_of_proxy_time']:>7.1f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
