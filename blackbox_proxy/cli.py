"""The ``blackbox-proxy`` command: one sub-command module per concept under ``commands/``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .errors import BlackboxProxyError

#: sub-command name -> module under blackbox_proxy.commands exposing ``add_parser(subparsers)``
COMMANDS = {
    "models": "models",
    "serve": "serve",
    "mc": "mc",
    "demo": "demo",
    "train-expert": "train",
    "build-corpus": "corpus",
    "eval": "evaluate",
    "sweep": "sweep",
    "generate": "generate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blackbox-proxy",
        description="Proxy-tune a hosted or self-hosted model with a small expert / anti-expert pair.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"blackbox_proxy.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"blackbox_proxy.commands.{module}":
                continue  # command not built yet
            raise
        mod.add_parser(sub)
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
