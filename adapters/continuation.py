"""A block of tokens a base model generated after a raw prefix, each with its top-k alternatives.

Returned by the ``continue_prefix`` capability of the Completions, continue-capable Chat and
in-process llama.cpp providers; consumed by :mod:`blackbox_proxy.blackbox_decoding`.

Capabilities (the ``capabilities`` class attribute of a provider, a frozenset of strings):

* ``"continue"``: ``continue_prefix(prefix, n, k)`` continues raw text (or a partial assistant
  message) and returns ``n`` greedy tokens, each with its top-k log-probs;
* ``"continue_ids"``: the prefix may also be a list of token ids, and returned tokens carry ids,
  so a generation can be continued without re-tokenising its text;
* ``"tokenize"``: ``tokenize(text)`` gives the ids the server would read for ``text``;
* ``"score_block"``: ``score_block(prefix, block, k)`` gives the top-k at every position of a given
  block and after it, in one call (vLLM's ``prompt_logprobs``): a drafted block verified at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError, MissingLogprobsError, ProviderError
from ..types import TokenLogprob, TopLogprobs, Usage

CONTINUE = "continue"
CONTINUE_IDS = "continue_ids"
TOKENIZE = "tokenize"
SCORE_BLOCK = "score_block"

__all__ = [
    "CONTINUE",
    "SCORE_BLOCK",
    "CapabilityError",
    "CONTINUE_IDS",
    "TOKENIZE",
    "Continuation",
    "check_block_size",
    "check_prefix",
    "parse_chat_positions",
    "parse_completion_positions",
]


class CapabilityError(InputError):
    """A provider lacks a capability the caller needs (e.g. continuing a partial response)."""


def require_capability(provider: Any, capability: str, what: str, advice: str | None = None) -> None:
    """Raise CapabilityError naming the provider when it lacks ``capability`` (``advice``: what to use)."""
    caps = getattr(provider, "capabilities", frozenset()) or frozenset()
    if capability not in caps:
        kind = getattr(provider, "kind", type(provider).__name__)
        raise CapabilityError(
            f"provider {kind!r} ({type(provider).__name__}) cannot {what} (it lacks the {capability!r} "
            "capability): "
            + (
                advice
                or "use a Completions endpoint (OpenAICompletionsProvider, --endpoint completions), "
                "a chat server with continue_final_message (ContinueChatProvider), or the in-process "
                "llama.cpp provider"
            )
        )


@dataclass(frozen=True)
class Continuation:
    """The tokens a provider generated after a prefix (greedy), with every position's top-k.

    ``positions[i].chosen`` is the token the server emitted at position i (its ``id`` when the
    server reports ids), ``positions[i].entries`` the alternatives it returned there.
    ``finish_reason`` is the server's: "length" when it stopped at ``n``; "stop" when the model
    ended its text (end-of-text is not itself returned as a position by most servers).
    """

    positions: tuple[TopLogprobs, ...]
    finish_reason: str | None
    requested: int
    k: int
    text: str = ""
    usage: Usage | None = None
    model: str = ""
    provider: str = ""
    #: whether the prefix was sent as token ids (no re-tokenisation on the server)
    sent_ids: bool = False

    @property
    def tokens(self) -> tuple[str, ...]:
        """Text of each generated token."""
        return tuple(p.chosen.token for p in self.positions if p.chosen is not None)

    @property
    def token_ids(self) -> tuple[int, ...] | None:
        """Id of each generated token, or None when the server did not report all of them."""
        ids = [p.chosen.id if p.chosen is not None else None for p in self.positions]
        if any(i is None for i in ids):
            return None
        return tuple(int(i) for i in ids)  # type: ignore[arg-type]

    @property
    def ended(self) -> bool:
        """True when the model ended its text right after the last returned position."""
        return len(self.positions) < self.requested and self.finish_reason != "length"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (positions as lists of {token, logprob})."""
        return {
            "tokens": list(self.tokens),
            "token_ids": list(self.token_ids) if self.token_ids is not None else None,
            "finish_reason": self.finish_reason,
            "requested": self.requested,
            "k": self.k,
            "text": self.text,
            "model": self.model,
            "provider": self.provider,
            "sent_ids": self.sent_ids,
            "prompt_tokens": self.usage.prompt_tokens if self.usage else None,
            "completion_tokens": self.usage.completion_tokens if self.usage else None,
            "top_logprobs": [
                [{"token": e.token, "logprob": e.logprob, "id": e.id} for e in p.entries]
                for p in self.positions
            ],
        }


