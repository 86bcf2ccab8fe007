"""Helpers shared by the OpenAI-protocol adapters: prompt and k checks, log-prob parsing, usage.

Parsing assumes nothing the protocol does not promise: entries may come in any order and number,
``bytes`` and ``id`` may be absent, the first entry need not be the most likely, and legacy
Completions fields may be empty with the data in chat style (llama.cpp's ``llama-server``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError, MalformedResponseError, MissingLogprobsError
from ..types import TokenLogprob, TopLogprobs, Usage
from .base import Prompt


def check_k(k: int, max_k: int | None, provider: str) -> int:
    """Validate the number of top log-probs asked for: an int with 1 <= k <= max_k (None = no limit)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"{provider}: k must be an integer, got {k!r}")
    if k < 1:
        raise InputError(f"{provider}: k must be at least 1, got {k}")
    if max_k is not None and k > max_k:
        raise InputError(
            f"{provider}: k={k} exceeds this provider's limit of {max_k} top log-probs "
            "(pass max_k=None for servers without a limit, e.g. llama.cpp)"
        )
    return k


def check_model(model: str, provider: str) -> str:
    """A non-empty model name."""
    if not isinstance(model, str) or not model.strip():
        raise InputError(f"{provider}: a model name is required, got {model!r}")
    return model


def to_messages(prompt: Prompt) -> list[dict[str, str]]:
    """Chat messages for a prompt: a string becomes one user message; messages are validated."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("empty prompt")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence) or not prompt:
        raise InputError(f"prompt must be a non-empty string or list of chat messages, got {prompt!r}")
    out: list[dict[str, str]] = []
    for i, m in enumerate(prompt):
        if (
            not isinstance(m, Mapping)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise InputError(
                f"chat message {i} must be a mapping with string 'role' and 'content', got {m!r}"
            )
        out.append(dict(m))
    if not any(m["content"].strip() for m in out):
        raise InputError("empty prompt: every chat message has empty content")
    return out


def to_text(prompt: Prompt, provider: str) -> str:
    """Completion text: only a non-empty string is accepted (messages have no completion form)."""
    if not isinstance(prompt, str):
        raise InputError(
            f"{provider} takes prompt text, not chat messages: use the chat provider, or render the "
            "messages to text yourself (e.g. prompts.mc_text)"
        )
    if not prompt.strip():
        raise InputError("empty prompt")
    return prompt


def token_logprob(entry: Mapping[str, Any]) -> TokenLogprob:
    """A TokenLogprob from one chat-style entry ({token, logprob, [id], [bytes]})."""
    token = entry.get("token")
    if not isinstance(token, str):
        raise MissingLogprobsError(f"log-prob entry without a token text: {dict(entry)!r}")
    lp = entry.get("logprob")
    if lp is None:
        raise MissingLogprobsError(f"token {token!r} came back without a log-prob")
    raw_bytes = entry.get("bytes")
    tid = entry.get("id")
    return TokenLogprob(
        token=token,
        logprob=float(lp),
        id=int(tid) if isinstance(tid, int) else None,
        bytes=tuple(int(b) for b in raw_bytes) if isinstance(raw_bytes, list) and raw_bytes else None,
    )


def first_choice(body: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The first choice of a response, or a MalformedResponseError (retried) when there is none."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        keys = ", ".join(sorted(str(k) for k in body)[:10]) or "none"
        raise MalformedResponseError(f"{where} returned no choices (top-level fields: {keys})")
    return choices[0]


def parse_chat_position(logprobs: Mapping[str, Any], where: str) -> tuple[list[TokenLogprob], TokenLogprob]:
    """(top entries, emitted token) of the first generated position, from chat-style ``content``."""
    content = logprobs.get("content")
    if not isinstance(content, list) or not content:
        raise MissingLogprobsError(f"{where} returned logprobs without any generated token (content empty)")
    first = content[0]
    chosen = token_logprob(first)
    top = first.get("top_logprobs") or []
    entries = [token_logprob(e) for e in top]
    if not entries:
        raise MissingLogprobsError(f"{where} returned no top_logprobs for the generated token")
    return entries, chosen


def no_logprobs_error(where: str) -> MissingLogprobsError:
    """The error for ``logprobs: null``: the model or server does not return log-probs."""
    return MissingLogprobsError(
        f"{where} returned no log-probs (logprobs: null): the model or server does not support "
        "log-probs, or ignored the request for them"
    )


def position_result(
    provider: Any, entries: Sequence[TokenLogprob], chosen: TokenLogprob | None, k: int, usage: Usage | None
) -> TopLogprobs:
    """The TopLogprobs of one position, labelled with ``provider``'s model and kind."""
    return TopLogprobs(
        entries=tuple(entries), k=k, chosen=chosen, model=provider.model, provider=provider.kind, usage=usage
    )


def usage_of(body: Mapping[str, Any], cached: bool) -> Usage:
    """Usage from a response body (zeros where the server reports none)."""
    u = body.get("usage") or {}
    return Usage(
        prompt_tokens=int(u.get("prompt_tokens") or 0),
        completion_tokens=int(u.get("completion_tokens") or 0),
        requests=1,
        cached=cached,
    )


def legacy_lists(lp: Mapping[str, Any]) -> tuple[list[Any], list[Any], list[Any], list[Any]] | None:
    """(tokens, token_logprobs, top_logprobs, text_offset) of legacy Completions logprobs, if filled."""
    tokens = lp.get("tokens")
    values = lp.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(values, list) or not tokens:
        return None
    n = len(tokens)
    if len(values) != n:
        raise MalformedResponseError(f"logprobs has {n} tokens but {len(values)} token_logprobs")
    top = lp.get("top_logprobs")
    offsets = lp.get("text_offset")
    top = top if isinstance(top, list) and len(top) == n else [None] * n
    offsets = offsets if isinstance(offsets, list) and len(offsets) == n else [None] * n
    return tokens, values, top, offsets


def row_entries(row: Any) -> list[TokenLogprob]:
    """Entries of one legacy top_logprobs row ({text: logprob}); a None row gives none."""
    if not isinstance(row, Mapping):
        return []
    return [TokenLogprob(str(t), float(v)) for t, v in row.items() if v is not None]


def parse_completion_position(lp: Mapping[str, Any], where: str) -> tuple[list[TokenLogprob], TokenLogprob]:
    """(top entries, emitted token) of the generated token from Completions ``logprobs``.

    Legacy fields first; when the client shows them as None, the chat-style ``content`` that
    llama.cpp's llama-server returns (kept by the client as an extra field, ``model_extra``).
    """
    legacy = legacy_lists(lp)
    if legacy is not None:
        tokens, values, top, _ = legacy
        entries = row_entries(top[0])
        if not entries:
            raise MissingLogprobsError(f"{where} returned no top_logprobs for the generated token")
        if values[0] is None:
            raise MissingLogprobsError(f"{where} returned no log-prob for the generated token")
        return entries, TokenLogprob(str(tokens[0]), float(values[0]))
    if "content" in lp:
        return parse_chat_position(lp, where)
    raise no_logprobs_error(where)
