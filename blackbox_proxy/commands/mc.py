"""``blackbox-proxy mc``: answer a JSONL file of multiple-choice questions with a steered hosted model.

Input: one JSON object a line, ``{"id": ..., "question": ..., "choices": [...], "answer": 0}``
(``id`` and ``answer`` optional; ``answer`` is the 0-based index of the gold option; ids default to
``line<N>``). A bad line is reported on stderr with its line number and skipped; the other
questions still run. Output: a CSV (or Parquet), one row per question in the schema every command
writes (base and steered letters, option probabilities, missing-candidate flags, expert log-probs,
error), and a summary. Scores are kept in ``OUT.run`` so re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import InputError
from ..evaluation.datasets import read_questions_jsonl
from ..types import MCQuestion
from .mcjob import answer_lines, check_outputs, run_job
from .options import (
    add_combination_args,
    add_pair_args,
    add_provider_args,
    add_run_args,
    add_sweep_arg,
    positive_int,
)


@dataclass
class ReadResult:
    """The valid questions of a JSONL file and one message per rejected line."""

    questions: list[MCQuestion] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def read_questions(path: str) -> ReadResult:
    """Parse a questions JSONL leniently: good lines become questions, bad ones ``path:line: reason``."""
    qs, errors = read_questions_jsonl(path, lenient=True)
    return ReadResult(qs, errors)


def run(args: argparse.Namespace) -> int:
    """Read questions, check outputs and models, answer everything (resumable), write the table."""
    check_outputs(args, inputs=[args.questions])
    read = read_questions(args.questions)
    for msg in read.errors:
        print(f"blackbox-proxy mc: skipped {msg}", file=sys.stderr)
    questions = read.questions[: args.limit] if args.limit else read.questions
    if not questions:
        raise InputError(f"no valid questions in {args.questions}")
    job = run_job(args, questions)
    for line in answer_lines(job.table, len(read.errors)):
        print(line)
    print(f"wrote {len(job.table)} rows to {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mc",
        help="answer multiple-choice questions (JSONL) with a hosted model steered by expert pairs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("questions", help="JSONL file: {id, question, choices: [...], answer: 0-based index}")
    add_provider_args(p)
    add_pair_args(p)
    g = p.add_argument_group("combination")
    add_combination_args(g)
    add_sweep_arg(g)
    p.add_argument("--limit", type=positive_int, help="answer only the first N valid questions")
    p.add_argument(
        "--out", required=True, metavar="RESULTS.csv", help="per-question results (.csv or .parquet)"
    )
    add_run_args(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run just this command (``python -m blackbox_proxy.commands.mc``)."""
    from ..cli import main as cli_main

    return cli_main(["mc", *(argv if argv is not None else sys.argv[1:])])
