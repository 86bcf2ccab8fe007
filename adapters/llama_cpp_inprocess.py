"""An in-process llama.cpp model that exposes only top-k log-probs: the offline stand-in for a hosted API.

It answers exactly what an OpenAI-compatible server would (same request, same parsing, same
:class:`~blackbox_proxy.types.TopLogprobs`), without HTTP, so the black-box path can be demonstrated
and tested with no server running. Full logits stay hidden on purpose.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from ..errors import InputError, MissingLogprobsError, ProviderError
from ..models import gguf_path, resolve
from ..types import TopLogprobs, Usage
from .base import Prompt
from .openai_common import check_k, parse_chat_position, parse_completion_position, to_messages, to_text

ENDPOINTS = ("chat", "completions")


class LlamaCppTopKProvider:
    """Top-k log-probs of the first generated token from a GGUF model run by llama-cpp-python in-process.

    ``endpoint="chat"`` applies the model's chat template (like /v1/chat/completions);
    ``"completions"`` takes prompt text (like /v1/completions). Calls are serialised by a lock:
    one llama.cpp context evaluates one request at a time.
    """

    kind = "llama-cpp-inprocess"
    max_k: int | None = None

    def __init__(
        self,
        spec: str | os.PathLike[str],
        *,
        n_ctx: int = 2048,
        n_threads: int = 2,
        endpoint: str = "chat",
        model_name: str | None = None,
    ) -> None:
        if endpoint not in ENDPOINTS:
            raise InputError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")
        from llama_cpp import Llama

        self.spec = str(spec)
        self.endpoint = endpoint
        self.model = model_name or resolve(spec).name
        self.path = gguf_path(spec)
        # logits_all: llama-cpp-python computes log-probs only when every position keeps its logits
        self._llm = Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            logits_all=True,
            verbose=False,
        )
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, endpoint={self.endpoint!r})"

    def top_logprobs(self, prompt: Prompt, k: int = 5) -> TopLogprobs:
        """Top-k log-probs of the first token the model generates after ``prompt`` (greedy, one token)."""
        check_k(k, self.max_k, self.kind)
        where = f"in-process llama.cpp model {self.model!r}"
        with self._lock:
            if self._llm is None:
                raise ProviderError(f"{where} was closed; create a new provider")
            if self.endpoint == "chat":
                body = self._llm.create_chat_completion(
                    messages=to_messages(prompt), max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=k
                )
            else:
                body = self._llm.create_completion(
                    prompt=to_text(prompt, self.kind), max_tokens=1, temperature=0.0, logprobs=k
                )
        entries, chosen = self._parse(body, where)
        u: dict[str, Any] = body.get("usage") or {}
        return TopLogprobs(
            entries=tuple(entries),
            k=k,
            chosen=chosen,
            model=self.model,
            provider=self.kind,
            usage=Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)),
        )

    def _parse(self, body: Any, where: str) -> tuple[list[Any], Any]:
        choices = body.get("choices") or []
        lp = choices[0].get("logprobs") if choices else None
        if not isinstance(lp, dict):
            raise MissingLogprobsError(f"{where} returned no log-probs")
        if self.endpoint == "chat":
            return parse_chat_position(lp, where)
        return parse_completion_position(lp, where)

    async def atop_logprobs(self, prompt: Prompt, k: int = 5) -> TopLogprobs:
        """Async twin of :meth:`top_logprobs` (runs in a worker thread; still one request at a time)."""
        return await asyncio.to_thread(self.top_logprobs, prompt, k)

    def close(self) -> None:
        """Free the llama.cpp context now rather than at garbage collection."""
        with self._lock:
            llm, self._llm = self._llm, None
        if llm is not None and hasattr(llm, "close"):
            llm.close()
