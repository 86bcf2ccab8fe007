"""The evaluation runner: each question costs one base request and one expert-pair scoring, ever.

For every question the runner asks the base provider for its top-k log-probs ONCE and scores the
expert pair ONCE, and stores both raw results. Every reported answer - base-only, expert-only,
anti-expert-only and proxy-tuned for any number of alphas, policies or strategies - is then derived
from those stored scores with :func:`blackbox_proxy.combine.combine`, without new requests.

Resume: with a ``run_dir`` the runner appends each base response to ``base.jsonl`` the moment it
arrives and each finished question to ``results.jsonl`` (flushed and fsynced per line). A run that
is killed and restarted with the same ``run_dir`` skips finished questions and reuses stored base
responses, so no request is made twice and no finished row is lost. ``run.json`` records what the
raw scores depend on (provider, model, k, endpoint, expert pair) and a restart with different
settings is refused. This store is separate from the provider's response cache
(:class:`blackbox_proxy.cache.ResponseCache`), which can be given to the provider as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..candidates import match_candidates
from ..combine import argmax, combine
from ..errors import BlackboxProxyError, InputError, MissingLogprobsError
from ..prompts import mc_messages, mc_text
from ..types import MCQuestion, TokenLogprob, TopLogprobs, Usage
from . import stats

log = logging.getLogger(__name__)

ENDPOINTS = ("chat", "completions")
RUN_FILE = "run.json"
BASE_FILE = "base.jsonl"
RESULTS_FILE = "results.jsonl"


# --------------------------------------------------------------------------- (de)serialisation


def top_to_json(top: TopLogprobs) -> dict[str, Any]:
    """A JSON-ready dict of a TopLogprobs (inverse of :func:`top_from_json`)."""

    def ent(e: TokenLogprob) -> dict[str, Any]:
        return {"token": e.token, "logprob": e.logprob, "id": e.id}

    u = top.usage
    return {
        "entries": [ent(e) for e in top.entries],
        "k": top.k,
        "chosen": ent(top.chosen) if top.chosen is not None else None,
        "model": top.model,
        "provider": top.provider,
        "usage": None if u is None else [u.prompt_tokens, u.completion_tokens, u.requests, u.cached],
    }


def top_from_json(d: Mapping[str, Any]) -> TopLogprobs:
    """Rebuild a TopLogprobs stored by :func:`top_to_json`."""

    def ent(x: Mapping[str, Any]) -> TokenLogprob:
        return TokenLogprob(str(x["token"]), float(x["logprob"]), x.get("id"))

    u = d.get("usage")
    return TopLogprobs(
        tuple(ent(e) for e in d["entries"]),
        int(d["k"]),
        ent(d["chosen"]) if d.get("chosen") else None,
        str(d.get("model", "")),
        str(d.get("provider", "")),
        None if u is None else Usage(int(u[0]), int(u[1]), int(u[2]), bool(u[3])),
    )


def question_digest(q: MCQuestion) -> str:
    """Short hash of a question's text and options, to catch a reused id with different content."""
    text = json.dumps([q.question, list(q.choices)], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class QuestionRecord:
    """The raw, stored outcome of one question: base top-k and the expert pair's candidate scores.

    ``top`` is None when the base answered without any log-probs (e.g. llama.cpp stopping at once
    on an end-of-text token); ``error`` then says why, and the question counts as all-missing.
    """

    id: str
    labels: tuple[str, ...]
    gold: str | None
    top: TopLogprobs | None
    expert: dict[str, float] | None = None
    anti_expert: dict[str, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "labels": list(self.labels),
            "gold": self.gold,
            "top": None if self.top is None else top_to_json(self.top),
            "expert": self.expert,
            "anti_expert": self.anti_expert,
            "meta": self.meta,
            "digest": self.digest,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> QuestionRecord:
        return cls(
            str(d["id"]),
            tuple(d["labels"]),
            d.get("gold"),
            top_from_json(d["top"]) if d.get("top") else None,
            d.get("expert"),
            d.get("anti_expert"),
            dict(d.get("meta") or {}),
            str(d.get("digest", "")),
            str(d.get("error") or ""),
        )


class JsonlStore:
    """Append-only JSONL keyed by ``id``: each append is flushed and fsynced; a torn last line is dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict[str, Any]]:
        """Every complete record by id; a partial trailing line (a killed write) is cut off the file."""
        out: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return out
        data = self.path.read_bytes()
        good = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            out[str(rec["id"])] = rec
            good += len(line)
        if good < len(data):
            log.warning("%s: dropping %d bytes of an unfinished record", self.path, len(data) - good)
            with self.path.open("r+b") as fh:
                fh.truncate(good)
        return out

    def append(self, rec: Mapping[str, Any]) -> None:
        """Write one record as a line and make it durable before returning."""
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


# --------------------------------------------------------------------------- deriving answers


def _alpha_key(a: float) -> str:
    return f"{a:g}"


def derive_row(
    rec: QuestionRecord, alphas: Sequence[float], *, policy: str = "floor", strategy: str = "proxy"
) -> dict[str, Any]:
    """One results-table row from stored scores: base, expert, anti-expert and proxy answers per alpha."""
    labels = rec.labels
    gold = rec.gold or ""
    if rec.top is None:  # the base returned no log-probs at all: nothing to steer
        base: dict[str, float | None] = dict.fromkeys(labels)
        missing, bound, c0 = list(labels), None, None
        base_letter = None
    else:
        base = match_candidates(rec.top, labels)
        missing = [lab for lab in labels if base[lab] is None]
        bound = rec.top.missing_bound()
        c0 = combine(base, [], [], policy=policy, strategy="proxy", bound=bound)
        base_letter = None if c0.excluded else c0.base_letter

    def ok(letter: str | None) -> bool | None:
        return None if not gold else letter == gold

    row: dict[str, Any] = {
        "id": rec.id,
        "week": rec.meta.get("week", ""),
        "date": rec.meta.get("date", ""),
        "source": rec.meta.get("source", ""),
        "n_choices": len(labels),
        "gold": gold,
        "n_missing": len(missing),
        "missing": "".join(missing),
        "all_missing": len(missing) == len(labels),
        "base_letter": base_letter or "",
        "base_correct": ok(base_letter),
    }
    has_pair = rec.expert is not None and rec.anti_expert is not None
    if has_pair:
        exp_letter, anti_letter = argmax(rec.expert), argmax(rec.anti_expert)
        row.update(
            expert_letter=exp_letter or "",
            expert_correct=ok(exp_letter),
            anti_letter=anti_letter or "",
            anti_correct=ok(anti_letter),
        )
        for a in alphas:
            letter = None
            if c0 is not None:
                c = combine(
                    base, [(rec.expert, rec.anti_expert)], [a], policy=policy, strategy=strategy, bound=bound
                )
                letter = None if c.excluded else c.letter
            row[f"proxy_letter@{_alpha_key(a)}"] = letter or ""
            row[f"proxy_correct@{_alpha_key(a)}"] = ok(letter)
    u = (rec.top.usage if rec.top is not None else None) or Usage(0, 0, 0)
    row.update(
        error=rec.error,
        prompt_tokens=u.prompt_tokens,
        cached=u.cached,
        model=rec.top.model if rec.top is not None else "",
        base_logprobs=json.dumps({k: v for k, v in base.items()}),
        expert_logprobs=json.dumps(rec.expert) if has_pair else "",
        anti_logprobs=json.dumps(rec.anti_expert) if has_pair else "",
    )
    return row


@dataclass
class EvalResult:
    """All stored question records of a run, plus the settings used to turn them into answers."""

    records: list[QuestionRecord]
    alphas: tuple[float, ...] = (1.0,)
    policy: str = "floor"
    strategy: str = "proxy"
    requests: int = 0

    def table(self, alphas: Sequence[float] | None = None) -> pd.DataFrame:
        """The per-question results table (one row per question), for these or the run's alphas."""
        al = tuple(alphas) if alphas is not None else self.alphas
        rows = []
        for r in self.records:
            try:
                rows.append(derive_row(r, al, policy=self.policy, strategy=self.strategy))
            except BlackboxProxyError as exc:
                raise type(exc)(f"question {r.id!r}: {exc}") from exc
        return pd.DataFrame(rows)

    def systems(self, alphas: Sequence[float] | None = None) -> list[tuple[str, str, float | None]]:
        """(name, correctness column, alpha) of each reported system."""
        al = tuple(alphas) if alphas is not None else self.alphas
        out: list[tuple[str, str, float | None]] = [("base", "base_correct", None)]
        if self.records and self.records[0].expert is not None:
            out += [("expert", "expert_correct", None), ("anti-expert", "anti_correct", None)]
            out += [(f"proxy a={_alpha_key(a)}", f"proxy_correct@{_alpha_key(a)}", a) for a in al]
        return out

    def summary(
        self,
        alphas: Sequence[float] | None = None,
        *,
        exclude_all_missing: bool = True,
        n_boot: int = 2000,
        seed: int = 0,
    ) -> pd.DataFrame:
        """Accuracy with Wilson 95% CIs per system, and each system vs base: McNemar p and bootstrap CI.

        Questions whose every option is missing from the base's top-k (or whose base answer carried
        no log-probs) are dropped from all systems when ``exclude_all_missing`` (as the paper did), so
        the comparisons stay paired.
        """
        return summarize(
            self.table(alphas),
            self.systems(alphas),
            exclude_all_missing=exclude_all_missing,
            n_boot=n_boot,
            seed=seed,
        )

    def sweep(self, alphas: Sequence[float], *, exclude_all_missing: bool = True) -> pd.DataFrame:
        """Accuracy of base, expert, anti-expert and proxy at each alpha (no new requests)."""
        t = self.table(alphas)
        if exclude_all_missing:
            t = t[~t["all_missing"]]
        has_pair = "expert_correct" in t.columns
        rows = []
        for a in alphas:
            row = {"alpha": float(a), "n": len(t), "base": _mean(t["base_correct"])}
            if has_pair:
                row.update(
                    proxy=_mean(t[f"proxy_correct@{_alpha_key(a)}"]),
                    expert=_mean(t["expert_correct"]),
                    anti_expert=_mean(t["anti_correct"]),
                )
            rows.append(row)
        return pd.DataFrame(rows)


def _mean(s: pd.Series) -> float:
    return float(s.astype(bool).mean()) if len(s) else math.nan


def summarize(
    table: pd.DataFrame,
    systems: Sequence[tuple[str, str, float | None]],
    *,
    exclude_all_missing: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Summary rows (system, n, accuracy, CI, delta vs base, McNemar p, bootstrap CI) of a results table."""
    t = table
    n_excl = 0
    if exclude_all_missing and len(t):
        n_excl = int(t["all_missing"].sum())
        t = t[~t["all_missing"]]
    t = t[t["gold"] != ""] if len(t) else t
    rows = []
    for name, col, a in systems:
        if len(t) == 0:
            rows.append({"system": name, "alpha": a, "n": 0, "excluded": n_excl})
            continue
        acc = stats.accuracy(t[col].astype(bool).tolist(), name)
        row: dict[str, Any] = {
            "system": name,
            "alpha": a,
            "n": acc.n,
            "correct": acc.correct,
            "accuracy": acc.accuracy,
            "ci_low": acc.ci_low,
            "ci_high": acc.ci_high,
            "excluded": n_excl,
        }
        if col != "base_correct":
            base = t["base_correct"].astype(bool).tolist()
            other = t[col].astype(bool).tolist()
            mc = stats.mcnemar_exact(base, other)
            bs = stats.paired_bootstrap(base, other, n_boot=n_boot, seed=seed)
            row.update(
                delta_vs_base=bs.diff,
                delta_ci_low=bs.ci_low,
                delta_ci_high=bs.ci_high,
                mcnemar_p=mc.p_value,
                only_base=mc.b,
                only_system=mc.c,
            )
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the runner


class LazyExpertPair:
    """An :class:`~blackbox_proxy.experts.ExpertPair` built on first use.

    Resuming a finished run then loads no model at all. Takes the same arguments as ExpertPair.
    """

    def __init__(
        self, expert: Any, anti_expert: Any, *, chat_template: bool = True, batch_size: int = 8
    ) -> None:
        self.expert_spec, self.anti_spec = expert, anti_expert
        self.chat_template, self.batch_size = chat_template, batch_size
        self._pair: Any = None
        self._lock = threading.Lock()

    @property
    def pair(self) -> Any:
        """The loaded ExpertPair (loaded now if needed)."""
        with self._lock:
            if self._pair is None:
                from ..experts import ExpertPair

                self._pair = ExpertPair(
                    self.expert_spec,
                    self.anti_spec,
                    chat_template=self.chat_template,
                    batch_size=self.batch_size,
                )
            return self._pair

    def identity(self) -> tuple[str, str, bool]:
        """(expert, anti-expert, chat template asked for), without loading anything."""
        return str(self.expert_spec), str(self.anti_spec), bool(self.chat_template)

    def score(self, prompts: Sequence[Any], candidates: Any, **kw: Any) -> Any:
        return self.pair.score(prompts, candidates, **kw)


def pair_identity(pair: Any) -> tuple[str, str, bool] | None:
    """(expert name, anti-expert name, chat template) of a pair, for the run fingerprint."""
    if pair is None:
        return None
    if hasattr(pair, "identity"):
        return pair.identity()
    return str(pair.expert.name), str(pair.anti_expert.name), bool(pair.expert.use_chat_template)


class EvaluationRunner:
    """Evaluate questions with a top-k provider as base and an optional expert pair, with resume.

    ``provider`` follows :class:`blackbox_proxy.adapters.base.TopLogprobsProvider`; ``pair`` is an
    :class:`blackbox_proxy.experts.ExpertPair` (or None for base-only). ``endpoint`` picks the
    prompt style sent to the base (chat messages or completion text); the experts read each
    question in their own format. ``concurrency`` bounds in-flight base requests; questions go in
    chunks of ``chunk_size``, and the base requests of the next chunk overlap the expert scoring
    of the current one.
    """

    def __init__(
        self,
        provider: Any,
        pair: Any = None,
        *,
        k: int = 5,
        endpoint: str = "chat",
        policy: str = "floor",
        strategy: str = "proxy",
        concurrency: int = 4,
        chunk_size: int = 16,
        run_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> None:
        if endpoint not in ENDPOINTS:
            raise InputError(f"unknown endpoint {endpoint!r}; choose one of {ENDPOINTS}")
        if k < 1:
            raise InputError(f"top-logprobs k must be at least 1, got {k}")
        max_k = getattr(provider, "max_k", None)
        if max_k is not None and k > max_k:
            raise InputError(f"--top-logprobs {k} exceeds the provider's limit of {max_k}")
        if concurrency < 1 or chunk_size < 1:
            raise InputError("concurrency and chunk_size must be at least 1")
        self.provider = provider
        self.pair = pair
        self.k = k
        self.endpoint = endpoint
        self.policy = policy
        self.strategy = strategy
        self.concurrency = concurrency
        self.chunk_size = chunk_size
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        #: base requests this runner actually sent (stored responses reused on resume are not counted)
        self.requests = 0

    # -- configuration / stores ----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """What the stored raw scores depend on (never any secret)."""
        ident = pair_identity(self.pair)
        return {
            "provider": str(getattr(self.provider, "kind", type(self.provider).__name__)),
            "model": str(getattr(self.provider, "model", "")),
            "k": self.k,
            "endpoint": self.endpoint,
            "expert": None if ident is None else ident[0],
            "anti_expert": None if ident is None else ident[1],
            "expert_chat_template": None if ident is None else ident[2],
        }

    def _open_stores(self) -> tuple[JsonlStore | None, JsonlStore | None]:
        if self.run_dir is None:
            return None, None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.config()
        cfg_path = self.run_dir / RUN_FILE
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text(encoding="utf-8"))
            diff = {k: (old.get(k), v) for k, v in cfg.items() if old.get(k) != v}
            if diff:
                raise InputError(
                    f"run directory {self.run_dir} holds a run with other settings "
                    f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                    "use a new --run-dir or the same settings"
                )
        else:
            tmp = cfg_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
            tmp.replace(cfg_path)
        return JsonlStore(self.run_dir / BASE_FILE), JsonlStore(self.run_dir / RESULTS_FILE)

    def prompt(self, q: MCQuestion) -> Any:
        """The prompt sent to the base for one question."""
        return mc_messages(q) if self.endpoint == "chat" else mc_text(q)

    def pair_prompt(self, q: MCQuestion) -> Any:
        """What the expert pair reads: the question in each model's own chat format, or the completion text."""
        return q if self.endpoint == "chat" else mc_text(q)

    # -- running -------------------------------------------------------------------------------
    def run(self, questions: Iterable[MCQuestion], alphas: Sequence[float] = (1.0,)) -> EvalResult:
        """Blocking :meth:`arun`; works inside a running event loop (e.g. a notebook) via a thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arun(questions, alphas))
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = asyncio.run(self.arun(questions, alphas))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc

        th = threading.Thread(target=target, name="blackbox-proxy-eval")
        th.start()
        th.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    async def arun(self, questions: Iterable[MCQuestion], alphas: Sequence[float] = (1.0,)) -> EvalResult:
        """Evaluate every question (skipping finished ones in ``run_dir``) and return all records."""
        qs = list(questions)
        al = tuple(float(a) for a in alphas)
        for a in al:
            if math.isnan(a):
                raise InputError("alpha is NaN")
        seen: set[str] = set()
        for q in qs:
            if q.id in seen:
                raise InputError(f"question id {q.id!r} appears twice; ids must be unique within a run")
            seen.add(q.id)
        base_store, res_store = self._open_stores()
        done_raw = res_store.load() if res_store else {}
        tops_raw = base_store.load() if base_store else {}
        digests = {q.id: question_digest(q) for q in qs}
        for store_name, raw in (("results", done_raw), ("base", tops_raw)):
            for qid, rec in raw.items():
                if qid in digests and rec.get("digest") and rec["digest"] != digests[qid]:
                    raise InputError(
                        f"run directory {self.run_dir}: stored {store_name} for question {qid!r} has "
                        "different question text; use a new --run-dir"
                    )
        done = {qid: QuestionRecord.from_json(r) for qid, r in done_raw.items() if qid in digests}
        tops: dict[str, tuple[TopLogprobs | None, str]] = {
            qid: (top_from_json(r["top"]) if r.get("top") else None, str(r.get("error") or ""))
            for qid, r in tops_raw.items()
            if qid in digests
        }
        pending = [q for q in qs if q.id not in done]
        bar = None
        if self.progress and qs:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(qs), initial=len(qs) - len(pending), desc="evaluating", unit="q")
        sem = asyncio.Semaphore(self.concurrency)

        async def fetch(q: MCQuestion) -> tuple[TopLogprobs | None, str]:
            if q.id in tops:
                return tops[q.id]
            error = ""
            async with sem:
                try:
                    top = await self.provider.atop_logprobs(self.prompt(q), self.k)
                except MissingLogprobsError as exc:  # a completed request without log-probs: keep it
                    top, error = None, str(exc)
                    log.warning("question %s: %s", q.id, exc)
            self.requests += 1
            tops[q.id] = (top, error)
            if base_store is not None:
                base_store.append(
                    {
                        "id": q.id,
                        "digest": digests[q.id],
                        "top": None if top is None else top_to_json(top),
                        "error": error,
                    }
                )
            return top, error

        async def fetch_chunk(chunk: Sequence[MCQuestion]) -> list[tuple[TopLogprobs | None, str]]:
            return list(await asyncio.gather(*(fetch(q) for q in chunk)))

        chunks = [pending[i : i + self.chunk_size] for i in range(0, len(pending), self.chunk_size)]
        nxt: asyncio.Task[list[tuple[TopLogprobs | None, str]]] | None = None
        try:
            if chunks:
                nxt = asyncio.ensure_future(fetch_chunk(chunks[0]))
            for i, chunk in enumerate(chunks):
                assert nxt is not None
                chunk_tops = await nxt
                nxt = asyncio.ensure_future(fetch_chunk(chunks[i + 1])) if i + 1 < len(chunks) else None
                if self.pair is not None:
                    scores = await asyncio.to_thread(
                        self.pair.score, [self.pair_prompt(q) for q in chunk], [q.labels for q in chunk]
                    )
                else:
                    scores = [None] * len(chunk)
                for q, (top, error), sc in zip(chunk, chunk_tops, scores, strict=True):
                    rec = QuestionRecord(
                        q.id,
                        q.labels,
                        q.gold_letter,
                        top,
                        None if sc is None else dict(sc.expert),
                        None if sc is None else dict(sc.anti_expert),
                        _meta(q),
                        digests[q.id],
                        error,
                    )
                    if res_store is not None:
                        res_store.append(rec.to_json())
                    done[q.id] = rec
                    if bar is not None:
                        bar.update(1)
        finally:
            if nxt is not None and not nxt.done():
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # already failing
                    await nxt
            if bar is not None:
                bar.close()
        records = [done[q.id] for q in qs]
        return EvalResult(records, al, self.policy, self.strategy, self.requests)


def _meta(q: MCQuestion) -> dict[str, Any]:
    """The small, JSON-safe part of a question's metadata kept in results (not evidence text)."""
    keep = ("week", "date", "source", "source_id")
    return {k: q.meta[k] for k in keep if k in q.meta and isinstance(q.meta[k], (str, int, float))}


def load_run(
    run_dir: str | os.PathLike[str],
    alphas: Sequence[float] = (1.0,),
    *,
    policy: str = "floor",
    strategy: str = "proxy",
) -> EvalResult:
    """Re-open a finished (or partial) run directory's stored records, for new alphas or policies."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        raise InputError(f"{run_dir} holds no {RESULTS_FILE}")
    raw = JsonlStore(path).load()
    return EvalResult([QuestionRecord.from_json(r) for r in raw.values()], tuple(alphas), policy, strategy)
