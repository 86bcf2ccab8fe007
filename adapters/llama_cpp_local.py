"""White-box model on llama.cpp (llama-cpp-python): full next-token logits from a GGUF file on CPU.

This is how people self-host GGUF models. A session decodes all rows of a batch together in one
llama.cpp context with one sequence (and one KV-cache stream) per row, so no padding is needed.
It drives llama.cpp's C API through llama-cpp-python's thin wrappers (``llama_cpp._internals``,
tested with 0.3.36), because the high-level ``Llama`` class keeps a single sequence.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError, ModelSpecError

KIND = "llama-cpp"
#: shortest shared prefix worth keeping (shorter ones are scored with the rows)
MIN_SHARED_PREFIX = 8


def _decode_once(
    lib: Any, ctx: Any, batch: Any, items: Sequence[tuple[int, int, int, bool]], n_vocab: int, where: str
) -> list[Any]:
    """One llama_decode of (seq, pos, token, want_logits) items; copies of the wanted logits rows."""
    import numpy as np

    for i, (seq, pos, token, want) in enumerate(items):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = want
    batch.n_tokens = len(items)
    code = lib.llama_decode(ctx, batch)
    if code != 0:
        raise InputError(f"llama_decode failed with code {code} ({where})")
    rows = []
    for i, (_, _, _, want) in enumerate(items):
        if want:
            ptr = lib.llama_get_logits_ith(ctx, i)
            rows.append(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy())
    return rows


def _context_params(owner: LlamaCppModel, n_seq: int, n_ctx: int, unified: bool) -> Any:
    """llama.cpp context parameters for ``owner``'s settings: ``n_seq`` sequences in ``n_ctx`` cells."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_seq_max = n_seq
    params.n_ctx = n_ctx
    params.kv_unified = unified
    params.n_batch = owner.n_batch
    params.n_ubatch = owner.n_batch
    params.n_threads = owner.n_threads
    params.n_threads_batch = owner.n_threads
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if owner.flash_attn
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    return params


def _free_context(owner: Any) -> None:
    """Free ``owner._ctx`` and ``owner._batch`` (a session's or scorer's), once."""
    if owner._ctx is not None:
        owner._ctx.close()
        owner._ctx = None
    if owner._batch is not None:
        owner._lib.llama_batch_free(owner._batch)
        owner._batch = None


