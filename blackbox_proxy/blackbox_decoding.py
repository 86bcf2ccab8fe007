"""Open-ended proxy-tuned generation of a black-box base, through its top-k log-probs.

The base is a provider with the ``continue`` capability (Completions, a chat server that continues
a partial assistant message, or in-process llama.cpp; see :mod:`blackbox_proxy.adapters.continuation`).
At every position the candidate set is the base's returned top-k tokens, as text, and

    steered(c) = base_logprob(c) + sum_i alpha_i * (expert_i(c) - anti_i(c))      for c in C

where ``expert_i(c)`` is the log-prob of the text ``c`` continuing the same prefix under the local
model: one lookup where ``c`` is one token of that model's tokenizer, else the sum over its tokens.
The base and the pair may have different tokenizers; only text crosses between them.

**Prefix boundary.** Each pair model reads the generated text as the concatenation of every
emitted token's own tokenisation (appended, never re-tokenised), so a candidate always starts at
a token boundary of the model's context and its KV cache is kept across blocks. For a pair that
shares the base's tokenizer this is exactly the base's own tokenisation.

**Speculative verification** (the default): the base is asked for a block of n greedy tokens with
their top-k; the pair scores every position of the block in one batched forward pass (a tree
attention mask covers the multi-token candidates off the block's path); the longest prefix on
which the steered choice equals the base's own token is accepted, the steered token is emitted at
the first disagreement, and the next block starts from there. Every position's data is what a
one-token request on the same prefix returns (the base is greedy, so its block is a function of
the prefix), so greedy output is identical to one call per token (``speculative=False``). n adapts
to the run length between disagreements.

**Sampling** is exact in distribution with the same blocks: the base's greedy token ``b`` is a draft
from the point mass at ``b``; speculative rejection sampling accepts it with probability
``p(b)`` (the steered distribution after temperature, top-k, top-p over C) and otherwise draws from
``p`` restricted to ``C \\ {b}``, renormalised. Then P(b) = p(b) and, for v != b,
P(v) = (1 - p(b)) * p(v) / (1 - p(b)) = p(v): each emitted token is an exact draw from ``p``.

Every result carries its accounting (:class:`BlackBoxAccounting`): calls, tokens, prompt tokens
sent (each call re-sends the prefix), the positions where steering changed the base's token.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from .adapters.base import FullLogitsModel, Prompt
from .adapters.continuation import (
    CONTINUE,
    CONTINUE_IDS,
    SCORE_BLOCK,
    TOKENIZE,
    Continuation,
    require_capability,
)
from .errors import BlackboxProxyError, InputError, ProviderError
from .sampling import GenerationConfig, find_stop, streamable_prefix

__all__ = [
    "BlackBoxAccounting",
    "BlackBoxGeneration",
    "BlackBoxProxyGenerator",
    "ChangedToken",
    "StepTrace",
    "speculative_sample",
    "steered_distribution",
]

#: model types whose attention takes a custom 4D mask with a growing KV cache (tree scoring)
_TREE_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3", "granite", "olmo2"})
#: who proposes a block: the base itself (continue_prefix) or the first pair's expert (score_block verifies)
DRAFTS = ("base", "pair")


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ChangedToken:
    """A position where steering emitted another token than the base's own greedy choice."""

    position: int
    base_token: str
    steered_token: str
    base_logprob: float
    #: the base's log-prob of the token steering chose
    steered_token_base_logprob: float
    #: the summed pair offset of the chosen token minus that of the base's token
    offset_gain: float


@dataclass(frozen=True)
class StepTrace:
    """One emitted position (``analysis=True``): the base's token, the choice, and how close it was."""

    position: int
    base_token: str
    chosen: str
    base_logprob: float
    #: steered score of the best candidate minus the second best (how robust the choice is)
    margin: float
    n_candidates: int


