"""``blackbox-proxy models list|path``: the packaged offline models and their cached files."""

from __future__ import annotations

import argparse

from ..models import gguf_path, list_models, safetensors_dir


def _list(args: argparse.Namespace) -> int:
    for row in list_models():
        mark = "installed" if row["installed"] else f"not installed ({row['install']})"
        print(f"{row['name']:<30} vocab {row['vocab']:>7}  {row['license']:<12} {mark}")
    return 0


def _path(args: argparse.Namespace) -> int:
    print(gguf_path(args.name) if args.gguf else safetensors_dir(args.name))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list packaged models, or print a model's local path")
    msub = p.add_subparsers(dest="models_command", required=True)
    lp = msub.add_parser("list", help="list the packaged offline models")
    lp.set_defaults(func=_list)
    pp = msub.add_parser("path", help="print the cached safetensors folder (or, with --gguf, the GGUF file)")
    pp.add_argument("name", help="packaged model name, GGUF path or folder")
    pp.add_argument("--gguf", action="store_true", help="print the verified GGUF file instead")
    pp.set_defaults(func=_path)
