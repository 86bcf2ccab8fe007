"""CLI sub-commands: each module exposes ``add_parser(subparsers)`` setting ``func`` on its parser."""
