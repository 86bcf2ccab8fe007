"""``blackbox-proxy mc``: answer a JSONL file of multiple-choice questions with a steered hosted model.

Input: one JSON object a line, ``{"id": ..., "question": ..., "choices": [...], "answer": 0}``
(``id`` and ``answer`` optional; ``answer`` is the 0-based index of the gold option). A bad line is
reported on stderr with its line number and skipped; the other questions still run. Output: a CSV,
one row per question (base and steered letters, option probabilities, missing-candidate flags,
expert log-probs, error), and a summary with both accuracies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..prompts import mc_messages, mc_text
from ..types import LETTERS, MCQuestion
from .common_args import add_combination_args, add_transport_args


@dataclass
class ReadResult:
    """The valid questions of a JSONL file and one message per rejected line."""

    questions: list[MCQuestion] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _question_from(rec: Any, line: int, where: str) -> MCQuestion:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("question", "choices"):
        if key not in rec:
            raise InputError(f"{where}: missing field {key!r}")
    choices = rec["choices"]
    if not isinstance(choices, list):
        raise InputError(f"{where}: 'choices' must be a list of strings, got {type(choices).__name__}")
    if not choices:
        raise InputError(f"{where}: 'choices' is empty")
    if len(choices) > len(LETTERS):
        raise InputError(f"{where}: {len(choices)} choices, more than the {len(LETTERS)} option letters A-Z")
    if any(not isinstance(c, (str, int, float)) or isinstance(c, bool) for c in choices):
        raise InputError(f"{where}: every choice must be a string")
    if not isinstance(rec["question"], str):
        raise InputError(f"{where}: 'question' must be a string")
    ans = rec.get("answer")
    if ans is not None and (isinstance(ans, bool) or not isinstance(ans, int)):
        raise InputError(f"{where}: 'answer' must be a 0-based integer index, got {ans!r}")
    qid = str(rec.get("id", f"line{line}"))
    meta = {k: v for k, v in rec.items() if k not in ("id", "question", "choices", "answer")}
    try:
        return MCQuestion(qid, rec["question"], tuple(str(c) for c in choices), ans, meta)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def read_questions(path: str | os.PathLike[str]) -> ReadResult:
    """Parse a questions JSONL leniently: good lines become questions, bad ones ``path:line: reason``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read questions file {p}: {exc.strerror or exc}") from None
    out = ReadResult()
    seen: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{p}:{n}"
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            out.errors.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        try:
            q = _question_from(rec, n, where)
        except InputError as exc:
            out.errors.append(str(exc))
            continue
        if q.id in seen:
            out.errors.append(f"{where}: duplicate id {q.id!r}")
            continue
        seen.add(q.id)
        out.questions.append(q)
    return out


def parse_alphas(text: str) -> tuple[float, ...]:
    """``"1"`` or ``"1,0.5"`` -> per-pair alphas (finite numbers)."""
    out = []
    for part in str(text).split(","):
        try:
            a = float(part)
        except ValueError:
            raise InputError(f"--alpha: {part!r} is not a number") from None
        if not math.isfinite(a):
            raise InputError(f"--alpha must be finite, got {part!r}")
        out.append(a)
    return tuple(out)


def _pairs_and_alphas(args: argparse.Namespace) -> tuple[list[tuple[str, str]], tuple[float, ...]]:
    experts, antis = args.expert or [], args.anti_expert or []
    if len(experts) != len(antis):
        raise InputError(
            f"{len(experts)} --expert but {len(antis)} --anti-expert: give one anti-expert per expert"
        )
    alphas = parse_alphas(args.alpha)
    if len(alphas) == 1:
        alphas = alphas * len(experts)
    if len(alphas) != len(experts):
        raise InputError(f"{len(experts)} expert pairs but {len(alphas)} alphas in --alpha {args.alpha}")
    return list(zip(experts, antis, strict=True)), alphas


def make_provider(args: argparse.Namespace) -> Any:
    """The OpenAI-protocol provider for ``--endpoint`` (key read from ``--api-key-env``, never logged)."""
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        raise InputError("no --base-url given and OPENAI_BASE_URL is not set")
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.endpoint == "chat":
        from ..adapters.openai_chat import OpenAIChatProvider as cls
    else:
        from ..adapters.openai_completions import OpenAICompletionsProvider as cls
    kw: dict[str, Any] = {
        "timeout": args.timeout,
        "max_retries": args.retries,
        "max_concurrency": args.concurrency,
        "cache": args.cache,
    }
    if args.max_k is not None:
        kw["max_k"] = None if args.max_k == 0 else args.max_k
    return cls(args.model, base_url, api_key, **kw)


