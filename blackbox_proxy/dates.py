"""Dates and date ranges as people type them: ``2025-01..2026-07``, ``2024/02/01``, ``20240201``."""

from __future__ import annotations

import re
from datetime import date, timedelta

from .errors import DatasetError

_DATE_RE = re.compile(r"^(\d{4})[-/]?(\d{2})[-/]?(\d{2})$")
_MONTH_RE = re.compile(r"^(\d{4})[-/](\d{2})$")
_YEAR_RE = re.compile(r"^(\d{4})$")


def parse_date(text: str) -> date:
    """Parse ``YYYY/MM/DD``, ``YYYY-MM-DD`` or ``YYYYMMDD`` into a date (DatasetError otherwise)."""
    m = _DATE_RE.match(str(text).strip())
    if not m:
        raise DatasetError(f"cannot parse date {text!r}: expected YYYY-MM-DD, YYYY/MM/DD or YYYYMMDD")
    try:
        return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError as exc:
        raise DatasetError(f"invalid date {text!r}: {exc}") from None


def _bound(text: str, end: bool) -> date:
    """A range endpoint: a day, a month (``YYYY-MM``) or a year (``YYYY``); month/year expand to their span."""
    t = text.strip()
    if m := _YEAR_RE.match(t):
        y = int(m.group(1))
        return date(y, 12, 31) if end else date(y, 1, 1)
    if m := _MONTH_RE.match(t):
        y, mo = int(m.group(1)), int(m.group(2))
        if not 1 <= mo <= 12:
            raise DatasetError(f"invalid month {text!r}")
        if not end:
            return date(y, mo, 1)
        nxt = date(y + (mo == 12), mo % 12 + 1, 1)
        return nxt - timedelta(days=1)
    return parse_date(t)


def parse_date_range(spec: str) -> tuple[date | None, date | None]:
    """Parse ``START..END`` (either side may be empty) where each side is a day, month or year.

    ``2025-01..2026-07`` covers 2025-01-01 to 2026-07-31; ``2025/03/07`` alone is that single day.
    """
    s = str(spec).strip()
    if not s:
        raise DatasetError("empty date range")
    if ".." not in s:
        return _bound(s, False), _bound(s, True)
    a, b = s.split("..", 1)
    lo = _bound(a, False) if a.strip() else None
    hi = _bound(b, True) if b.strip() else None
    if lo and hi and lo > hi:
        raise DatasetError(f"date range {spec!r} starts after it ends")
    return lo, hi


def as_date(d: date | str | None, end: bool) -> date | None:
    if d is None or isinstance(d, date):
        return d
    return _bound(d, end)
