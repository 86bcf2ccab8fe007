"""Evaluation throughput with one vs two vLLM base replicas, as a ratio from one run.

Run: ``python benchmarks/bench_vllm_replicas.py [--questions 60] [--repeats 2] [--concurrency 4]``.
Starts two vLLM CPU servers with SmolLM2-135M-Instruct (float32, eager), each pinned to its own
CPU core (``VLLM_CPU_OMP_THREADS_BIND``: the CPU stand-in for one GPU per replica), then scores
the same TruthfulQA questions through the multiple-choice engine (base only, top-5, ``exact``
candidates) with one replica and with both behind a ReplicatedProvider, alternating, best of
``--repeats``. Answers must be identical. Writes ``benchmarks/results/vllm_replicas.json``.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from blackbox_proxy.adapters.replicas import ReplicatedProvider
from blackbox_proxy.adapters.vllm import VLLMChatProvider

from blackbox_proxy.evaluation.datasets import load_truthfulqa
from blackbox_proxy.files import atomic_write_json
from blackbox_proxy.rerank import Reranker
from blackbox_proxy.vllm_server import VLLMServer

SMOLLM2 = "smollm2-135m-instruct"
OUT = Path(__file__).parent / "results" / "vllm_replicas.json"


def run(provider: Any, questions: list[Any], exact: bool) -> tuple[float, list[str | None]]:
    """Seconds to score ``questions`` and each record's base argmax letter."""
    eng = Reranker(provider, k=5)
    if exact:  # the engine does not pass candidates yet: score through the provider directly
        import asyncio

        from blackbox_proxy.candidates import match_candidates
        from blackbox_proxy.prompts import mc_messages

        async def all_q() -> list[Any]:
            sem = asyncio.Semaphore(provider.max_concurrency)

            async def one(q: Any) -> Any:
                async with sem:
                    return await provider.atop_logprobs(mc_messages(q), 5, candidates=q.labels)

            return await asyncio.gather(*(one(q) for q in questions))

        t0 = time.perf_counter()
        tops = asyncio.run(all_q())
        dt = time.perf_counter() - t0
        letters = []
        for q, top in zip(questions, tops, strict=True):
            m = match_candidates(top, q.labels)
            letters.append(max(q.labels, key=lambda lab: m[lab]))  # type: ignore[arg-type, return-value]
        return dt, letters
    t0 = time.perf_counter()
    recs = eng.score(questions)
    dt = time.perf_counter() - t0
    return dt, [None if r.error else eng.derive(r).base_letter for r in recs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight per replica")
    ap.add_argument("--exact", action="store_true", help="also ask every candidate's exact log-prob")
    ap.add_argument("--no-bind", action="store_true", help="do not pin each replica to one core")
    args = ap.parse_args()

    qs = load_truthfulqa()[: args.questions]
    with ExitStack() as stack:
        servers = []
        t0 = time.perf_counter()
        for core in (0, 1):
            env = {} if args.no_bind else {"VLLM_CPU_OMP_THREADS_BIND": str(core)}
            srv = VLLMServer(SMOLLM2, "smollm2", env=env, kv_cache_gib=1)
            servers.append(stack.enter_context(srv))
            print(f"replica {core}: {srv.base_url} ready in {srv.startup_seconds:.1f} s", flush=True)
        startup = time.perf_counter() - t0

        def provider(urls: list[str]) -> Any:
            ps = [VLLMChatProvider("smollm2", u, max_concurrency=args.concurrency, timeout=120) for u in urls]
            return ps[0] if len(ps) == 1 else ReplicatedProvider(ps)

        one = provider([servers[0].base_url])
        two = provider([s.base_url for s in servers])
        run(two, qs[:8], args.exact)  # warm both replicas
        t1, t2, l1, l2 = [], [], None, None
        for _ in range(args.repeats):
            dt, l1 = run(one, qs, args.exact)
            t1.append(dt)
            dt, l2 = run(two, qs, args.exact)
            t2.append(dt)
        assert l1 == l2, "one and two replicas gave different answers"
        per = two.stats()
        q1, q2 = len(qs) / min(t1), len(qs) / min(t2)
        result = {
            "questions": len(qs),
            "concurrency_per_replica": args.concurrency,
            "exact": args.exact,
            "pinned_one_core_per_replica": not args.no_bind,
            "one_replica_qps": round(q1, 2),
            "two_replicas_qps": round(q2, 2),
            "ratio": round(q2 / q1, 3),
            "seconds_one": [round(t, 2) for t in t1],
            "seconds_two": [round(t, 2) for t in t2],
            "requests_per_replica": [s["requests"] for s in per],
            "startup_seconds_both": round(startup, 1),
            "answers_identical": True,
        }
        atomic_write_json(OUT, result)
        print(result)


if __name__ == "__main__":
    main()
