"""The multiple-choice engine: score each question once, derive every answer from the record.

For each question the base model (behind a :class:`~blackbox_proxy.adapters.base.TopLogprobsProvider`)
sees the lettered prompt and returns the top-k log-probs of its first answer token, and each expert
pair scores the same letters locally. Those raw scores are an :class:`MCRecord`; every reported
answer (base, expert alone, proxy-tuned at any alpha, policy or strategy) is derived from a record by
:func:`derive` without new requests. :class:`Reranker` does the I/O: base requests over the async
transport, bounded by the provider's concurrency, overlapped with batched pair scoring in a worker
thread. ``mc``, ``eval``, ``sweep``, ``demo`` and the notebooks all run through it and write the one
row schema of :func:`record_row` (resume and run directories: :mod:`blackbox_proxy.evaluation.runner`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from .candidates import match_candidates
from .combine import POLICIES, STRATEGIES, argmax, combine
from .errors import (
    BlackboxProxyError,
    InputError,
    ProviderError,
    RequestRejectedError,
    TransientProviderError,
)
from .experts import ExpertPair, PairScores, TemplatedQuestion
from .option_scoring import CALIBRATIONS, DEFAULT_CALIBRATION, SCORING_MODES, OptionScores
from .prompts import mc_messages, mc_text, resolve_template
from .types import LETTERS, MCQuestion, SteeredAnswer, TopLogprobs, Usage

if TYPE_CHECKING:
    import pandas as pd

    from .adapters.base import Prompt, TopLogprobsProvider

PairLike = PairScores | OptionScores | tuple[Mapping[str, float], Mapping[str, float]]
#: what a record holds per pair: letter scores or option-text scores
Scores = PairScores | OptionScores


def scores_from_json(d: Mapping[str, Any]) -> Scores:
    """A stored pair score of either mode."""
    return OptionScores.from_json(d) if d.get("mode") == "options" else PairScores.from_json(d)


T = TypeVar("T")


def check_alphas(alpha: float | Sequence[float], n: int) -> tuple[float, ...]:
    """One finite weight per pair: a single number applies to all ``n`` pairs."""
    if isinstance(alpha, bool):
        raise InputError(f"alpha must be a number, got {alpha!r}")
    if isinstance(alpha, (int, float)):
        out = (float(alpha),) * n
    else:
        out = tuple(float(a) for a in alpha)
        if len(out) == 1 and n > 1:
            out = out * n
        if len(out) != n:
            raise InputError(f"{n} expert pairs but {len(out)} alphas")
    if any(not math.isfinite(a) for a in out):
        raise InputError(f"alpha must be finite, got {out}")
    return out


def question_digest(q: MCQuestion) -> str:
    """Short hash of a question's text and options (what the paid scores depend on; not the gold)."""
    text = json.dumps([q.question, list(q.choices)], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _meta(q: MCQuestion) -> dict[str, Any]:
    """The small, JSON-safe part of a question's metadata kept in results (not evidence text)."""
    keep = ("week", "date", "source", "source_id")
    return {k: q.meta[k] for k in keep if k in q.meta and isinstance(q.meta[k], (str, int, float))}


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class MCRecord:
    """The raw, stored outcome of one question: the base's top-k and every pair's candidate scores.

    ``top`` is None when the question produced no usable base answer; ``error`` then says why
    (a run resumed later retries such a question).
    """

    id: str
    labels: tuple[str, ...]
    gold: str | None
    top: TopLogprobs | None
    pairs: tuple[Scores, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "labels": list(self.labels),
            "gold": self.gold,
            "top": None if self.top is None else self.top.to_json(),
            "pairs": [p.to_json() for p in self.pairs],
            "meta": self.meta,
            "digest": self.digest,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MCRecord:
        """Rebuild a stored record (also reads round 1's single-pair ``expert``/``anti_expert`` form)."""
        if "pairs" in d:
            pairs = tuple(scores_from_json(p) for p in d["pairs"] or ())
        elif d.get("expert") is not None and d.get("anti_expert") is not None:
            pairs = (PairScores.from_json({"expert": d["expert"], "anti_expert": d["anti_expert"]}),)
        else:
            pairs = ()
        return cls(
            str(d["id"]),
            tuple(d["labels"]),
            d.get("gold"),
            TopLogprobs.from_json(d["top"]) if d.get("top") else None,
            pairs,
            dict(d.get("meta") or {}),
            str(d.get("digest", "")),
            str(d.get("error") or ""),
        )

    def with_question(self, q: MCQuestion) -> MCRecord:
        """This record with the question's current gold and metadata (those are not paid for)."""
        return MCRecord(
            self.id, self.labels, q.gold_letter, self.top, self.pairs, _meta(q), self.digest, self.error
        )


def derive(
    rec: MCRecord,
    alphas: float | Sequence[float] = 1.0,
    *,
    policy: str = "floor",
    strategy: str = "proxy",
    base_override: Mapping[str, float] | None = None,
) -> SteeredAnswer:
    """The steered answer of a stored record at ``alphas`` (one per pair) under ``policy``/``strategy``.

    A record without a base answer gives an answer with no letters and every option missing.
    ``base_override`` replaces the base's letter log-probs (e.g. debiased ones; nothing is missing
    then, but ``missing`` still reports what the top-k lacked).
    """
    pairs = [p.as_pair() for p in rec.pairs]
    al = check_alphas(alphas, len(pairs))
    first = pairs[0] if pairs else ({}, {})
    common: dict[str, Any] = {
        "question_id": rec.id,
        "labels": rec.labels,
        "policy": policy,
        "strategy": strategy,
        "gold_letter": rec.gold,
        "expert_logprobs": dict(first[0]),
        "anti_expert_logprobs": dict(first[1]),
    }
    if rec.top is None:
        return SteeredAnswer(
            letter=None,
            base_letter=None,
            steered_probs={},
            base_probs={},
            offsets={},
            base_logprobs={},
            missing=rec.labels,
            filled={},
            alpha=al,
            excluded=True,
            **common,
        )
    base = match_candidates(rec.top, rec.labels)
    if base_override is not None:
        comb = combine(dict(base_override), pairs, al, policy=policy, strategy=strategy, bound=None)
        comb = replace(comb, missing=tuple(k for k, v in base.items() if v is None))
    else:
        comb = combine(base, pairs, al, policy=policy, strategy=strategy, bound=rec.top.missing_bound())
    return SteeredAnswer(
        letter=None if comb.excluded else comb.letter,
        base_letter=None if comb.excluded else comb.base_letter,
        steered_probs=comb.steered_probs,
        base_probs=comb.base_probs,
        offsets=comb.offsets,
        base_logprobs=comb.base_logprobs,
        missing=comb.missing,
        filled=comb.filled,
        alpha=comb.alphas,
        excluded=comb.excluded,
        usage=rec.top.usage,
        model=rec.top.model,
        **common,
    )


def steer(
    q: MCQuestion,
    top: TopLogprobs,
    pair_scores: Sequence[PairLike],
    alpha: float | Sequence[float] = 1.0,
    *,
    policy: str = "floor",
    strategy: str = "proxy",
) -> SteeredAnswer:
    """Combine the base's top-k log-probs with expert-pair scores for one question (no I/O).

    ``pair_scores`` holds one :class:`PairScores` (or ``(expert, anti_expert)`` dicts) per pair and
    ``alpha`` one weight per pair (a single number applies to all).
    """
    pairs = tuple(p if isinstance(p, PairScores) else PairScores(dict(p[0]), dict(p[1])) for p in pair_scores)
    return derive(record_for(q, top, pairs), alpha, policy=policy, strategy=strategy)


def record_for(
    q: MCQuestion, top: TopLogprobs | None, pairs: Sequence[PairScores], error: str = ""
) -> MCRecord:
    """The record of question ``q`` from its base answer and pair scores."""
    return MCRecord(q.id, q.labels, q.gold_letter, top, tuple(pairs), _meta(q), question_digest(q), error)


# --------------------------------------------------------------------------- the row schema

_PER_OPTION = ("p_", "base_p_", "offset_", "missing_", "base_lp_", "expert_lp_", "anti_lp_")
_FIXED = ("id", "base_letter", "steered_letter", "gold_letter", "excluded")


def _alpha_text(alphas: Sequence[float]) -> str:
    return ",".join(f"{a:g}" for a in alphas)


def sweep_key(s: float) -> str:
    """The suffix of a sweep column: ``steered_letter@{sweep_key(s)}``."""
    return f"{s:g}"


def record_row(
    rec: MCRecord,
    alphas: Sequence[float],
    *,
    policy: str = "floor",
    strategy: str = "proxy",
    sweep: Sequence[float] = (),
    scale: float = 1.0,
    base_override: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The one flat row of a question, written by every command.

    Columns: :meth:`SteeredAnswer.to_dict` (``id``, ``base_letter``, ``steered_letter``,
    ``gold_letter``, ``p_X``, ``base_p_X``, ``offset_X``, ``missing_X``, ``n_missing``...),
    ``base_lp_X`` (the base's matched log-prob, empty when missing), with a single pair its
    ``expert_lp_X`` / ``anti_lp_X`` and the expert's and anti-expert's own letters; correctness
    columns; the question's ``week``/``date``/``source``; and for each sweep value ``s`` (the
    per-pair alphas scaled by ``s``) ``steered_letter@s`` and ``steered_correct@s``; ``error`` last.
    The main columns are at the per-pair ``alphas`` scaled by ``scale``.
    """
    gold = rec.gold or ""

    def ok(letter: str | None) -> bool | None:
        return None if not gold else letter == gold

    kw: dict[str, Any] = {"policy": policy, "strategy": strategy, "base_override": base_override}
    if not rec.pairs:  # a base-only record, or an error row that has no pair scores
        alphas = ()
    ans = derive(rec, [scale * a for a in alphas], **kw)
    row = ans.to_dict()
    if base_override is not None:
        raw = derive(rec, [0.0] * len(rec.pairs), policy=policy, strategy=strategy)
        row["raw_base_letter"] = raw.base_letter or ""
    base_lp = match_candidates(rec.top, rec.labels) if rec.top is not None else dict.fromkeys(rec.labels)
    for lab in rec.labels:
        row[f"base_lp_{lab}"] = base_lp[lab]
    if len(rec.pairs) == 1:
        e, a = rec.pairs[0].as_pair()
        row.update({f"expert_lp_{k}": v for k, v in e.items()})
        row.update({f"anti_lp_{k}": v for k, v in a.items()})
    row.update(
        week=rec.meta.get("week", ""),
        date=rec.meta.get("date", ""),
        source=rec.meta.get("source", ""),
        n_choices=len(rec.labels),
        all_missing=len(ans.missing) == len(rec.labels),
        base_correct=ok(ans.base_letter),
        steered_correct=ok(ans.letter),
    )
    if rec.pairs:
        first = rec.pairs[0]
        row["expert_scoring"] = "options" if isinstance(first, OptionScores) else "letters"
        if isinstance(first, OptionScores):
            row["option_calibration"] = first.calibration
        e, a = first.as_pair()
        exp_letter, anti_letter = argmax(e), argmax(a)
        row.update(
            expert_letter=exp_letter or "",
            expert_correct=ok(exp_letter),
            anti_letter=anti_letter or "",
            anti_correct=ok(anti_letter),
        )
        for s in sweep:
            a = derive(rec, [s * x for x in alphas], **kw)
            row[f"steered_letter@{sweep_key(s)}"] = a.letter or ""
            row[f"steered_correct@{sweep_key(s)}"] = ok(a.letter)
    u = (rec.top.usage if rec.top is not None else None) or Usage(0, 0, 0)
    row["cached"] = u.cached
    row["error"] = rec.error
    return row


def column_order(cols: Sequence[str]) -> list[str]:
    """Fixed columns first, then each per-option group in letter order, the rest, ``error`` last."""
    groups = {pre: [f"{pre}{lab}" for lab in LETTERS if f"{pre}{lab}" in cols] for pre in _PER_OPTION}
    grouped = {c for g in groups.values() for c in g}
    fixed = [c for c in _FIXED if c in cols]
    rest = [c for c in cols if c not in grouped and c not in fixed and c != "error"]
    return (
        fixed
        + [c for pre in _PER_OPTION for c in groups[pre]]
        + rest
        + (["error"] if "error" in cols else [])
    )


def records_table(
    records: Iterable[MCRecord],
    alphas: Sequence[float],
    *,
    policy: str = "floor",
    strategy: str = "proxy",
    sweep: Sequence[float] = (),
    scale: float = 1.0,
    base_overrides: Mapping[str, Mapping[str, float] | None] | None = None,
) -> pd.DataFrame:
    """The results table of many records: one :func:`record_row` per question, in order.

    ``base_overrides`` maps a question id to replacement base log-probs (debiasing). A question whose
    answer cannot be derived (policy ``error`` and an option missing) becomes an error row.
    """
    import pandas as pd

    rows = []
    for r in records:
        over = (base_overrides or {}).get(r.id)
        kw = {"policy": policy, "strategy": strategy, "sweep": sweep, "scale": scale, "base_override": over}
        try:
            rows.append(record_row(r, alphas, **kw))
        except BlackboxProxyError as exc:  # e.g. policy 'error' on a missing option: that row only
            bad = MCRecord(r.id, r.labels, r.gold, None, (), r.meta, r.digest, _error_text(exc))
            rows.append(record_row(bad, (), **{**kw, "base_override": None}))
    df = pd.DataFrame(rows)
    return df[column_order(list(df.columns))] if len(df.columns) else df


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, also inside a running loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())  # type: ignore[arg-type]
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(make())  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    th = threading.Thread(target=target, name="blackbox-proxy-mc")
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def is_fatal(exc: BaseException) -> bool:
    """Whether a provider failure ends a run: what cannot get better (bad key, unknown model, an
    unreachable host after retries, a server that never returns log-probs).

    Transient failures whose retries ran out (:class:`TransientProviderError`) and requests the server
    rejected for this question alone (:class:`RequestRejectedError`, e.g. a 400) stay with their
    question as an error row, which a resumed run asks again; so do other library errors.
    """
    if isinstance(exc, (TransientProviderError, RequestRejectedError)):
        return False
    return isinstance(exc, ProviderError)


# --------------------------------------------------------------------------- the engine


class Reranker:
    """The multiple-choice engine: a top-k-only base steered by local expert pairs.

    ``alpha`` is one weight per pair (a single number applies to all). ``endpoint`` (default: the
    provider's) picks the prompt the base sees: ``"chat"`` (:func:`mc_messages`; each local model
    reads the same question through its own chat template) or ``"completions"`` (:func:`mc_text`
    for the base and the pairs). ``k`` top log-probs are requested per question;
    ``base_concurrency`` bounds parallel base requests (default: the provider's). ``prompt``
    replaces the default template with a function of the question; the pairs read the same prompt.
    """

    def __init__(
        self,
        provider: TopLogprobsProvider,
        pairs: ExpertPair | Sequence[ExpertPair] = (),
        alpha: float | Sequence[float] = 1.0,
        *,
        policy: str = "floor",
        strategy: str = "proxy",
        k: int = 5,
        endpoint: str | None = None,
        base_concurrency: int | None = None,
        chunk_size: int | None = None,
        prompt: Callable[[MCQuestion], Prompt] | None = None,
        expert_scoring: str = "letters",
        option_calibration: str = DEFAULT_CALIBRATION,
        max_prompt_tokens: int = 32768,
        score_cache: Any = None,
        template: Any = None,
    ) -> None:
        if expert_scoring not in SCORING_MODES:
            raise InputError(f"unknown expert scoring {expert_scoring!r}; choose one of {SCORING_MODES}")
        if option_calibration not in CALIBRATIONS:
            raise InputError(
                f"unknown option calibration {option_calibration!r}; choose one of {CALIBRATIONS}"
            )
        self.expert_scoring, self.option_calibration = expert_scoring, option_calibration
        self.max_prompt_tokens = int(max_prompt_tokens)
        #: the prompt template of base and pairs (:mod:`blackbox_proxy.prompts`: a name, file or object)
        self.template = resolve_template(template)
        if isinstance(score_cache, (str, os.PathLike)):
            from .cache import ResponseCache

            score_cache = ResponseCache(score_cache)
        #: on-disk cache of pair scores (a :class:`~blackbox_proxy.cache.ResponseCache`), or None
        self.score_cache = score_cache
        self._digests: dict[int, str] = {}
        self.provider = provider
        self.pairs: tuple[ExpertPair, ...] = (pairs,) if isinstance(pairs, ExpertPair) else tuple(pairs)
        self.alphas = check_alphas(alpha, len(self.pairs))
        if policy not in POLICIES:
            raise InputError(f"unknown missing-candidate policy {policy!r}; choose one of {POLICIES}")
        if strategy not in STRATEGIES:
            raise InputError(f"unknown fusion strategy {strategy!r}; choose one of {STRATEGIES}")
        if strategy == "interpolate" and (any(a < 0 for a in self.alphas) or sum(self.alphas) > 1 + 1e-12):
            raise InputError(
                f"strategy 'interpolate' needs alphas >= 0 summing to at most 1, got {self.alphas}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k (top log-probs per request) must be a positive integer, got {k!r}")
        if provider.max_k is not None and k > provider.max_k:
            raise InputError(
                f"--top-logprobs {k} exceeds what provider {provider.kind} returns (max_k={provider.max_k})"
            )
        endpoint = endpoint or provider.endpoint
        if endpoint not in ("chat", "completions"):
            raise InputError(f"unknown endpoint {endpoint!r}; choose chat or completions")
        if policy == "exact" and "exact" not in provider.capabilities:
            raise InputError(
                f"provider {provider.kind!r} lacks the 'exact' capability (the log-probs of named candidate "
                "tokens): the 'exact' missing-candidate policy needs a vLLM server (--provider vllm); "
                "use --missing floor or exclude otherwise"
            )
        self.policy, self.strategy, self.k, self.endpoint = policy, strategy, k, endpoint
        self.prompt = prompt
        conc = base_concurrency or provider.max_concurrency or 1
        if conc < 1:
            raise InputError(f"base concurrency must be at least 1, got {conc}")
        self.base_concurrency = int(conc)
        self.chunk_size = int(chunk_size or max([p.batch_size for p in self.pairs] or [8]))
        if self.chunk_size < 1:
            raise InputError(f"chunk_size must be at least 1, got {chunk_size}")
        #: base requests this engine sent, answered or not (stored answers reused on resume are not counted)
        self.requests = 0
        #: where the last :meth:`ascore` spent its time, in seconds (see :meth:`ascore`)
        self.timings: dict[str, float] = {}

    # -- what the engine's scores depend on ------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The settings the raw scores depend on (never a secret), for run fingerprints."""
        return {
            "provider": str(self.provider.kind),
            "model": str(self.provider.model),
            "k": self.k,
            "endpoint": self.endpoint,
            "prompt": self.template.to_dict()
            if self.prompt is None
            else getattr(self.prompt, "__name__", "custom"),
            "pairs": [p.identity() for p in self.pairs],
            "expert_scoring": self.expert_scoring,
            "exact_candidates": self.policy == "exact",
        }

    # -- prompts ---------------------------------------------------------------------------------
    def base_prompt(self, q: MCQuestion) -> Prompt:
        """What the base model is sent for ``q``."""
        if self.prompt is not None:
            return self.prompt(q)
        return mc_messages(q, self.template) if self.endpoint == "chat" else mc_text(q, self.template)

    def pair_prompt(self, q: MCQuestion) -> Prompt | MCQuestion:
        """What the expert pairs read: the base's prompt (chat messages go through each model's own
        chat template), or the question itself on chat with the default template."""
        if self.prompt is not None:
            return self.prompt(q)
        return TemplatedQuestion(q, self.template) if self.endpoint == "chat" else mc_text(q, self.template)

    # -- scoring -------------------------------------------------------------------------------
    def _score_one_pair(self, pair: ExpertPair, questions: Sequence[MCQuestion]) -> list[Scores]:
        if self.expert_scoring == "options":
            return pair.score_options(questions, calibration=self.option_calibration)
        return pair.score([self.pair_prompt(q) for q in questions], [q.labels for q in questions])

    def _cache_key(self, pair_digest: str, q: MCQuestion) -> str:
        """What a pair's scores of ``q`` depend on: the models, the mode and the rendered prompt."""
        prompt: Any = self.pair_prompt(q)
        if self.expert_scoring == "options":
            from .option_scoring import CONTENT_FREE, cloze_prompt, option_text

            prompt = {
                "cloze": cloze_prompt(q),
                "options": [option_text(c) for c in q.choices],
                "cf": CONTENT_FREE,
            }
        elif isinstance(prompt, TemplatedQuestion):  # each model renders it in its own format: key by both
            prompt = {"chat": mc_messages(q, self.template), "text": mc_text(q, self.template)}
        what = {"pair": pair_digest, "mode": self.expert_scoring, "prompt": prompt, "labels": list(q.labels)}
        text = json.dumps(what, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def score_pairs(self, questions: Sequence[MCQuestion], progress: bool = False) -> list[list[Scores]]:
        """Per question, the scores of every pair (batched within each pair; cached on disk when a
        ``score_cache`` is given, keyed by the models' digests and the rendered prompt)."""
        per_pair: list[list[Scores]] = []
        for pair in self.pairs:
            if self.score_cache is None:
                per_pair.append(self._score_one_pair(pair, questions))
                continue
            if id(pair) not in self._digests:
                self._digests[id(pair)] = pair.digest()
            keys = [self._cache_key(self._digests[id(pair)], q) for q in questions]
            got: list[Scores | None] = []
            for key in keys:
                hit = self.score_cache.get(key)
                got.append(None if hit is None else scores_from_json(hit))
            todo = [i for i, g in enumerate(got) if g is None]
            if todo:
                fresh = self._score_one_pair(pair, [questions[i] for i in todo])
                for i, sc in zip(todo, fresh, strict=True):
                    self.score_cache.put(keys[i], sc.to_json(), endpoint="expert-scores", model=pair.name)
                    got[i] = sc
            per_pair.append([g for g in got if g is not None])
        return [[scores[i] for scores in per_pair] for i in range(len(questions))]

    def _score_chunk(self, qs: Sequence[MCQuestion]) -> list[list[Scores] | BlackboxProxyError]:
        """Pair scores for a chunk; if the batch fails, each question alone so errors stay local."""
        if not self.pairs:
            return [[] for _ in qs]
        try:
            return list(self.score_pairs(qs))
        except BlackboxProxyError as exc:
            if len(qs) == 1:
                return [exc]
        out: list[list[Scores] | BlackboxProxyError] = []
        for q in qs:
            try:
                out.append(self.score_pairs([q])[0])
            except BlackboxProxyError as exc:
                out.append(exc)
        return out

    async def ascore(
        self,
        questions: Sequence[MCQuestion],
        *,
        known: Mapping[str, TopLogprobs] | None = None,
        on_top: Callable[[MCQuestion, TopLogprobs], None] | None = None,
        on_record: Callable[[MCRecord], None] | None = None,
        progress: bool = False,
        initial: int = 0,
        total: int | None = None,
    ) -> list[MCRecord]:
        """Score every question once: its record, in order.

        Base requests run concurrently (bounded) from the start, while the pairs score chunk after
        chunk in a worker thread. ``known`` holds base answers already paid for (a resume);
        ``on_top`` sees each new base answer as soon as it arrives, ``on_record`` each finished record
        (a run store persists both). A fatal provider error (see :func:`is_fatal`) ends the run after
        the finished records were handed over; any other error stays with its question's record.

        Afterwards :attr:`timings` says where the wall time went: ``wall_s``; ``first_base_s``
        (waiting for the first base answer, before any scoring); ``pair_s`` (pair scoring, in the
        worker thread); ``base_wait_s`` (records waiting for base answers after their pair scores
        were ready: the base's share not hidden behind the pairs); ``overhead_s`` (the rest: ours);
        and, overlapping those, ``base_busy_s`` (wall time with a base request in flight) and
        ``base_request_s`` (the sum of request latencies).
        """
        qs = list(questions)
        known = dict(known or {})
        t_start = time.perf_counter()
        tm = dict.fromkeys(("first_base_s", "pair_s", "base_wait_s", "base_busy_s", "base_request_s"), 0.0)
        self.timings = tm
        inflight = [0, 0.0]  # requests in flight, when the current busy stretch began
        sem = asyncio.Semaphore(self.base_concurrency)
        limit = self.prompt_char_limit()
        bar = None
        if progress and (qs or initial):
            from tqdm.auto import tqdm

            bar = tqdm(
                total=total if total is not None else len(qs) + initial,
                initial=initial,
                desc="questions",
                unit="q",
            )

        async def fetch(q: MCQuestion) -> TopLogprobs | BlackboxProxyError:
            if q.id in known:
                return known[q.id]
            try:
                prompt = self.base_prompt(q)
                size = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
                if size > limit:
                    raise InputError(
                        f"question {q.id!r}: its prompt has {size} characters, more than the {limit} "
                        "this run accepts (about the models' context); refused before any model saw it"
                    )
                async with sem:
                    self.requests += 1
                    t0 = time.perf_counter()
                    if inflight[0] == 0:
                        inflight[1] = t0
                    inflight[0] += 1
                    try:
                        if self.policy == "exact":  # every option's own log-prob (capability checked above)
                            top = await self.provider.atop_logprobs(prompt, self.k, candidates=q.labels)  # type: ignore[call-arg]
                        else:
                            top = await self.provider.atop_logprobs(prompt, self.k)
                    finally:
                        t1 = time.perf_counter()
                        tm["base_request_s"] += t1 - t0
                        inflight[0] -= 1
                        if inflight[0] == 0:
                            tm["base_busy_s"] += t1 - inflight[1]
            except BlackboxProxyError as exc:
                if is_fatal(exc):
                    raise
                return exc
            if on_top is not None:
                on_top(q, top)
            return top

        tasks = [asyncio.ensure_future(fetch(q)) for q in qs]
        out: list[MCRecord] = []
        try:
            first = next((t for q, t in zip(qs, tasks, strict=True) if q.id not in known), None)
            if first is not None:  # a dead server or a bad key fails now, before any model is loaded
                t0 = time.perf_counter()
                await asyncio.wait([first])
                tm["first_base_s"] = time.perf_counter() - t0
                if first.exception() is not None:
                    raise first.exception()  # type: ignore[misc]
            for start in range(0, len(qs), self.chunk_size):
                chunk = qs[start : start + self.chunk_size]
                t0 = time.perf_counter()
                scores = await asyncio.to_thread(self._score_chunk, chunk)
                tm["pair_s"] += time.perf_counter() - t0
                for j, q in enumerate(chunk):
                    t0 = time.perf_counter()
                    top = await tasks[start + j]
                    tm["base_wait_s"] += time.perf_counter() - t0
                    sc = scores[j]
                    if isinstance(top, BlackboxProxyError):
                        rec = record_for(q, None, [], _error_text(top))
                    elif isinstance(sc, BlackboxProxyError):
                        rec = record_for(q, None, [], _error_text(sc))
                    else:
                        rec = record_for(q, top, sc)
                    if on_record is not None:
                        on_record(rec)
                    out.append(rec)
                    if bar is not None:
                        bar.update(1)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if bar is not None:
                bar.close()
            tm["wall_s"] = time.perf_counter() - t_start
            tm["overhead_s"] = tm["wall_s"] - tm["first_base_s"] - tm["pair_s"] - tm["base_wait_s"]
        return out

    def prompt_char_limit(self) -> int:
        """The longest base prompt sent, in characters: 6 a token of ``max_prompt_tokens``.

        (Each pair model refuses a prompt longer than its own context when it renders it.)"""
        return 6 * self.max_prompt_tokens

    def score(self, questions: Sequence[MCQuestion], *, progress: bool = False) -> list[MCRecord]:
        """Blocking :meth:`ascore` (works inside a running event loop, e.g. a notebook)."""
        return run_sync(lambda: self.ascore(questions, progress=progress))

    # -- answers -------------------------------------------------------------------------------
    def derive(self, rec: MCRecord, alphas: float | Sequence[float] | None = None) -> SteeredAnswer:
        """The answer of a record at this engine's alphas (or ``alphas``), policy and strategy."""
        return derive(
            rec, self.alphas if alphas is None else alphas, policy=self.policy, strategy=self.strategy
        )

    def answer(self, q: MCQuestion) -> SteeredAnswer:
        """Steered answer to one question (one base request, one local scoring per pair).

        A question that could not be answered raises its error.
        """
        rec = self.score([q])[0]
        if rec.top is None:
            raise InputError(f"question {q.id!r}: {rec.error}")
        return self.derive(rec)

    async def aanswer(self, q: MCQuestion) -> SteeredAnswer:
        """Async :meth:`answer`."""
        rec = (await self.ascore([q]))[0]
        if rec.top is None:
            raise InputError(f"question {q.id!r}: {rec.error}")
        return self.derive(rec)

    def table(self, records: Iterable[MCRecord], sweep: Sequence[float] = ()) -> pd.DataFrame:
        """The results table of records at this engine's alphas, policy and strategy."""
        return records_table(records, self.alphas, policy=self.policy, strategy=self.strategy, sweep=sweep)

    def answer_many(self, questions: Sequence[MCQuestion], progress: bool = True) -> pd.DataFrame:
        """A DataFrame, one :func:`record_row` per question (``error`` empty when it was answered)."""
        return self.table(run_sync(lambda: self.ascore(list(questions), progress=progress)))
