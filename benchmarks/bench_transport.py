"""Transport costs on a real llama.cpp server: provider vs raw ``openai`` client, cache hits, async.

Run: ``python benchmarks/bench_transport.py [--requests 30] [--base-url URL --model NAME]``.
Without ``--base-url`` it serves smollm2-135m-instruct itself. All ratios come from this one run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import openai
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
from tqdm import tqdm

from blackbox_proxy.server import LocalServer


def prompts(n: int) -> list[str]:
    return [f"Question {i}: is {i} an even number? Answer yes or no." for i in range(n)]


def timed(label: str, fn: Callable[[str], object], items: list[str]) -> float:
    """Seconds per item of ``fn`` over ``items`` (progress on stderr)."""
    t0 = time.perf_counter()
    for p in tqdm(items, desc=label, file=sys.stderr, leave=False):
        fn(p)
    return (time.perf_counter() - t0) / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    with ExitStack() as stack:
        base_url = args.base_url
        if base_url is None:
            base_url = stack.enter_context(
                LocalServer("smollm2-135m-instruct", args.model, n_ctx=1024)
            ).base_url
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        items = prompts(args.requests)
        raw = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)

        def raw_call(p: str) -> None:
            raw.chat.completions.create(
                model=args.model,
                messages=[{"role": "user", "content": p}],
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=5,
            )

        provider = OpenAIChatProvider(args.model, base_url, max_k=None, cache=tmp / "cache.sqlite")
        plain = OpenAIChatProvider(args.model, base_url, max_k=None)
        raw_call(items[0])  # warm the server
        t_raw = timed("raw openai client", raw_call, items)
        t_plain = timed("provider, no cache", lambda p: plain.top_logprobs(p, 5), items)
        t_miss = timed("provider, cache miss", lambda p: provider.top_logprobs(p, 5), items)
        t_hit = timed("provider, cache hit", lambda p: provider.top_logprobs(p, 5), items)

        async def run_async(conc: int) -> float:
            prov = OpenAIChatProvider(args.model, base_url, max_k=None, max_concurrency=conc)
            t0 = time.perf_counter()
            await asyncio.gather(*(prov.atop_logprobs(p + " (async)", 5) for p in items))
            return (time.perf_counter() - t0) / len(items)

        t_async = asyncio.run(run_async(4))
        print(f"requests per measurement: {len(items)} (llama.cpp serves one request at a time)")
        print(f"raw openai client      {1000 * t_raw:8.1f} ms/request")
        print(f"provider (no cache)    {1000 * t_plain:8.1f} ms/request  ratio to raw {t_plain / t_raw:.2f}")
        print(f"provider, cache miss   {1000 * t_miss:8.1f} ms/request  ratio to raw {t_miss / t_raw:.2f}")
        print(
            f"provider, cache hit    {1000 * t_hit:8.2f} ms/request  speed-up over miss {t_miss / t_hit:.0f}x"
        )
        print(
            f"async, concurrency 4   {1000 * t_async:8.1f} ms/request  ratio to sync {t_async / t_plain:.2f}"
        )
        print(f"cache: {provider.transport.cache.stats() if provider.transport.cache else {}}")


if __name__ == "__main__":
    main()
