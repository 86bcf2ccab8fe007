"""Full-logit proxy-tuned generation for self-hosted bases (the white-box path).

At every step each model scores the next token over its full vocabulary, and

    steered = s_base + sum_i alpha_i * (log_softmax(s_expert_i) - log_softmax(s_anti_i))

is decoded (greedy or sampled). The base enters as raw logits: its normaliser is one constant per
row, so softmax and arg-max are unchanged, and with alpha = 0 (or an expert identical to its
anti-expert) the scores are bitwise the base's own, so greedy decoding reproduces the base's
greedy ``generate`` token for token.

* Every model keeps its own KV cache (one ``LogitsSession`` each) and may read the prompt in its
  own format, e.g. the expert its chat template and the base and anti-expert the plain text, as
  the paper did for chat experts; the continuation tokens are shared.
* Models must share one vocabulary (checked up front, :class:`VocabularyMismatchError` names the
  first differing token). Logits wider than the vocabulary (Qwen pads its output layer to 151,936
  rows while its hub tokenizer has 151,665 tokens) are cut to the shared vocabulary before the
  log-softmax, so padding columns are never sampled and take no probability mass.
* Batches are left-padded by the transformers backend; llama.cpp runs one sequence per row.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from .adapters.base import FullLogitsModel, LogitsSession, Prompt
from .errors import InputError
from .experts import ExpertPair, PromptFormat
from .sampling import GenerationConfig, find_stop, select_tokens, streamable_prefix
from .vocabulary import shared_vocab_size

#: The pair class of the decoder is the one pair class of the library.
ProxyPair = ExpertPair


__all__ = [
    "Generation",
    "GenerationConfig",
    "ProxyDecoder",
    "ProxyPair",
    "PromptFormat",
    "StepRecord",
    "load_model",
    "pair_offset",
    "render_prompt",
]


def _messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    msgs = [dict(m) for m in prompt]
    if not msgs:
        raise InputError("empty chat prompt: no messages")
    for i, m in enumerate(msgs):
        if "content" not in m or "role" not in m:
            raise InputError(f"chat message {i} needs 'role' and 'content', got keys {sorted(m)}")
    return msgs


def _plain_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(str(m["content"]).strip() for m in _messages(prompt))


def render_prompt(model: FullLogitsModel, prompt: Prompt, fmt: PromptFormat = "plain") -> list[int]:
    """Token ids of ``prompt`` as ``model`` reads it in format ``fmt``.

    "plain": the text itself (chat messages: their contents joined by blank lines); "chat": the
    model's chat template with the assistant turn opened (a string becomes one user message).
    """
    if isinstance(prompt, str) and not prompt:
        raise InputError("empty prompt")
    if fmt == "chat":
        ids = model.encode_chat(_messages(prompt))
    elif fmt == "plain":
        ids = model.encode(_plain_text(prompt))
    elif callable(fmt):
        text = fmt(prompt)
        if not isinstance(text, str):
            raise InputError(f"prompt format function returned {type(text).__name__}, expected str")
        ids = model.encode(text)
    else:
        raise InputError(f"unknown prompt format {fmt!r}: use 'plain', 'chat' or a function")
    if not ids:
        raise InputError(f"prompt encodes to no tokens for model {model.name!r}")
    return list(ids)


def pair_offset(expert_logprobs: Any, anti_logprobs: Any, alpha: float) -> Any:
    """alpha * (expert - anti) on log-softmaxed rows; 0 where both are -inf (a token both rule out)."""
    import torch

    diff = expert_logprobs - anti_logprobs
    return alpha * torch.where(torch.isnan(diff), torch.zeros_like(diff), diff)


@dataclass(frozen=True)
class StepRecord:
    """One generated token and its log-prob under each model (for token-level analysis, paper §6.1).

    All log-probs are log-softmax over the shared vocabulary at temperature 1; ``steered_logprob``
    is the proxy-tuned distribution's (before temperature / top-k / top-p).
    """

    row: int
    step: int
    token_id: int
    token: str
    base_logprob: float
    steered_logprob: float
    expert_logprobs: tuple[float, ...]
    anti_logprobs: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """Flat dict: one column per expert / anti-expert (expert_0_logprob, anti_0_logprob...)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("expert_logprobs", "anti_logprobs")}
        for i, (e, a) in enumerate(zip(self.expert_logprobs, self.anti_logprobs, strict=True)):
            d[f"expert_{i}_logprob"] = e
            d[f"anti_{i}_logprob"] = a
        return d


