"""``blackbox-proxy demo``: the multiple-choice black-box path end to end, fully offline.

A packaged model run in-process by llama.cpp and exposing only its top-k log-probs stands in for a
hosted API (the base); two packaged models are the expert / anti-expert pair; the questions are the
shipped TruthfulQA MC1 sample. Prints base vs steered answers and both accuracies.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..combine import POLICIES, STRATEGIES
from ..debias import METHODS as DEBIAS_METHODS
from ..errors import InputError
from ..option_scoring import CALIBRATIONS, DEFAULT_CALIBRATION, SCORING_MODES
from .mcjob import check_outputs, run_job
from .options import default_threads, positive_int

DEFAULT_BASE = "qwen2.5-coder-1.5b-instruct"
DEFAULT_EXPERT = "qwen2.5-coder-0.5b-instruct"
DEFAULT_ANTI = "smollm2-135m-instruct"
SAMPLE_SIZE = 40


def table(df: Any) -> str:
    """Per-question table: gold, base and steered letters with their probability of the gold option."""
    lines = [f"{'id':<16} {'gold':>4} {'base':>4} {'p_gold':>7} {'steered':>7} {'p_gold':>7}  missing"]
    for _, r in df.iterrows():
        if r.get("error"):
            lines.append(f"{r['id']:<16} {r['gold_letter']:>4}  error: {r['error']}")
            continue
        g = r["gold_letter"]
        bp, sp = r.get(f"base_p_{g}", float("nan")), r.get(f"p_{g}", float("nan"))
        bm = "+" if r["base_letter"] == g else " "
        sm = "+" if r["steered_letter"] == g else " "
        lines.append(
            f"{r['id']:<16} {g:>4} {r['base_letter'] or '-':>3}{bm} {bp:>7.3f} {r['steered_letter'] or '-':>6}{sm} "
            f"{sp:>7.3f}  {r['missing'] or ''}"
        )
    lines.append("(+ marks a correct answer; p_gold is the probability given to the gold option)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Load the in-process base and the pair, answer the sample, print the table and accuracies."""
    from ..adapters.base import ProviderOptions, create_provider
    from ..data.truthfulqa_sample import load_sample

    check_outputs(args)
    if args.limit > SAMPLE_SIZE:
        raise InputError(f"--limit {args.limit}: the shipped sample has {SAMPLE_SIZE} questions")
    args.expert, args.anti_expert = [args.expert_spec], [args.anti_spec]
    questions = load_sample()[: args.limit]
    t0 = time.perf_counter()
    print(
        f"base (top-{args.top_logprobs} log-probs only, in-process llama.cpp): {args.base}", file=sys.stderr
    )
    provider = create_provider(
        "llama-cpp", ProviderOptions(args.base, endpoint=args.endpoint, threads=args.threads)
    )
    print(f"expert pair: {args.expert_spec} - {args.anti_spec}, alpha {args.alpha}", file=sys.stderr)
    try:
        df = run_job(args, questions, provider=provider, resumable=False).table
    finally:
        provider.close()
    elapsed = time.perf_counter() - t0
    print(table(df))
    ok = df[df["error"].astype(str) == ""]
    n = len(ok)
    base_acc = (ok["base_letter"] == ok["gold_letter"]).sum()
    steer_acc = (ok["steered_letter"] == ok["gold_letter"]).sum()
    print()
    print(
        f"TruthfulQA MC1 sample, {n} questions ({len(df) - n} errors), alpha {args.alpha}, policy {args.missing}"
    )
    print(f"base    {args.base:<32} accuracy {base_acc / max(n, 1):.3f} ({base_acc}/{n})")
    print(
        f"steered {'+ (' + args.expert_spec + ' - ' + args.anti_spec + ')':<32} accuracy "
        f"{steer_acc / max(n, 1):.3f} ({steer_acc}/{n})"
    )
    print(
        f"changed answers: {(ok['base_letter'] != ok['steered_letter']).sum()}; "
        f"questions with an option outside the top-{args.top_logprobs}: {(ok['n_missing'] > 0).sum()}; "
        f"{elapsed:.0f} s"
    )
    if args.expert_spec == DEFAULT_EXPERT and args.anti_spec == DEFAULT_ANTI:
        print(
            "note: the default pair is two different packaged models, not a model and its fine-tuned "
            "twin, so the offset measures their difference, not a tuning; make a real expert with "
            "`blackbox-proxy train-expert` and pass it with --expert/--anti-expert."
        )
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="offline demo: an in-process top-k-only base steered by a packaged expert pair on TruthfulQA",
        description=__doc__,
    )
    p.add_argument(
        "--base", default=DEFAULT_BASE, help=f"base model spec, served top-k only (default {DEFAULT_BASE})"
    )
    p.add_argument(
        "--expert",
        dest="expert_spec",
        default=DEFAULT_EXPERT,
        help=f"expert model spec (default {DEFAULT_EXPERT})",
    )
    p.add_argument(
        "--anti-expert",
        dest="anti_spec",
        default=DEFAULT_ANTI,
        help=f"anti-expert model spec (default {DEFAULT_ANTI})",
    )
    p.add_argument(
        "--limit",
        "--n",
        type=positive_int,
        default=SAMPLE_SIZE,
        help=f"number of sample questions, at most {SAMPLE_SIZE} (default {SAMPLE_SIZE})",
    )
    p.add_argument("--alpha", default="1", help="steering strength (default 1)")
    p.add_argument(
        "--top-logprobs",
        "--k",
        type=positive_int,
        default=10,
        help="top log-probs the base reveals (default 10)",
    )
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat", help="default chat")
    p.add_argument("--prompt-template", metavar="NAME|FILE", help="multiple-choice prompt template")
    p.add_argument(
        "--missing", choices=POLICIES, default="floor", help="missing-option policy (default floor)"
    )
    p.add_argument("--strategy", choices=STRATEGIES, default="proxy", help="fusion strategy (default proxy)")
    p.add_argument(
        "--expert-backend", default="auto", choices=("auto", "transformers", "llama-cpp"), help="pair backend"
    )
    p.add_argument(
        "--expert-scoring",
        choices=SCORING_MODES,
        default="letters",
        help="what the pair scores: option letters or option texts",
    )
    p.add_argument("--option-calibration", choices=CALIBRATIONS, default=DEFAULT_CALIBRATION)
    p.add_argument("--debias", choices=DEBIAS_METHODS, default="none", help="letter-bias correction")
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="questions per expert forward pass (default 8)"
    )
    p.add_argument(
        "--threads", type=positive_int, default=default_threads(), help="CPU threads for each model"
    )
    p.add_argument("--out", help="also write the per-question results to this CSV")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(
        func=run, no_chat_template=False, chunk_size=None, concurrency=None, run_dir=None, sweep=None
    )