def summarize(df: Any, skipped: int) -> list[str]:
    """Summary lines: counts of answered / excluded / errors / skipped lines, missing options, accuracies."""
    n = len(df)
    err = df["error"].astype(str).str.len() > 0 if "error" in df else None
    n_err = int(err.sum()) if err is not None else 0
    ok = df[~err] if err is not None else df
    excl = ok["excluded"].astype(bool)
    lines = [
        f"questions: {n} ({n - n_err - int(excl.sum())} answered, {int(excl.sum())} excluded, "
        f"{n_err} errors); input lines skipped: {skipped}"
    ]
    if "n_missing" in ok and len(ok):
        nm = ok["n_missing"].fillna(0).astype(int)
        lines.append(
            f"options missing from the base's top-k: {int(nm.sum())} in {int((nm > 0).sum())} questions"
        )
    graded = ok[ok["gold_letter"].astype(str).str.len() > 0] if len(ok) else ok
    if len(graded):
        base = (graded["base_letter"] == graded["gold_letter"]).sum()
        steer = (graded["steered_letter"] == graded["gold_letter"]).sum()
        m = len(graded)
        lines.append(f"base accuracy:    {base / m:.3f} ({base}/{m})")
        lines.append(f"steered accuracy: {steer / m:.3f} ({steer}/{m})")
        lines.append("(excluded questions count as wrong for the steered answer)" if excl.any() else "")
    else:
        lines.append("no gold answers given: accuracy not computed")
    return [s for s in lines if s]


def run(args: argparse.Namespace) -> int:
    """Read questions, check the server, load the pairs, answer everything, write CSV and summary."""
    import pandas as pd

    from ..experts import ExpertPair
    from ..models import resolve
    from ..rerank import Reranker

    read = read_questions(args.questions)
    for msg in read.errors:
        print(f"blackbox-proxy mc: skipped {msg}", file=sys.stderr)
    questions = read.questions[: args.limit] if args.limit else read.questions
    if not questions:
        raise InputError(f"no valid questions in {args.questions}")
    pairs, alphas = _pairs_and_alphas(args)
    for spec in {s for pair in pairs for s in pair}:
        resolve(spec)  # unknown specs fail now, before any request or model load
    provider = make_provider(args)
    # one real request first: an unreachable server or unknown model is one clear error (exit 2)
    first = questions[0]
    provider.top_logprobs(
        mc_messages(first) if args.endpoint == "chat" else mc_text(first), args.top_logprobs
    )
    loaded = [
        ExpertPair(e, a, chat_template=not args.no_chat_template, batch_size=args.batch_size)
        for e, a in pairs
    ]
    reranker = Reranker(
        provider,
        loaded,
        alphas,
        policy=args.missing,
        strategy=args.strategy,
        k=args.top_logprobs,
        endpoint=args.endpoint,
        base_concurrency=args.concurrency,
    )
    df: pd.DataFrame = reranker.answer_many(questions, progress=not args.quiet)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    for line in summarize(df, len(read.errors)):
        print(line)
    print(f"wrote {len(df)} rows to {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mc",
        help="answer multiple-choice questions (JSONL) with a hosted model steered by expert pairs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("questions", help="JSONL file: {id, question, choices: [...], answer: 0-based index}")
    p.add_argument(
        "--base-url",
        help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default $OPENAI_BASE_URL)",
    )
    p.add_argument("--model", required=True, help="base model name at --base-url")
    p.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default OPENAI_API_KEY)",
    )
    p.add_argument(
        "--expert",
        action="append",
        metavar="SPEC",
        help="tuned expert model spec (packaged name, folder, GGUF); repeat for several pairs",
    )
    p.add_argument(
        "--anti-expert", action="append", metavar="SPEC", help="untuned anti-expert, one per --expert"
    )
    p.add_argument(
        "--alpha", default="1", metavar="A", help="steering strength; comma-separate one per pair (default 1)"
    )
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat", help="default chat")
    p.add_argument(
        "--top-logprobs", type=int, default=5, metavar="K", help="top log-probs per request (default 5)"
    )
    p.add_argument(
        "--max-k",
        type=int,
        metavar="N",
        help="largest K the server accepts (default OpenAI's: 20 chat, 5 completions; 0 = no limit)",
    )
    add_combination_args(p)
    p.add_argument(
        "--no-chat-template", action="store_true", help="experts read plain text, not their chat template"
    )
    p.add_argument("--batch-size", type=int, default=8, help="questions per expert forward pass (default 8)")
    add_transport_args(p)
    p.add_argument("--limit", type=int, help="answer only the first N valid questions")
    p.add_argument("--out", required=True, metavar="RESULTS.csv", help="per-question results CSV")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run just this command (``python -m blackbox_proxy.commands.mc``)."""
    from ..cli import main as cli_main

    return cli_main(["mc", *(argv if argv is not None else sys.argv[1:])])
