"""White-box model on ``transformers``: full next-token logits with a KV cache and left padding.

The forward passes mirror ``model.generate`` (position ids from the attention mask, the mask
dropped when a batch has no padding, ``logits_to_keep=1``), so greedy decoding through this
adapter reproduces the model's own greedy ``generate`` token for token.

Scoring (:meth:`TransformersModel.logprobs`) reuses the KV state of the prefix a batch shares with
the batches before it (chat-template header, system text, instruction, few-shot examples): that
prefix is evaluated once, and each batch evaluates only its rows' own tokens after it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError

KIND = "transformers"
#: shortest shared prefix (tokens) whose KV state :meth:`TransformersModel.logprobs` keeps and reuses
MIN_SHARED_PREFIX = 8
#: largest logits block (bytes) the prefix path computes at once; above it the padded path runs
_MAX_PREFIX_LOGITS_BYTES = 256 * 2**20


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids declared by the tokenizer and by the model's generation config."""
    ids: set[int] = set()
    for value in (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return frozenset(ids)


class TransformersSession:
    """KV-cached decoding of one left-padded batch on a ``transformers`` causal LM."""

    def __init__(self, model: Any, prompts: Sequence[Sequence[int]], pad_token_id: int) -> None:
        import torch
        from transformers import DynamicCache

        self._torch = torch
        self._model = model
        self.batch_size = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((self.batch_size, width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((self.batch_size, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if prompt:
                ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
                mask[row, width - len(prompt) :] = 1
        # As generate(): positions count real tokens only; padding sits at position 0.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        # As generate(): an all-ones mask is dropped for good (same attention kernels, same numbers).
        self._mask: Any = None if bool(mask.all()) else mask
        self._next_position = positions[:, -1:] + 1
        self._cache = DynamicCache(config=model.config)
        self._logits = self._forward(ids, positions)

    def _forward(self, ids: Any, positions: Any) -> Any:
        with self._torch.inference_mode():
            out = self._model(
                input_ids=ids,
                attention_mask=self._mask,
                position_ids=positions,
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :].float()

    def logits(self) -> Any:
        """Next-token logits, [batch, vocab_size] float32."""
        if self._cache is None:
            raise InputError("this decoding session is closed")
        return self._logits

    def feed(self, token_ids: Sequence[int]) -> None:
        """Append one token per row and run one cached forward step."""
        torch = self._torch
        if self._cache is None:
            raise InputError("this decoding session is closed")
        if len(token_ids) != self.batch_size:
            raise InputError(f"feed() got {len(token_ids)} tokens for a batch of {self.batch_size}")
        ids = torch.tensor(list(token_ids), dtype=torch.long).view(self.batch_size, 1)
        if self._mask is not None:
            self._mask = torch.cat([self._mask, self._mask.new_ones((self.batch_size, 1))], dim=-1)
        positions = self._next_position
        self._next_position = positions + 1
        self._logits = self._forward(ids, positions)

    def close(self) -> None:
        """Drop the cache."""
        self._cache = None
        self._logits = None

    def __enter__(self) -> TransformersSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TransformersModel:
    """A ``transformers`` causal LM and its tokenizer behind the FullLogitsModel protocol."""

    kind = KIND

    def __init__(self, model: Any, tokenizer: Any, name: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_token_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = min(self.eos_token_ids) if self.eos_token_ids else 0
        self.pad_token_id = int(pad)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        #: longest sequence the model takes (its position embeddings)
        self.max_context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
        self.unk_token_id = tokenizer.unk_token_id
        self._vocab: list[str] | None = None
        #: reuse the KV state of a prefix shared across :meth:`logprobs` calls (full-attention models only)
        self.prefix_reuse = _prefix_reuse_supported(model)
        #: tokens of :meth:`logprobs` inputs read from the kept prefix state, and prefix tokens evaluated
        self.prefix_stats = {"reused_tokens": 0, "prefix_tokens": 0, "calls": 0}
        self._prefix: tuple[tuple[int, ...], list[tuple[Any, Any]]] | None = None
        self._prefix_lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: str | os.PathLike[str], dtype: Any = None) -> TransformersModel:
        """Load any model spec accepted by ``blackbox_proxy.models`` (packaged name, folder, GGUF, hub id)."""
        from ..models import load_causal_lm

        model, tokenizer = load_causal_lm(spec, dtype=dtype)
        return cls(model, tokenizer, name=str(spec))

    def vocab(self) -> list[str]:
        """Token texts by id (tokenizer vocabulary plus added tokens)."""
        if self._vocab is None:
            mapping = self.tokenizer.get_vocab()
            size = max(len(self.tokenizer), max(mapping.values(), default=-1) + 1)
            texts = [""] * size
            for text, idx in mapping.items():
                texts[idx] = text
            self._vocab = texts
        return self._vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Plain-text token ids, with the special tokens the tokenizer adds itself unless told not to."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Chat-template token ids ending with the assistant turn's opening."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"model {self.name!r} has no chat template; use the plain prompt format")
        out = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(out["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of the ids, special tokens skipped."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def open(self, prompts: Sequence[Sequence[int]]) -> TransformersSession:
        """Prefill a left-padded batch and return its session."""
        if not prompts:
            raise InputError("no prompts to decode")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise InputError(f"prompt {i} encodes to no tokens for model {self.name!r}")
        return TransformersSession(self.model, prompts, self.pad_token_id)

    def logprobs(self, seqs: Sequence[Sequence[int]], keep: int = 1) -> Any:
        """Log-softmax at the last ``keep`` positions of each sequence, [batch, keep, vocab] float32.

        With :attr:`prefix_reuse`, a prefix every sequence shares (at least :data:`MIN_SHARED_PREFIX`
        tokens, outside the last ``keep`` positions) comes from the kept KV state of earlier calls
        or is evaluated once and kept; the rest is one right-padded forward pass after it. Otherwise
        (or when nothing is shared) one left-padded forward pass; both agree to float rounding.
        """
        if not seqs or any(not s for s in seqs):
            raise InputError(f"logprobs() needs non-empty sequences (model {self.name!r})")
        width = max(len(s) for s in seqs)
        if keep < 1 or keep > width:
            raise InputError(f"keep={keep} must be between 1 and the longest sequence's length")
        if self.prefix_reuse:
            with self._prefix_lock:
                out = self._prefix_logprobs(seqs, keep)
            if out is not None:
                return out
        return self._padded_logprobs(seqs, keep)

    def clear_prefix_cache(self) -> None:
        """Forget the kept prefix state (the next :meth:`logprobs` call evaluates its prefix anew)."""
        with self._prefix_lock:
            self._prefix = None

    def _shared_prefix(self, seqs: Sequence[Sequence[int]], keep: int) -> int:
        """Tokens of the kept prefix usable for ``seqs`` (cut to what they share), evaluating a new
        prefix when none is kept or too little of it is shared; 0 when too little is shared at all."""
        import torch

        limit = min(len(s) for s in seqs) - keep
        first = seqs[0]
        common = 0
        while common < limit and all(s[common] == first[common] for s in seqs):
            common += 1
        if common < MIN_SHARED_PREFIX:
            return 0
        if self._prefix is not None:
            ids, kv = self._prefix
            m = 0
            while m < len(ids) and m < common and ids[m] == first[m]:
                m += 1
            if m >= MIN_SHARED_PREFIX:
                if m < len(ids):  # keep only what is still shared (a causal prefix of the state)
                    self._prefix = (ids[:m], [(k[..., :m, :], v[..., :m, :]) for k, v in kv])
                return m
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.inference_mode():
            self.model(
                input_ids=torch.tensor([list(first[:common])], dtype=torch.long),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self._prefix = (tuple(first[:common]), _cache_tensors(cache))
        self.prefix_stats["prefix_tokens"] += common
        return common

    def _prefix_logprobs(self, seqs: Sequence[Sequence[int]], keep: int) -> Any:
        """:meth:`logprobs` after the kept shared prefix; None when the prefix path does not apply."""
        import torch
        from transformers import DynamicCache

        p = self._shared_prefix(seqs, keep)
        if p == 0:
            return None
        rows = len(seqs)
        lengths = [len(s) - p for s in seqs]
        width = max(lengths)
        # positions (after the prefix) whose logits are read: the last `keep` of each row
        wanted = sorted({n - keep + j for n in lengths for j in range(keep)})
        if rows * len(wanted) * self.vocab_size * 4 > _MAX_PREFIX_LOGITS_BYTES:
            return None
        ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, p + width), dtype=torch.long)
        mask[:, :p] = 1
        for i, seq in enumerate(seqs):  # right padding: a row's real tokens never attend to its pads
            ids[i, : lengths[i]] = torch.tensor(list(seq[p:]), dtype=torch.long)
            mask[i, : p + lengths[i]] = 1
        positions = torch.arange(p, p + width, dtype=torch.long).unsqueeze(0).expand(rows, width)
        cache = DynamicCache()
        for layer, (k, v) in enumerate(self._prefix[1]):  # type: ignore[index]
            cache.update(
                k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous(), layer
            )
        index = torch.tensor(wanted, dtype=torch.long)
        with torch.inference_mode():
            try:
                logits = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=index,
                ).logits
            except TypeError:  # a forward without logits_to_keep: this model scores the padded way
                self.prefix_reuse = False
                return None
            lp = torch.log_softmax(logits.float(), dim=-1)
            where = {pos: j for j, pos in enumerate(wanted)}
            pick = torch.tensor(
                [[where[n - keep + j] for j in range(keep)] for n in lengths], dtype=torch.long
            )
            out = lp[torch.arange(rows).unsqueeze(1), pick]
        self.prefix_stats["reused_tokens"] += p * rows
        self.prefix_stats["calls"] += 1
        return out

    def _padded_logprobs(self, seqs: Sequence[Sequence[int]], keep: int) -> Any:
        """:meth:`logprobs` as one left-padded forward pass of the whole sequences."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        with torch.inference_mode():
            try:
                logits = self.model(**kwargs, logits_to_keep=keep, use_cache=False).logits
            except TypeError:  # models whose forward has no logits_to_keep
                logits = self.model(**kwargs, use_cache=False).logits
            return torch.log_softmax(logits[:, -keep:, :].float(), dim=-1)

    def __repr__(self) -> str:
        return f"TransformersModel({self.name!r})"


def _prefix_reuse_supported(model: Any) -> bool:
    """Whether a kept prefix state is exact for ``model``: plain full attention in every layer."""
    cfg = model.config
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "is_encoder_decoder", False):
        return False
    types = getattr(cfg, "layer_types", None) or ()
    return all(t == "full_attention" for t in types)


def _cache_tensors(cache: Any) -> list[tuple[Any, Any]]:
    """The (keys, values) tensors of every layer of a filled ``DynamicCache`` (old and new layouts)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))