def check_block_size(n: int, provider: str) -> int:
    """n >= 1 tokens to generate (never 0: llama.cpp reads max_tokens=0 as unlimited)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"{provider}: the number of tokens to continue must be an integer >= 1, got {n!r}")
    return n


def check_prefix(prefix: str | Sequence[int], provider: str, *, ids_ok: bool) -> str | list[int]:
    """A non-empty prefix text, or a non-empty list of token ids where the provider takes ids."""
    if isinstance(prefix, str):
        if not prefix:
            raise InputError(f"{provider}: empty prefix")
        return prefix
    if (
        isinstance(prefix, Sequence)
        and prefix
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prefix)
    ):
        if not ids_ok:
            raise InputError(f"{provider} continues text only, not token ids")
        if any(t < 0 for t in prefix):
            raise InputError(f"{provider}: negative token id in the prefix")
        return [int(t) for t in prefix]
    raise InputError(f"{provider}: the prefix must be non-empty text or a list of token ids, got {prefix!r}")


def _entry(entry: Mapping[str, Any], where: str) -> TokenLogprob:
    token = entry.get("token")
    lp = entry.get("logprob")
    if not isinstance(token, str) or lp is None:
        raise MissingLogprobsError(
            f"{where} returned a log-prob entry without token or logprob: {dict(entry)!r}"
        )
    tid = entry.get("id")
    raw = entry.get("bytes")
    return TokenLogprob(
        token,
        float(lp),
        id=int(tid) if isinstance(tid, int) and not isinstance(tid, bool) else None,
        bytes=tuple(int(b) for b in raw) if isinstance(raw, list) and raw else None,
    )


def parse_chat_positions(
    content: Any, k: int, where: str, model: str, provider: str
) -> tuple[TopLogprobs, ...]:
    """Every position of chat-style ``logprobs.content`` (token, logprob, top_logprobs[, id, bytes])."""
    if not isinstance(content, list):
        raise MissingLogprobsError(f"{where} returned logprobs without a content list")
    out = []
    for i, pos in enumerate(content):
        if not isinstance(pos, Mapping):
            raise MissingLogprobsError(f"{where}: log-prob position {i} is not an object")
        chosen = _entry(pos, where)
        entries = [_entry(e, where) for e in (pos.get("top_logprobs") or []) if isinstance(e, Mapping)]
        if not entries:
            raise MissingLogprobsError(f"{where} returned no top_logprobs at generated position {i}")
        out.append(TopLogprobs(tuple(entries), k, chosen, model, provider))
    return tuple(out)


def parse_completion_positions(
    lp: Mapping[str, Any], k: int, where: str, model: str, provider: str
) -> tuple[TopLogprobs, ...]:
    """Every position of Completions ``logprobs``: legacy lists, else llama-server's chat-style content."""
    tokens = lp.get("tokens")
    if isinstance(tokens, list):
        values = lp.get("token_logprobs")
        tops = lp.get("top_logprobs")
        if (
            not isinstance(values, list)
            or not isinstance(tops, list)
            or not (len(tokens) == len(values) == len(tops))
        ):
            raise MissingLogprobsError(
                f"{where} returned {len(tokens)} tokens with mismatched token_logprobs / top_logprobs lists"
            )
        out = []
        for i, (tok, value, row) in enumerate(zip(tokens, values, tops, strict=True)):
            if value is None or not isinstance(row, Mapping) or not row:
                raise MissingLogprobsError(f"{where} returned no log-probs at generated position {i}")
            entries = tuple(TokenLogprob(str(t), float(v)) for t, v in row.items() if v is not None)
            out.append(TopLogprobs(entries, k, TokenLogprob(str(tok), float(value)), model, provider))
        return tuple(out)
    if "content" in lp and lp.get("content") is not None:
        return parse_chat_positions(lp.get("content"), k, where, model, provider)
    raise MissingLogprobsError(
        f"{where} returned no per-token log-probs (logprobs: {str(dict(lp))[:120]}): the server does "
        "not support log-probs on this endpoint, or ignored the request for them"
    )


def check_block(positions: Sequence[TopLogprobs], n: int, finish: Any, where: str) -> None:
    """A block must not be longer than asked for."""
    if len(positions) > n:
        raise ProviderError(f"{where} returned {len(positions)} tokens where {n} were asked for")
    if finish is not None and not isinstance(finish, str):
        raise ProviderError(f"{where} returned a non-string finish_reason {finish!r}")
