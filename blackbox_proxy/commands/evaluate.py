"""``blackbox-proxy eval DATASET``: evaluate base, expert, anti-expert and proxy answers on a benchmark.

Each question costs one base request and one expert-pair scoring; every alpha is derived from the
stored scores. Results go to ``--out`` (CSV or Parquet by extension) with a summary table on
stdout. The run directory (``--run-dir``, default ``OUT.run``) makes a killed run resumable:
re-running the same command skips finished questions and repeats no request.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputError
from ..evaluation.datasets import DATASETS, load_dataset
from ..evaluation.runner import ENDPOINTS, EvalResult, EvaluationRunner, LazyExpertPair
from ..evaluation.stats import breakdown, missing_rates
from .common_args import add_combination_args, add_transport_args

DEFAULT_EMBEDDED_BASE = "smollm2-135m-instruct"


def parse_alphas(values: list[str] | None, default: tuple[float, ...] = (1.0,)) -> tuple[float, ...]:
    """Alphas from repeated ``--alpha`` flags, each a number or a comma list (``0,0.5,1``)."""
    if not values:
        return default
    out: list[float] = []
    for v in values:
        for part in str(v).split(","):
            if not part.strip():
                continue
            try:
                a = float(part)
            except ValueError:
                raise InputError(f"--alpha {part!r} is not a number") from None
            if a != a or a in (float("inf"), float("-inf")):
                raise InputError(f"--alpha must be finite, got {part!r}")
            out.append(a)
    if not out:
        raise InputError("--alpha given without any value")
    return tuple(dict.fromkeys(out))


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The base / expert / alpha / endpoint flags, named as in ``mc`` (shared with ``sweep``)."""
    g = p.add_argument_group("base model")
    g.add_argument(
        "--base-url",
        help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL; without one, the "
        "base runs in-process from a packaged GGUF model)",
    )
    g.add_argument(
        "--model",
        help=f"base model name at --base-url, or a model spec in-process (default {DEFAULT_EMBEDDED_BASE})",
    )
    g.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default OPENAI_API_KEY)",
    )
    g.add_argument("--endpoint", choices=ENDPOINTS, default="chat", help="chat or completions (default chat)")
    g.add_argument(
        "--top-logprobs", type=int, default=5, metavar="K", help="top log-probs per base request (default 5)"
    )
    g.add_argument(
        "--max-k",
        type=int,
        metavar="N",
        help="largest K the server accepts (default: OpenAI's 20 chat / 5 completions at api.openai.com, "
        "no limit elsewhere; 0 = no limit)",
    )
    add_combination_args(g)
    add_transport_args(g)
    e = p.add_argument_group("expert pair")
    e.add_argument(
        "--expert", action="append", metavar="SPEC", help="tuned expert model spec (name, folder, GGUF)"
    )
    e.add_argument("--anti-expert", action="append", metavar="SPEC", help="untuned anti-expert model spec")
    e.add_argument(
        "--alpha",
        action="append",
        metavar="A",
        help="steering strength(s) reported for the pair; repeat or comma-separate several "
        "(all derived from one scoring; default 1)",
    )
    e.add_argument(
        "--no-chat-template", action="store_true", help="experts read plain text, not their chat template"
    )
    e.add_argument("--batch-size", type=int, default=8, help="questions per expert forward pass (default 8)")
    e.add_argument(
        "--chunk-size",
        type=int,
        default=16,
        help="questions per expert-scoring chunk; finished rows are saved per chunk (default 16)",
    )


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Dataset selection flags."""
    p.add_argument("dataset", choices=sorted(DATASETS), help="benchmark to evaluate")
    p.add_argument(
        "--data-dir",
        "--data",
        dest="data_dir",
        help="dataset folder or file (default: the shared data folder)",
    )
    p.add_argument("--weeks", help="RealtimeQA date range, e.g. 2025-01..2026-07 or 2024/02/01..2024/03/31")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions")
    p.add_argument("--seed", type=int, default=0, help="TruthfulQA option shuffle seed (default 0)")
    p.add_argument("--split", default="validation", help="MMLU split (default validation)")


def load_questions(args: argparse.Namespace) -> list:
    """The questions the flags select."""
    kw: dict[str, Any] = {}
    if args.dataset.startswith("realtimeqa"):
        if args.weeks:
            kw["weeks"] = args.weeks
    elif args.weeks:
        raise InputError("--weeks applies to realtimeqa only")
    if args.dataset == "truthfulqa":
        kw["seed"] = args.seed
    if args.dataset == "mmlu":
        kw["split"] = args.split
    if args.dataset == "jsonl" and not args.data_dir:
        raise InputError("the jsonl dataset needs --data FILE")
    qs = load_dataset(args.dataset, args.data_dir, limit=args.limit, **kw)
    if not qs:
        raise InputError(f"no {args.dataset} questions selected (check --weeks / --data-dir)")
    return qs


def build_provider(args: argparse.Namespace) -> Any:
    """The base provider: OpenAI-compatible HTTP when a base URL is known, else in-process llama.cpp."""
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    if base_url:
        if not args.model:
            raise InputError("--model is required with --base-url (the model name the server knows)")
        if args.endpoint == "chat":
            from ..adapters.openai_chat import OpenAIChatProvider as cls
        else:
            from ..adapters.openai_completions import OpenAICompletionsProvider as cls
        kw: dict[str, Any] = {
            "timeout": args.timeout,
            "max_retries": args.retries,
            "max_concurrency": args.concurrency,
            "cache": args.cache,
        }
        if args.max_k is not None:
            kw["max_k"] = args.max_k or None
        elif "api.openai.com" not in base_url:
            kw["max_k"] = None  # self-hosted servers (llama.cpp, vLLM) set their own limit
        api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
        return cls(args.model, base_url, api_key, **kw)
    if args.cache:
        raise InputError("--cache applies to --base-url providers; the in-process base answers locally")
    from ..adapters.llama_cpp_inprocess import LlamaCppTopKProvider

    return LlamaCppTopKProvider(args.model or DEFAULT_EMBEDDED_BASE, endpoint=args.endpoint)


def build_pair(args: argparse.Namespace) -> Any:
    """The expert pair, or None when neither --expert nor --anti-expert is given."""
    if not args.expert and not args.anti_expert:
        if args.alpha:
            raise InputError("--alpha needs --expert and --anti-expert")
        return None
    if not (args.expert and args.anti_expert):
        raise InputError("give both --expert and --anti-expert (or neither, for a base-only evaluation)")
    if len(args.expert) > 1 or len(args.anti_expert) > 1:
        raise InputError("eval and sweep take one expert pair (use `mc` to combine several pairs)")
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return LazyExpertPair(
        args.expert[0],
        args.anti_expert[0],
        chat_template=not args.no_chat_template,
        batch_size=args.batch_size,
    )


def run_dir_for(args: argparse.Namespace) -> Path | None:
    """``--run-dir``, else ``OUT.run`` next to ``--out`` (so re-running a command resumes it)."""
    if getattr(args, "run_dir", None):
        return Path(args.run_dir)
    out = getattr(args, "out", None)
    return Path(str(out) + ".run") if out else None


def evaluate_from_args(args: argparse.Namespace, alphas: tuple[float, ...]) -> EvalResult:
    """Load data, build base and pair, and run (or resume) the evaluation."""
    if args.top_logprobs < 1:
        raise InputError(f"--top-logprobs must be at least 1, got {args.top_logprobs}")
    qs = load_questions(args)
    pair = build_pair(args)
    provider = build_provider(args)
    runner = EvaluationRunner(
        provider,
        pair,
        k=args.top_logprobs,
        endpoint=args.endpoint,
        policy=args.missing,
        strategy=args.strategy,
        concurrency=args.concurrency,
        chunk_size=args.chunk_size,
        run_dir=run_dir_for(args),
        progress=not args.quiet,
    )
    return runner.run(qs, alphas)


def write_table(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a DataFrame as CSV or Parquet, chosen by the file extension."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ext = p.suffix.lower()
    if ext == ".csv":
        df.to_csv(p, index=False)
    elif ext in (".parquet", ".pq"):
        try:
            df.to_parquet(p, index=False)
        except ImportError as exc:
            raise InputError(f"writing Parquet needs pyarrow ({exc}); use a .csv file instead") from None
    else:
        raise InputError(f"--out {p}: unknown extension {ext!r}; use .csv or .parquet")


def _fmt_summary(s: pd.DataFrame) -> str:
    cols = [
        c
        for c in ("system", "n", "correct", "accuracy", "ci_low", "ci_high", "delta_vs_base", "mcnemar_p")
        if c in s
    ]
    return s[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="")


def _run(args: argparse.Namespace) -> int:
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise InputError(f"--out {args.out}: use a .csv or .parquet file")
    alphas = parse_alphas(args.alpha)
    result = evaluate_from_args(args, alphas)
    table = result.table()
    if args.out:
        write_table(table, args.out)
    summary = result.summary()
    print(
        f"{args.dataset}: {len(table)} questions, model {next((m for m in table['model'] if m), '?')}, "
        f"base requests sent: {result.requests}"
    )
    print(_fmt_summary(summary))
    rates = missing_rates(table)
    print(
        f"options missing from the base's top-{args.top_logprobs}: any {rates['any_missing']:.1%}, "
        f"all {rates['all_missing']:.1%} (excluded from accuracy), mean {rates['mean_missing']:.2f} per question"
    )
    n_err = int((table["error"] != "").sum()) if "error" in table.columns else 0
    if n_err:
        print(f"{n_err} questions got an answer without log-probs from the base (counted as all missing)")
    if args.summary_out:
        write_table(summary, args.summary_out)
    if args.breakdown:
        if args.breakdown not in table.columns or not table[args.breakdown].astype(bool).any():
            raise InputError(
                f"--breakdown {args.breakdown}: this dataset has no {args.breakdown!r} information"
            )
        t = table[~table["all_missing"]]
        cols = [c for _, c, _ in result.systems()]
        b = breakdown(t, args.breakdown, cols)
        print(b.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate base / expert / proxy accuracy on a benchmark (resumable)",
        description="Evaluate on realtimeqa, truthfulqa, mmlu, arc-easy, arc-challenge or a jsonl file. "
        "Each question costs one base request; all alphas come from stored scores.",
    )
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--out", help="per-question results, .csv or .parquet")
    p.add_argument("--summary-out", help="write the summary table too (.csv or .parquet)")
    p.add_argument("--run-dir", help="where raw scores are stored for resume (default OUT.run)")
    p.add_argument(
        "--breakdown", choices=("week", "source"), help="also print accuracy per week or per source"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
