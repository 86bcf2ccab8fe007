"""The multiple-choice reranker: a hosted base's top-k log-probs steered by local expert pairs.

For each question the base model (behind a :class:`~blackbox_proxy.adapters.base.TopLogprobsProvider`)
sees the lettered prompt and returns the top-k log-probs of its first answer token; the option
letters are matched in that list by text; each expert pair scores the same letters locally; and
:func:`blackbox_proxy.combine.combine` applies ``base + sum_i alpha_i (expert_i - anti_i)`` under the
chosen missing-candidate policy. :func:`steer` is that last step, pure; :class:`Reranker` does the I/O.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .candidates import match_candidates
from .combine import POLICIES, STRATEGIES, combine
from .errors import BlackboxProxyError, InputError
from .experts import ExpertPair, PairScores
from .prompts import mc_messages, mc_text
from .types import MCQuestion, SteeredAnswer, TopLogprobs

if TYPE_CHECKING:
    import pandas as pd

    from .adapters.base import Prompt, TopLogprobsProvider

ENDPOINTS = ("chat", "completions")

PairLike = PairScores | tuple[dict[str, float], dict[str, float]]


def _alphas(alpha: float | Sequence[float], n: int) -> tuple[float, ...]:
    if isinstance(alpha, (int, float)):
        out = (float(alpha),) * n
    else:
        out = tuple(float(a) for a in alpha)
        if len(out) != n:
            raise InputError(f"{n} expert pairs but {len(out)} alphas")
    if any(math.isnan(a) or math.isinf(a) for a in out):
        raise InputError(f"alpha must be finite, got {out}")
    return out


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
    ``alpha`` one weight per pair (a single number applies to all). Candidates missing from the
    top-k follow ``policy`` (bound: :meth:`TopLogprobs.missing_bound`). ``expert_logprobs`` /
    ``anti_expert_logprobs`` of the result report the first pair.
    """
    pairs = [p.as_pair() if isinstance(p, PairScores) else (dict(p[0]), dict(p[1])) for p in pair_scores]
    alphas = _alphas(alpha, len(pairs))
    base = match_candidates(top, q.labels)
    comb = combine(base, pairs, alphas, policy=policy, strategy=strategy, bound=top.missing_bound())
    first = pairs[0] if pairs else ({}, {})
    return SteeredAnswer(
        question_id=q.id,
        labels=q.labels,
        letter=None if comb.excluded else comb.letter,
        base_letter=None if comb.excluded else comb.base_letter,
        steered_probs=comb.steered_probs,
        base_probs=comb.base_probs,
        offsets=comb.offsets,
        base_logprobs=comb.base_logprobs,
        missing=comb.missing,
        filled=comb.filled,
        policy=policy,
        strategy=strategy,
        alpha=comb.alphas,
        excluded=comb.excluded,
        gold_letter=q.gold_letter,
        expert_logprobs=dict(first[0]),
        anti_expert_logprobs=dict(first[1]),
        usage=top.usage,
        model=top.model,
    )


_PER_OPTION = ("p_", "base_p_", "offset_", "missing_", "expert_lp_", "anti_lp_")


