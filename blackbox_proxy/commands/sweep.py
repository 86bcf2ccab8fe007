"""``blackbox-proxy sweep DATASET``: accuracy against alpha for base, proxy and expert, as a table and a plot.

One base request and one scoring per expert pair per question, then every value of ``--sweep`` from
the stored scores (like the paper's Figure 2). ``--from-run DIR`` re-uses a finished ``eval`` run
with no requests.
"""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..evaluation.plots import plot_alpha_sweep
from ..evaluation.runner import load_run
from ..files import check_output_path, write_table
from .evaluate import add_data_args, add_model_args, load_questions
from .mcjob import check_outputs, run_job
from .options import add_run_args, pair_alphas, parse_numbers, sweep_values

DEFAULT_SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def _run(args: argparse.Namespace) -> int:
    check_outputs(args)
    if args.plot:
        if not args.plot.lower().endswith(".png"):
            raise InputError(f"--plot {args.plot}: give a .png file")
        check_output_path(args.plot, what="--plot")
    values = sweep_values(args, DEFAULT_SWEEP)
    if args.from_run:
        alphas = parse_numbers(args.alpha, "--alpha") if args.alpha else None
        result = load_run(
            args.from_run, values, policy=args.missing, strategy=args.strategy, pair_alphas=alphas
        )
        if not result.has_pairs:
            raise InputError(f"{args.from_run}: the stored run has no expert-pair scores to sweep over")
    else:
        if args.dataset is None:
            raise InputError("give a DATASET (or --from-run DIR)")
        if not (args.expert and args.anti_expert):
            raise InputError("a sweep needs --expert and --anti-expert")
        pair_alphas(args, len(args.expert))  # check --alpha before any work
        result = run_job(args, load_questions(args), default_sweep=DEFAULT_SWEEP, write_out=False).result
    table = result.sweep(values)
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
    add_model_args(p, sweep_default=",".join(f"{v:g}" for v in DEFAULT_SWEEP))
    p.add_argument("--from-run", metavar="DIR", help="re-use the stored scores of an eval run directory")
    p.add_argument("--out", help="sweep table, .csv or .parquet")
    p.add_argument("--plot", help="PNG file for the accuracy-vs-alpha plot")
    p.add_argument("--title", help="plot title")
    add_run_args(p)
    p.set_defaults(func=_run)
