"""``blackbox-proxy eval DATASET``: evaluate base, expert, anti-expert and proxy answers on a benchmark.

Each question costs one base request and one scoring per expert pair; every alpha of ``--sweep``
is derived from the stored scores. Results go to ``--out`` (CSV or Parquet by extension) in the
row schema every command writes, with a summary table on stdout (including the mean-offset and
shuffled-offset controls). The run directory (``--run-dir``, default ``OUT.run``) makes a killed
run resumable: re-running the same command skips finished questions and repeats no request.

Ctrl-C or SIGTERM stops a run gracefully: no new base request starts, the answers in flight are
awaited for up to 5 s (``runner.STOP_GRACE``) and stored, one line says what was kept, and the
exit status is 130 (SIGINT) or 143 (SIGTERM). A second Ctrl-C quits at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import InputError
from ..evaluation.datasets import DATASETS, load_dataset
from ..evaluation.stats import breakdown, missing_rates
from ..files import write_table
from .mcjob import answer_lines, check_outputs, format_summary, run_job
from .options import (
    add_combination_args,
    add_pair_args,
    add_provider_args,
    add_run_args,
    add_sweep_arg,
    positive_int,
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
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N questions")
    p.add_argument("--seed", type=int, default=0, help="TruthfulQA option shuffle seed (default 0)")
    p.add_argument("--split", default="validation", help="MMLU split (default validation)")


def add_model_args(p: argparse.ArgumentParser, *, sweep_default: str | None = None) -> None:
    """Provider, pair, combination and sweep flags: the same in ``mc``, ``eval`` and ``sweep``."""
    add_provider_args(p)
    add_pair_args(p)
    g = p.add_argument_group("combination")
    add_combination_args(g)
    add_sweep_arg(g, sweep_default)


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


def _run(args: argparse.Namespace) -> int:
    check_outputs(args, inputs=[args.data_dir] if args.data_dir else [])
    qs = load_questions(args)
    job = run_job(args, qs)  # a graceful stop raises RunStopped, which cli.main reports
    result, table = job.result, job.table
    print(
        f"{args.dataset}: {len(table)} questions, model {next((m for m in table['model'] if m), '?')}, "
        f"base requests sent: {result.requests}"
    )
    for line in answer_lines(table):
        print(line)
    summary = result.summary()
    print(format_summary(summary))
    rates = missing_rates(table)
    print(
        f"options missing from the base's top-{args.top_logprobs}: any {rates['any_missing']:.1%}, "
        f"all {rates['all_missing']:.1%} (excluded from accuracy), mean {rates['mean_missing']:.2f} per question"
    )
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
        "Each question costs one base request; all alphas of --sweep come from stored scores.",
    )
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--out", help="per-question results, .csv or .parquet")
    p.add_argument("--summary-out", help="write the summary table too (.csv or .parquet)")
    p.add_argument(
        "--breakdown", choices=("week", "source"), help="also print accuracy per week or per source"
    )
    add_run_args(p)
    p.set_defaults(func=_run)
