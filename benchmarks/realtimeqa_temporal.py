"""RealtimeQA temporal adaptation, end to end (the paper's section 7 on this machine's models).

1. corpus: the news articles retrieved for the 2025-2026 questions (``*_gcs.jsonl``), one document
   per distinct URL (:func:`blackbox_proxy.corpus.build_corpus`);
2. expert: the anti-expert (a small packaged model) fine-tuned on that corpus with
   :func:`blackbox_proxy.training.train_expert` (resumable; reused when already trained);
3. base: qwen2.5-coder-1.5b-instruct served by llama.cpp behind :class:`blackbox_proxy.server.LocalServer`,
   queried as a black box (top-k log-probs over the OpenAI chat protocol);
4. evaluation on the 2025-2026 questions with :class:`EvaluationRunner` (resumable), then accuracy
   with Wilson 95% CIs for base / expert / anti-expert / proxy per alpha, McNemar's exact test and a
   paired bootstrap of proxy vs base, per-month breakdown, missing-candidate rates, and two plots.

Run (about 1 s per question for the base plus expert scoring; training dominates)::

    python benchmarks/realtimeqa_temporal.py --limit 200 --train-steps 200

Everything lands in ``--out-dir`` (results CSV, summary CSV, plots, a Markdown report).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from blackbox_proxy.evaluation.datasets import default_data_dir, load_realtimeqa, parse_date_range

HERE = Path(__file__).resolve().parent


def build_corpus(
    data_dir: Path, weeks: str, question_ids: set[str] | None, out: Path, max_docs: int | None
) -> int:
    """Write the retrieved articles of ``weeks`` (only those of ``question_ids`` when given); returns the count."""
    from blackbox_proxy.corpus import build_corpus as corpus_docs
    from blackbox_proxy.corpus import write_corpus

    root = data_dir / "realtimeqa" if (data_dir / "realtimeqa").is_dir() else data_dir
    docs, _stats = corpus_docs(root, weeks, progress=False)
    if question_ids is not None:
        docs = [d for d in docs if d.question_id in question_ids]
    if max_docs is not None:
        docs = docs[:max_docs]
    write_corpus(docs, out)
    return len(docs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=100, help="number of 2025-2026 questions to evaluate")
    ap.add_argument(
        "--sample",
        choices=("spread", "first"),
        default="spread",
        help="evenly spaced over the range, or the first N",
    )
    ap.add_argument("--weeks", default="2025-01..2026-07", help="question date range")
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument(
        "--base", default="qwen2.5-coder-1.5b-instruct", help="base model (served as a black box)"
    )
    ap.add_argument(
        "--anti-expert", default="smollm2-135m-instruct", help="small packaged model = untuned anti-expert"
    )
    ap.add_argument(
        "--expert-dir", help="trained expert folder (default OUT_DIR/expert; reused when complete)"
    )
    ap.add_argument(
        "--corpus",
        choices=("selected", "all"),
        default="selected",
        help="train on the articles of the evaluated questions only, or of every 2025-2026 question",
    )
    ap.add_argument("--max-docs", type=int, help="cap on training documents")
    ap.add_argument("--train-steps", type=int, default=100, help="optimizer steps for the expert")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    ap.add_argument("--alpha", default="0,0.5,1,1.5,2,3", help="comma-separated alphas (1 is the paper's)")
    ap.add_argument("--top-logprobs", type=int, default=10)
    ap.add_argument("--out-dir", default=str(HERE / "results" / "realtimeqa_temporal"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider

    from blackbox_proxy.cache import ResponseCache
    from blackbox_proxy.evaluation.plots import plot_alpha_sweep, plot_per_week
    from blackbox_proxy.evaluation.runner import EvaluationRunner
    from blackbox_proxy.evaluation.stats import breakdown, missing_rates
    from blackbox_proxy.experts import ExpertPair
    from blackbox_proxy.server import LocalServer
    from blackbox_proxy.training import TrainConfig, train_expert

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alphas = tuple(float(a) for a in args.alpha.split(",") if a.strip())
    data_dir = Path(args.data_dir)
    parse_date_range(args.weeks)
    pool = load_realtimeqa(data_dir, weeks=args.weeks)
    if args.sample == "spread" and args.limit < len(pool):  # evenly spaced over the date range
        step = len(pool) / args.limit
        questions = [pool[int(i * step)] for i in range(args.limit)]
    else:
        questions = pool[: args.limit]
    print(f"questions: {len(questions)} of {len(pool)} ({args.weeks}, {args.sample})", file=sys.stderr)
    timings: dict[str, float] = {}

    # 1. corpus
    t = time.perf_counter()
    corpus = out / "corpus.jsonl"
    ids = {q.meta["source_id"] for q in questions} if args.corpus == "selected" else None
    n_docs = build_corpus(data_dir, args.weeks, ids, corpus, args.max_docs)
    timings["corpus_s"] = time.perf_counter() - t
    print(f"corpus: {n_docs} documents -> {corpus}", file=sys.stderr)
    if n_docs == 0:
        print("no training documents found for these questions", file=sys.stderr)
        return 2

    # 2. expert = anti-expert fine-tuned on the articles
    t = time.perf_counter()
    expert_dir = Path(args.expert_dir) if args.expert_dir else out / "expert"
    cfg = TrainConfig(
        max_steps=args.train_steps,
        lr=args.lr,
        lora=args.lora,
        max_seq_len=args.max_seq_len,
        kind="text",
        threads=2,
    )
    card = train_expert(args.anti_expert, corpus, expert_dir, cfg, resume=True)
    timings["train_s"] = time.perf_counter() - t
    print(f"expert: {expert_dir} ({card.steps} steps, final loss {card.final_loss:.3f})", file=sys.stderr)

    # 3 + 4. base behind a real OpenAI-compatible server; evaluation with resume
    t = time.perf_counter()
    with LocalServer(args.base, "base", n_threads=2) as srv:
        provider = OpenAIChatProvider(
            srv.model, srv.base_url, max_k=None, cache=ResponseCache(out / "cache.sqlite")
        )
        runner = EvaluationRunner(
            provider,
            ExpertPair(str(expert_dir), args.anti_expert),
            k=args.top_logprobs,
            run_dir=out / "run",
        )
        result = runner.run(questions, alphas)
    timings["eval_s"] = time.perf_counter() - t

    table = result.table()
    table["month"] = table["date"].str[:7]
    table.to_csv(out / "results.csv", index=False)
    summary = result.summary(n_boot=5000)
    summary.to_csv(out / "summary.csv", index=False)
    sweep = result.sweep(alphas)
    plot_alpha_sweep(sweep, out / "alpha_sweep.png", title=f"RealtimeQA {args.weeks}: accuracy vs alpha")
    best = "steered_correct@1" if 1.0 in alphas else f"steered_correct@{alphas[-1]:g}"
    plot_per_week(table[~table["all_missing"]], ["base_correct", best], out / "per_week.png")
    per_month = breakdown(table[~table["all_missing"]], "month", ["base_correct", "expert_correct", best])
    rates = missing_rates(table)

    cols = [
        "system",
        "n",
        "correct",
        "accuracy",
        "ci_low",
        "ci_high",
        "delta_vs_base",
        "delta_ci_low",
        "delta_ci_high",
        "mcnemar_p",
    ]
    fmt = summary[[c for c in cols if c in summary.columns]]
    report = [
        f"# RealtimeQA temporal adaptation ({len(questions)} questions, {args.weeks})",
        "",
        f"base {args.base} (llama.cpp server, top-{args.top_logprobs} log-probs only); anti-expert "
        f"{args.anti_expert}; expert = anti-expert fine-tuned on {n_docs} retrieved 2025-2026 articles "
        f"({card.steps} steps, final loss {card.final_loss:.3f}).",
        "",
        fmt.to_markdown(index=False, floatfmt=".4f") if _has_tabulate() else fmt.to_string(index=False),
        "",
        f"options missing from the top-k: any {rates['any_missing']:.1%}, all {rates['all_missing']:.1%} "
        f"(excluded); base requests this run: {result.requests}",
        "",
        "timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    ]
    (out / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    print("\n".join(report))
    print()
    print(per_month.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    pd.DataFrame([timings]).to_csv(out / "timings.csv", index=False)
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
