"""The ``blackbox-proxy`` command: one sub-command module per concept under ``commands/``."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .errors import BlackboxProxyError, RunStopped

#: modules under blackbox_proxy.commands; each exposes ``add_parser(subparsers)`` for its sub-command(s)
COMMAND_MODULES = ("models", "serve", "mc", "demo", "train", "corpus", "evaluate", "sweep", "generate")


#: what looks like an API key on a command line (masked in argparse's error messages)
_KEY_LIKE = re.compile(r"\b(sk|pk|rk|key)-[A-Za-z0-9_\-]{6,}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse without prefix matching, for the command and every sub-command.

    ``--api-key sk-...`` must not pass for an abbreviation of ``--api-key-env`` (and be silently
    ignored): ``allow_abbrev`` is forced off, and sub-parsers made by ``add_subparsers`` /
    ``add_parser`` are of this class too. Error messages mask anything that looks like a key.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print usage and one line (keys masked), exit 2."""
        super().error(_KEY_LIKE.sub(lambda m: f"{m.group(1)}-***", message))


def build_parser() -> argparse.ArgumentParser:
    """The ``blackbox-proxy`` parser with every sub-command (no abbreviated long options anywhere)."""
    parser = ArgumentParser(
        prog="blackbox-proxy",
        description="Proxy-tune a hosted or self-hosted model with a small expert / anti-expert pair.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
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
    except RunStopped as stop:  # Ctrl-C / SIGTERM during a run: what was kept, in one line
        print(f"blackbox-proxy: {stop}", file=sys.stderr, flush=True)
        return 128 + (signal.SIGTERM if stop.reason == "SIGTERM" else signal.SIGINT)
    except BlackboxProxyError as exc:
        print(f"blackbox-proxy: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or socket the OS refused: one line (the traceback with -v)
        if args.verbose:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"blackbox-proxy: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blackbox-proxy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
