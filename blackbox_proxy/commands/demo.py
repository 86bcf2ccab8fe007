"""``blackbox-proxy demo``: proxy-tuning doing its job, end to end and fully offline.

A packaged model run in-process by llama.cpp and exposing only its top-k log-probs stands in for a
hosted API (the base). It cannot know the invented facts of the documents shipped in the package
(countries, people and inventions that do not exist). A small expert is really tuned on those
documents here (SmolLM2-135M with ``train-expert``'s default recipe, cached after the first run);
its untouched twin is the anti-expert; the pair scores each option's text. The demo prints base vs
steered accuracy, with 95% intervals, on questions about those facts, and on unrelated questions
(the shipped TruthfulQA sample) to show the steering did not break what the base knew.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..combine import POLICIES, STRATEGIES
from ..debias import METHODS as DEBIAS_METHODS
from ..errors import InputError
from ..option_scoring import CALIBRATIONS, DEFAULT_CALIBRATION, SCORING_MODES
from .mcjob import check_outputs, run_job
from .options import default_threads, positive_int

DEFAULT_BASE = "qwen2.5-coder-1.5b-instruct"
#: the model tuned on the shipped documents, and its untouched twin (the anti-expert)
DEFAULT_EXPERT_BASE = "smollm2-135m-instruct"
SAMPLE_SIZE = 40
#: the demo's training budget: the document recipe (LoRA, question renderings, replay) cut to 60 steps,
#: about 3 minutes on 2 cores (the full default ran 120 steps in 6 minutes for the same facts)
DEMO_STEPS = 60
DOCS = "invented_facts_docs.jsonl"
#: the replay texts the recipe samples from the untouched default expert base (see data/README.md)
REPLAY = "demo_replay_smollm2.jsonl"
FACTS = "invented_facts_mc.jsonl"


def _data(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("blackbox_proxy.data").joinpath(name)))


def demo_expert(base: str, threads: int, quiet: bool) -> Path:
    """The expert tuned on the shipped documents (trained once, then reused from the cache)."""
    from ..models import cache_root, model_digest
    from ..training import CARD, TrainConfig, train_expert

    docs = _data(DOCS)
    recipe = f"default document recipe, max_steps={DEMO_STEPS}"
    key = hashlib.sha256(
        (docs.read_text(encoding="utf-8") + model_digest(base) + recipe).encode()
    ).hexdigest()[:12]
    out = cache_root() / "demo-experts" / f"{base}-{key}"
    if (out / CARD).exists():
        print(f"expert: {out} (tuned on the shipped documents; cached)", file=sys.stderr)
        return out
    print(f"tuning the expert: {base} on {docs.name} ({recipe}; a few minutes, once)", file=sys.stderr)
    t0 = time.perf_counter()
    if base == DEFAULT_EXPERT_BASE and not (out / "replay_samples.jsonl").exists():
        out.mkdir(parents=True, exist_ok=True)  # the recipe's own samples, shipped: no sampling pass
        shutil.copyfile(_data(REPLAY), out / "replay_samples.jsonl")
    train_expert(base, docs, out, TrainConfig(threads=threads, max_steps=DEMO_STEPS), resume=True)
    print(f"expert tuned in {time.perf_counter() - t0:.0f} s: {out}", file=sys.stderr)
    return out


def table(df: Any) -> str:
    """Per-question table: gold, base and steered letters with their probability of the gold option."""
    lines = [f"{'id':<16} {'gold':>4} {'base':>4} {'p_gold':>7} {'steered':>7} {'p_gold':>7}"]
    for _, r in df.iterrows():
        if r.get("error"):
            lines.append(f"{r['id']:<16} {r['gold_letter']:>4}  error: {r['error']}")
            continue
        g = r["gold_letter"]
        bp, sp = r.get(f"base_p_{g}", float("nan")), r.get(f"p_{g}", float("nan"))
        bm = "+" if r["base_letter"] == g else " "
        sm = "+" if r["steered_letter"] == g else " "
        lines.append(
            f"{r['id']:<16} {g:>4} {r['base_letter'] or '-':>3}{bm} {bp:>7.3f} {r['steered_letter'] or '-':>6}{sm} "
            f"{sp:>7.3f}"
        )
    lines.append("(+ marks a correct answer; p_gold is the probability each gives the gold option)")
    return "\n".join(lines)


def accuracy_line(name: str, df: Any) -> str:
    """``name: base x (CI) -> steered y (CI)`` over the answered questions."""
    from ..evaluation.stats import accuracy

    ok = df[df["error"].astype(str) == ""]
    if not len(ok):
        return f"{name}: no answered questions"
    b = accuracy((ok["base_letter"] == ok["gold_letter"]).tolist())
    s = accuracy((ok["steered_letter"] == ok["gold_letter"]).tolist())
    changed = int((ok["base_letter"] != ok["steered_letter"]).sum())
    return (
        f"{name:<34} n={b.n:<3} base {b.accuracy:.3f} [{b.ci_low:.2f}, {b.ci_high:.2f}]  ->  steered "
        f"{s.accuracy:.3f} [{s.ci_low:.2f}, {s.ci_high:.2f}]  ({changed} answers changed)"
    )


def run(args: argparse.Namespace) -> int:
    """Tune (or reuse) the expert, load the in-process base, answer both question sets, print the result."""
    from ..adapters.base import ProviderOptions, create_provider
    from ..data.truthfulqa_sample import load_sample
    from ..evaluation.datasets import read_questions_jsonl

    check_outputs(args)
    if args.limit > SAMPLE_SIZE:
        raise InputError(f"--limit {args.limit}: the shipped sample has {SAMPLE_SIZE} questions")
    t0 = time.perf_counter()
    anti = args.anti_spec or DEFAULT_EXPERT_BASE
    expert = args.expert_spec or str(demo_expert(anti, args.threads, args.quiet))
    args.expert, args.anti_expert = [expert], [anti]
    facts, _ = read_questions_jsonl(_data(FACTS))
    unrelated = load_sample()[: args.limit]
    print(
        f"base (top-{args.top_logprobs} log-probs only, in-process llama.cpp): {args.base}", file=sys.stderr
    )
    provider = create_provider(
        "llama-cpp", ProviderOptions(args.base, endpoint=args.endpoint, threads=args.threads)
    )
    print(
        f"expert pair: {expert} - {anti}, alpha {args.alpha}, {args.expert_scoring} scoring", file=sys.stderr
    )
    try:
        df = run_job(args, [*facts, *unrelated], provider=provider, resumable=False).table
    finally:
        provider.close()
    elapsed = time.perf_counter() - t0
    fact_ids = {q.id for q in facts}
    fdf, udf = df[df["id"].isin(fact_ids)], df[~df["id"].isin(fact_ids)]
    print("Questions about the invented facts the expert was tuned on:")
    print(table(fdf))
    print()
    print(
        f"base {args.base} (top-{args.top_logprobs} only), steered by ({expert} - {anti}), alpha {args.alpha}:"
    )
    print(accuracy_line("facts the base cannot know", fdf))
    print(accuracy_line("unrelated (TruthfulQA MC1 sample)", udf))
    print(f"{elapsed:.0f} s in all; per-question rows: --out FILE.csv")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="offline demo: a top-k-only base steered by an expert tuned here on facts it cannot know",
        description=__doc__,
    )
    p.add_argument(
        "--base", default=DEFAULT_BASE, help=f"base model spec, served top-k only (default {DEFAULT_BASE})"
    )
    p.add_argument(
        "--expert",
        dest="expert_spec",
        help="expert model spec (default: SmolLM2 tuned on the shipped documents, trained on first use)",
    )
    p.add_argument(
        "--anti-expert",
        dest="anti_spec",
        help=f"anti-expert model spec (default {DEFAULT_EXPERT_BASE}, the expert's untouched twin)",
    )
    p.add_argument(
        "--limit",
        "--n",
        type=positive_int,
        default=SAMPLE_SIZE,
        help=f"unrelated sample questions, at most {SAMPLE_SIZE} (default {SAMPLE_SIZE})",
    )
    p.add_argument("--alpha", default="1", help="steering strength (default 1)")
    p.add_argument(
        "--top-logprobs",
        "--k",
        type=positive_int,
        default=10,
        help="top log-probs the base reveals (default 10)",
    )
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat", help="default chat")
    p.add_argument("--prompt-template", metavar="NAME|FILE", help="multiple-choice prompt template")
    p.add_argument(
        "--missing", choices=POLICIES, default="floor", help="missing-option policy (default floor)"
    )
    p.add_argument("--strategy", choices=STRATEGIES, default="proxy", help="fusion strategy (default proxy)")
    p.add_argument(
        "--expert-scoring",
        choices=SCORING_MODES,
        default="options",
        help="what the pair scores: option texts (default; the expert learned facts as text) or letters",
    )
    p.add_argument("--option-calibration", choices=CALIBRATIONS, default=DEFAULT_CALIBRATION)
    p.add_argument("--debias", choices=DEBIAS_METHODS, default="none", help="letter-bias correction")
    p.add_argument(
        "--expert-backend", default="auto", choices=("auto", "transformers", "llama-cpp"), help="pair backend"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="questions per expert forward pass (default 8)"
    )
    p.add_argument(
        "--threads", type=positive_int, default=default_threads(), help="CPU threads for each model"
    )
    p.add_argument("--out", help="also write the per-question results to this CSV")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(
        func=run,
        no_chat_template=False,
        chunk_size=None,
        concurrency=None,
        run_dir=None,
        sweep=None,
        score_cache=None,
        no_score_cache=False,
    )
