"""The ``blackbox-proxy`` command: one sub-command module per concept under ``commands/``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .errors import BlackboxProxyError

#: modules under blackbox_proxy.commands; each exposes ``add_parser(subparsers)`` for its sub-command(s)
COMMAND_MODULES = ("models", "serve", "mc", "demo", "train", "corpus", "evaluate", "sweep", "generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blackbox-proxy",
        description="Proxy-tune a hosted or self-hosted model with a small expert / anti-expert pair.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(f"blackbox_proxy.commands.{module}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run the chosen command, turn library errors into one clear line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except BlackboxProxyError as exc:
        print(f"blackbox-proxy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blackbox-proxy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
