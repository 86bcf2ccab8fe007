"""Scale-out: several replicas of one base model behind one provider, each with its own budget.

``ReplicatedProvider([p1, p2, ...])`` takes providers of the same model (e.g. one
:class:`~blackbox_proxy.adapters.vllm.VLLMChatProvider` per vLLM deployment). Every request goes to
the replica with the lowest share of its concurrency budget in use, so a runner that keeps
``max_concurrency`` (the sum of the budgets) requests in flight fans them out over all replicas.
Greedy answers do not depend on the replica, so results equal those of one server.

Through the registry, a ``base_url`` holding several comma-separated URLs builds one (the ``vllm``
provider: ``--base-url http://gpu1:8000/v1,http://gpu2:8000/v1``), each replica getting
``max_concurrency`` of its own.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import InputError
from ..types import TopLogprobs
from .base import Prompt

__all__ = ["ReplicatedProvider", "split_base_urls"]


def split_base_urls(base_url: str | None) -> list[str]:
    """The URLs of a comma-separated ``base_url`` (one URL gives a one-element list)."""
    if not base_url:
        return []
    urls = [u.strip() for u in base_url.split(",")]
    if any(not u for u in urls):
        raise InputError(f"empty URL in the base URL list {base_url!r}")
    if len(set(urls)) != len(urls):
        raise InputError(f"the base URL list {base_url!r} names a replica twice")
    return urls


class ReplicatedProvider:
    """Replicas of one model: each request goes to the least-loaded replica (by its own budget)."""

    def __init__(self, replicas: Sequence[Any]) -> None:
        reps = list(replicas)
        if not reps:
            raise InputError("a replicated provider needs at least one replica")
        first = reps[0]
        for r in reps[1:]:
            if r.model != first.model or r.endpoint != first.endpoint or type(r) is not type(first):
                raise InputError(
                    f"replicas must serve one model through one provider type; got {first.model!r} "
                    f"({type(first).__name__}, {first.endpoint}) and {r.model!r} ({type(r).__name__}, {r.endpoint})"
                )
        self.replicas = reps
        self.model = first.model
        self.kind = f"{first.kind}x{len(reps)}" if len(reps) > 1 else first.kind
        self.endpoint = first.endpoint
        limits = [r.max_k for r in reps]
        self.max_k = None if all(m is None for m in limits) else min(m for m in limits if m is not None)
        self.capabilities: frozenset[str] = frozenset.intersection(
            *(frozenset(getattr(r, "capabilities", frozenset())) for r in reps)
        )
        self._budgets = [max(1, int(r.max_concurrency)) for r in reps]
        self._in_flight = [0] * len(reps)
        self._served = [0] * len(reps)
        self._lock = threading.Lock()

    @property
    def max_concurrency(self) -> int:
        """The sum of the replicas' budgets: what a runner may keep in flight."""
        return sum(self._budgets)

    @property
    def base_url(self) -> str:
        """All replica URLs, comma-separated."""
        return ",".join(str(getattr(r, "base_url", "?")) for r in self.replicas)

    def stats(self) -> list[dict[str, Any]]:
        """Per replica: its URL, budget, requests in flight and requests sent so far."""
        with self._lock:
            return [
                {"base_url": getattr(r, "base_url", "?"), "budget": b, "in_flight": f, "requests": n}
                for r, b, f, n in zip(
                    self.replicas, self._budgets, self._in_flight, self._served, strict=True
                )
            ]

    @contextmanager
    def _pick(self) -> Iterator[Any]:
        with self._lock:
            i = min(
                range(len(self.replicas)),
                key=lambda j: (self._in_flight[j] / self._budgets[j], self._served[j]),
            )
            self._in_flight[i] += 1
            self._served[i] += 1
        try:
            yield self.replicas[i]
        finally:
            with self._lock:
                self._in_flight[i] -= 1

    def top_logprobs(self, prompt: Prompt, k: int = 5, **kwargs: Any) -> TopLogprobs:
        """The least-loaded replica's :meth:`top_logprobs` (keyword options such as ``candidates`` pass on)."""
        with self._pick() as r:
            return r.top_logprobs(prompt, k, **kwargs)

    async def atop_logprobs(self, prompt: Prompt, k: int = 5, **kwargs: Any) -> TopLogprobs:
        """Async twin of :meth:`top_logprobs`."""
        with self._pick() as r:
            return await r.atop_logprobs(prompt, k, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Other provider methods (continue_prefix, score_block, tokenize ...) go to a least-loaded replica."""
        if name.startswith("_") or name in ("replicas",):
            raise AttributeError(name)
        attr = getattr(self.replicas[0], name)
        if not callable(attr):
            return attr

        if inspect.iscoroutinefunction(attr):

            async def acall(*args: Any, **kwargs: Any) -> Any:
                with self._pick() as r:
                    return await getattr(r, name)(*args, **kwargs)

            return acall

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._pick() as r:
                return getattr(r, name)(*args, **kwargs)

        return call

    def close(self) -> None:
        """Close every replica."""
        for r in self.replicas:
            r.close()

    def __repr__(self) -> str:
        return (
            f"ReplicatedProvider({self.model!r}, replicas={len(self.replicas)}, base_url={self.base_url!r})"
        )
