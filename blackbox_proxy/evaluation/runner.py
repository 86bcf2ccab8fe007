"""The evaluation runner: resume and concurrency over the multiple-choice engine.

Each question costs one base request and one scoring per expert pair, ever: the engine
(:class:`blackbox_proxy.rerank.Reranker`) produces one :class:`~blackbox_proxy.rerank.MCRecord`
per question, and every reported answer (base, expert alone, proxy at every alpha of a sweep, the
controls) is derived from the stored records without new requests.

Resume: with a ``run_dir`` each base answer is appended to ``base.jsonl`` the moment it arrives and
each finished record to ``results.jsonl`` (flushed and fsynced per line). A run restarted with the
same ``run_dir`` skips finished questions, reuses stored base answers and retries questions whose
record holds an error. ``run.json`` records what the raw scores depend on (provider, model, k,
endpoint, pairs); a restart with other settings is refused. A corrupt line in a store is reported
with its file and line number and only that record is redone. Gold answers and metadata are not
part of what was paid for: a resume takes them from the current questions.

Graceful stop: while a :class:`StopRequest` is set (the CLI sets one on Ctrl-C or SIGTERM, see
:func:`graceful_stop`), no new base request starts, the requests in flight are awaited for up to
``grace`` seconds (:data:`STOP_GRACE`, 5 s by default) so that every answer already bought lands in
``base.jsonl``, and the run ends with :class:`RunStopped`, which says what was kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputError, RunStopped
from ..experts import ExpertPair, PairScores
from ..files import JsonlStore, atomic_write_json, read_text
from ..option_scoring import OptionScores
from ..rerank import MCRecord, Reranker, check_alphas, derive, question_digest, records_table, sweep_key
from ..types import MCQuestion, TopLogprobs
from . import stats

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
BASE_FILE = "base.jsonl"
RESULTS_FILE = "results.jsonl"
DEBIAS_FILE = "debias.json"

#: seconds a stopped run waits for the base answers in flight to land in the run store
STOP_GRACE = 5.0


def _as_extra(e: Any) -> MCQuestion:
    """A debiasing prompt as a question of its own, keyed by the plan's key."""
    q = e.question
    return MCQuestion(e.key, q.question, q.choices, q.answer, q.meta)


# --------------------------------------------------------------------------- results


def _mean(s: pd.Series) -> float:
    return float(s.astype(bool).mean()) if len(s) else math.nan


def control_records(
    records: Sequence[MCRecord], alphas: Sequence[float], kind: str, seed: int = 0
) -> list[MCRecord]:
    """Records whose pair offsets are replaced by a control that carries no question knowledge.

    ``"mean"``: every question gets the mean offset of each option letter over all questions (a pure
    letter prior); ``"shuffled"``: offsets permuted across questions with the same number of options.
    The offset is the summed ``alpha_i * (expert_i - anti_i)``, held as one pair (expert = offset,
    anti = 0), so derive it at alpha 1 scaled by the sweep value.
    """
    offs: list[dict[str, float] | None] = []
    for r in records:
        if r.top is None or not r.pairs:
            offs.append(None)
            continue
        o = dict.fromkeys(r.labels, 0.0)
        for p, a in zip(r.pairs, alphas, strict=True):
            e, anti = p.as_pair()
            for lab in r.labels:
                o[lab] += a * (e[lab] - anti[lab])
        offs.append(o)
    if kind == "mean":
        sums: dict[str, list[float]] = {}
        for o in offs:
            for lab, v in (o or {}).items():
                sums.setdefault(lab, []).append(v)
        mean = {lab: math.fsum(v) / len(v) for lab, v in sums.items()}
        new = [None if o is None else {lab: mean[lab] for lab in o} for o in offs]
    elif kind == "shuffled":
        rng = random.Random(seed)
        new = list(offs)
        by_n: dict[int, list[int]] = {}
        for i, o in enumerate(offs):
            if o is not None:
                by_n.setdefault(len(o), []).append(i)
        for idx in by_n.values():
            perm = idx[:]
            rng.shuffle(perm)
            for i, j in zip(idx, perm, strict=True):
                new[i] = dict(zip(records[i].labels, offs[j].values(), strict=True))  # type: ignore[union-attr]
    else:
        raise InputError(f"unknown control {kind!r}: use 'mean' or 'shuffled'")
    out = []
    for r, o in zip(records, new, strict=True):
        pairs = () if o is None else (PairScores(o, dict.fromkeys(o, 0.0)),)
        out.append(MCRecord(r.id, r.labels, r.gold, r.top, pairs, r.meta, r.digest, r.error))
    return out


