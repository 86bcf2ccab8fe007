"""``blackbox-proxy build-corpus``: RealtimeQA retrieved articles -> training documents (JSONL)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..corpus import build_corpus, write_corpus
from ..errors import InputError
from ..files import check_output_path


def _check_out(out: str, data_dir: str) -> None:
    """Refuse an unusable --out before reading any article (a folder, the data folder, a read-only place)."""
    path = Path(out)
    if path.is_dir():
        raise InputError(f"--out {path} is a directory; give a file name, e.g. {path / 'corpus.jsonl'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"--out {path}: cannot create folder {path.parent} ({exc.strerror or exc})"
        ) from None
    check_output_path(path, inputs=[data_dir])


def _run(args: argparse.Namespace) -> int:
    _check_out(args.out, args.data_dir)
    docs, stats = build_corpus(
        args.data_dir,
        args.weeks,
        include_evidence=args.include_evidence,
        min_chars=args.min_chars,
        progress=not args.quiet,
    )
    path = write_corpus(docs, args.out)
    print(json.dumps({"out": str(path), **stats.to_dict()}))
    if stats.skipped_files:
        print(f"note: skipped {len(stats.skipped_files)} non-weekly files", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-corpus",
        help="write RealtimeQA retrieved articles for a range of weeks as training documents",
        description="Documents are the retrieved news articles (and, with --include-evidence, the quiz "
        "evidence passages with HTML stripped), de-duplicated by URL. Questions, options and answers "
        "are never written into a document.",
    )
    p.add_argument("--data-dir", required=True, help="RealtimeQA folder in the upstream layout (has past/)")
    p.add_argument(
        "--weeks", required=True, help="inclusive range of weeks, e.g. 2025-01..2026-07 or 2025-03-07"
    )
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--include-evidence", action="store_true", help="add the quiz evidence passages")
    p.add_argument("--min-chars", type=int, default=200, help="skip articles shorter than this (characters)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
