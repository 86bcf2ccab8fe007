"""White-box model on ``transformers``: full next-token logits with a KV cache and left padding.

The forward passes mirror ``model.generate`` (position ids from the attention mask, the mask
dropped when a batch has no padding, ``logits_to_keep=1``), so greedy decoding through this
adapter reproduces the model's own greedy ``generate`` token for token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError

KIND = "transformers"


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
        """Log-softmax at the last ``keep`` positions of each sequence: one left-padded forward pass."""
        import torch

        if not seqs or any(not s for s in seqs):
            raise InputError(f"logprobs() needs non-empty sequences (model {self.name!r})")
        width = max(len(s) for s in seqs)
        if keep < 1 or keep > width:
            raise InputError(f"keep={keep} must be between 1 and the longest sequence's length")
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
