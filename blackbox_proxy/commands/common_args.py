"""Flags shared by the commands that query a base provider (``mc``, ``eval``, ``sweep``)."""

from __future__ import annotations

from typing import Any

from ..combine import POLICIES, STRATEGIES


def add_combination_args(g: Any) -> None:
    """--missing and --strategy: how base and expert scores are combined."""
    g.add_argument(
        "--missing",
        choices=POLICIES,
        default="floor",
        help="options absent from the top-k: floor (fill with the top-k bound), exclude, error",
    )
    g.add_argument("--strategy", choices=STRATEGIES, default="proxy", help="fusion strategy (default proxy)")


def add_transport_args(g: Any) -> None:
    """--concurrency, --timeout, --retries and --cache of the base provider's requests."""
    g.add_argument("--concurrency", type=int, default=4, help="base requests in flight (default 4)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per base request (default 60)")
    g.add_argument("--retries", type=int, default=5, help="retries per base request (default 5)")
    g.add_argument("--cache", metavar="FILE", help="SQLite cache of base responses (keyed without secrets)")
