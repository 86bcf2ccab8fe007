"""Expert-pair scoring on the two local backends, in one run: transformers (float32) vs llama.cpp (4-bit GGUF).

Prints questions per second of each backend, the ratio, and how far their letter log-probs and their
answers (the pair's own letters and the offsets' argmax) differ: the tolerance the engine's
``--expert-backend auto`` relies on.

    python benchmarks/bench_expert_backends.py --n 64
    python benchmarks/bench_expert_backends.py --expert qwen2.5-coder-0.5b-instruct --anti smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import time

import torch

from blackbox_proxy.evaluation.datasets import load_dataset
from blackbox_proxy.experts import ExpertPair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="MMLU validation questions (default 64)")
    ap.add_argument("--expert", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--anti", default="smollm2-135m-instruct")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    qs = load_dataset("mmlu")[: args.n]
    labels = [q.labels for q in qs]
    results = {}
    for backend in ("transformers", "llama-cpp"):
        opts = {"n_threads": args.threads} if backend == "llama-cpp" else {}
        pair = ExpertPair(
            args.expert, args.anti, backend=backend, batch_size=args.batch_size, load_options=opts
        )
        pair.score(qs[:2], labels[:2])  # load and warm up
        t = time.perf_counter()
        scores = pair.score(qs, labels)
        results[backend] = (time.perf_counter() - t, scores)
        print(f"{backend}: {results[backend][0]:.1f} s for {len(qs)} questions", flush=True)
    (t_hf, hf), (t_ll, ll) = results["transformers"], results["llama-cpp"]
    diffs = [
        abs(getattr(a, side)[lab] - getattr(b, side)[lab])
        for a, b in zip(hf, ll, strict=True)
        for side in ("expert", "anti_expert")
        for lab in a.expert
    ]
    same_off = sum(
        max(a.offsets(), key=a.offsets().get) == max(b.offsets(), key=b.offsets().get)
        for a, b in zip(hf, ll, strict=True)
    )
    same_exp = sum(
        max(a.expert, key=a.expert.get) == max(b.expert, key=b.expert.get)
        for a, b in zip(hf, ll, strict=True)
    )
    diffs.sort()
    print(
        f"\npair {args.expert} - {args.anti}, {len(qs)} MMLU questions, batch {args.batch_size}, {args.threads} threads"
    )
    print(
        f"transformers float32: {len(qs) / t_hf:.2f} q/s; llama.cpp GGUF: {len(qs) / t_ll:.2f} q/s; ratio {t_hf / t_ll:.2f}x"
    )
    print(
        f"letter log-prob |difference|: median {diffs[len(diffs) // 2]:.4f}, p95 {diffs[int(0.95 * len(diffs))]:.4f}, "
        f"max {diffs[-1]:.4f} nats"
    )
    print(f"same expert letter: {same_exp}/{len(qs)}; same offset argmax: {same_off}/{len(qs)}")


if __name__ == "__main__":
    main()
