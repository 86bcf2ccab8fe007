"""Accuracy of the base's multiple-choice answer under the ``floor`` and ``exact`` policies at k = 5.

Run: ``python benchmarks/vllm_exact_vs_floor.py [--questions 200] [--offset 200] [--base-url URL --model NAME]``.
Without ``--base-url`` it serves SmolLM2-135M-Instruct with vLLM (float32) itself. Per question: one
top-5 request (``floor`` fills a missing option with the top-k bound; ``exclude`` drops it) and one
``exact`` request (``logprob_token_ids``: every option's true log-prob). TruthfulQA MC1 questions
``offset .. offset + questions`` (held out from the ones the tests and prompt choice use).
Writes ``benchmarks/results/vllm_exact_vs_floor.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from blackbox_proxy.adapters.vllm import VLLMChatProvider

from blackbox_proxy.candidates import match_candidates
from blackbox_proxy.combine import fill_missing
from blackbox_proxy.evaluation.datasets import load_truthfulqa
from blackbox_proxy.files import atomic_write_json
from blackbox_proxy.prompts import mc_messages
from blackbox_proxy.vllm_server import VLLMServer

OUT = Path(__file__).parent / "results" / "vllm_exact_vs_floor.json"


def argmax(scores: dict[str, float]) -> str:
    return max(scores, key=lambda k: scores[k])


async def fetch(prov: VLLMChatProvider, qs: list[Any], k: int, conc: int) -> list[tuple[Any, Any]]:
    sem = asyncio.Semaphore(conc)

    async def one(q: Any) -> tuple[Any, Any]:
        async with sem:
            msgs = mc_messages(q)
            return await asyncio.gather(
                prov.atop_logprobs(msgs, k), prov.atop_logprobs(msgs, k, candidates=q.labels)
            )

    return await asyncio.gather(*(one(q) for q in qs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--offset", type=int, default=200)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    qs = load_truthfulqa()[args.offset : args.offset + args.questions]
    with ExitStack() as stack:
        url = args.base_url
        if url is None:
            url = stack.enter_context(VLLMServer("smollm2-135m-instruct", args.model)).base_url
        prov = VLLMChatProvider(args.model, url, with_top_k=False, timeout=120)
        t0 = time.perf_counter()
        pairs = asyncio.run(fetch(prov, qs, args.k, args.concurrency))
        seconds = time.perf_counter() - t0
    right = {"floor": 0, "exclude": 0, "exact": 0}
    any_missing = changed = excluded_all = 0
    for q, (plain, exact) in zip(qs, pairs, strict=True):
        gold = q.labels[q.answer]
        m = match_candidates(plain, q.labels)
        any_missing += any(v is None for v in m.values())
        floor, _, _ = fill_missing(m, "floor", plain.missing_bound())
        kept, _, _ = fill_missing(m, "exclude", None)
        ex = match_candidates(exact, q.labels)
        assert all(v is not None for v in ex.values())
        a_floor, a_exact = argmax(floor), argmax(ex)  # type: ignore[arg-type]
        changed += a_floor != a_exact
        right["floor"] += a_floor == gold
        right["exact"] += a_exact == gold
        if kept:
            right["exclude"] += argmax(kept) == gold
        else:
            excluded_all += 1
    n = len(qs)
    result = {
        "model": args.model,
        "questions": n,
        "offset": args.offset,
        "k": args.k,
        "accuracy": {p: round(c / n, 4) for p, c in right.items()},
        "exact_minus_floor": round((right["exact"] - right["floor"]) / n, 4),
        "questions_with_a_missing_option": any_missing,
        "answers_changed_floor_to_exact": changed,
        "questions_with_every_option_missing": excluded_all,
        "seconds": round(seconds, 1),
    }
    atomic_write_json(OUT, result)
    print(result)


if __name__ == "__main__":
    main()
