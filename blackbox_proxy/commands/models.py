"""``blackbox-proxy models list|path``: the packaged offline models and their cached files."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..model_checks import check_gguf_file, check_model_folder
from ..models import gguf_path, list_models, safetensors_dir


def check_spec_files(spec: str) -> None:
    """A spec naming a local file or folder is checked (magic, truncation, tokenizer) before anything loads it."""
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        check_gguf_file(p)
    elif p.is_dir():
        if (p / "config.json").exists() or (p / "adapter_config.json").exists():
            check_model_folder(p)
        else:
            for g in p.glob("*.gguf"):
                check_gguf_file(g)


def _list(args: argparse.Namespace) -> int:
    for row in list_models():
        mark = "installed" if row["installed"] else f"not installed ({row['install']})"
        print(f"{row['name']:<30} vocab {row['vocab']:>7}  {row['license']:<12} {mark}")
    return 0


def _path(args: argparse.Namespace) -> int:
    check_spec_files(args.name)
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
