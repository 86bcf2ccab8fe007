"""Plots of evaluation results (matplotlib, Agg backend: no display needed).

``plot_alpha_sweep`` draws accuracy against alpha for base, proxy, expert and anti-expert, like the
paper's Figure 2; ``plot_per_week`` draws accuracy per RealtimeQA week with Wilson 95% bands.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from ..errors import InputError
from .stats import wilson_interval

_STYLE = {
    "base": ("base", "tab:gray", "--"),
    "proxy": ("proxy-tuned", "tab:red", "-"),
    "expert": ("expert", "tab:blue", ":"),
    "anti_expert": ("anti-expert", "tab:green", ":"),
}


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib is a declared extra
        raise InputError(f"plotting needs matplotlib (pip install 'blackbox-proxy[plots]'): {exc}") from None
    return plt


def plot_alpha_sweep(
    sweep: pd.DataFrame, path: str | os.PathLike[str] | None = None, *, title: str = ""
) -> Any:
    """Accuracy vs alpha from ``EvalResult.sweep``; saved as PNG to ``path`` when given. Returns the Figure."""
    if "alpha" not in sweep.columns or "base" not in sweep.columns or sweep.empty:
        raise InputError("a sweep table needs rows and the columns 'alpha' and 'base'")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    s = sweep.sort_values("alpha")
    for col, (label, color, ls) in _STYLE.items():
        if col not in s.columns:
            continue
        if col == "proxy":
            ax.plot(s["alpha"], s[col], marker="o", color=color, linestyle=ls, label=label)
        else:  # constant in alpha: a horizontal reference line
            ax.axhline(float(s[col].iloc[0]), color=color, linestyle=ls, label=label)
    vals = [float(v) for c in _STYLE if c in s.columns for v in s[c]]
    lo, hi = min(vals), max(vals)
    ax.set_ylim(max(0.0, min(lo, hi - 0.1) - 0.05), min(1.0, max(hi, lo + 0.1) + 0.05))
    ax.set_xlabel("alpha (steering strength)")
    ax.set_ylabel("accuracy")
    n = int(s["n"].iloc[0]) if "n" in s.columns else None
    ax.set_title(title or (f"accuracy vs alpha (n = {n})" if n is not None else "accuracy vs alpha"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, format="png")
    return fig


def plot_per_week(
    table: pd.DataFrame,
    columns: Sequence[str] = ("base_correct",),
    path: str | os.PathLike[str] | None = None,
    *,
    labels: Sequence[str] | None = None,
    title: str = "",
) -> Any:
    """Accuracy per ``week`` for each boolean outcome column, with Wilson 95% bands. Returns the Figure."""
    if "week" not in table.columns or not table["week"].astype(bool).any():
        raise InputError("per-week plot needs a 'week' column (RealtimeQA results)")
    for c in columns:
        if c not in table.columns:
            raise InputError(f"no outcome column {c!r} in the results table")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    weeks = pd.to_datetime(table["week"])
    for i, c in enumerate(columns):
        g = table.assign(_w=weeks, _c=table[c].astype(bool)).groupby("_w")["_c"].agg(["sum", "count"])
        acc = g["sum"] / g["count"]
        ci = [wilson_interval(int(k), int(n)) for k, n in zip(g["sum"], g["count"], strict=True)]
        lab = labels[i] if labels else c.replace("_correct", "").replace("@", " a=")
        line = ax.plot(g.index, acc, marker="o", markersize=3, label=lab)[0]
        ax.fill_between(
            g.index, [lo for lo, _ in ci], [hi for _, hi in ci], color=line.get_color(), alpha=0.15
        )
    ax.set_ylim(0, 1)
    ax.set_xlabel("quiz week")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "accuracy per week (95% Wilson bands)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, format="png")
    return fig
