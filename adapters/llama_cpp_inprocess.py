"""An in-process llama.cpp model that exposes only top-k log-probs: the offline stand-in for a hosted API.

It answers exactly what an OpenAI-compatible server would (same request, same parsing, same
:class:`~blackbox_proxy.types.TopLogprobs`), without HTTP, so the black-box path can be demonstrated
and tested with no server running. Full logits stay hidden on purpose.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from typing import Any

from ..errors import InputError, MissingLogprobsError, ProviderError
from ..models import gguf_path, resolve
from ..types import TokenLogprob, TopLogprobs, Usage
from .base import Prompt, ProviderOptions, register_provider
from .continuation import CONTINUE, CONTINUE_IDS, TOKENIZE, Continuation, check_block_size, check_prefix
from .openai_common import (
    check_k,
    parse_chat_position,
    parse_completion_position,
    position_result,
    to_messages,
    to_text,
)

ENDPOINTS = ("chat", "completions")


class LlamaCppTopKProvider:
    """Top-k log-probs of the first generated token from a GGUF model run by llama-cpp-python in-process.

    ``endpoint="chat"`` applies the model's chat template (like /v1/chat/completions);
    ``"completions"`` takes prompt text (like /v1/completions). Calls are serialised by a lock:
    one llama.cpp context evaluates one request at a time.
    """

    kind = "llama-cpp-inprocess"
    max_k: int | None = None
    #: one llama.cpp context answers one request at a time
    max_concurrency = 1
    #: continue raw text or token ids (greedy, ids reported), and tokenize text as the model reads it
    capabilities: frozenset[str] = frozenset({CONTINUE, CONTINUE_IDS, TOKENIZE})

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
        #: tokens in the context that were evaluated one per decode by continue_prefix
        self._single_ids: list[int] = []
        self._single_ok = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, endpoint={self.endpoint!r})"

    def top_logprobs(self, prompt: Prompt, k: int = 5) -> TopLogprobs:
        """Top-k log-probs of the first token the model generates after ``prompt`` (greedy, one token)."""
        check_k(k, self.max_k, self.kind)
        where = f"in-process llama.cpp model {self.model!r}"
        with self._lock:
            if self._llm is None:
                raise ProviderError(f"{where} was closed; create a new provider")
            self._single_ok = False  # create_* re-evaluates the context its own way
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
        usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
        return position_result(self, entries, chosen, k, usage)

    def _parse(self, body: Any, where: str) -> tuple[list[Any], Any]:
        choices = body.get("choices") or []
        lp = choices[0].get("logprobs") if choices else None
        if not isinstance(lp, dict):
            raise MissingLogprobsError(f"{where} returned no log-probs")
        if self.endpoint == "chat":
            return parse_chat_position(lp, where)
        return parse_completion_position(lp, where)

    # -- continuing a raw prefix ------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as a Completions prompt reads it (BOS where the model adds one)."""
        if not isinstance(text, str) or not text:
            raise InputError("empty text to tokenize")
        with self._lock:
            llm = self._open_llm()
            return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def is_end_token(self, token_id: int) -> bool:
        """True for the model's end-of-generation tokens (end of text, end of turn)."""
        import llama_cpp

        with self._lock:
            return bool(llama_cpp.llama_vocab_is_eog(self._open_llm()._model.vocab, int(token_id)))

    def _open_llm(self) -> Any:
        if self._llm is None:
            raise ProviderError(
                f"in-process llama.cpp model {self.model!r} was closed; create a new provider"
            )
        return self._llm

    def continue_prefix(
        self, prefix: str | Sequence[int], n: int, k: int = 5, *, messages: Prompt | None = None
    ) -> Continuation:
        """``n`` greedy tokens after the raw ``prefix`` (text or token ids), each with its top-k and ids.

        Like a Completions server: temperature 0, no repetition penalty; an end-of-text token ends
        the block (finish_reason "stop") and is not returned as a position. Every token is evaluated
        on its own (one llama_decode per token) and the KV cache is reused only for tokens evaluated
        that way, so a position's log-probs depend on its prefix alone, not on how earlier calls
        split the text into requests (llama.cpp's numbers move with batch shape otherwise).
        """
        import llama_cpp
        import numpy as np

        check_k(k, self.max_k, self.kind)
        n = check_block_size(n, self.kind)
        if messages is not None:
            raise InputError(f"{self.kind} continues raw text or token ids; render the chat to text first")
        prefix = check_prefix(prefix, self.kind, ids_ok=True)
        with self._lock:
            llm = self._open_llm()
            ids = (
                list(llm.tokenize(prefix.encode("utf-8"), add_bos=True, special=True))
                if isinstance(prefix, str)
                else list(prefix)
            )
            if len(ids) + n > llm.n_ctx():
                raise InputError(f"prefix of {len(ids)} tokens + {n} new exceeds n_ctx={llm.n_ctx()}")
            self._evaluate(llm, ids)
            positions: list[TopLogprobs] = []
            out: list[int] = []
            finish = "length"
            vocab = llm._model.vocab
            while True:
                row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
                m = row.max()
                logp = row - (m + np.log(np.exp(row - m).sum()))
                top = np.argpartition(-logp, min(k, len(logp) - 1))[:k]
                top = top[np.lexsort((top, -logp[top]))]  # by log-prob, ties by id
                token = int(top[0])
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                prev = ids + out

                def text(t: int, prev: list[int] = prev) -> str:
                    # a control token (end of turn, end of text) has no plain text: its name instead
                    # ("<|im_end|>"), so that a pair can score it and the generator can end on it
                    special = bool(llama_cpp.llama_vocab_is_control(vocab, int(t)))
                    return llm.detokenize([int(t)], prev_tokens=prev, special=special).decode(
                        "utf-8", errors="replace"
                    )

                entries = tuple(TokenLogprob(text(t), min(float(logp[t]), 0.0), id=int(t)) for t in top)
                positions.append(TopLogprobs(entries, k, entries[0], self.model, self.kind))
                out.append(token)
                if len(out) >= n:
                    break
                self._evaluate(llm, ids + out)
            body_text = llm.detokenize(out, prev_tokens=ids).decode("utf-8", errors="replace")
        usage = Usage(len(ids), len(out))
        return Continuation(
            tuple(positions),
            finish,
            n,
            k,
            body_text,
            usage,
            self.model,
            self.kind,
            not isinstance(prefix, str),
        )

    def _evaluate(self, llm: Any, ids: Sequence[int]) -> None:
        """Bring the context to exactly ``ids``, one token per decode, reusing what was evaluated so."""
        done = self._single_ids if self._single_ok else []
        common = 0
        for a, b in zip(done, ids, strict=False):
            if a != b:
                break
            common += 1
        llm.n_tokens = common  # the last kept token's logits stay in llm.scores (logits_all)
        for t in ids[common:]:
            llm.eval([int(t)])
        self._single_ids = list(ids)
        self._single_ok = True

    async def acontinue_prefix(
        self, prefix: str | Sequence[int], n: int, k: int = 5, *, messages: Prompt | None = None
    ) -> Continuation:
        """Async twin of :meth:`continue_prefix` (a worker thread; one request at a time)."""
        return await asyncio.to_thread(self.continue_prefix, prefix, n, k, messages=messages)

    async def atop_logprobs(self, prompt: Prompt, k: int = 5) -> TopLogprobs:
        """Async twin of :meth:`top_logprobs` (runs in a worker thread; still one request at a time)."""
        return await asyncio.to_thread(self.top_logprobs, prompt, k)

    def close(self) -> None:
        """Free the llama.cpp context now rather than at garbage collection."""
        with self._lock:
            llm, self._llm = self._llm, None
        if llm is not None and hasattr(llm, "close"):
            llm.close()


@register_provider("llama-cpp")
def _llama_cpp(options: ProviderOptions) -> LlamaCppTopKProvider:
    """A packaged model or GGUF file run in-process, revealing only its top-k (offline stand-in)."""
    if options.base_url:
        raise InputError("provider 'llama-cpp' runs the model in-process; it takes no --base-url")
    if options.cache:
        raise InputError("--cache applies to HTTP providers; the in-process base answers locally")
    return LlamaCppTopKProvider(options.model, n_threads=options.threads or 2, endpoint=options.endpoint)
