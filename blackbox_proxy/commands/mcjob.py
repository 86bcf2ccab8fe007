"""One multiple-choice job for every command: engine + runner, the results table, the summary.

``mc``, ``eval``, ``sweep`` and ``demo`` differ only in where their questions come from and what
they print; each builds its engine from the shared flags (:mod:`.options`) and calls :func:`run_job`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputError
from ..evaluation.runner import EvalResult, EvaluationRunner, graceful_stop
from ..files import check_output_path, write_table
from ..types import MCQuestion
from .options import build_engine, set_threads, sweep_values

TABLE_EXTS = (".csv", ".parquet", ".pq")


def run_dir_for(args: argparse.Namespace) -> Path | None:
    """``--run-dir``, else ``OUT.run`` next to ``--out`` (so re-running a command resumes it)."""
    if getattr(args, "run_dir", None):
        return Path(args.run_dir)
    out = getattr(args, "out", None)
    return Path(str(out) + ".run") if out else None


def check_outputs(args: argparse.Namespace, inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Refuse unusable output paths before any work (a folder, an input file, an unwritable place)."""
    for flag in ("out", "summary_out"):
        path = getattr(args, flag, None)
        if not path:
            continue
        what = f"--{flag.replace('_', '-')}"
        if Path(path).is_dir():
            raise InputError(f"{what} {path} is a directory; give a .csv or .parquet file name")
        if Path(path).suffix.lower() not in TABLE_EXTS:
            raise InputError(f"{what} {path}: use a .csv or .parquet file")
        check_output_path(path, inputs=inputs, what=what)


@dataclass
class Job:
    """A finished job: the run's records and the table written."""

    result: EvalResult
    table: pd.DataFrame
    engine: Any


def run_job(
    args: argparse.Namespace,
    questions: Sequence[MCQuestion],
    *,
    provider: Any = None,
    pairs: list[Any] | None = None,
    default_sweep: tuple[float, ...] = (1.0,),
    write_out: bool = True,
    resumable: bool = True,
) -> Job:
    """Score ``questions`` (resuming from the run directory), write ``--out`` (unless told not to)."""
    if not questions:
        raise InputError("no questions to answer")
    set_threads(args)
    engine = build_engine(args, provider=provider, pairs=pairs)
    run_dir = run_dir_for(args) if resumable else None
    runner = EvaluationRunner(
        engine=engine,
        run_dir=run_dir,
        progress=not args.quiet,
        debias=getattr(args, "debias", "none"),
        debias_fraction=getattr(args, "debias_fraction", 0.1),
    )
    with graceful_stop():  # Ctrl-C / SIGTERM: answers in flight are awaited and stored (RunStopped)
        result = runner.run(questions, sweep_values(args, default_sweep))
    for msg in result.problems:
        print(f"blackbox-proxy: warning: {msg}")
    res = result.debiased()
    if res is not None:
        prior = {k: v for k, v in res.prior.items() if k != "method"}
        print(f"debias {res.method}: {res.extra_calls} extra base calls; prior {prior}")
    table = result.table()
    if write_out and getattr(args, "out", None):
        write_table(table, args.out)
    return Job(result, table, engine)


def answer_lines(df: pd.DataFrame, skipped: int | None = None) -> list[str]:
    """Counts (answered / excluded / errors / skipped lines), missing options, base and steered accuracy."""
    n = len(df)
    err = df["error"].astype(str).str.len() > 0
    n_err = int(err.sum())
    ok = df[~err]
    excl = ok["excluded"].astype(bool)
    head = (
        f"questions: {n} ({n - n_err - int(excl.sum())} answered, {int(excl.sum())} excluded, {n_err} errors)"
    )
    if skipped is not None:
        head += f"; input lines skipped: {skipped}"
    lines = [head]
    if len(ok):
        nm = ok["n_missing"].fillna(0).astype(int)
        lines.append(
            f"options missing from the base's top-k: {int(nm.sum())} in {int((nm > 0).sum())} questions"
        )
    graded = ok[ok["gold_letter"].astype(str).str.len() > 0] if len(ok) else ok
    if len(graded):
        base = int((graded["base_letter"] == graded["gold_letter"]).sum())
        steer = int((graded["steered_letter"] == graded["gold_letter"]).sum())
        m = len(graded)
        lines.append(f"base accuracy:    {base / m:.3f} ({base}/{m})")
        lines.append(f"steered accuracy: {steer / m:.3f} ({steer}/{m})")
        if excl.any():
            lines.append("(excluded questions count as wrong for the steered answer)")
    else:
        lines.append("no gold answers given: accuracy not computed")
    if n_err:
        first = df.loc[err, ["id", "error"]].iloc[0]
        lines.append(
            f"{n_err} questions have no answer (first: {first['id']}: {first['error']}); "
            "re-run the same command to retry them"
        )
    return lines


def format_summary(s: pd.DataFrame) -> str:
    """The systems table (accuracy, CI, delta and McNemar p vs base, and for the proxy vs its
    mean-offset control) as text."""
    names = (
        "system", "n", "correct", "accuracy", "ci_low", "ci_high", "delta_vs_base", "mcnemar_p",
        "delta_vs_control", "mcnemar_p_vs_control",
    )  # fmt: skip
    cols = [c for c in names if c in s]
    return s[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="")
