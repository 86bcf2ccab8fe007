"""``blackbox-proxy sweep DATASET``: accuracy against alpha for base, proxy and expert, as a table and a plot.

One base request and one expert-pair scoring per question, then every alpha from stored scores
(like the paper's Figure 2). ``--from-run DIR`` re-uses a finished ``eval`` run with no requests.
"""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..evaluation.plots import plot_alpha_sweep
from ..evaluation.runner import load_run
from .evaluate import add_data_args, add_model_args, evaluate_from_args, parse_alphas, write_table

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def _run(args: argparse.Namespace) -> int:
    alphas = parse_alphas(args.alpha, DEFAULT_ALPHAS)
    if args.from_run:
        result = load_run(args.from_run, alphas, policy=args.missing, strategy=args.strategy)
        if not result.records or result.records[0].expert is None:
            raise InputError(f"{args.from_run}: the stored run has no expert-pair scores to sweep over")
    else:
        if args.dataset is None:
            raise InputError("give a DATASET (or --from-run DIR)")
        if not (args.expert and args.anti_expert):
            raise InputError("a sweep needs --expert and --anti-expert")
        result = evaluate_from_args(args, alphas)
    table = result.sweep(alphas)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out:
        write_table(table, args.out)
    if args.plot:
        plot_alpha_sweep(table, args.plot, title=args.title or "")
        print(f"plot written to {args.plot}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="accuracy vs alpha (table + PNG plot) for base, proxy and expert",
        description="Sweep alpha without extra requests: each question is scored once.",
    )
    add_data_args(p)
    p.set_defaults(dataset=None)
    for a in p._actions:  # DATASET is optional with --from-run
        if a.dest == "dataset":
            a.nargs = "?"
    add_model_args(p)
    p.add_argument("--from-run", metavar="DIR", help="re-use the stored scores of an eval run directory")
    p.add_argument("--run-dir", help="where raw scores are stored for resume")
    p.add_argument("--out", help="sweep table, .csv or .parquet")
    p.add_argument("--plot", help="PNG file for the accuracy-vs-alpha plot")
    p.add_argument("--title", help="plot title")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
