"""Top-k log-probs and echo scoring over the legacy OpenAI Completions endpoint.

``top_logprobs(text, k)`` asks for one token (``max_tokens=1``, never 0: llama.cpp reads 0 as
unlimited) with ``logprobs=k`` (OpenAI allows at most 5). ``score_text(prompt, continuation)``
scores given text with ``echo=True``: the server returns the log-prob of every prompt token.

Servers differ in how they fill this endpoint, and the adapter checks rather than assumes:

* llama.cpp's own ``llama-server`` returns chat-style ``logprobs.content``; the ``openai`` client then
  shows the legacy fields as None and keeps the data as an extra field (``model_extra``), which is
  read when the legacy fields are empty. It ignores ``echo``, so :meth:`score_text` raises there.
* llama-cpp-python's server shifts ``echo`` scores by one position for models that add no BOS
  token (verified: SmolLM2 is shifted, Gemma-3, which adds BOS, is aligned): entry i carries the
  distribution that predicts token i+1. The adapter
  detects the layout once per provider by comparing the echo rows with a plain one-token request
  on the same prefix, and realigns: the log-prob of token i is then read from row i-1, keyed by
  token text, which holds it only when the token is among that row's top-k. A token outside is a
  MissingLogprobsError unless k can grow (``max_k=None`` servers are re-asked with k=1000).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import InputError, MissingLogprobsError, ProviderError
from ..types import TokenLogprob, TopLogprobs, Usage
from .base import OPENAI_COMPLETIONS_MAX_LOGPROBS, Prompt, ProviderOptions, register_provider
from .continuation import (
    CONTINUE,
    CONTINUE_IDS,
    Continuation,
    check_block,
    check_block_size,
    check_prefix,
    parse_completion_positions,
)
from .openai_common import (
    check_k,
    first_choice,
    legacy_lists,
    no_logprobs_error,
    parse_completion_position,
    position_result,
    row_entries,
    to_text,
    usage_of,
)
from .openai_provider import OpenAIProviderBase, openai_max_k, openai_provider_kwargs

ENDPOINT = "completions"
#: echo layouts: OpenAI's (entry i scores token i) or shifted by one (entry i predicts token i+1)
ALIGNED, SHIFTED = "aligned", "shifted"
#: k used to re-ask an unlimited server when a realigned token is outside the first top-k
_WIDE_K = 1000
_PROBE_TEXT = "One, two, three, four, five, six, seven"
#: largest log-prob difference between an echo row and a plain request accepted as "the same row"
_PROBE_TOLERANCE = 0.3


@dataclass(frozen=True)
class ContinuationScore:
    """Per-token log-probs of a continuation given a prompt, and their sum."""

    continuation: str
    tokens: tuple[TokenLogprob, ...]
    model: str
    layout: str
    usage: Usage | None = None

    @property
    def logprob(self) -> float:
        """log P(continuation | prompt): the sum over its tokens."""
        return math.fsum(t.logprob for t in self.tokens)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["logprob"] = self.logprob
        return d


class OpenAICompletionsProvider(OpenAIProviderBase):
    """A black-box model behind the legacy Completions endpoint: top-k of the next token, echo scoring.

    Takes prompt text only (chat messages are an InputError). Configuration as
    :class:`~blackbox_proxy.adapters.openai_provider.OpenAIProviderBase`; ``max_k`` defaults to 5,
    OpenAI's limit for ``logprobs``.
    """

    kind = "openai-completions"
    endpoint = "completions"
    api = "completions"
    default_max_k = OPENAI_COMPLETIONS_MAX_LOGPROBS
    #: continue a raw prefix; the prompt may be token ids (OpenAI legacy, vLLM, llama-server; not
    #: llama-cpp-python's server, whose prompt is text only)
    capabilities: frozenset[str] = frozenset({CONTINUE, CONTINUE_IDS})

    def __init__(
        self, model: str, base_url: str | None = None, api_key: str | None = None, **options: Any
    ) -> None:
        super().__init__(model, base_url, api_key, **options)
        self._layout: str | None = None
        self._layout_lock = threading.Lock()

    # -- top-k of the next token ------------------------------------------------------------------
    def request_params(self, prompt: Prompt, k: int, *, echo: bool = False) -> dict[str, Any]:
        """The JSON request for the top-k log-probs of the token after ``prompt``."""
        check_k(k, self.max_k, self.kind)
        params: dict[str, Any] = {
            "model": self.model,
            "prompt": to_text(prompt, self.kind),
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": k,
        }
        if echo:
            params["echo"] = True
        params.update(self.extra_params)
        return params

    def _logprobs(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        choice = first_choice(body, self._where)
        lp = choice.get("logprobs")
        if isinstance(lp, Mapping) and lp.get("tokens") == [] and not choice.get("text"):
            # llama-cpp-python drops the whole position when the first token is end-of-text
            raise MissingLogprobsError(
                f"{self._where} generated no token (finish_reason={choice.get('finish_reason')!r}): the "
                "model ended its output at once, so the server returned no log-probs for that position. "
                "Use the chat endpoint, or a prompt that ends where the answer starts",
                transient=False,  # the same at temperature 0 every time: not worth paying again
            )
        if not isinstance(lp, Mapping):
            raise no_logprobs_error(self._where)
        return lp

    def parse(self, body: Mapping[str, Any], k: int, *, cached: bool = False) -> TopLogprobs:
        """TopLogprobs of the generated token, from legacy fields or chat-style ``content``."""
        entries, chosen = parse_completion_position(self._logprobs(body), self._where)
        return position_result(self, entries, chosen, k, usage_of(body, cached))

    # -- continuing a raw prefix (open-ended black-box generation) --------------------------------
    def continue_params(self, prefix: str | Sequence[int], n: int, k: int) -> dict[str, Any]:
        """The request for ``n`` greedy tokens after ``prefix`` (text or token ids), top-k at each."""
        check_k(k, self.max_k, self.kind)
        params: dict[str, Any] = {
            "model": self.model,
            "prompt": check_prefix(prefix, self.kind, ids_ok=True),
            "max_tokens": check_block_size(n, self.kind),  # never 0: llama.cpp reads 0 as unlimited
            "temperature": 0,
            "logprobs": k,
        }
        params.update(self.extra_params)
        return params

    def parse_continuation(
        self, body: Mapping[str, Any], n: int, k: int, *, cached: bool = False, sent_ids: bool = False
    ) -> Continuation:
        """Every generated position of a Completions answer (legacy lists or llama-server's content)."""
        where = self._where
        choice = first_choice(body, where)
        finish = choice.get("finish_reason")
        text = choice.get("text") if isinstance(choice.get("text"), str) else ""
        lp = choice.get("logprobs")
        usage = usage_of(body, cached)
        if not isinstance(lp, Mapping):
            if not text and finish == "stop" and usage.completion_tokens == 0:
                positions: tuple[TopLogprobs, ...] = ()  # the model ended at once: nothing to score
            else:
                raise no_logprobs_error(where)
        else:
            positions = parse_completion_positions(lp, k, where, self.model, self.kind)
        check_block(positions, n, finish, where)
        if not positions and finish == "length":
            raise MissingLogprobsError(f"{where} returned no generated token and finish_reason 'length'")
        return Continuation(positions, finish, n, k, text, usage, self.model, self.kind, sent_ids)

    def continue_prefix(self, prefix: str | Sequence[int], n: int, k: int = 5) -> Continuation:
        """``n`` greedy tokens after the raw ``prefix`` (text, or token ids), each with its top-k."""
        params = self.continue_params(prefix, n, k)
        ids = not isinstance(prefix, str)
        body, cached = self._post(params, lambda b: self.parse_continuation(b, n, k, sent_ids=ids))
        return self.parse_continuation(body, n, k, cached=cached, sent_ids=ids)

    async def acontinue_prefix(self, prefix: str | Sequence[int], n: int, k: int = 5) -> Continuation:
        """Async twin of :meth:`continue_prefix`."""
        params = self.continue_params(prefix, n, k)
        ids = not isinstance(prefix, str)

        body, cached = await self._apost(params, lambda b: self.parse_continuation(b, n, k, sent_ids=ids))
        return self.parse_continuation(body, n, k, cached=cached, sent_ids=ids)

    # -- echo scoring ------------------------------------------------------------------------------
    def _echo(self, text: str, k: int) -> tuple[list[Any], list[Any], list[Any], list[Any], Usage]:
        body, cached = self._post(self.request_params(text, k, echo=True), self._echo_lists)
        return (*self._echo_lists(body), usage_of(body, cached))

    def _echo_lists(self, body: Mapping[str, Any]) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        """(tokens, token_logprobs, top_logprobs, text_offset) of an echo answer, checked."""
        legacy = legacy_lists(self._logprobs(body))
        if legacy is None or any(o is None for o in legacy[3]):
            raise ProviderError(
                f"{self._where} did not return per-token log-probs with text offsets for echo=True: "
                "this server does not support echo scoring (llama.cpp's llama-server ignores echo)"
            )
        tokens, values, top, offsets = legacy
        if not offsets or offsets[0] != 0:
            raise ProviderError(f"{self._where} ignored echo=True (the first token is not at offset 0)")
        return tokens, values, top, offsets

    def echo_layout(self) -> str:
        """ALIGNED or SHIFTED: how this server lines up echo scores (probed once, then remembered).

        A plain one-token request on a prefix gives the distribution of the next token for sure;
        the echo row carrying the same distribution tells which token it belongs to.
        """
        with self._layout_lock:
            if self._layout is not None:
                return self._layout
            k = 5 if self.max_k is None else min(5, self.max_k)
            tokens, _, top, offsets, _ = self._echo(_PROBE_TEXT, k)
            if len(tokens) < 3:
                raise ProviderError(f"{self._where}: echo probe returned too few tokens ({tokens!r})")
            i = len(tokens) - 1
            while i > 1 and offsets[i] >= len(_PROBE_TEXT):  # skip a generated token, if echoed
                i -= 1
            plain = self.top_logprobs(_PROBE_TEXT[: offsets[i]], k).known()

            def error(row: Any) -> float:
                echoed = {e.token: e.logprob for e in row_entries(row)}
                common = set(echoed) & set(plain)
                return max((abs(echoed[t] - plain[t]) for t in common), default=math.inf)

            # llama.cpp's numbers move by up to ~0.1 with batch shape and cache reuse, so demand a
            # close match on one side and a clearly worse one on the other
            aligned, shifted = error(top[i]), error(top[i - 1])
            if aligned < _PROBE_TOLERANCE and shifted > 4 * aligned:
                self._layout = ALIGNED
            elif shifted < _PROBE_TOLERANCE and aligned > 4 * shifted:
                self._layout = SHIFTED
            else:
                raise ProviderError(
                    f"{self._where}: echo log-probs match neither alignment of the server's own "
                    f"next-token log-probs (max differences {aligned:.3g} aligned, {shifted:.3g} shifted); "
                    "echo scoring is not reliable on this server"
                )
            return self._layout

    def score_text(self, prompt: str, continuation: str, *, k: int | None = None) -> ContinuationScore:
        """Log-probs of each token of ``continuation`` given ``prompt`` (one echo request).

        The boundary must fall between tokens: a token spanning prompt and continuation is an
        InputError (end the prompt with the separator, e.g. "Answer:" + " A").
        """
        to_text(prompt, self.kind)
        if not isinstance(continuation, str) or not continuation:
            raise InputError("empty continuation: nothing to score")
        k0 = check_k(
            k if k is not None else (5 if self.max_k is None else min(5, self.max_k)), self.max_k, self.kind
        )
        layout = self.echo_layout()
        text = prompt + continuation
        result, usage = self._score_once(prompt, text, k0, layout)
        if isinstance(result, ContinuationScore):
            return result
        wider = self.max_k if self.max_k is not None else max(_WIDE_K, k0)
        if layout == SHIFTED and wider > k0:
            result, more = self._score_once(prompt, text, wider, layout)
            if isinstance(result, ContinuationScore):
                return replace(result, usage=usage + more)  # both requests are billed
        raise MissingLogprobsError(
            f"{self._where}: token {result!r} of the continuation is outside the top-{max(k0, wider)} "
            "log-probs this server returned; its echo scores are shifted by one position (a model "
            "without BOS on llama-cpp-python), so its log-prob cannot be recovered"
        )

    def _score_once(
        self, prompt: str, text: str, k: int, layout: str
    ) -> tuple[ContinuationScore | str, Usage]:
        """(The score, or the text of the first continuation token whose log-prob is unavailable; usage)."""
        tokens, values, top, offsets, usage = self._echo(text, k)
        start, end = len(prompt), len(text)
        picked: list[TokenLogprob] = []
        for i, (tok, off) in enumerate(zip(tokens, offsets, strict=True)):
            tok = str(tok)
            if off >= end:
                break  # the generated token (echo also returns it)
            if off < start:
                if off + len(tok) > start:
                    raise InputError(
                        f"token {tok!r} spans the end of the prompt and the start of the continuation; "
                        "move the separator (space, newline) so the boundary falls between tokens"
                    )
                continue
            if layout == ALIGNED:
                value = values[i]
            else:
                row = top[i - 1] if i >= 1 else None
                value = row.get(tok) if isinstance(row, Mapping) else None
                if value is None:
                    return tok, usage
            if value is None:
                raise MissingLogprobsError(f"{self._where} returned no log-prob for token {tok!r}")
            picked.append(TokenLogprob(tok, float(value)))
        if not picked:
            raise ProviderError(
                f"{self._where}: no echoed token falls inside the continuation {text[start:]!r}"
            )
        return ContinuationScore(text[start:], tuple(picked), self.model, layout, usage), usage

    def score_many(self, prompt: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        """:meth:`score_text` for several continuations of one prompt (e.g. answer options)."""
        return [self.score_text(prompt, c) for c in continuations]


@register_provider("openai-completions")
def _openai_completions(options: ProviderOptions) -> OpenAICompletionsProvider:
    """Legacy OpenAI Completions (or any compatible server at ``base_url``): prompt text only."""
    return OpenAICompletionsProvider(
        options.model,
        max_k=openai_max_k(options, OPENAI_COMPLETIONS_MAX_LOGPROBS),
        **openai_provider_kwargs(options),
    )