@dataclass(frozen=True)
class BlackBoxAccounting:
    """What a black-box generation cost and did (one per result; also written by ``--report``)."""

    mode: Literal["speculative", "per-token"]
    sampling: bool
    k: int
    api_calls: int
    cached_calls: int
    generated_tokens: int
    calls_per_token: float
    #: prompt tokens the server reported over all calls (each call re-sends the prefix)
    prompt_tokens_sent: int
    completion_tokens_billed: int
    tokens_received: int
    #: tokens received but not used (after a disagreement, a stop string or the token limit)
    tokens_discarded: int
    changed: tuple[ChangedToken, ...]
    changed_rate: float
    block_sizes: tuple[int, ...]
    accepted_per_block: tuple[int, ...]
    #: calls whose reported prompt length differs from the tokens generated so far (text re-tokenised)
    retokenized: tuple[dict[str, int], ...]
    #: positions where the server's own token was not the top of its own log-probs (a penalty or bias)
    base_not_top1: int
    sent_ids: bool
    wall_seconds: float
    base_seconds: float
    pair_seconds: float
    #: block-scoring requests sent to served pair models (vLLM over HTTP; 0 for in-process pairs)
    pair_requests: int = 0
    #: who proposed the blocks ("base" or "pair") and how many base calls verified a pair's draft
    draft: str = "base"
    verified_drafts: int = 0
    #: text-only servers that say how they tokenise (llama-cpp-python): tokenize requests sent, and
    #: the positions where a block was cut because its text would come back re-tokenised
    tokenize_requests: int = 0
    retokenization_cuts: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (changed tokens as a list of dicts)."""
        d = asdict(self)
        d["changed"] = [asdict(c) for c in self.changed]
        d["block_sizes"] = list(self.block_sizes)
        d["accepted_per_block"] = list(self.accepted_per_block)
        d["retokenized"] = [dict(r) for r in self.retokenized]
        d["retokenization_cuts"] = list(self.retokenization_cuts)
        return d


@dataclass(frozen=True)
class BlackBoxGeneration:
    """One prompt's continuation from a black-box base, and its accounting."""

    prompt: Prompt
    text: str
    tokens: tuple[str, ...]
    token_ids: tuple[int | None, ...]
    finish_reason: Literal["eos", "stop", "length"]
    alphas: tuple[float, ...]
    accounting: BlackBoxAccounting
    #: per-position trace, with GenerationConfig(analysis=True)
    trace: tuple[StepTrace, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat dict (one DataFrame row) with the main accounting numbers."""
        a = self.accounting
        return {
            "prompt": self.prompt if isinstance(self.prompt, str) else [dict(m) for m in self.prompt],
            "text": self.text,
            "n_tokens": len(self.tokens),
            "finish_reason": self.finish_reason,
            "alphas": list(self.alphas),
            "mode": a.mode,
            "api_calls": a.api_calls,
            "calls_per_token": a.calls_per_token,
            "prompt_tokens_sent": a.prompt_tokens_sent,
            "n_changed": len(a.changed),
            "changed_rate": a.changed_rate,
        }


# ----------------------------------------------------------------------------- sampling maths


def steered_distribution(scores: Mapping[str, float], config: GenerationConfig) -> dict[str, float]:
    """Probabilities over the candidates: softmax(scores / T) after top-k and top-p (on C only)."""
    if not scores:
        raise InputError("no candidates to sample from")
    t = float(config.temperature or 1.0)
    items = sorted(scores.items(), key=lambda kv: -kv[1])
    if config.top_k > 0:
        items = items[: config.top_k]
    m = items[0][1] / t
    weights = [(c, math.exp(s / t - m)) for c, s in items]
    total = math.fsum(w for _, w in weights)
    probs = [(c, w / total) for c, w in weights]
    if config.top_p < 1.0:
        kept, mass = [], 0.0
        for c, p in probs:
            if mass >= config.top_p:
                break
            kept.append((c, p))
            mass += p
        total = math.fsum(p for _, p in kept)
        probs = [(c, p / total) for c, p in kept]
    return dict(probs)


def _draw(probs: Sequence[tuple[str, float]], rng: random.Random) -> str:
    total = math.fsum(p for _, p in probs)
    u = rng.random() * total
    acc = 0.0
    for c, p in probs:
        acc += p
        if u < acc:
            return c
    return probs[-1][0]


def speculative_sample(probs: Mapping[str, float], draft: str, rng: random.Random) -> str:
    """One exact draw from ``probs`` given a deterministic draft token (speculative rejection sampling).

    Accept ``draft`` with probability p(draft); otherwise draw from p without ``draft``,
    renormalised. The result is distributed exactly as ``probs``.
    """
    p_draft = probs.get(draft, 0.0)
    if rng.random() < p_draft:
        return draft
    rest = [(c, p) for c, p in probs.items() if c != draft and p > 0]
    if not rest:
        return draft
    return _draw(rest, rng)


# ----------------------------------------------------------------------------- pair side


def _pieces(model: Any, memo: dict[str, tuple[int, ...]], text: str) -> tuple[int, ...]:
    """``model``'s tokens for ``text`` without special tokens, memoised in ``memo``."""
    got = memo.get(text)
    if got is None:
        got = tuple(model.encode(text, add_special_tokens=False)) if text else ()
        memo[text] = got
    return got


class _PairContext:
    """One local model reading one prompt format: its token context and KV cache across blocks."""

    def __init__(self, model: FullLogitsModel, prompt_ids: Sequence[int]) -> None:
        self.model = model
        self.ids: list[int] = list(prompt_ids)
        self._pieces: dict[str, tuple[int, ...]] = {}
        hf = getattr(model, "model", None)
        model_type = getattr(getattr(hf, "config", None), "model_type", None)
        self.tree = model_type in _TREE_MODEL_TYPES
        self._hf = hf
        self._cache: Any = None
        self._n_cached = 0
        self._pending_valid = 0  # tokens of the last forward that may stay in the cache

    def pieces(self, text: str) -> tuple[int, ...]:
        """This model's tokens for ``text`` (no special tokens), memoised."""
        return _pieces(self.model, self._pieces, text)

    # -- scoring ---------------------------------------------------------------------------------
    def score_block(self, path: Sequence[str], cands: Sequence[Sequence[str]]) -> list[dict[str, float]]:
        """log P(c | context + path[:j]) for every candidate c of every block position j."""
        if self.tree:
            return self._score_tree(path, cands)
        return self._score_rows(path, cands)

    def _plan(
        self, path: Sequence[str], cands: Sequence[Sequence[str]]
    ) -> tuple[list[int], list[int], list[tuple[int, tuple[int, ...]]]]:
        """(path tokens after the context, q_j = path index predicting position j, branch prefixes)."""
        flat: list[int] = []
        starts: list[int] = []
        for t in path:
            starts.append(len(flat))
            flat.extend(self.pieces(t))
        branches: dict[tuple[int, tuple[int, ...]], None] = {}
        for j, cs in enumerate(cands):
            own = self.pieces(path[j])
            for c in cs:
                q = self.pieces(c)
                if len(q) >= 2 and q != own:
                    for i in range(1, len(q)):
                        branches[(j, q[:i])] = None
        return flat, starts, list(branches)

    def _collect(
        self,
        path: Sequence[str],
        cands: Sequence[Sequence[str]],
        starts: Sequence[int],
        path_row: Any,
        branch_row: Any,
    ) -> list[dict[str, float]]:
        """Sum token log-probs per candidate; ``path_row(x)`` is the row after path token x-1 (x=0: context)."""
        out: list[dict[str, float]] = []
        for j, cs in enumerate(cands):
            own = self.pieces(path[j])
            scores: dict[str, float] = {}
            for c in cs:
                q = self.pieces(c)
                if not q:
                    scores[c] = 0.0
                    continue
                base = starts[j]
                total = float(path_row(base)[q[0]])
                for i in range(1, len(q)):
                    row = path_row(base + i) if q == own else branch_row(j, q[:i])
                    total += float(row[q[i]])
                scores[c] = total
            out.append(scores)
        return out

    def _score_rows(self, path: Sequence[str], cands: Sequence[Sequence[str]]) -> list[dict[str, float]]:
        """Any FullLogitsModel: one pass over the path, one batched pass over the branches (no cache)."""
        flat, starts, branches = self._plan(path, cands)
        path_lp = self.model.logprobs([self.ids + flat], keep=len(flat) + 1)[0]
        rows: dict[tuple[int, tuple[int, ...]], Any] = {}
        if branches:
            seqs = [self.ids + flat[: starts[j]] + list(pre) for j, pre in branches]
            lp = self.model.logprobs(seqs, keep=1)
            rows = {b: lp[i, -1] for i, b in enumerate(branches)}
        return self._collect(path, cands, starts, lambda x: path_lp[x], lambda j, pre: rows[(j, pre)])

    def _score_tree(self, path: Sequence[str], cands: Sequence[Sequence[str]]) -> list[dict[str, float]]:
        """transformers: one cached forward over the path and every branch, with a tree attention mask."""
        import torch
        from transformers import DynamicCache

        hf = self._hf
        if self._cache is None:
            self._cache = DynamicCache(config=hf.config)
            self._n_cached = 0
        flat, starts, branches = self._plan(path, cands)
        pending = self.ids[self._n_cached :]
        p0 = len(pending) - 1  # node whose logits predict block position 0
        nodes = pending + flat
        n_path = len(nodes)
        cached = self._n_cached
        positions = list(range(cached, cached + n_path))
        parent: list[int] = list(range(-1, n_path - 1))
        index: dict[tuple[int, tuple[int, ...]], int] = {}
        for j, pre in branches:  # prefixes come shortest first within one candidate
            anchor = p0 + starts[j]
            par = anchor if len(pre) == 1 else index[(j, pre[:-1])]
            index[(j, pre)] = len(nodes)
            nodes.append(pre[-1])
            parent.append(par)
            positions.append(positions[anchor] + len(pre))
        n = len(nodes)
        allowed = torch.zeros((n, cached + n), dtype=torch.bool)
        allowed[:, :cached] = True
        allowed[:n_path, cached : cached + n_path] = torch.ones((n_path, n_path), dtype=torch.bool).tril()
        for x in range(n_path, n):
            allowed[x, cached + x] = True
            y = parent[x]
            while y >= n_path:
                allowed[x, cached + y] = True
                y = parent[y]
            allowed[x, cached : cached + y + 1] = True
        mask = torch.zeros((1, 1, n, cached + n), dtype=torch.float32)
        mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
        with torch.inference_mode():
            logits = hf(
                input_ids=torch.tensor([nodes], dtype=torch.long),
                position_ids=torch.tensor([positions], dtype=torch.long),
                attention_mask=mask,
                past_key_values=self._cache,
                use_cache=True,
            ).logits[0]
            lp = torch.log_softmax(logits.float(), dim=-1)
        self._pending_valid = n_path
        self._tree_extra = n - n_path
        return self._collect(path, cands, starts, lambda x: lp[p0 + x], lambda j, pre: lp[index[(j, pre)]])

    # -- drafting --------------------------------------------------------------------------------
    def draft(self, n: int) -> str:
        """This model's greedy continuation of its context, at most ``n`` tokens, as text: a block for
        the base to verify in one call. It stops before an end-of-text token ("" when that comes first)."""
        import torch

        eos = getattr(self.model, "eos_token_ids", frozenset())
        out: list[int] = []
        with self.model.open([self.ids]) as session:
            while len(out) < n:
                tok = int(torch.argmax(session.logits()[0]))
                if tok in eos:
                    break
                out.append(tok)
                if len(out) < n:
                    session.feed([tok])
        return self.model.decode(out) if out else ""

    # -- committing ------------------------------------------------------------------------------
    def commit(self, path: Sequence[str], accepted: int, emitted: str | None) -> None:
        """Append the accepted path tokens (and the emitted one); keep the cache of what stays valid."""
        added: list[int] = []
        for t in path[:accepted]:
            added.extend(self.pieces(t))
        valid_after = self._n_cached + len(self.ids[self._n_cached :]) + len(added)
        self.ids.extend(added)
        if emitted is not None:
            self.ids.extend(self.pieces(emitted))
        if self.tree and self._cache is not None:
            keep = min(valid_after, len(self.ids) - 1)
            have = self._cache.get_seq_length()
            if have > keep:
                self._cache.crop(keep - have)
            self._n_cached = keep


class _ServedContext:
    """A pair model on a server (``ServedModel``: vLLM over HTTP) reading one prompt format.

    Every candidate of every block position is one sequence (context + path up to it + the
    candidate's tokens) scored from the candidate on through ``prompt_logprobs``: one request per
    block, the server's prefix cache shares the context. Same contract as :class:`_PairContext`.
    """

    tree = False

    def __init__(self, model: Any, prompt_ids: Sequence[int]) -> None:
        self.model = model
        self.ids: list[int] = list(prompt_ids)
        self._pieces: dict[str, tuple[int, ...]] = {}
        self.requests = 0

    def pieces(self, text: str) -> tuple[int, ...]:
        """The server's tokens for ``text`` (no special tokens), memoised."""
        return _pieces(self.model, self._pieces, text)

    def score_block(self, path: Sequence[str], cands: Sequence[Sequence[str]]) -> list[dict[str, float]]:
        """log P(c | context + path[:j]) for every candidate c of every block position j (one request)."""
        flat: list[int] = []
        starts: list[int] = []
        for t in path:
            starts.append(len(flat))
            flat.extend(self.pieces(t))
        index: dict[tuple[int, ...], int] = {}
        seqs: list[list[int]] = []
        firsts: list[int] = []
        for j, cs in enumerate(cands):
            for c in cs:
                q = self.pieces(c)
                if not q:
                    continue
                seq = tuple(self.ids + flat[: starts[j]] + list(q))
                if seq not in index:
                    index[seq] = len(seqs)
                    seqs.append(list(seq))
                    firsts.append(len(self.ids) + starts[j])
        values = self.model.token_logprobs(seqs, firsts) if seqs else []
        self.requests += bool(seqs)
        out: list[dict[str, float]] = []
        for j, cs in enumerate(cands):
            scores: dict[str, float] = {}
            for c in cs:
                q = self.pieces(c)
                if not q:
                    scores[c] = 0.0
                    continue
                seq = tuple(self.ids + flat[: starts[j]] + list(q))
                scores[c] = math.fsum(values[index[seq]])
            out.append(scores)
        return out

    def commit(self, path: Sequence[str], accepted: int, emitted: str | None) -> None:
        """Append the accepted path tokens and the emitted one (the server keeps no state of ours)."""
        for t in path[:accepted]:
            self.ids.extend(self.pieces(t))
        if emitted is not None:
            self.ids.extend(self.pieces(emitted))


def _context(model: Any, prompt_ids: Sequence[int]) -> Any:
    """The pair context for one model: in-process full logits, or a served model scored over HTTP."""
    if hasattr(model, "token_logprobs") and not hasattr(model, "logprobs"):
        return _ServedContext(model, prompt_ids)
    return _PairContext(model, prompt_ids)


class _Pairs:
    """Every active pair's contexts (shared where two roles are one model reading one format)."""

    def __init__(self, pairs: Sequence[Any], prompt: Prompt) -> None:
        from .decoding import render_prompt

        self.terms: list[tuple[float, Any, Any]] = []
        contexts: dict[tuple[int, str], Any] = {}

        def ctx(model: FullLogitsModel, fmt: Any) -> Any:
            key = (id(model), repr(fmt))
            if key not in contexts:
                contexts[key] = _context(model, render_prompt(model, prompt, fmt))
            return contexts[key]

        for p in pairs:
            e = ctx(p.expert, getattr(p, "expert_format", "plain"))
            a = ctx(p.anti_expert, getattr(p, "anti_format", "plain"))
            self.terms.append((float(p.alpha), e, a))
        self.contexts = list(contexts.values())

    def offsets(self, path: Sequence[str], cands: Sequence[Sequence[str]]) -> list[dict[str, float]]:
        """sum_i alpha_i * (expert_i - anti_i) for every candidate of every block position."""
        out: list[dict[str, float]] = [dict.fromkeys(cs, 0.0) for cs in cands]
        if not self.terms:
            return out
        scored = {id(c): c.score_block(path, cands) for c in self.contexts}
        for alpha, e, a in self.terms:
            es, as_ = scored[id(e)], scored[id(a)]
            for j, cs in enumerate(cands):
                for c in cs:
                    out[j][c] += alpha * (es[j][c] - as_[j][c])
        return out

    def draft(self, n: int) -> str:
        """The first pair's expert's greedy draft of the next ``n`` tokens ("" without a pair)."""
        if not self.terms:
            return ""
        expert = self.terms[0][1]
        if not hasattr(expert, "draft"):
            raise InputError(
                "draft='pair' needs the first pair's expert in-process (a served expert cannot draft)"
            )
        return str(expert.draft(n))

    def commit(self, path: Sequence[str], accepted: int, emitted: str | None) -> None:
        for c in self.contexts:
            c.commit(path, accepted, emitted)


# ----------------------------------------------------------------------------- the generator


@dataclass
class _State:
    texts: list[str] = field(default_factory=list)
    ids: list[int | None] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    calls: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    received: int = 0
    changed: list[ChangedToken] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    retokenized: list[dict[str, int]] = field(default_factory=list)
    not_top1: int = 0
    trace: list[StepTrace] = field(default_factory=list)
    base_s: float = 0.0
    pair_s: float = 0.0
    drafted: int = 0
    tokenize_requests: int = 0
    cuts: list[int] = field(default_factory=list)


class BlackBoxProxyGenerator:
    """Generate from a black-box base steered by local expert pairs, through its top-k log-probs.

    ``provider`` needs the ``continue`` capability (e.g. ``OpenAICompletionsProvider``,
    ``ContinueChatProvider``, ``LlamaCppTopKProvider``); ``pairs`` are :class:`~blackbox_proxy.
    experts.ExpertPair` (= ``decoding.ProxyPair``) objects whose models are FullLogitsModels, or
    ``ServerExpertPair`` objects (models served by vLLM: one ``prompt_logprobs`` request per block).
    ``top_logprobs`` is k; ``speculative=False`` asks one token per call. ``block_size`` is the
    first block's length; later blocks adapt between ``min_block`` and ``max_block``.

    ``draft`` says who proposes a block. ``"base"`` (default): the base continues greedily and the
    pair checks each position. ``"pair"``: the first pair's expert drafts the block (greedy, the
    steered text it expects), and the base verifies it in one call, top-k at every drafted position
    and after it (``score_block``: vLLM's ``prompt_logprobs``); the first position whose steered
    choice differs from the draft gets that choice, the rest of the draft is dropped. Both give the
    same tokens as per-token decoding (greedy, or exactly the same distribution when sampling); they
    differ in how many tokens each call yields. After :meth:`stream`, ``last`` holds that
    generation's full result (text, accounting).
    """

    last: BlackBoxGeneration | None = None

    def __init__(
        self,
        provider: Any,
        pairs: Any = (),
        *,
        top_logprobs: int = 20,
        speculative: bool = True,
        block_size: int = 8,
        min_block: int = 2,
        max_block: int = 32,
        draft: Literal["base", "pair"] = "base",
    ) -> None:
        require_capability(provider, CONTINUE, "continue a raw prefix (open-ended black-box generation)")
        if draft not in DRAFTS:
            raise InputError(f"draft must be one of {', '.join(DRAFTS)}, got {draft!r}")
        if draft == "pair":
            require_capability(
                provider,
                SCORE_BLOCK,
                "verify a drafted block in one call (draft='pair': vLLM's prompt_logprobs)",
            )
            if not speculative:
                raise InputError("draft='pair' verifies drafted blocks: it needs speculative=True")
        self.provider = provider
        self.pairs: tuple[Any, ...] = (pairs,) if hasattr(pairs, "alpha") else tuple(pairs)
        for p in self.pairs:
            if not all(hasattr(p, a) for a in ("expert", "anti_expert", "alpha")):
                raise InputError(f"pairs must be ExpertPair / ProxyPair objects, got {type(p).__name__}")
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 1:
            raise InputError(f"top_logprobs must be a positive integer, got {top_logprobs!r}")
        max_k = getattr(provider, "max_k", None)
        if max_k is not None and top_logprobs > max_k:
            raise InputError(f"top_logprobs={top_logprobs} exceeds the provider's limit of {max_k}")
        if not (1 <= min_block <= block_size <= max_block):
            raise InputError(
                f"need 1 <= min_block <= block_size <= max_block, got {min_block}, {block_size}, {max_block}"
            )
        self.k = top_logprobs
        self.speculative = speculative
        self.draft = draft
        self.block_size, self.min_block, self.max_block = block_size, min_block, max_block
        self.chat = getattr(provider, "endpoint", "completions") == "chat"
        caps = getattr(provider, "capabilities", frozenset())
        self.use_ids = not self.chat and CONTINUE_IDS in caps and TOKENIZE in caps
        # a text-only server that says how it tokenises: blocks are cut where the text so far would
        # come back re-tokenised, so every position is read as a one-token request would read it
        self.check_text = not self.chat and not self.use_ids and TOKENIZE in caps and draft == "base"

    # -- public API ------------------------------------------------------------------------------
    def generate(
        self, prompt: Prompt, config: GenerationConfig | None = None, **overrides: Any
    ) -> BlackBoxGeneration:
        """The steered continuation of one prompt (text for Completions; messages for chat)."""
        run = _Run(self, prompt, self._config(config, overrides))
        for _ in run.steps():
            pass
        return run.result()

    def stream(
        self, prompt: Prompt, config: GenerationConfig | None = None, **overrides: Any
    ) -> Iterator[str]:
        """Text chunks of the continuation as they are decided (stop strings never shown)."""
        cfg = self._config(config, overrides)
        run = _Run(self, prompt, cfg)
        shown = ""
        for _ in run.steps():
            st = run.state
            safe = st.text if st.finish is not None else streamable_prefix(st.text, cfg.stop)
            if len(safe) > len(shown) and safe.startswith(shown):
                yield safe[len(shown) :]
                shown = safe
        self.last = run.result()
        if run.state.text != shown and run.state.text.startswith(shown):
            yield run.state.text[len(shown) :]

    def _config(self, config: GenerationConfig | None, overrides: Mapping[str, Any]) -> GenerationConfig:
        cfg = config or GenerationConfig()
        return replace(cfg, **overrides) if overrides else cfg


class _Run:
    """One generation: the base prefix, the pair contexts, the loop over blocks."""

    def __init__(self, gen: BlackBoxProxyGenerator, prompt: Prompt, cfg: GenerationConfig) -> None:
        from .adapters.openai_common import to_messages

        self.gen, self.prompt, self.cfg = gen, prompt, cfg
        self.state = _State()
        self.rng = random.Random(cfg.seed)
        if gen.chat:
            self.messages: Any = to_messages(prompt)
            self.prompt_text = ""
        else:
            if not isinstance(prompt, str) or not prompt:
                raise InputError(
                    f"provider {gen.provider.kind!r} continues raw text: give the prompt as non-empty text "
                    "(render chat messages to text first, or use a chat server with continue_final_message)"
                )
            self.messages = None
            self.prompt_text = prompt
        # drafted blocks come back with token ids (score_block reports them), so a server that can
        # tokenise continues from ids under draft="pair" even without the "tokenize" capability
        by_ids = gen.use_ids or (
            gen.draft == "pair"
            and not gen.chat
            and CONTINUE_IDS in getattr(gen.provider, "capabilities", frozenset())
            and hasattr(gen.provider, "tokenize")
        )
        self.sent_ids = bool(by_ids)
        self.base_ids: list[int] | None = list(gen.provider.tokenize(prompt)) if by_ids else None
        active = [p for p in gen.pairs if float(p.alpha) != 0.0]
        self.pairs = _Pairs(active, prompt)
        self.end_texts = _end_texts(active)
        self.alphas = tuple(float(p.alpha) for p in gen.pairs)
        self.first_prompt_tokens: int | None = None
        self._tok_memo: dict[str, list[int]] = {}
        self.t0 = time.perf_counter()

    # -- the base --------------------------------------------------------------------------------
    def _prefix(self) -> Any:
        """What the base continues from: token ids, the partial message, or the raw text so far."""
        if self.base_ids is not None:
            return self.base_ids
        if self.messages is not None:
            return self.state.text
        return self.prompt_text + "".join(self.state.texts)

    def _block(self, n: int) -> Continuation:
        """The next block with the base's top-k at every position: drafted by the pair and verified
        by the base in one call (``draft="pair"``), or continued by the base itself."""
        if self.gen.draft == "pair" and self.pairs.terms:
            t = time.perf_counter()
            drafted = self.pairs.draft(n)
            self.state.pair_s += time.perf_counter() - t
            if drafted:
                return self._verify(drafted)
        return self._call(n)

    def _verify(self, drafted: str) -> Continuation:
        """The base's top-k at every position of the drafted text and after it (one ``score_block``
        call); an end of text right after the draft ends the returned block there."""
        st, gen = self.state, self.gen
        t = time.perf_counter()
        cont = gen.provider.score_block(self._prefix(), drafted, gen.k)
        st.base_s += time.perf_counter() - t
        st.calls += 1
        st.drafted += 1
        self._bill(cont.usage)
        if cont.finish_reason == "stop" and cont.positions:  # the base ends its text after the draft
            cont = replace(cont, positions=cont.positions[:-1])
        elif self.base_ids is not None and cont.positions:
            # the position after the draft comes from the generated token, reported as text only:
            # dropped, so every emitted token keeps its id (the next draft starts there)
            cont = replace(cont, positions=cont.positions[:-1], finish_reason="length")
        else:
            cont = replace(cont, finish_reason="length")
        st.received += len(cont.positions)
        st.blocks.append(cont.requested)
        return cont

    def _bill(self, usage: Any) -> None:
        """Add one call's usage (cached, prompt and completion tokens) to the accounting."""
        if usage is not None:
            self.state.cached += int(usage.cached)
            self.state.prompt_tokens += usage.prompt_tokens
            self.state.completion_tokens += usage.completion_tokens

    def _call(self, n: int) -> Continuation:
        st, gen = self.state, self.gen
        t = time.perf_counter()
        prefix = self._prefix()
        kwargs = {"messages": self.messages} if self.messages is not None else {}
        cont = gen.provider.continue_prefix(prefix, n, gen.k, **kwargs)
        st.base_s += time.perf_counter() - t
        st.calls += 1
        u = cont.usage
        self._bill(u)
        if u is not None and u.prompt_tokens:
            if self.first_prompt_tokens is None:
                self.first_prompt_tokens = u.prompt_tokens
            elif u.prompt_tokens != self.first_prompt_tokens + len(st.texts):
                st.retokenized.append(
                    {
                        "position": len(st.texts),
                        "expected_prompt_tokens": self.first_prompt_tokens + len(st.texts),
                        "reported_prompt_tokens": u.prompt_tokens,
                    }
                )
        st.received += len(cont.positions)
        st.blocks.append(n)
        return cont

    def _is_end(self, top: Any, text: str) -> bool:
        """Whether candidate ``text`` at this position is an end-of-generation token: by the base's
        own id where the provider can tell (in-process llama.cpp), else by name ("<|im_end|>",
        "<|endoftext|>": an end token of a pair model)."""
        tid = _id_of(top, text)
        check = getattr(self.gen.provider, "is_end_token", None)
        if tid is not None and check is not None:
            return bool(check(tid))
        return bool(text) and text in self.end_texts

    def _tokens_of(self, text: str) -> list[int]:
        """The base server's ids for ``text`` (one tokenize request, remembered for the next check)."""
        got = self._tok_memo.get(text)
        if got is None:
            got = list(self.gen.provider.tokenize(text))
            self.state.tokenize_requests += 1
            if len(self._tok_memo) > 8:
                self._tok_memo.clear()
            self._tok_memo[text] = got
        return got

    def _reads_as_generated(self) -> bool:
        """True when the server reads the text so far as its reading of the text before the last
        token plus exactly one token (that token: token texts are unique), i.e. as it generated it.

        Applied from the second position of a block on, it makes each accepted position's context the
        one a one-token request on the same text gets, so speculative output equals per-token output
        on servers that only take text (where re-sent text may merge or split tokens).
        """
        text = self._prefix()
        last = self.state.texts[-1]
        before = text[: len(text) - len(last)]
        prev, cur = self._tokens_of(before), self._tokens_of(text)
        return len(cur) == len(prev) + 1 and cur[: len(prev)] == prev

    # -- one position ----------------------------------------------------------------------------
    def _candidates(self, top: Any, own: str) -> list[str]:
        """Candidate texts at one position (text prefixes cannot carry a token without text).

        A drafted token outside the base's top-k is no candidate (per-token decoding would never
        see it): the steered choice there comes from the top-k, so the draft is rejected.
        """
        known = top.known()
        if self.gen.draft == "pair" and own not in {e.token for e in top.entries}:
            known.pop(own, None)
        return [c for c in known if c or c == own or self.base_ids is not None]

    def _choose(
        self, top: Any, own: str, ref: str, cands: Sequence[str], offsets: Mapping[str, float]
    ) -> tuple[str, dict[str, float]]:
        """(chosen candidate text, base log-probs of the candidates) at one position; ``own`` is the
        block's token there, ``ref`` what the base alone would emit (the same unless drafted)."""
        known = top.known()
        base = {c: known[c] for c in cands}
        chosen = own
        drafted = self.gen.draft == "pair"
        if not drafted and base[chosen] < max(base.values()) - 1e-9:
            self.state.not_top1 += 1
        steered = {c: lp + offsets.get(c, 0.0) for c, lp in base.items()}
        if self.cfg.analysis:  # the trace names the base's own token (its top-1 under a draft)
            top2 = sorted(steered.values(), reverse=True)[:2]
            margin = top2[0] - top2[1] if len(top2) == 2 else math.inf
            self._last_trace = (ref, known.get(ref, -math.inf), margin, len(steered))
        if chosen not in steered:  # a draft outside the top-k: rejected, the choice is the top-k's
            if self.cfg.greedy:
                best = max(steered.values())
                return next(c for c in base if steered[c] == best), base
            probs = steered_distribution(steered, self.cfg)
            return _draw(sorted(probs.items(), key=lambda kv: -kv[1]), self.rng), base
        if self.cfg.greedy:
            best = max(steered.values())
            if steered[chosen] >= best:  # ties keep the base's own token (identity at alpha = 0)
                return chosen, base
            return next(c for c in base if steered[c] == best), base
        probs = steered_distribution(steered, self.cfg)
        if self.gen.speculative:
            return speculative_sample(probs, chosen, self.rng), base
        return _draw(sorted(probs.items(), key=lambda kv: -kv[1]), self.rng), base

    def _emit(self, text: str, tid: int | None) -> bool:
        """Append one token; True when generation must stop (stop string or token limit)."""
        st = self.state
        if not text and self.base_ids is None:
            raise ProviderError(
                f"the base emitted a token without text (part of a multi-byte character) at position "
                f"{len(st.texts)}; a text prefix cannot re-send it: use a provider that continues from "
                "token ids (in-process llama.cpp)"
            )
        if self.cfg.analysis:
            own, lp, margin, n_c = self._last_trace
            st.trace.append(StepTrace(len(st.texts), own, text, lp, margin, n_c))
        st.texts.append(text)
        st.ids.append(tid)
        if self.base_ids is not None:
            if tid is None:
                self.base_ids = None  # ids unknown from here on: continue from text
            else:
                self.base_ids.append(tid)
        st.text += text
        if self.cfg.stop:
            cut = find_stop(st.text, self.cfg.stop)
            if cut is not None:
                st.text = st.text[:cut]
                st.finish = "stop"
                return True
        if len(st.texts) >= self.cfg.max_new_tokens:
            st.finish = "length"
            return True
        return False

    # -- the loop --------------------------------------------------------------------------------
    def steps(self) -> Iterator[None]:
        """Run to the end, yielding after every emitted token."""
        st, gen = self.state, self.gen
        n = gen.block_size if gen.speculative else 1
        run_avg = float(n)
        try:
            while st.finish is None:
                want = min(n, self.cfg.max_new_tokens - len(st.texts))
                cont = self._block(want)
                if not cont.positions:
                    st.finish = "eos"
                    break
                path = [p.chosen.token if p.chosen is not None else "" for p in cont.positions]
                cands = [self._candidates(p, own) for p, own in zip(cont.positions, path, strict=True)]
                t = time.perf_counter()
                offsets = self.pairs.offsets(path, cands)
                st.pair_s += time.perf_counter() - t
                accepted, emitted, stop, cut = 0, None, False, False
                for j, top in enumerate(cont.positions):
                    if j and gen.check_text and self.base_ids is None and not self._reads_as_generated():
                        st.cuts.append(len(st.texts))  # re-sent text reads otherwise: ask again from here
                        cut = True
                        break
                    own = path[j]
                    # what the base alone would emit here: its own token, or its top-1 under a draft
                    ref = _base_top1(top) if gen.draft == "pair" else own
                    choice, base = self._choose(top, own, ref, cands[j], offsets[j])
                    tid = _id_of(top, choice)
                    if choice != ref:
                        known = top.known()
                        st.changed.append(
                            ChangedToken(
                                len(st.texts),
                                ref,
                                choice,
                                known.get(ref, -math.inf),
                                base[choice],
                                offsets[j].get(choice, 0.0) - offsets[j].get(ref, 0.0),
                            )
                        )
                    if choice != own and self._is_end(top, choice):
                        st.finish = "eos"  # steering chose to end the text here (end of turn / text)
                        stop = True
                        break
                    if choice != own:
                        emitted = choice
                        stop = self._emit(choice, tid)
                        yield None
                        break
                    accepted += 1
                    stop = self._emit(own, tid)
                    yield None
                    if stop:
                        break
                st.accepted.append(accepted)
                if stop:
                    break
                if emitted is None and not cut and cont.ended and accepted == len(cont.positions):
                    st.finish = "eos"
                    break
                self.pairs.commit(path, accepted, emitted)
                if gen.speculative and not cut:
                    if emitted is None:
                        n = min(gen.max_block, max(n, 2 * len(cont.positions)))
                    else:
                        run_avg = 0.6 * run_avg + 0.4 * (accepted + 1)
                        n = max(gen.min_block, min(gen.max_block, round(2 * run_avg)))
        except BlackboxProxyError as exc:
            exc.partial = self.result()  # type: ignore[attr-defined]
            raise

    def result(self) -> BlackBoxGeneration:
        """The generation so far (complete once :meth:`steps` is exhausted)."""
        st, gen = self.state, self.gen
        n_tok = len(st.texts)
        used = sum(st.accepted) + len(st.changed)
        acct = BlackBoxAccounting(
            mode="speculative" if gen.speculative else "per-token",
            sampling=not self.cfg.greedy,
            k=gen.k,
            api_calls=st.calls,
            cached_calls=st.cached,
            generated_tokens=n_tok,
            calls_per_token=st.calls / n_tok if n_tok else float(st.calls),
            prompt_tokens_sent=st.prompt_tokens,
            completion_tokens_billed=st.completion_tokens,
            tokens_received=st.received,
            tokens_discarded=max(st.received - used, 0),
            changed=tuple(st.changed),
            changed_rate=len(st.changed) / n_tok if n_tok else 0.0,
            block_sizes=tuple(st.blocks),
            accepted_per_block=tuple(st.accepted),
            retokenized=tuple(st.retokenized),
            base_not_top1=st.not_top1,
            sent_ids=self.sent_ids,
            wall_seconds=time.perf_counter() - self.t0,
            base_seconds=st.base_s,
            pair_seconds=st.pair_s,
            pair_requests=sum(getattr(c, "requests", 0) for c in self.pairs.contexts),
            draft=gen.draft,
            verified_drafts=st.drafted,
            tokenize_requests=st.tokenize_requests,
            retokenization_cuts=tuple(st.cuts),
        )
        return BlackBoxGeneration(
            prompt=self.prompt,
            text=st.text,
            tokens=tuple(st.texts),
            token_ids=tuple(st.ids),
            finish_reason=(st.finish or "length"),  # type: ignore[arg-type]
            alphas=self.alphas,
            accounting=acct,
            trace=tuple(st.trace) if self.cfg.analysis else None,
        )


def _end_texts(pairs: Sequence[Any]) -> frozenset[str]:
    """Names of the pair models' end-of-generation tokens (how a text-only base names its own)."""
    out: set[str] = set()
    for p in pairs:
        for m in (p.expert, p.anti_expert):
            tok = getattr(m, "tokenizer", None)
            for t in getattr(m, "eos_token_ids", ()) or ():
                name = tok.convert_ids_to_tokens(int(t)) if tok is not None else None
                if isinstance(name, str) and name.startswith("<") and name.endswith(">"):
                    out.add(name)
    return frozenset(out)


def _base_top1(top: Any) -> str:
    """The base's most likely token at one position (ties: the first listed)."""
    best = max(top.entries, key=lambda e: e.logprob) if top.entries else top.chosen
    return str(best.token)


def _id_of(top: Any, text: str) -> int | None:
    """The base's token id for candidate ``text`` at one position, where the provider reported it."""
    if top.chosen is not None and top.chosen.token == text:
        return top.chosen.id
    for e in top.entries:
        if e.token == text and e.id is not None:
            return e.id
    return None