@dataclass
class EvalResult:
    """All stored records of a run, plus the settings used to turn them into answers.

    ``alphas`` holds one weight per pair; ``sweep`` the scale factors reported as
    ``steered_letter@s`` (with one pair and alpha 1 they are the alphas themselves).
    """

    records: list[MCRecord]
    sweep_values: tuple[float, ...] = (1.0,)
    policy: str = "floor"
    strategy: str = "proxy"
    requests: int = 0
    alphas: tuple[float, ...] | None = None
    problems: tuple[str, ...] = ()
    #: the letter-bias correction of the base (None: none) and the extra records it scored
    debias_plan: Any = None
    extra: dict[str, MCRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = max((len(r.pairs) for r in self.records), default=0)
        self.alphas = check_alphas(self.alphas if self.alphas is not None else 1.0, n) if n else ()
        self.sweep_values = tuple(float(s) for s in self.sweep_values)

    @property
    def has_pairs(self) -> bool:
        return any(r.pairs for r in self.records)

    def debiased(self) -> Any:
        """The :class:`~blackbox_proxy.debias.DebiasResult` of the base's letters (None without debiasing)."""
        if self.debias_plan is None or self.debias_plan.method == "none":
            return None
        from .. import debias

        def letters(r: MCRecord | None) -> dict[str, float] | None:
            if r is None or r.top is None:
                return None
            a = derive(r, [0.0] * len(r.pairs), policy=self.policy)
            if a.excluded:
                return None
            return {lab: a.base_logprobs.get(lab, -math.inf) for lab in r.labels}

        observed = {r.id: letters(r) for r in self.records}
        extra = {e.key: letters(self.extra.get(e.key)) for e in self.debias_plan.extra}
        return debias.apply(self.debias_plan, observed, extra)

    def base_overrides(self) -> dict[str, dict[str, float] | None] | None:
        """Debiased base log-probs per question, as the engine's ``base_override`` (None without debiasing)."""
        res = self.debiased()
        if res is None:
            return None
        return {
            qid: None if p is None else {k: (math.log(v) if v > 0 else -math.inf) for k, v in p.items()}
            for qid, p in res.probs.items()
        }

    def table(self, sweep: Sequence[float] | None = None) -> pd.DataFrame:
        """The per-question results table (one :func:`~blackbox_proxy.rerank.record_row` per question).

        ``steered_letter`` is the answer at the per-pair ``alphas`` (``--alpha``); the sweep adds
        ``steered_letter@s`` columns. With debiasing, ``base_letter`` and
        every steered answer start from the debiased base (``raw_base_letter`` is the base as observed).
        """
        sw = tuple(sweep) if sweep is not None else self.sweep_values
        return records_table(
            self.records,
            self.alphas or (),
            policy=self.policy,
            strategy=self.strategy,
            sweep=sw,
            scale=1.0,
            base_overrides=self.base_overrides(),
        )

    def systems(self, sweep: Sequence[float] | None = None) -> list[tuple[str, str, float | None]]:
        """(name, correctness column, sweep value) of each reported system."""
        sw = tuple(sweep) if sweep is not None else self.sweep_values
        out: list[tuple[str, str, float | None]] = [("base", "base_correct", None)]
        if self.has_pairs:
            out += [("expert", "expert_correct", None), ("anti-expert", "anti_correct", None)]
            out += [(f"proxy a={sweep_key(s)}", f"steered_correct@{sweep_key(s)}", s) for s in sw]
        return out

    def control_table(self, kind: str, sweep: Sequence[float] | None = None, seed: int = 0) -> pd.DataFrame:
        """The results table of a control (``"mean"`` or ``"shuffled"`` offsets), same rows and sweep."""
        sw = tuple(sweep) if sweep is not None else self.sweep_values
        recs = control_records(self.records, self.alphas or (), kind, seed)
        return records_table(
            recs,
            (1.0,),  # the control offsets already carry the per-pair alphas; the sweep scales them
            policy=self.policy,
            strategy=self.strategy,
            sweep=sw,
            base_overrides=self.base_overrides(),
        )

    def summary(
        self,
        sweep: Sequence[float] | None = None,
        *,
        exclude_all_missing: bool = True,
        controls: bool = True,
        n_boot: int = 2000,
        seed: int = 0,
    ) -> pd.DataFrame:
        """Accuracy with Wilson 95% CIs per system, and each system vs base: McNemar p and bootstrap CI.

        With pairs and ``controls``, two controls are reported beside the proxy at each sweep value:
        the question-independent mean offset and offsets shuffled across questions; a gain they share
        is a letter prior, not knowledge. Questions whose every option is missing from the base's
        top-k (or that have no base answer) are dropped from all systems when ``exclude_all_missing``
        (as the paper did), so the comparisons stay paired.
        """
        sw = tuple(sweep) if sweep is not None else self.sweep_values
        table = self.table(sw)
        systems = self.systems(sw)
        versus: dict[str, str] = {}
        if controls and self.has_pairs and self.strategy in ("proxy", "entropy_gated"):
            for kind in ("mean", "shuffled"):
                ct = self.control_table(kind, sw, seed)
                for s in sw:
                    col = f"{kind}_control_correct@{sweep_key(s)}"
                    table[col] = ct[f"steered_correct@{sweep_key(s)}"].to_numpy()
                    systems.append((f"{kind}-offset control a={sweep_key(s)}", col, s))
                    if kind == "mean":  # the bar a knowledge gain must clear: the letter prior, same alpha
                        versus[f"proxy a={sweep_key(s)}"] = col
        return summarize(
            table, systems, exclude_all_missing=exclude_all_missing, n_boot=n_boot, seed=seed, versus=versus
        )

    def sweep(self, values: Sequence[float], *, exclude_all_missing: bool = True) -> pd.DataFrame:
        """Accuracy of base, expert, anti-expert and proxy at each sweep value (no new requests)."""
        t = self.table(values)
        if exclude_all_missing and len(t):
            t = t[~t["all_missing"]]
        rows = []
        for s in values:
            row = {"alpha": float(s), "n": len(t), "base": _mean(t["base_correct"]) if len(t) else math.nan}
            if self.has_pairs and len(t):
                row.update(
                    proxy=_mean(t[f"steered_correct@{sweep_key(s)}"]),
                    expert=_mean(t["expert_correct"]),
                    anti_expert=_mean(t["anti_correct"]),
                )
            rows.append(row)
        return pd.DataFrame(rows)


def summarize(
    table: pd.DataFrame,
    systems: Sequence[tuple[str, str, float | None]],
    *,
    exclude_all_missing: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    versus: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Summary rows (system, n, accuracy, CI, delta vs base, McNemar p, bootstrap CI) of a results table.

    ``versus`` maps a system name to a second reference column (the proxy to its mean-offset
    control): those rows also get ``delta_vs_control`` and ``mcnemar_p_vs_control``, paired the same way.
    """
    t = table
    n_excl = 0
    if exclude_all_missing and len(t):
        n_excl = int(t["all_missing"].sum())
        t = t[~t["all_missing"]]
    t = t[t["gold_letter"].astype(str) != ""] if len(t) else t

    def outcomes(column: str) -> list[bool]:
        return t[column].astype(bool).tolist()

    rows = []
    for name, col, a in systems:
        if len(t) == 0:
            rows.append({"system": name, "alpha": a, "n": 0, "excluded": n_excl})
            continue
        mine = outcomes(col)
        acc = stats.accuracy(mine, name)
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
            base = outcomes("base_correct")
            mc = stats.mcnemar_exact(base, mine)
            bs = stats.paired_bootstrap(base, mine, n_boot=n_boot, seed=seed)
            row.update(
                delta_vs_base=bs.diff,
                delta_ci_low=bs.ci_low,
                delta_ci_high=bs.ci_high,
                mcnemar_p=mc.p_value,
                only_base=mc.b,
                only_system=mc.c,
            )
        ref = (versus or {}).get(name)
        if ref is not None and ref in t:
            mc = stats.mcnemar_exact(outcomes(ref), mine)
            row.update(
                delta_vs_control=(mc.c - mc.b) / len(mine) if mine else math.nan,
                mcnemar_p_vs_control=mc.p_value,
            )
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- stopping


class StopRequest:
    """A request to stop a run gracefully (thread- and signal-safe): no new base request starts and
    those in flight are awaited for up to ``grace`` seconds, so that nothing bought is thrown away."""

    def __init__(self, grace: float = STOP_GRACE) -> None:
        if not (isinstance(grace, (int, float)) and math.isfinite(grace) and grace >= 0):
            raise InputError(f"stop grace must be a finite number of seconds >= 0, got {grace!r}")
        self.grace = float(grace)
        #: what asked for the stop (e.g. "SIGINT"), None while running
        self.reason: str | None = None
        self._event = threading.Event()

    def set(self, reason: str = "stop") -> None:
        """Ask the run to stop (the first reason given is kept)."""
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self._event.is_set()


_active_stop: StopRequest | None = None


@contextlib.contextmanager
def graceful_stop(grace: float = STOP_GRACE, *, stream: Any = None) -> Iterator[StopRequest]:
    """While active, Ctrl-C (SIGINT) and SIGTERM stop every :class:`EvaluationRunner` run gracefully.

    The first signal sets the yielded :class:`StopRequest` (in-flight base answers are awaited up to
    ``grace`` seconds, then the run raises :class:`RunStopped`); a second one exits the process at
    once (status 130), like a kill: the run store stays consistent, answers still in flight are lost.
    Outside the main thread no handler is installed, but the request is still honoured.
    """
    global _active_stop
    stop = StopRequest(grace)
    out = stream if stream is not None else sys.stderr
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            with contextlib.suppress(Exception):
                print(f"blackbox-proxy: {name} again: stopped at once", file=out, flush=True)
            os._exit(130)
        stop.set(name)
        with contextlib.suppress(Exception):
            print(
                f"blackbox-proxy: {name}: stopping; waiting up to {stop.grace:g} s for base answers in "
                "flight (press Ctrl-C again to quit at once)",
                file=out,
                flush=True,
            )

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, on_signal)
    before, _active_stop = _active_stop, stop
    try:
        yield stop
    finally:
        _active_stop = before
        for s, h in previous.items():
            signal.signal(s, h)


class _Gate:
    """The engine's provider behind a gate: once a stop is asked for no request starts; counts the
    requests in flight (so a stop can wait for them) and the answers that landed after the stop."""

    def __init__(self, inner: Any, stop: StopRequest) -> None:
        self._inner, self._stop = inner, stop
        self.in_flight = 0
        #: requests in flight at the stop that then brought an answer / failed
        self.landed_after_stop = 0
        self.failed_after_stop = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def atop_logprobs(self, *args: Any, **kwargs: Any) -> Any:
        if self._stop.is_set():
            await asyncio.Event().wait()  # never starts; cancelled when the run ends
        self.in_flight += 1
        try:
            top = await self._inner.atop_logprobs(*args, **kwargs)
        except Exception:
            if self._stop.is_set():
                self.failed_after_stop += 1
            raise
        finally:
            self.in_flight -= 1
        if self._stop.is_set():
            self.landed_after_stop += 1
        return top


# --------------------------------------------------------------------------- the runner


class EvaluationRunner:
    """Evaluate questions through one engine, resumably.

    Give an engine (:class:`~blackbox_proxy.rerank.Reranker`) or the engine's arguments: a
    ``provider`` and ``pair`` (one :class:`~blackbox_proxy.experts.ExpertPair`, a list of them, or
    None for base-only) with ``alpha`` (one weight per pair), ``k``, ``endpoint``, ``policy``,
    ``strategy``, ``concurrency`` (in-flight base requests) and ``chunk_size`` (questions per pair
    batch). ``run_dir`` makes the run resumable. ``stop`` (default: the one of an active
    :func:`graceful_stop`) ends a run gracefully when set: see :class:`StopRequest`.
    """

    def __init__(
        self,
        provider: Any = None,
        pair: ExpertPair | Sequence[ExpertPair] | None = None,
        *,
        engine: Reranker | None = None,
        alpha: float | Sequence[float] = 1.0,
        k: int = 5,
        endpoint: str | None = None,
        policy: str = "floor",
        strategy: str = "proxy",
        concurrency: int | None = None,
        chunk_size: int = 16,
        run_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        debias: str = "none",
        debias_fraction: float = 0.1,
        debias_seed: int = 0,
        stop: StopRequest | None = None,
    ) -> None:
        from ..debias import check_method

        self.debias = check_method(debias)
        if not 0 < debias_fraction <= 1:
            raise InputError(f"debias fraction must be in (0, 1], got {debias_fraction}")
        self.debias_fraction, self.debias_seed = float(debias_fraction), int(debias_seed)
        if engine is None:
            if provider is None:
                raise InputError("EvaluationRunner needs a provider or an engine")
            pairs = () if pair is None else ((pair,) if isinstance(pair, ExpertPair) else tuple(pair))
            engine = Reranker(
                provider,
                pairs,
                alpha,
                policy=policy,
                strategy=strategy,
                k=k,
                endpoint=endpoint,
                base_concurrency=concurrency,
                chunk_size=chunk_size,
            )
        self.engine = engine
        #: the base alone, for the extra prompts of debiasing (pairs do not score those)
        self._base_engine = Reranker(
            engine.provider,
            (),
            policy=engine.policy,
            k=engine.k,
            endpoint=engine.endpoint,
            base_concurrency=engine.base_concurrency,
            prompt=engine.prompt,
            max_prompt_tokens=engine.max_prompt_tokens,
            template=engine.template,
        )
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.stop = stop

    @property
    def requests(self) -> int:
        """Base requests actually sent (stored answers reused on resume are not counted)."""
        return self.engine.requests + self._base_engine.requests

    def config(self) -> dict[str, Any]:
        """What the stored raw scores depend on (never any secret)."""
        cfg = self.engine.config()
        if self.debias != "none":
            cfg["debias"] = {
                "method": self.debias,
                "fraction": self.debias_fraction,
                "seed": self.debias_seed,
            }
        return cfg

    # -- stores ----------------------------------------------------------------------------------
    def _open_stores(self) -> tuple[JsonlStore | None, JsonlStore | None]:
        if self.run_dir is None:
            return None, None
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise InputError(f"run directory {self.run_dir} is a file; give a folder")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create run directory {self.run_dir}: {exc.strerror or exc}") from None
        if not os.access(self.run_dir, os.W_OK):
            raise InputError(f"run directory {self.run_dir} is not writable")
        cfg = self.config()
        cfg_path = self.run_dir / RUN_FILE
        if cfg_path.exists():
            try:
                old = json.loads(read_text(cfg_path, "run file"))
                if not isinstance(old, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                raise InputError(
                    f"{cfg_path} is damaged ({exc}); delete it to start this run directory afresh"
                ) from None
            diff = {k: (old.get(k), v) for k, v in cfg.items() if old.get(k) != v}
            if diff:
                raise InputError(
                    f"run directory {self.run_dir} holds a run with other settings "
                    f"({'; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                    "use a new --run-dir or the same settings"
                )
        else:
            atomic_write_json(cfg_path, cfg)
        return JsonlStore(self.run_dir / BASE_FILE), JsonlStore(self.run_dir / RESULTS_FILE)

    def _recalibrated(self, rec: MCRecord) -> MCRecord:
        """A stored record under this engine's option calibration (chosen at derivation, not scoring)."""
        cal = self.engine.option_calibration
        if not any(isinstance(p, OptionScores) and p.calibration != cal for p in rec.pairs):
            return rec
        pairs = tuple(p.with_calibration(cal) if isinstance(p, OptionScores) else p for p in rec.pairs)
        return MCRecord(rec.id, rec.labels, rec.gold, rec.top, pairs, rec.meta, rec.digest, rec.error)

    # -- running -------------------------------------------------------------------------------
    def run(self, questions: Iterable[MCQuestion], alphas: Sequence[float] = (1.0,)) -> EvalResult:
        """Blocking :meth:`arun`; works inside a running event loop (e.g. a notebook) via a thread."""
        from ..rerank import run_sync

        qs = list(questions)
        return run_sync(lambda: self.arun(qs, alphas))

    async def arun(self, questions: Iterable[MCQuestion], alphas: Sequence[float] = (1.0,)) -> EvalResult:
        """Evaluate every question (skipping finished ones in ``run_dir``) and return all records.

        ``alphas`` are the sweep values reported (each scales the engine's per-pair weights).
        """
        qs = list(questions)
        sweep = tuple(float(a) for a in alphas)
        if any(not math.isfinite(a) for a in sweep):
            raise InputError(f"sweep values must be finite, got {sweep}")
        seen: set[str] = set()
        for q in qs:
            if q.id in seen:
                raise InputError(f"question id {q.id!r} appears twice; ids must be unique within a run")
            seen.add(q.id)
        plan = None
        if self.debias != "none":
            from .. import debias

            plan = debias.plan(self.debias, qs, fraction=self.debias_fraction, seed=self.debias_seed)
        extra_qs = [] if plan is None else [_as_extra(e) for e in plan.extra]
        base_store, res_store = self._open_stores()
        done_raw = res_store.load() if res_store else {}
        tops_raw = base_store.load() if base_store else {}
        problems = [*(res_store.problems if res_store else []), *(base_store.problems if base_store else [])]
        by_id = {q.id: q for q in [*qs, *extra_qs]}
        digests = {q.id: question_digest(q) for q in by_id.values()}
        for store_name, raw in (("results", done_raw), ("base", tops_raw)):
            for qid, rec in raw.items():
                if qid in digests and rec.get("digest") and rec["digest"] != digests[qid]:
                    raise InputError(
                        f"run directory {self.run_dir}: stored {store_name} for question {qid!r} has "
                        "different question text or options; use a new --run-dir"
                    )
        done: dict[str, MCRecord] = {}
        for qid, r in done_raw.items():
            if qid not in by_id:
                continue
            try:
                rec = MCRecord.from_json(r)
            except (KeyError, TypeError, ValueError) as exc:
                problems.append(f"{self.run_dir}/{RESULTS_FILE}: record {qid!r} unreadable ({exc}); redone")
                continue
            if not rec.error:  # an error row is retried
                done[qid] = self._recalibrated(rec.with_question(by_id[qid]))
        known: dict[str, TopLogprobs] = {}
        for qid, r in tops_raw.items():
            if qid in by_id and r.get("top"):
                try:
                    known[qid] = TopLogprobs.from_json(r["top"])
                except (KeyError, TypeError, ValueError) as exc:
                    problems.append(
                        f"{self.run_dir}/{BASE_FILE}: answer {qid!r} unreadable ({exc}); re-asked"
                    )
        pending = [q for q in qs if q.id not in done]
        extra_pending = [q for q in extra_qs if q.id not in done]

        stored = set(known)  # ids with a base answer in the store

        def on_top(q: MCQuestion, top: TopLogprobs) -> None:
            if base_store is not None:
                base_store.append({"id": q.id, "digest": digests[q.id], "top": top.to_json()})
                stored.add(q.id)

        def on_record(rec: MCRecord) -> None:
            if res_store is not None:
                res_store.append(rec.to_json())
            done[rec.id] = rec

        async def score() -> None:
            await self.engine.ascore(
                pending,
                known=known,
                on_top=on_top,
                on_record=on_record,
                progress=self.progress,
                initial=len(qs) - len(pending),
                total=len(qs),
            )
            if extra_pending:  # the debiasing prompts: base requests only
                await self._base_engine.ascore(
                    extra_pending,
                    known=known,
                    on_top=on_top,
                    on_record=on_record,
                    progress=self.progress,
                )

        stop = self.stop if self.stop is not None else _active_stop
        if stop is None:
            await score()
        else:
            await self._stoppable(score, stop, lambda: (sum(q.id in done for q in qs), len(qs), len(stored)))
        records = [done[q.id] for q in qs]
        result = EvalResult(
            records,
            sweep,
            self.engine.policy,
            self.engine.strategy,
            self.requests,
            self.engine.alphas,
            tuple(problems),
            plan,
            {q.id: done[q.id] for q in extra_qs if q.id in done},
        )
        if plan is not None and self.run_dir is not None:
            res = result.debiased()
            atomic_write_json(self.run_dir / DEBIAS_FILE, {"plan": plan.to_dict(), "result": res.to_dict()})
        return result

    async def _stoppable(
        self,
        score: Callable[[], Awaitable[None]],
        stop: StopRequest,
        counts: Callable[[], tuple[int, int, int]],
    ) -> None:
        """Run ``score()`` with the engines' provider behind a :class:`_Gate`; on a stop, wait for the
        requests in flight (up to ``stop.grace`` s), cancel the rest and raise :class:`RunStopped`."""
        engines = [self.engine, self._base_engine]
        inner = self.engine.provider
        gate = _Gate(inner, stop)
        for e in engines:
            e.provider = gate
        try:
            task = asyncio.ensure_future(score())
            while not task.done() and not stop.is_set():
                await asyncio.wait([task], timeout=0.05)
            if task.done():
                task.result()
                return
            t0 = time.monotonic()
            while self.run_dir is not None and gate.in_flight and time.monotonic() - t0 < stop.grace:
                if task.done():
                    break
                await asyncio.sleep(0.02)
            waited, abandoned = time.monotonic() - t0, gate.in_flight
            in_flight = gate.landed_after_stop + gate.failed_after_stop + abandoned  # at the stop
            if task.done():  # the last answers landed and the run finished while it waited
                task.result()
                return
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            finished, total, stored = counts()
            raise RunStopped(
                stop.reason or "stop",
                in_flight=in_flight,
                kept=gate.landed_after_stop if self.run_dir is not None else 0,
                abandoned=abandoned,
                waited=waited,
                finished=finished,
                total=total,
                stored=stored,
                run_dir=self.run_dir,
            )
        finally:
            for e in engines:
                e.provider = inner


def load_run(
    run_dir: str | os.PathLike[str],
    alphas: Sequence[float] = (1.0,),
    *,
    policy: str = "floor",
    strategy: str = "proxy",
    pair_alphas: float | Sequence[float] | None = None,
) -> EvalResult:
    """Re-open a finished (or partial) run directory's stored records, for new sweeps or policies."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        raise InputError(f"{run_dir} holds no {RESULTS_FILE}")
    store = JsonlStore(path)
    raw = store.load()
    return EvalResult(
        [MCRecord.from_json(r) for r in raw.values()],
        tuple(alphas),
        policy,
        strategy,
        alphas=None
        if pair_alphas is None
        else tuple(check_alphas(pair_alphas, 1))
        if isinstance(pair_alphas, (int, float))
        else tuple(pair_alphas),
        problems=tuple(store.problems),
    )