def _column_order(cols: list[str]) -> list[str]:
    """Fixed columns first, then each per-option group in letter order, the rest, ``error`` last."""
    groups = {
        pre: sorted(c for c in cols if c.startswith(pre) and len(c) == len(pre) + 1) for pre in _PER_OPTION
    }
    grouped = {c for g in groups.values() for c in g}
    head = [c for c in cols if c not in grouped and c != "error"]
    fixed = [c for c in head if c in ("id", "base_letter", "steered_letter", "gold_letter", "excluded")]
    rest = [c for c in head if c not in fixed]
    return (
        fixed
        + [c for pre in _PER_OPTION for c in groups[pre]]
        + rest
        + (["error"] if "error" in cols else [])
    )


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Reranker:
    """Answer multiple-choice questions with a top-k-only base steered by local expert pairs.

    ``endpoint`` picks the prompt the base sees: ``"chat"`` (:func:`mc_messages`; each local model
    reads the same messages through its own chat template) or ``"completions"`` (:func:`mc_text`
    for the base and the pair). ``None`` takes the provider's ``endpoint`` attribute if it has one,
    else infers it from its ``kind``. ``k`` top log-probs are requested per question;
    ``base_concurrency`` bounds parallel base requests in :meth:`answer_many` (default: the
    provider's ``max_concurrency``, else 1). ``prompt`` replaces the default template with a
    function of the question (e.g. few-shot text for a base model); the pairs read the same prompt.
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
        prompt: Callable[[MCQuestion], Prompt] | None = None,
    ) -> None:
        self.provider = provider
        self.pairs: tuple[ExpertPair, ...] = (pairs,) if isinstance(pairs, ExpertPair) else tuple(pairs)
        self.alphas = _alphas(alpha, len(self.pairs))
        if policy not in POLICIES:
            raise InputError(f"unknown missing-candidate policy {policy!r}; choose one of {POLICIES}")
        if strategy not in STRATEGIES:
            raise InputError(f"unknown fusion strategy {strategy!r}; choose one of {STRATEGIES}")
        if strategy == "interpolate" and (any(a < 0 for a in self.alphas) or sum(self.alphas) > 1 + 1e-12):
            raise InputError(
                f"strategy 'interpolate' needs alphas >= 0 summing to at most 1, got {self.alphas}"
            )
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k (top log-probs per request) must be a positive integer, got {k!r}")
        max_k = getattr(provider, "max_k", None)
        if max_k is not None and k > max_k:
            raise InputError(
                f"k={k} exceeds what provider {getattr(provider, 'kind', '?')} returns (max_k={max_k})"
            )
        if endpoint is None:
            endpoint = getattr(provider, "endpoint", None)
        if endpoint is None:
            endpoint = "completions" if "completion" in str(getattr(provider, "kind", "")) else "chat"
        if endpoint not in ENDPOINTS:
            raise InputError(f"unknown endpoint {endpoint!r}; choose one of {ENDPOINTS}")
        self.policy, self.strategy, self.k, self.endpoint = policy, strategy, k, endpoint
        self.prompt = prompt
        conc = (
            base_concurrency
            or getattr(provider, "max_concurrency", None)
            or getattr(getattr(provider, "transport", None), "max_concurrency", None)
            or 1
        )
        self.base_concurrency = max(1, int(conc))

    # -- prompts ---------------------------------------------------------------------------------
    def base_prompt(self, q: MCQuestion) -> Prompt:
        """What the base model is sent for ``q``."""
        if self.prompt is not None:
            return self.prompt(q)
        return mc_messages(q) if self.endpoint == "chat" else mc_text(q)

    def pair_prompt(self, q: MCQuestion) -> Prompt | MCQuestion:
        """What the expert pairs read: the base's prompt (chat messages go through each model's own
        chat template), or the question itself on chat with the default template."""
        if self.prompt is not None:
            return self.prompt(q)
        return q if self.endpoint == "chat" else mc_text(q)

    # -- one question ----------------------------------------------------------------------------
    def score_pairs(self, questions: Sequence[MCQuestion], progress: bool = False) -> list[list[PairScores]]:
        """Per question, the scores of every pair (batched within each pair)."""
        per_pair = [
            pair.score(
                [self.pair_prompt(q) for q in questions], [q.labels for q in questions], progress=progress
            )
            for pair in self.pairs
        ]
        return [[scores[i] for scores in per_pair] for i in range(len(questions))]

    def answer(self, q: MCQuestion) -> SteeredAnswer:
        """Steered answer to one question (one base request, one local scoring per pair)."""
        top = self.provider.top_logprobs(self.base_prompt(q), self.k)
        return steer(
            q, top, self.score_pairs([q])[0], self.alphas, policy=self.policy, strategy=self.strategy
        )

    async def aanswer(self, q: MCQuestion) -> SteeredAnswer:
        """Async :meth:`answer`: the base request is awaited while the pair scores in a worker thread."""
        scores_task = asyncio.create_task(asyncio.to_thread(self.score_pairs, [q]))
        try:
            top = await self.provider.atop_logprobs(self.base_prompt(q), self.k)
        except BaseException:
            await asyncio.gather(scores_task, return_exceptions=True)
            raise
        scores = await scores_task
        return steer(q, top, scores[0], self.alphas, policy=self.policy, strategy=self.strategy)

    # -- many questions --------------------------------------------------------------------------
    def answer_batch(
        self, questions: Sequence[MCQuestion], progress: bool = True
    ) -> list[SteeredAnswer | BlackboxProxyError]:
        """One result per question, in order; a question's library error is returned in its place.

        Base requests run in background threads while the pairs score batches locally.
        """
        from tqdm.auto import tqdm

        questions = list(questions)
        if not questions:
            return []
        chunk = max([p.batch_size for p in self.pairs] or [8])
        results: list[SteeredAnswer | BlackboxProxyError] = []
        pool = ThreadPoolExecutor(max_workers=self.base_concurrency, thread_name_prefix="base")
        bar = tqdm(total=len(questions), desc="questions", unit="q", disable=not progress)
        try:
            futures: list[Future[TopLogprobs]] = [
                pool.submit(self.provider.top_logprobs, self.base_prompt(q), self.k) for q in questions
            ]
            for start in range(0, len(questions), chunk):
                qs = questions[start : start + chunk]
                scores = self._score_chunk(qs)
                for j, q in enumerate(qs):
                    results.append(self._finish(q, futures[start + j], scores[j]))
                    bar.update(1)
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)
        return results

    def _score_chunk(self, qs: Sequence[MCQuestion]) -> list[list[PairScores] | BlackboxProxyError]:
        """Pair scores for a chunk; if the batch fails, each question alone so errors stay local."""
        try:
            return list(self.score_pairs(qs))
        except BlackboxProxyError:
            if len(qs) == 1:
                raise
        out: list[list[PairScores] | BlackboxProxyError] = []
        for q in qs:
            try:
                out.append(self.score_pairs([q])[0])
            except BlackboxProxyError as exc:
                out.append(exc)
        return out

    def _finish(
        self, q: MCQuestion, fut: Future[TopLogprobs], scores: list[PairScores] | BlackboxProxyError
    ) -> SteeredAnswer | BlackboxProxyError:
        try:
            top = fut.result()
            if isinstance(scores, BlackboxProxyError):
                return scores
            return steer(q, top, scores, self.alphas, policy=self.policy, strategy=self.strategy)
        except BlackboxProxyError as exc:
            return exc

    def answer_many(self, questions: Sequence[MCQuestion], progress: bool = True) -> pd.DataFrame:
        """A DataFrame, one row per question: :meth:`SteeredAnswer.to_dict` columns, the pairs'
        candidate log-probs (``expert_lp_A``, ``anti_lp_A``, with a single pair) and an ``error``
        column (empty when the question was answered)."""
        import pandas as pd

        questions = list(questions)
        rows = [
            self.row(q, r) for q, r in zip(questions, self.answer_batch(questions, progress), strict=True)
        ]
        df = pd.DataFrame(rows)
        return df[_column_order(list(df.columns))]

    def row(self, q: MCQuestion, result: SteeredAnswer | BaseException) -> dict[str, Any]:
        """The flat result row of one question (an error row when ``result`` is an exception)."""
        if isinstance(result, BaseException):
            return {
                "id": q.id,
                "base_letter": "",
                "steered_letter": "",
                "gold_letter": q.gold_letter or "",
                "excluded": False,
                "policy": self.policy,
                "strategy": self.strategy,
                "alpha": ",".join(f"{a:g}" for a in self.alphas),
                "error": _error_text(result),
            }
        row = result.to_dict()
        if len(self.pairs) == 1:
            row.update({f"expert_lp_{k}": v for k, v in result.expert_logprobs.items()})
            row.update({f"anti_lp_{k}": v for k, v in result.anti_expert_logprobs.items()})
        row["error"] = ""
        return row
