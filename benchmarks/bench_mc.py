"""Benchmark of the multiple-choice black-box path against a real local llama.cpp server.

Measures, in one run on the same questions:
  1. wall time of base-only answers vs proxy-tuned answers (Reranker.answer_many; ratio = overhead);
  2. the expert pair's throughput, batched vs one question at a time (questions/second; ratio = speed-up).

    python benchmarks/bench_mc.py                      # 200 MMLU validation questions
    python benchmarks/bench_mc.py --n 50 --dataset arc-easy --batch-size 16
    python benchmarks/bench_mc.py --expert smollm2-135m-instruct   # fast: two separate SmolLM2 copies
"""

from __future__ import annotations

import argparse
import time

import torch
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider

from blackbox_proxy.evaluation.datasets import load_dataset
from blackbox_proxy.experts import ExpertPair
from blackbox_proxy.models import load_model
from blackbox_proxy.rerank import Reranker
from blackbox_proxy.server import LocalServer


def accuracy(df: object, col: str) -> float:
    ok = df[df["error"] == ""]  # type: ignore[index]
    return float((ok[col] == ok["gold_letter"]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="questions (default 200)")
    ap.add_argument("--dataset", default="mmlu", help="mmlu, arc-easy, arc-challenge... (default mmlu)")
    ap.add_argument("--base", default="smollm2-135m-instruct", help="model served by llama.cpp as the base")
    ap.add_argument("--expert", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--anti-expert", default="smollm2-135m-instruct")
    ap.add_argument("--k", type=int, default=20, help="top log-probs per request (default 20)")
    ap.add_argument("--batch-size", type=int, default=8, help="expert batch size (default 8)")
    ap.add_argument("--single-n", type=int, help="questions for the one-at-a-time timing (default --n)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pair-only", action="store_true", help="only the batched vs one-at-a-time pair timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    questions = load_dataset(args.dataset)[: args.n]
    single_n = min(args.single_n or len(questions), len(questions))
    if args.expert == args.anti_expert:  # time two real forward passes, not one shared model
        pair = ExpertPair(
            load_model(args.expert, shared=False),
            load_model(args.anti_expert, shared=False),
            batch_size=args.batch_size,
        )
    else:
        pair = ExpertPair(args.expert, args.anti_expert, batch_size=args.batch_size)
    pair.score(questions[:2], [q.labels for q in questions[:2]])  # warm-up (allocations, lazy init)
    rows: list[tuple[str, str, str]] = []
    n = len(questions)
    if not args.pair_only:
        with LocalServer(args.base, "base", n_threads=args.threads) as srv:
            provider = OpenAIChatProvider(srv.model, srv.base_url, max_k=None, timeout=300)
            provider.top_logprobs("warm-up", 1)
            t = time.perf_counter()
            base_df = Reranker(provider, (), k=args.k).answer_many(questions)
            t_base = time.perf_counter() - t
            print(f"base only: {t_base:.1f} s", flush=True)
            t = time.perf_counter()
            proxy_df = Reranker(provider, pair, 1.0, k=args.k).answer_many(questions)
            t_proxy = time.perf_counter() - t
            print(f"proxy-tuned: {t_proxy:.1f} s", flush=True)
        rows.append(("base only (answer_many)", f"{t_base:.1f} s", f"{n / t_base:.2f} q/s"))
        rows.append(("proxy-tuned (answer_many)", f"{t_proxy:.1f} s", f"{n / t_proxy:.2f} q/s"))
        rows.append(("  ratio proxy / base", f"{t_proxy / t_base:.2f}x", ""))
    t = time.perf_counter()
    pair.score(questions, [q.labels for q in questions])
    t_batched = time.perf_counter() - t
    print(f"pair batched: {t_batched:.1f} s", flush=True)
    t = time.perf_counter()
    for q in questions[:single_n]:
        pair.score([q], q.labels)
    t_single = time.perf_counter() - t
    qps_b, qps_s = n / t_batched, single_n / t_single
    rows.append((f"pair batched (batch {args.batch_size})", f"{t_batched:.1f} s", f"{qps_b:.2f} q/s"))
    rows.append((f"pair one at a time ({single_n} q)", f"{t_single:.1f} s", f"{qps_s:.2f} q/s"))
    rows.append(("  ratio batched / single (q/s)", f"{qps_b / qps_s:.2f}x", ""))
    print(f"\n{args.dataset}: {n} questions; base {args.base} via llama.cpp server (top-{args.k});")
    print(f"pair {args.expert} - {args.anti_expert}; {args.threads} threads; torch {torch.__version__}")
    w = max(len(r[0]) for r in rows)
    for name, a, b in rows:
        print(f"{name:<{w}}  {a:>10}  {b:>10}")
    if not args.pair_only:
        print(
            f"accuracy: base {accuracy(proxy_df, 'base_letter'):.3f}, steered "
            f"{accuracy(proxy_df, 'steered_letter'):.3f} (base-only run {accuracy(base_df, 'base_letter'):.3f}); "
            f"missing-option questions {int((proxy_df['n_missing'] > 0).sum())}, "
            f"errors {int((proxy_df['error'] != '').sum())}"
        )


if __name__ == "__main__":
    main()
