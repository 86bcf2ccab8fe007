"""``blackbox-proxy train-expert BASE DATA --out DIR``: fine-tune a small model into an expert on CPU."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import InputError
from ..training import TrainConfig, train_expert
from .models import check_spec_files
from .options import non_negative_int, positive_float, positive_int


def _non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return v


def _dropout(text: str) -> float:
    """argparse type: a probability in [0, 1)."""
    v = _non_negative_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text!r}")
    return v


def _epochs(text: str) -> float | str:
    """argparse type: a positive number of passes, or 'auto'."""
    if text == "auto":
        return text
    return positive_float(text)


def _heldout(text: str) -> float:
    """argparse type: a fraction in [0, 1)."""
    v = _non_negative_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text!r}")
    return v


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse what would fail after loading the base model: --out a file, missing data, a damaged base folder."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; the expert is written as a folder, give a folder name")
    data = Path(args.data)
    if not data.exists():
        raise InputError(f"training data {data} does not exist")
    if data.resolve() == out.resolve():
        raise InputError(f"--out {out} is the training data; give another folder")
    check_spec_files(args.base)


def _run(args: argparse.Namespace) -> int:
    _check_paths(args)
    cfg = TrainConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_seq_len=args.max_seq_len,
        packing=not args.no_packing,
        lora=args.lora,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets,
        merge_lora=args.merge_lora,
        seed=args.seed,
        threads=args.threads,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        warmup_steps=args.warmup_steps,
        scheduler=args.scheduler,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        chat_template=not args.no_chat_template,
        kind=args.kind,
        progress=not args.quiet,
        renderings=args.renderings,
        replay=args.replay,
        replay_data=args.replay_data,
        heldout_fraction=args.heldout_fraction,
        eval_every=args.eval_every,
        patience=args.patience,
        max_general_rise=args.max_general_rise,
    )
    result = train_expert(args.base, args.data, args.out, cfg, resume=args.resume)
    card = result.to_dict()
    summary = {
        k: card[k]
        for k in (
            "out",
            "format",
            "steps",
            "best_step",
            "final_loss",
            "tokens",
            "train_seconds",
            "early_stop",
        )
    }
    if card["eval_log"]:
        first, best = (
            card["eval_log"][0],
            next((r for r in card["eval_log"] if r["step"] == card["best_step"]), card["eval_log"][-1]),
        )
        for key in ("heldout_loss", "general_loss"):
            if first.get(key) is not None:
                summary[key] = [first[key], best[key]]
    print(json.dumps(summary))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-expert",
        help="fine-tune a small model on documents or prompt/response pairs into an expert folder",
        description="Documents (JSONL with 'text', a folder of .txt, or one .txt) train by continued "
        "pre-training; JSONL with 'prompt' and 'response' trains with the model's chat template and "
        "loss on the response only. The output folder is a model spec; expert_card.json describes it.",
    )
    p.add_argument("base", help="base model spec (packaged name, GGUF, folder or hub id)")
    p.add_argument("data", help="training data: JSONL file, .txt file or folder of .txt files")
    p.add_argument("--out", required=True, help="output folder (the expert)")
    p.add_argument(
        "--kind", choices=("auto", "text", "sft"), default="auto", help="data kind (default: inferred)"
    )
    p.add_argument(
        "--epochs",
        type=_epochs,
        default=None,
        help="passes over the data (fractions allowed) or 'auto' (default: documents auto = at least "
        "60 steps, at most 12 epochs; pairs 1)",
    )
    p.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps; overrides --epochs")
    p.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="learning rate (default: documents 1e-3 LoRA; pairs 5e-5 full; 2e-4 for --lora on pairs)",
    )
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-seq-len", type=positive_int, default=256, help="tokens per training sequence")
    p.add_argument("--no-packing", action="store_true", help="do not pack short documents together")
    p.add_argument(
        "--lora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train a LoRA adapter instead of all weights (default: documents LoRA, pairs full)",
    )
    p.add_argument(
        "--lora-r", type=positive_int, default=None, help="LoRA rank (default: documents 16, else 8)"
    )
    p.add_argument(
        "--lora-alpha",
        type=positive_int,
        default=None,
        help="LoRA scaling alpha (default: documents 32, else 16)",
    )
    p.add_argument("--lora-dropout", type=_dropout, default=0.05, help="LoRA dropout")
    p.add_argument(
        "--lora-targets", default="all-linear", help="'all-linear' or comma-separated module names"
    )
    p.add_argument("--merge-lora", action="store_true", help="save merged weights instead of an adapter")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, LoRA init, dropout)")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument(
        "--save-every", type=non_negative_int, default=50, help="checkpoint every N steps (0: never)"
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the last checkpoint after finishing")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear warm-up steps")
    p.add_argument(
        "--scheduler", choices=("linear", "cosine", "constant"), default="linear", help="LR schedule"
    )
    p.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="AdamW weight decay")
    p.add_argument(
        "--max-grad-norm", type=_non_negative_float, default=1.0, help="gradient clipping (0: off)"
    )
    p.add_argument("--no-chat-template", action="store_true", help="pairs as plain prompt + response text")
    g = p.add_argument_group("document recipe (defaults for document data; see the README)")
    g.add_argument(
        "--renderings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train on question/answer renderings derived from the documents (default: on for documents)",
    )
    g.add_argument(
        "--replay",
        type=_non_negative_float,
        default=None,
        help="replayed general sequences per training sequence (default: documents 0.5, pairs 0)",
    )
    g.add_argument(
        "--replay-data",
        default=None,
        metavar="DOCS",
        help="general documents to replay (default: text sampled from the untouched base)",
    )
    g.add_argument(
        "--heldout-fraction",
        type=_heldout,
        default=0.1,
        help="documents held out for the held-out loss (taken once there are 20 documents)",
    )
    g.add_argument(
        "--eval-every",
        type=positive_int,
        default=None,
        help="steps between held-out evaluations (default: 1/10 of the run)",
    )
    g.add_argument(
        "--patience",
        type=positive_int,
        default=3,
        help="evaluations without held-out improvement before stopping",
    )
    g.add_argument(
        "--max-general-rise",
        type=positive_float,
        default=0.15,
        help="stop when the held-out general loss rises this many nats above its start",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
