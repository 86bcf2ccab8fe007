"""Public result and input types shared by every part of blackbox-proxy.

All results are frozen dataclasses with ``to_dict()`` so a batch becomes a pandas DataFrame.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InputError, MissingLogprobsError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _short(value: Any, limit: int = 60) -> str:
    """A value's repr, cut to ``limit`` characters (for one-line error messages)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class TokenLogprob:
    """One token and its log-probability, as a provider returned it."""

    token: str
    logprob: float
    id: int | None = None
    bytes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.logprob, (int, float)) or math.isnan(self.logprob):
            raise MissingLogprobsError(f"token {self.token!r} has a non-numeric log-prob {self.logprob!r}")
        if self.logprob > 1e-4:
            raise MissingLogprobsError(f"token {self.token!r} has a positive log-prob {self.logprob!r}")


@dataclass(frozen=True)
class Usage:
    """Token accounting reported by a provider for one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 1
    cached: bool = False

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.requests + other.requests,
            self.cached and other.cached,
        )


@dataclass(frozen=True)
class TopLogprobs:
    """The top-k log-probs of one generated position (the first answer token).

    ``entries`` holds the provider's top-k list as returned (order and count not trusted);
    ``chosen`` is the token the provider actually emitted, whose log-prob is exact even when
    it lies outside the top k (llama.cpp appends it; vLLM puts it first). ``k`` is the number
    of top entries requested, which bounds what a missing token can weigh.
    """

    entries: tuple[TokenLogprob, ...]
    k: int
    chosen: TokenLogprob | None = None
    model: str = ""
    provider: str = ""
    usage: Usage | None = None

    def __post_init__(self) -> None:
        if not self.entries:
            raise MissingLogprobsError(
                f"provider {self.provider or '?'} returned no top log-probs for model {self.model or '?'}"
            )

    def top_entries(self) -> tuple[TokenLogprob, ...]:
        """The k most likely entries (extra entries, e.g. an appended chosen token, dropped)."""
        ordered = sorted(self.entries, key=lambda e: -e.logprob)
        return tuple(ordered[: self.k]) if self.k > 0 else tuple(ordered)

    def known(self) -> dict[str, float]:
        """Every token text whose log-prob is known exactly (duplicates keep the larger value)."""
        out: dict[str, float] = {}
        items = list(self.entries) + ([self.chosen] if self.chosen is not None else [])
        for e in items:
            if e.token not in out or e.logprob > out[e.token]:
                out[e.token] = e.logprob
        return out

    def missing_bound(self) -> float:
        """Upper bound on the log-prob of any token not among the top k.

        The smaller of the k-th returned log-prob and log(1 - returned probability mass);
        see DESIGN.md. Clamped at log(1e-12) when the returned mass rounds to one.
        """
        top = self.top_entries()
        kth = min(e.logprob for e in top)
        mass = sum(math.exp(e.logprob) for e in {e.token: e for e in top}.values())
        rest = math.log(max(1.0 - mass, 1e-12))
        return min(kth, rest)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> dict[str, Any]:
        """A compact JSON-ready dict (inverse of :meth:`from_json`), as run stores keep it."""

        def ent(e: TokenLogprob) -> dict[str, Any]:
            return {"token": e.token, "logprob": e.logprob, "id": e.id}

        u = self.usage
        return {
            "entries": [ent(e) for e in self.entries],
            "k": self.k,
            "chosen": ent(self.chosen) if self.chosen is not None else None,
            "model": self.model,
            "provider": self.provider,
            "usage": None if u is None else [u.prompt_tokens, u.completion_tokens, u.requests, u.cached],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TopLogprobs:
        """Rebuild a TopLogprobs stored by :meth:`to_json`."""

        def ent(x: Mapping[str, Any]) -> TokenLogprob:
            return TokenLogprob(str(x["token"]), float(x["logprob"]), x.get("id"))

        u = d.get("usage")
        return cls(
            tuple(ent(e) for e in d["entries"]),
            int(d["k"]),
            ent(d["chosen"]) if d.get("chosen") else None,
            str(d.get("model", "")),
            str(d.get("provider", "")),
            None if u is None else Usage(int(u[0]), int(u[1]), int(u[2]), bool(u[3])),
        )


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question; ``answer`` is the 0-based index of the gold option, if known."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # checked, never coerced: None must not become the text "None", nor "abcd" four choices
        if not isinstance(self.id, str) or not self.id.strip():
            raise InputError(f"question id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.question, str):
            raise InputError(
                f"question {self.id!r}: the question text must be a string, got {type(self.question).__name__} "
                f"{_short(self.question)}"
            )
        if isinstance(self.choices, (str, bytes, bytearray, Mapping, AbstractSet)) or not isinstance(
            self.choices, Iterable
        ):
            raise InputError(
                f"question {self.id!r}: choices must be a list of strings, got {type(self.choices).__name__} "
                f"{_short(self.choices)}"
            )
        object.__setattr__(self, "choices", tuple(self.choices))
        for i, c in enumerate(self.choices):
            if not isinstance(c, str):
                raise InputError(
                    f"question {self.id!r}: choice {i} must be a string, got {type(c).__name__} {_short(c)}"
                )
        if self.answer is not None:
            if isinstance(self.answer, bool) or not isinstance(self.answer, numbers.Integral):
                raise InputError(
                    f"question {self.id!r}: answer must be the 0-based index of the gold choice (an int) or "
                    f"None, got {type(self.answer).__name__} {_short(self.answer)}"
                )
            object.__setattr__(self, "answer", int(self.answer))
        if not isinstance(self.meta, Mapping):
            raise InputError(f"question {self.id!r}: meta must be a mapping, got {type(self.meta).__name__}")
        if not self.question.strip():
            raise InputError(f"question {self.id!r}: empty question text")
        if len(self.choices) < 2:
            raise InputError(f"question {self.id!r}: needs at least 2 choices, got {len(self.choices)}")
        if len(self.choices) > len(LETTERS):
            raise InputError(
                f"question {self.id!r}: {len(self.choices)} choices but only {len(LETTERS)} letters exist"
            )
        if any(not c.strip() for c in self.choices):
            raise InputError(f"question {self.id!r}: a choice is empty")
        if self.answer is not None and not (0 <= self.answer < len(self.choices)):
            raise InputError(
                f"question {self.id!r}: answer index {self.answer} out of range for {len(self.choices)} choices"
            )

    @property
    def labels(self) -> tuple[str, ...]:
        """Option letters A, B, C... one per choice."""
        return tuple(LETTERS[: len(self.choices)])

    @property
    def gold_letter(self) -> str | None:
        return None if self.answer is None else LETTERS[self.answer]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["choices"] = list(self.choices)
        d["meta"] = dict(self.meta)
        return d


@dataclass(frozen=True)
class SteeredAnswer:
    """The outcome of proxy-tuning one multiple-choice question.

    ``letter`` is the steered answer (None when the question was excluded by the missing-candidate
    policy), ``base_letter`` the base model's own choice among the options. Distributions map each
    option label to a probability over the candidate set; ``offsets`` is the summed
    ``alpha_i * (expert_i - anti_expert_i)`` per label.
    """

    question_id: str
    labels: tuple[str, ...]
    letter: str | None
    base_letter: str | None
    steered_probs: dict[str, float]
    base_probs: dict[str, float]
    offsets: dict[str, float]
    base_logprobs: dict[str, float]
    missing: tuple[str, ...]
    filled: dict[str, float]
    policy: str
    strategy: str
    alpha: tuple[float, ...]
    excluded: bool = False
    gold_letter: str | None = None
    expert_logprobs: dict[str, float] = field(default_factory=dict)
    anti_expert_logprobs: dict[str, float] = field(default_factory=dict)
    usage: Usage | None = None
    model: str = ""

    @property
    def correct(self) -> bool | None:
        return None if self.gold_letter is None else self.letter == self.gold_letter

    @property
    def base_correct(self) -> bool | None:
        return None if self.gold_letter is None else self.base_letter == self.gold_letter

    def to_dict(self) -> dict[str, Any]:
        """A flat row: one column per option probability, missing flags and usage."""
        row: dict[str, Any] = {
            "id": self.question_id,
            "base_letter": self.base_letter or "",
            "steered_letter": self.letter or "",
            "gold_letter": self.gold_letter or "",
            "excluded": self.excluded,
            "policy": self.policy,
            "strategy": self.strategy,
            "alpha": ",".join(f"{a:g}" for a in self.alpha),
            "n_missing": len(self.missing),
            "missing": "".join(self.missing),
        }
        for lab in self.labels:
            row[f"p_{lab}"] = self.steered_probs.get(lab, 0.0)
        for lab in self.labels:
            row[f"base_p_{lab}"] = self.base_probs.get(lab, 0.0)
        for lab in self.labels:
            row[f"offset_{lab}"] = self.offsets.get(lab, 0.0)
        for lab in self.labels:
            row[f"missing_{lab}"] = lab in self.missing
        u = self.usage or Usage(0, 0, 0)
        row.update(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, model=self.model)
        return row