@dataclass(frozen=True)
class Generation:
    """One prompt's continuation: text (stop string removed), token ids (EOS included), why it ended."""

    prompt: Prompt
    text: str
    token_ids: tuple[int, ...]
    finish_reason: Literal["eos", "stop", "length"]
    alphas: tuple[float, ...] = ()
    analysis: tuple[StepRecord, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat dict (one DataFrame row); the analysis is left out (see :meth:`analysis_frame`)."""
        return {
            "prompt": self.prompt if isinstance(self.prompt, str) else list(self.prompt),
            "text": self.text,
            "n_tokens": len(self.token_ids),
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "alphas": list(self.alphas),
        }

    def analysis_frame(self) -> Any:
        """The per-step records as a pandas DataFrame (requires ``analysis=True``)."""
        import pandas as pd

        if self.analysis is None:
            raise InputError("this generation was run without analysis=True")
        return pd.DataFrame([r.to_dict() for r in self.analysis])


@dataclass
class _Row:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    shown: str = ""
    finish: str | None = None
    records: list[StepRecord] = field(default_factory=list)


class _BatchRun:
    """Lock-step decoding of one batch: all sessions advance by one shared token per step."""

    def __init__(
        self,
        decoder: ProxyDecoder,
        prompts: Sequence[Prompt],
        config: GenerationConfig,
        *,
        live_text: bool = False,
    ) -> None:
        import torch

        #: decode the text after every step (streaming, stop strings); otherwise once at the end
        self.live_text = live_text or bool(config.stop)

        self._torch = torch
        self.decoder = decoder
        self.config = config
        self.pairs = [p for p in decoder.pairs if p.alpha != 0]
        self.eos = config.eos_token_ids if config.eos_token_ids is not None else decoder.base.eos_token_ids
        self.rows = [_Row() for _ in prompts]
        self.generator = None
        if not config.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(
                config.seed if config.seed is not None else int(torch.seed() % (2**63))
            )
        self.sessions: list[LogitsSession] = []
        roles: list[tuple[FullLogitsModel, PromptFormat]] = [(decoder.base, decoder.base_format)]
        for p in decoder.pairs if config.analysis else self.pairs:
            roles += [(p.expert, p.expert_format), (p.anti_expert, p.anti_format)]
        self.analysed_pairs = list(decoder.pairs) if config.analysis else self.pairs
        try:
            for model, fmt in roles:
                self.sessions.append(model.open([render_prompt(model, pr, fmt) for pr in prompts]))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for s in self.sessions:
            s.close()
        self.sessions = []

    def step(self, step: int) -> list[int]:
        """Pick one token per row from the current logits (rows already finished get a filler)."""
        torch = self._torch
        n = self.decoder.vocab_size
        base = self.sessions[0].logits()[:, :n]
        offset = None
        expert_lp, anti_lp = [], []
        for i, pair in enumerate(self.analysed_pairs):
            e = torch.log_softmax(self.sessions[1 + 2 * i].logits()[:, :n], dim=-1)
            a = torch.log_softmax(self.sessions[2 + 2 * i].logits()[:, :n], dim=-1)
            expert_lp.append(e)
            anti_lp.append(a)
            if pair.alpha != 0:
                term = pair_offset(e, a, pair.alpha)
                offset = term if offset is None else offset + term
        steered = base if offset is None else base + offset
        chosen = select_tokens(steered, self.config, self.generator)
        tokens = [int(t) for t in chosen.tolist()]
        if self.config.analysis:
            idx = chosen.view(-1, 1)
            base_lp = torch.log_softmax(base, dim=-1).gather(1, idx).view(-1).tolist()
            steer_lp = torch.log_softmax(steered, dim=-1).gather(1, idx).view(-1).tolist()
            e_lp = [x.gather(1, idx).view(-1).tolist() for x in expert_lp]
            a_lp = [x.gather(1, idx).view(-1).tolist() for x in anti_lp]
            for r, row in enumerate(self.rows):
                if row.finish is None:
                    row.records.append(
                        StepRecord(
                            r,
                            step,
                            tokens[r],
                            self.decoder.base.decode([tokens[r]]),
                            base_lp[r],
                            steer_lp[r],
                            tuple(x[r] for x in e_lp),
                            tuple(x[r] for x in a_lp),
                        )
                    )
        return tokens

    def accept(self, tokens: Sequence[int]) -> None:
        """Append each unfinished row's token, then finish rows at EOS or a stop string."""
        stops = self.config.stop
        for row, tok in zip(self.rows, tokens, strict=True):
            if row.finish is not None:
                continue
            row.ids.append(tok)
            if self.config.stop_at_eos and tok in self.eos:
                row.finish = "eos"
                continue
            if not self.live_text:
                continue
            row.text = self.decoder.base.decode(row.ids)
            if stops:
                cut = find_stop(row.text, stops)
                if cut is not None:
                    row.text = row.text[:cut]
                    row.finish = "stop"

    def feed(self, tokens: Sequence[int]) -> None:
        """Advance every session by the chosen tokens (finished rows' tokens are ignored fillers)."""
        for s in self.sessions:
            s.feed(tokens)

    def run(self) -> Iterator[None]:
        """Decode to the end, yielding after every step (for streaming)."""
        cfg = self.config
        for step in range(cfg.max_new_tokens):
            tokens = self.step(step)
            self.accept(tokens)
            yield None
            if all(r.finish is not None for r in self.rows) or step == cfg.max_new_tokens - 1:
                break
            self.feed(tokens)
        for row in self.rows:
            if row.finish is None:
                row.finish = "length"
            if not self.live_text:
                row.text = self.decoder.base.decode(row.ids)


class ProxyDecoder:
    """Generate from a base steered by expert pairs, over the full shared vocabulary.

    ``base`` and the pair models are :class:`FullLogitsModel` objects (transformers or llama.cpp);
    the same object may serve several roles. ``base_format`` says how the base reads prompts.
    """

    def __init__(
        self,
        base: FullLogitsModel,
        pairs: ProxyPair | Sequence[ProxyPair] = (),
        *,
        base_format: PromptFormat = "plain",
        batch_size: int = 8,
    ) -> None:
        self.base = base
        self.pairs: tuple[ProxyPair, ...] = (pairs,) if isinstance(pairs, ProxyPair) else tuple(pairs)
        for p in self.pairs:
            if not isinstance(p, ProxyPair):
                raise InputError(f"pairs must be ProxyPair objects, got {type(p).__name__}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.base_format = base_format
        self.batch_size = batch_size
        models = [base] + [m for p in self.pairs for m in (p.expert, p.anti_expert)]
        #: columns of the logits that are real shared tokens (see module docstring)
        self.vocab_size = shared_vocab_size(models)

    def _config(self, config: GenerationConfig | None, overrides: Mapping[str, Any]) -> GenerationConfig:
        cfg = config or GenerationConfig()
        return replace(cfg, **overrides) if overrides else cfg

    def _result(self, prompt: Prompt, row: _Row, cfg: GenerationConfig) -> Generation:
        return Generation(
            prompt=prompt,
            text=row.text,
            token_ids=tuple(row.ids),
            finish_reason=row.finish or "length",  # type: ignore[arg-type]
            alphas=tuple(p.alpha for p in self.pairs),
            analysis=tuple(row.records) if cfg.analysis else None,
        )

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        config: GenerationConfig | None = None,
        *,
        progress: bool = False,
        **overrides: Any,
    ) -> list[Generation]:
        """Continuations of a prompt or a list of prompts, in batches of ``batch_size`` (left-padded).

        ``overrides`` are GenerationConfig fields (max_new_tokens=..., temperature=..., stop=...).
        """
        cfg = self._config(config, overrides)
        items = _as_prompt_list(prompts)
        out: list[Generation] = []
        starts = range(0, len(items), self.batch_size)
        if progress and len(items) > self.batch_size:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="generate", unit="batch")
        for start in starts:
            chunk = items[start : start + self.batch_size]
            run = _BatchRun(self, chunk, cfg)
            try:
                for _ in run.run():
                    pass
            finally:
                run.close()
            out.extend(self._result(p, r, cfg) for p, r in zip(chunk, run.rows, strict=True))
        return out

    def stream(
        self, prompt: Prompt, config: GenerationConfig | None = None, **overrides: Any
    ) -> Iterator[str]:
        """Text chunks of one prompt's continuation as they are decided (stop strings never shown)."""
        cfg = self._config(config, overrides)
        if not isinstance(prompt, str):
            _messages(prompt)
        run = _BatchRun(self, [prompt], cfg, live_text=True)
        row = run.rows[0]
        try:
            for _ in run.run():
                safe = row.text if row.finish is not None else streamable_prefix(row.text, cfg.stop)
                if len(safe) > len(row.shown) and safe.startswith(row.shown):
                    yield safe[len(row.shown) :]
                    row.shown = safe
            if row.text != row.shown and row.text.startswith(row.shown):
                yield row.text[len(row.shown) :]
        finally:
            run.close()


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """A single prompt (string or one chat conversation) or a list of prompts, as a list."""
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if not items:
        raise InputError("no prompts given")
    if all(isinstance(m, Mapping) for m in items):  # one chat conversation
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def load_model(spec: str | os.PathLike[str], backend: str = "auto", **kwargs: Any) -> FullLogitsModel:
    """:func:`blackbox_proxy.models.load_model`, re-exported where the decoder's users look for it."""
    from .models import load_model as _load

    return _load(spec, backend, **kwargs)