class LlamaCppSession:
    """KV-cached decoding of one batch: row i is llama.cpp sequence i of a fresh context."""

    def __init__(
        self, owner: LlamaCppModel, prompts: Sequence[Sequence[int]], keep: int = 1, *, compact: bool = False
    ) -> None:
        """``compact``: one unified KV buffer just large enough for the prompts (one-shot scoring, no
        feeding), instead of an ``n_ctx`` stream per row."""
        import llama_cpp
        from llama_cpp import _internals

        self._lib = llama_cpp
        self._owner = owner
        self.batch_size = len(prompts)
        if compact:  # scoring only: the rows share one buffer sized to their tokens
            n_ctx, unified = -(-sum(len(p) for p in prompts) // 256) * 256 + 256, True
        else:  # each row gets its own n_ctx-sized stream
            n_ctx, unified = owner.n_ctx * self.batch_size, False
        params = _context_params(owner, self.batch_size, n_ctx, unified)
        longest = max(len(p) for p in prompts)
        if longest >= owner.n_ctx:
            raise InputError(
                f"a prompt has {longest} tokens; model {owner.name!r} was opened with n_ctx={owner.n_ctx}"
            )
        self._ctx = _internals.LlamaContext(model=owner.llama_model, params=params, verbose=False)
        self._batch = llama_cpp.llama_batch_init(max(owner.n_batch, self.batch_size), 0, 1)
        self._positions = [len(p) for p in prompts]
        self._logits = self._prefill(prompts, keep)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[Any]:
        """Decode (seq, pos, token, want_logits) items in one llama_decode call; return wanted rows."""
        where = f"context full? n_ctx={self._owner.n_ctx} per row"
        return _decode_once(self._lib, self._ctx.ctx, self._batch, items, self._owner.vocab_size, where)

    def _prefill(self, prompts: Sequence[Sequence[int]], keep: int = 1) -> Any:
        """Evaluate the prompts; logits of the last ``keep`` positions of each, by sequence then position."""
        import numpy as np
        import torch

        items = [
            (seq, pos, int(tok), pos >= len(p) - keep)
            for seq, p in enumerate(prompts)
            for pos, tok in enumerate(p)
        ]
        rows: list[Any] = []
        step = self._owner.n_batch
        for start in range(0, len(items), step):
            rows.extend(self._decode(items[start : start + step]))
        return torch.from_numpy(np.stack(rows))

    def logits(self) -> Any:
        """Next-token logits, [batch, vocab_size] float32."""
        if self._ctx is None:
            raise InputError("this decoding session is closed")
        return self._logits

    def feed(self, token_ids: Sequence[int]) -> None:
        """Append one token per row (all rows in one llama_decode call)."""
        import numpy as np
        import torch

        if self._ctx is None:
            raise InputError("this decoding session is closed")
        if len(token_ids) != self.batch_size:
            raise InputError(f"feed() got {len(token_ids)} tokens for a batch of {self.batch_size}")
        if max(self._positions) + 1 >= self._owner.n_ctx:
            raise InputError(
                f"context full: model {self._owner.name!r} was opened with n_ctx={self._owner.n_ctx}"
            )
        items = [(seq, self._positions[seq], int(tok), True) for seq, tok in enumerate(token_ids)]
        self._positions = [p + 1 for p in self._positions]
        self._logits = torch.from_numpy(np.stack(self._decode(items)))

    def close(self) -> None:
        """Free the llama.cpp context and batch."""
        _free_context(self)
        self._logits = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have freed llama_cpp already
            self.close()

    def __enter__(self) -> LlamaCppSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PrefixScorer:
    """One persistent llama.cpp context for scoring: sequence 0 keeps a shared prefix, rows use 1.

    The KV buffer is unified, so copying the prefix into the row's sequence adds the row's id to the
    prefix cells instead of duplicating them; the row's own cells are removed after it is scored.
    """

    def __init__(self, owner: LlamaCppModel) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self._lib = llama_cpp
        self._owner = owner
        params = _context_params(owner, 2, 2 * owner.n_ctx, True)  # a prefix and a row, each < n_ctx
        self._ctx = _internals.LlamaContext(model=owner.llama_model, params=params, verbose=False)
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(owner.n_batch, 0, 1)
        #: token ids held by sequence 0
        self.prefix: tuple[int, ...] = ()

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[Any]:
        """Decode (seq, pos, token, want_logits) items in n_batch chunks; the wanted logits rows."""
        rows: list[Any] = []
        step = self._owner.n_batch
        where = f"while scoring with model {self._owner.name!r}"
        for start in range(0, len(items), step):
            part = items[start : start + step]
            rows.extend(
                _decode_once(self._lib, self._ctx.ctx, self._batch, part, self._owner.vocab_size, where)
            )
        return rows

    def _keep_prefix(self, seqs: Sequence[Sequence[int]], keep: int) -> int:
        """Tokens of sequence 0 the rows can start from: the kept prefix cut to what they share, or a
        newly evaluated one; 0 when the rows share too little."""
        limit = min(len(s) for s in seqs) - keep
        first = seqs[0]
        common = 0
        while common < limit and all(s[common] == first[common] for s in seqs):
            common += 1
        kept = 0
        while kept < len(self.prefix) and kept < common and self.prefix[kept] == first[kept]:
            kept += 1
        if kept >= MIN_SHARED_PREFIX:
            if kept < len(self.prefix):
                self._lib.llama_memory_seq_rm(self._mem, 0, kept, -1)
                self.prefix = self.prefix[:kept]
            return kept
        self._lib.llama_memory_seq_rm(self._mem, 0, -1, -1)
        self.prefix = ()
        if common < MIN_SHARED_PREFIX:
            return 0
        self._decode([(0, pos, int(t), False) for pos, t in enumerate(first[:common])])
        self.prefix = tuple(int(t) for t in first[:common])
        self._owner.prefix_stats["prefix_tokens"] += common
        return common

    def score(self, seqs: Sequence[Sequence[int]], keep: int) -> Any:
        """Logits of the last ``keep`` positions of each row (fewer for shorter rows), row by row.

        Rows are decoded one after another as sequence 1, each on top of the kept prefix: a row's
        numbers then never depend on which other rows share its batch (llama.cpp's sums move with
        the KV layout), and on CPU it is faster than one decode of all rows, whose attention spans
        every row's cells.
        """
        import numpy as np
        import torch

        p = self._keep_prefix(seqs, keep)
        out: list[Any] = []
        for s in seqs:
            try:
                if p:
                    self._lib.llama_memory_seq_cp(self._mem, 0, 1, 0, p)
                out.extend(
                    self._decode([(1, pos, int(s[pos]), pos >= len(s) - keep) for pos in range(p, len(s))])
                )
            finally:
                self._lib.llama_memory_seq_rm(self._mem, 1, -1, -1)
        stats = self._owner.prefix_stats
        stats["reused_tokens"] += p * len(seqs)
        stats["calls"] += 1
        return torch.from_numpy(np.stack(out))

    def close(self) -> None:
        """Free the context and its batch."""
        _free_context(self)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class LlamaCppModel:
    """A GGUF model on llama.cpp behind the FullLogitsModel protocol (CPU, full logits every step)."""

    kind = KIND

    def __init__(
        self,
        spec: str | os.PathLike[str],
        *,
        n_ctx: int = 2048,
        n_threads: int = 2,
        n_batch: int = 512,
        name: str | None = None,
        flash_attn: bool = False,
        verbose: bool = False,
    ) -> None:
        """Load ``spec`` (packaged name or .gguf); ``n_ctx`` is per row, ``flash_attn`` as in ``Llama``."""
        import llama_cpp
        from llama_cpp import _internals, _logger

        from ..models import gguf_path

        if n_ctx < 8 or n_threads < 1 or n_batch < 1:
            raise InputError(
                f"bad llama.cpp settings: n_ctx={n_ctx}, n_threads={n_threads}, n_batch={n_batch}"
            )
        path = gguf_path(spec)
        self.name = name or str(spec)
        self.path = path
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_batch = n_batch
        self.flash_attn = flash_attn
        self._lib = llama_cpp
        _logger.set_verbose(verbose)  # llama.cpp's own log lines on stderr (global, as Llama(verbose=...))
        try:
            self.llama_model = _internals.LlamaModel(
                path_model=str(path), params=llama_cpp.llama_model_default_params(), verbose=verbose
            )
        except ValueError as exc:
            raise ModelSpecError(f"llama.cpp could not load {path}: {exc}") from exc
        self.vocab_size = int(self.llama_model.n_vocab())
        eos = {self.llama_model.token_eos(), self.llama_model.token_eot()}
        self.eos_token_ids = frozenset(int(t) for t in eos if t >= 0)
        self._vocab: list[str] | None = None
        self._chat: Any = None
        self.has_chat_template = bool(self.llama_model.metadata().get("tokenizer.chat_template"))
        #: longest sequence a row may hold (the context it was opened with)
        self.max_context = n_ctx
        self.unk_token_id: int | None = None
        #: keep the prefix every scored row shares in a persistent context (see :meth:`logprobs`)
        self.prefix_reuse = True
        self.prefix_stats = {"reused_tokens": 0, "prefix_tokens": 0, "calls": 0}
        self._scorer: _PrefixScorer | None = None
        self._scorer_lock = threading.Lock()

    def vocab(self) -> list[str]:
        """Token texts by id, as stored in the GGUF file."""
        if self._vocab is None:
            self._vocab = [self.llama_model.token_get_text(i) for i in range(self.vocab_size)]
        return self._vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Plain-text token ids (BOS added when the model asks for it, unless told not to)."""
        return list(
            self.llama_model.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False)
        )

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Chat-template token ids from the GGUF's ``tokenizer.chat_template``."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self._chat is None:
            template = self.llama_model.metadata().get("tokenizer.chat_template")
            if not template:
                raise InputError(f"model {self.name!r} has no chat template; use the plain prompt format")
            bos, eos = self.llama_model.token_bos(), self.llama_model.token_eos()
            self._chat = Jinja2ChatFormatter(
                template=template,
                eos_token=self.llama_model.token_get_text(eos) if eos >= 0 else "",
                bos_token=self.llama_model.token_get_text(bos) if bos >= 0 else "",
            )
        text = self._chat(messages=[dict(m) for m in messages]).prompt
        bos = self.llama_model.token_bos()
        starts_with_bos = bos >= 0 and text.startswith(self.llama_model.token_get_text(bos))
        return list(
            self.llama_model.tokenize(text.encode("utf-8"), add_bos=not starts_with_bos, special=True)
        )

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of the ids (control tokens render as nothing)."""
        out = bytearray()
        size = 64
        buf = ctypes.create_string_buffer(size)
        for tok in token_ids:
            n = self._lib.llama_token_to_piece(self.llama_model.vocab, int(tok), buf, size, 0, False)
            if n < 0:  # piece longer than the buffer: grow and retry
                size = -n
                buf = ctypes.create_string_buffer(size)
                n = self._lib.llama_token_to_piece(self.llama_model.vocab, int(tok), buf, size, 0, False)
            out += buf.raw[:n]
        return out.decode("utf-8", errors="replace")

    def open(self, prompts: Sequence[Sequence[int]]) -> LlamaCppSession:
        """Evaluate a batch of prompts, one llama.cpp sequence per row."""
        if not prompts:
            raise InputError("no prompts to decode")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise InputError(f"prompt {i} encodes to no tokens for model {self.name!r}")
        return LlamaCppSession(self, prompts)

    def logprobs(self, seqs: Sequence[Sequence[int]], keep: int = 1) -> Any:
        """Log-softmax at the last ``keep`` positions of each sequence, [batch, keep, vocab] float32.

        With :attr:`prefix_reuse` (the default) the rows are scored one by one in one persistent
        llama.cpp context: a prefix every row shares (at least :data:`MIN_SHARED_PREFIX` tokens,
        outside the last ``keep`` positions) is kept as sequence 0 across calls and shared with each
        row (unified KV: the cells are shared, not copied), so the instruction and few-shot text
        every question repeats is evaluated once, and a row's numbers equal those of the row alone
        in a fresh context whatever batch it came in. Otherwise one fresh context per call.
        """
        import torch

        if not seqs or any(not s for s in seqs):
            raise InputError(f"logprobs() needs non-empty sequences (model {self.name!r})")
        if keep < 1:
            raise InputError(f"keep={keep} must be at least 1")
        longest = max(len(s) for s in seqs)
        if longest >= self.n_ctx:
            raise InputError(
                f"a prompt has {longest} tokens; model {self.name!r} was opened with n_ctx={self.n_ctx}"
            )
        if self.prefix_reuse:
            with self._scorer_lock:
                rows = self._reuse_scorer().score(seqs, keep)
        else:
            with LlamaCppSession(self, seqs, keep=keep, compact=True) as session:
                rows = session.logits()  # the wanted rows, sequence by sequence
        rows = torch.log_softmax(rows, dim=-1)
        # a sequence shorter than keep fills only the end of its window (the rest: -inf, never read)
        out = torch.full((len(seqs), keep, rows.shape[-1]), -math.inf)
        start = 0
        for i, seq in enumerate(seqs):
            n = min(keep, len(seq))
            out[i, keep - n :] = rows[start : start + n]
            start += n
        return out

    def _reuse_scorer(self) -> _PrefixScorer:
        """The persistent scoring context (opened on first use)."""
        if self._scorer is None:
            self._scorer = _PrefixScorer(self)
        return self._scorer

    def clear_prefix_cache(self) -> None:
        """Free the persistent scoring context and its kept prefix (the next call evaluates anew)."""
        with self._scorer_lock:
            if self._scorer is not None:
                self._scorer.close()
            self._scorer = None

    def close(self) -> None:
        """Free the scoring context and the model weights."""
        self.clear_prefix_cache()
        self.llama_model.close()

    def __repr__(self) -> str:
        return f"LlamaCppModel({self.name!r})"
