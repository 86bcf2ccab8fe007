"""Shared by choose_prompt.py and bench_debias.py: the served base's letter log-probs per question.

One chat request per prompt (top-k log-probs of the first token), candidates matched by text with
:func:`blackbox_proxy.candidates.match_candidates`, a missing letter filled with the floor bound
(the smaller of the k-th log-prob and log(1 - returned mass)), as the MC engine's ``floor`` policy.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider

from blackbox_proxy.candidates import match_candidates
from blackbox_proxy.evaluation.datasets import load_arc, load_mmlu, load_realtimeqa
from blackbox_proxy.prompts import PromptTemplate
from blackbox_proxy.types import MCQuestion


@dataclass(frozen=True)
class Scored:
    """One question's letter log-probs (floor-filled), which were missing, and the letter mass."""

    logprobs: dict[str, float]
    missing: tuple[str, ...]
    mass: float

    @property
    def letter(self) -> str:
        return max(self.logprobs, key=self.logprobs.__getitem__)


def score(provider: OpenAIChatProvider, template: PromptTemplate, q: MCQuestion, k: int) -> Scored:
    """The base's letter log-probs for ``q`` rendered by ``template`` (chat form)."""
    top = provider.top_logprobs(template.messages(q), k)
    got = match_candidates(top, q.labels)
    floor = top.missing_bound()
    missing = tuple(lab for lab, v in got.items() if v is None)
    lps = {lab: (floor if v is None else v) for lab, v in got.items()}
    mass = sum(math.exp(v) for v in got.values() if v is not None)
    return Scored(lps, missing, mass)


def spread(questions: Sequence[MCQuestion], n: int | None) -> list[MCQuestion]:
    """``n`` questions evenly spaced over the list (all when ``n`` is None or too large)."""
    if n is None or n >= len(questions):
        return list(questions)
    return [questions[(i * len(questions)) // n] for i in range(n)]


def datasets(arc: int | None, mmlu: int | None, rtqa: int | None) -> dict[str, list[MCQuestion]]:
    """Validation data: ARC-Challenge and MMLU (evenly spaced), RealtimeQA 2025+ (the first ``rtqa``)."""
    out: dict[str, list[MCQuestion]] = {}
    if arc != 0:
        out["arc-challenge-val"] = spread(load_arc(subset="challenge"), arc)
    if mmlu != 0:
        out["mmlu-val"] = spread(load_mmlu(split="validation"), mmlu)
    if rtqa != 0:
        out["realtimeqa-2025+"] = load_realtimeqa(weeks="2025-01..2026-12")[: rtqa or None]
    return out


def add_server_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--base-url", help="a running server's /v1 URL (default: start one for this run)")
    ap.add_argument(
        "--model", default="qwen2.5-coder-1.5b-instruct", help="spec to serve, or the served name"
    )
    ap.add_argument("--port", type=int, default=8091, help="port of the server started here (default 8091)")
    ap.add_argument("--k", type=int, default=20, help="top log-probs per request (default 20)")
    ap.add_argument("--cache", help="SQLite response cache (reruns are then free)")
    ap.add_argument("--threads", type=int, default=2)


@contextlib.contextmanager
def provider_for(args: argparse.Namespace) -> Iterator[OpenAIChatProvider]:
    """A chat provider on ``--base-url``, or on a LocalServer started for the run."""
    with contextlib.ExitStack() as stack:
        if args.base_url:
            url, name = args.base_url, args.model
        else:
            from blackbox_proxy.server import LocalServer

            srv = stack.enter_context(
                LocalServer(args.model, args.model, port=args.port, n_threads=args.threads)
            )
            url, name = srv.base_url, srv.model
        prov = OpenAIChatProvider(name, url, max_k=None, timeout=300, cache=args.cache, max_concurrency=1)
        stack.callback(prov.close)
        yield prov


class Progress:
    """A one-line progress report on stderr every ``every`` seconds."""

    def __init__(self, total: int, what: str, every: float = 30.0) -> None:
        self.total, self.what, self.every = total, what, every
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            print(f"  {self.what}: {self.done}/{self.total} ({rate:.2f}/s)", file=sys.stderr, flush=True)
