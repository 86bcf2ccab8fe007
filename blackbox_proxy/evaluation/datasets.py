"""Dataset loaders that all produce :class:`~blackbox_proxy.types.MCQuestion` lists.

Supported: RealtimeQA in its upstream repository layout, TruthfulQA MC1, MMLU, ARC (HF schema) and
the generic JSONL of the ``mc`` command. ``load_dataset(name, ...)`` dispatches through ``DATASETS``.

RealtimeQA rules (see ``load_realtimeqa``):
  * only weekly files named exactly ``YYYYMMDD_qa.jsonl`` (or ``YYYYMMDD_qa_nota.jsonl`` for the
    "none of the above" variant) under ``backnumber/`` and ``past/`` are read, in file-name order;
    cumulative range files (``20220617-20220708_qa.jsonl``), ``pm_``/``cnn_``/``time_`` side files and
    ``latest/`` (no answers) are skipped;
  * exact duplicate records (same JSON content) are kept once;
  * a question id reused for a *different* question is kept as a separate question with the id
    ``"<id>@<week>"`` (the week of the file it appears in, e.g. ``20230414_20@20230421``); the first
    occurrence keeps the plain id and ``meta["source_id"]`` always holds the upstream id;
  * empty choices (the blank 5th choice of some THE WEEK questions) are dropped and the gold index is
    re-mapped to the remaining choices; a gold answer that points at an empty choice is an error.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from ..dates import as_date, parse_date, parse_date_range
from ..errors import DatasetError, InputError
from ..files import iter_jsonl
from ..text import strip_html
from ..types import LETTERS, MCQuestion

log = logging.getLogger(__name__)

_WEEKLY = {"qa": re.compile(r"^(\d{8})_qa\.jsonl$"), "qa_nota": re.compile(r"^(\d{8})_qa_nota\.jsonl$")}


# --------------------------------------------------------------------------- paths


def default_data_dir() -> Path:
    """The shared evaluation data: $BLACKBOX_PROXY_DATA, else ``../shared/data`` next to the project root."""
    env = os.environ.get("BLACKBOX_PROXY_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _resolve(path: str | os.PathLike[str] | None, sub: str) -> Path:
    """``path`` if given, else ``default_data_dir()/sub``; raises DatasetError when it does not exist."""
    p = Path(path).expanduser() if path is not None else default_data_dir() / sub
    if not p.exists():
        raise DatasetError(f"data path {p} does not exist (pass --data-dir or set BLACKBOX_PROXY_DATA)")
    return p


def _text(value: Any) -> Any:
    """A text field stripped; anything that is not a string is passed on for MCQuestion to refuse."""
    return value.strip() if isinstance(value, str) else value


def read_jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; a bad line is a DatasetError naming it."""
    try:
        yield from iter_jsonl(path, what="dataset file")  # type: ignore[misc]
    except InputError as exc:
        raise DatasetError(str(exc)) from None


# --------------------------------------------------------------------------- choices


def clean_choices(choices: Sequence[Any], answer: int | None, where: str) -> tuple[list[str], int | None]:
    """Drop empty choices and re-map the gold index onto the remaining ones.

    Raises DatasetError when the gold answer is itself an empty choice or out of range.
    """
    texts = ["" if c is None else str(c) for c in choices]
    if answer is not None and not 0 <= answer < len(texts):
        raise DatasetError(f"{where}: answer index {answer} out of range for {len(texts)} choices")
    if answer is not None and not texts[answer].strip():
        raise DatasetError(f"{where}: the gold answer (index {answer}) is an empty choice")
    kept: list[str] = []
    new_answer = None
    for i, t in enumerate(texts):
        if not t.strip():
            continue
        if i == answer:
            new_answer = len(kept)
        kept.append(t.strip())
    return kept, new_answer


# --------------------------------------------------------------------------- RealtimeQA


def realtimeqa_files(
    data_dir: str | os.PathLike[str] | None = None, variant: str = "qa"
) -> list[tuple[date, Path]]:
    """The weekly answered files of one variant (``qa`` or ``qa_nota``), as (week, path), by name."""
    if variant not in _WEEKLY:
        raise DatasetError(f"unknown RealtimeQA variant {variant!r}; choose one of {sorted(_WEEKLY)}")
    root = _resolve(data_dir, "realtimeqa")
    if (root / "realtimeqa").is_dir() and not (root / "past").is_dir():
        root = root / "realtimeqa"
    if not (root / "past").is_dir() and not (root / "backnumber").is_dir():
        raise DatasetError(f"{root} is not a RealtimeQA folder (no backnumber/ or past/ inside)")
    pat = _WEEKLY[variant]
    out = []
    for section in ("backnumber", "past"):
        for p in (root / section).glob("*/*.jsonl"):
            if m := pat.match(p.name):
                out.append((parse_date(m.group(1)), p))
    out.sort(key=lambda t: (t[0], t[1].name, str(t[1])))
    return out


def load_realtimeqa(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    start: date | str | None = None,
    end: date | str | None = None,
    weeks: str | None = None,
    variant: str = "qa",
    by: str = "question_date",
) -> list[MCQuestion]:
    """Answered RealtimeQA questions, de-duplicated, optionally filtered to a date range.

    ``weeks`` is a range like ``2025-01..2026-07`` (overrides ``start``/``end``); dates in the files
    come as ``YYYY/MM/DD`` or ``YYYY-MM-DD`` and are normalised. ``by`` picks the date filtered on:
    ``question_date`` (the quiz's own date) or ``week`` (the weekly file's date). ``meta`` holds
    ``week``, ``date``, ``source``, ``url``, ``evidence`` (HTML stripped), ``source_id`` and ``file``.
    """
    if by not in ("question_date", "week"):
        raise DatasetError(f"unknown date field {by!r}; choose 'question_date' or 'week'")
    lo, hi = parse_date_range(weeks) if weeks else (as_date(start, False), as_date(end, True))
    seen_content: set[str] = set()
    seen_ids: set[str] = set()
    out: list[MCQuestion] = []
    n_dupes = n_reused = 0
    for week, path in realtimeqa_files(data_dir, variant):
        for line, rec in read_jsonl_records(path):
            where = f"{path}:{line}"
            ans = rec.get("answer")
            if not ans:  # unanswered (e.g. a blank placeholder record)
                continue
            key = json.dumps(rec, sort_keys=True, ensure_ascii=False)
            if key in seen_content:
                n_dupes += 1
                continue
            seen_content.add(key)
            q = _realtimeqa_question(rec, week, path, where)
            d = parse_date(q.meta["date"]) if by == "question_date" else week
            if (lo and d < lo) or (hi and d > hi):
                continue
            qid = q.id
            if qid in seen_ids:
                n_reused += 1
                qid = f"{q.id}@{week:%Y%m%d}"
                if qid in seen_ids:
                    raise DatasetError(f"{where}: question id {q.id!r} reused twice in week {week}")
                q = MCQuestion(qid, q.question, q.choices, q.answer, q.meta)
            seen_ids.add(qid)
            out.append(q)
    log.info(
        "RealtimeQA %s: %d questions (%d exact duplicates, %d reused ids)",
        variant,
        len(out),
        n_dupes,
        n_reused,
    )
    return out


def _realtimeqa_question(rec: Mapping[str, Any], week: date, path: Path, where: str) -> MCQuestion:
    for k in ("question_id", "question_sentence", "choices", "answer", "question_date"):
        if k not in rec:
            raise DatasetError(f"{where}: record has no {k!r} field")
    ans = rec["answer"]
    if isinstance(ans, list):  # upstream: a list holding one index string; a few records hold a bare string
        if len(ans) != 1:
            raise DatasetError(f"{where}: expected 'answer' to hold one index, got {ans!r}")
        ans = ans[0]
    try:
        idx = int(ans)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: answer {ans!r} is not an integer index") from None
    choices, gold = clean_choices(rec["choices"], idx, where)
    meta = {
        "week": week.isoformat(),
        "date": parse_date(rec["question_date"]).isoformat(),
        "source": str(rec.get("question_source") or ""),
        "url": str(rec.get("question_url") or ""),
        "evidence": strip_html(str(rec.get("evidence") or "")),
        "source_id": str(rec["question_id"]),
        "file": f"{path.parent.parent.name}/{path.parent.name}/{path.name}",
    }
    try:
        return MCQuestion(
            str(rec["question_id"]), _text(rec["question_sentence"]), tuple(choices), gold, meta
        )
    except InputError as exc:
        raise DatasetError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- TruthfulQA


def load_truthfulqa(path: str | os.PathLike[str] | None = None, *, seed: int = 0) -> list[MCQuestion]:
    """TruthfulQA MC1 from ``mc_task.json``; options shuffled per question with ``seed``.

    The file lists the true option first, so an unshuffled order would make "A" always right.
    Each question's permutation depends only on ``seed`` and its index, so ``--limit`` does not
    change the order of the questions it keeps.
    """
    p = _resolve(path, "truthfulqa")
    if p.is_dir():
        p = p / "mc_task.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read TruthfulQA file {p}: {exc}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{p}: expected a JSON list of questions")
    out = []
    for i, rec in enumerate(data):
        where = f"{p}[{i}]"
        targets = rec.get("mc1_targets") if isinstance(rec, dict) else None
        if not isinstance(targets, dict) or not targets:
            raise DatasetError(f"{where}: no mc1_targets")
        items = list(targets.items())
        n_true = sum(1 for _, v in items if int(v) == 1)
        if n_true != 1:
            raise DatasetError(f"{where}: MC1 needs exactly one true option, found {n_true}")
        random.Random(f"truthfulqa:{seed}:{i}").shuffle(items)
        choices = tuple(str(t) for t, _ in items)
        gold = next(j for j, (_, v) in enumerate(items) if int(v) == 1)
        out.append(
            MCQuestion(f"truthfulqa_{i}", _text(rec["question"]), choices, gold, {"source": "truthfulqa"})
        )
    return out


# --------------------------------------------------------------------------- MMLU


def load_mmlu(
    path: str | os.PathLike[str] | None = None,
    *,
    split: str = "validation",
    subjects: Iterable[str] | None = None,
) -> list[MCQuestion]:
    """MMLU records ``{question, subject, choices, answer}`` (``answer`` an index or a letter)."""
    p = _resolve(path, "mmlu")
    if p.is_dir():
        p = p / f"mmlu_{split}.jsonl"
        if not p.exists():
            raise DatasetError(f"no MMLU split {split!r} at {p}")
    want = set(subjects) if subjects else None
    out = []
    for line, rec in read_jsonl_records(p):
        where = f"{p}:{line}"
        subj = str(rec.get("subject", ""))
        if want is not None and subj not in want:
            continue
        ans = rec.get("answer")
        if isinstance(ans, str) and len(ans.strip()) == 1 and ans.strip().upper() in LETTERS:
            ans = LETTERS.index(ans.strip().upper())
        try:
            idx = int(ans)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: answer {ans!r} is neither an index nor a letter") from None
        choices, gold = clean_choices(rec.get("choices") or [], idx, where)
        try:
            out.append(
                MCQuestion(
                    f"mmlu_{split}_{line - 1}", _text(rec["question"]), tuple(choices), gold, {"source": subj}
                )
            )
        except (InputError, KeyError) as exc:
            raise DatasetError(f"{where}: {exc}") from None
    return out


# --------------------------------------------------------------------------- ARC


def load_arc(path: str | os.PathLike[str] | None = None, *, subset: str = "easy") -> list[MCQuestion]:
    """ARC in the HF schema; ``answerKey`` is looked up among ``choices.label`` ("A".."E" or "1".."4")."""
    if subset not in ("easy", "challenge"):
        raise DatasetError(f"unknown ARC subset {subset!r}; choose 'easy' or 'challenge'")
    p = _resolve(path, "arc")
    if p.is_dir():
        p = p / f"arc_{subset}_validation.jsonl"
    out = []
    for line, rec in read_jsonl_records(p):
        where = f"{p}:{line}"
        ch = rec.get("choices")
        if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
            raise DatasetError(f"{where}: 'choices' must be {{text: [...], label: [...]}}")
        labels = [str(x).strip() for x in ch["label"]]
        if len(labels) != len(ch["text"]):
            raise DatasetError(f"{where}: {len(labels)} labels for {len(ch['text'])} choice texts")
        key = str(rec.get("answerKey", "")).strip()
        if key not in labels:
            raise DatasetError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        choices, gold = clean_choices(ch["text"], labels.index(key), where)
        qid = str(rec.get("id") or f"arc_{subset}_{line - 1}")
        try:
            out.append(
                MCQuestion(qid, _text(rec["question"]), tuple(choices), gold, {"source": f"arc-{subset}"})
            )
        except (InputError, KeyError) as exc:
            raise DatasetError(f"{where}: {exc}") from None
    return out


# --------------------------------------------------------------------------- generic JSONL


def question_from_record(rec: Any, where: str, default_id: str) -> MCQuestion:
    """One question of the generic JSONL, ``{id, question, choices, answer}``, validated field by field.

    ``answer`` (optional) is the 0-based index of the gold option; ``id`` defaults to ``default_id``.
    The message of every error starts with ``where`` (``path:line``).
    """
    if not isinstance(rec, Mapping):
        raise DatasetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("question", "choices"):
        if key not in rec:
            raise DatasetError(f"{where}: missing field {key!r}")
    question, choices = rec["question"], rec["choices"]
    if not isinstance(question, str):
        raise DatasetError(f"{where}: 'question' must be a string, got {type(question).__name__}")
    if not isinstance(choices, list):
        raise DatasetError(f"{where}: 'choices' must be a list of strings, got {type(choices).__name__}")
    if not choices:
        raise DatasetError(f"{where}: 'choices' is empty")
    if len(choices) > len(LETTERS):
        raise DatasetError(
            f"{where}: {len(choices)} choices, more than the {len(LETTERS)} option letters A-Z"
        )
    if any(not isinstance(c, (str, int, float)) or isinstance(c, bool) for c in choices):
        raise DatasetError(f"{where}: every choice must be a string")
    ans = rec.get("answer")
    if ans is not None and (isinstance(ans, bool) or not isinstance(ans, int)):
        raise DatasetError(f"{where}: 'answer' must be a 0-based integer index, got {ans!r}")
    qid = rec.get("id", default_id)
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or not str(qid).strip():
        raise DatasetError(f"{where}: 'id' must be a non-empty string or integer, got {qid!r}")
    meta = {k: v for k, v in rec.items() if k not in ("id", "question", "choices", "answer")}
    try:
        return MCQuestion(str(qid), question, tuple(str(c) for c in choices), ans, meta)
    except InputError as exc:
        raise DatasetError(f"{where}: {exc}") from None


def read_questions_jsonl(
    path: str | os.PathLike[str], *, lenient: bool = False
) -> tuple[list[MCQuestion], list[str]]:
    """The questions of a generic JSONL file, and one ``path:line: reason`` message per rejected line.

    Strict (the default) raises DatasetError at the first bad line; ``lenient`` skips bad lines
    (and later duplicates of an id) and reports them. Ids default to ``line{n}``.
    """
    if path is None:
        raise DatasetError("the jsonl dataset needs a file path")
    p = Path(path)
    out: list[MCQuestion] = []
    errors: list[str] = []
    seen: set[str] = set()
    for n, rec in iter_jsonl(p, what="questions file", lenient=True):
        where = f"{p}:{n}"
        try:
            if isinstance(rec, InputError):
                raise DatasetError(str(rec))
            q = question_from_record(rec, where, f"line{n}")
            if q.id in seen:
                raise DatasetError(f"{where}: duplicate id {q.id!r}")
        except DatasetError as exc:
            if not lenient:
                raise
            errors.append(str(exc))
            continue
        seen.add(q.id)
        out.append(q)
    return out, errors


def load_jsonl(path: str | os.PathLike[str]) -> list[MCQuestion]:
    """The generic JSONL (strict): ``{id, question, choices, answer}`` with ``answer`` 0-based (optional)."""
    if path is None:
        raise DatasetError("the jsonl dataset needs a file path")
    return read_questions_jsonl(_resolve(path, ""), lenient=False)[0]


# --------------------------------------------------------------------------- registry


def _realtimeqa_entry(path: str | None, **kw: Any) -> list[MCQuestion]:
    return load_realtimeqa(path, **kw)


DATASETS: dict[str, Callable[..., list[MCQuestion]]] = {
    "realtimeqa": _realtimeqa_entry,
    "realtimeqa-nota": lambda path=None, **kw: load_realtimeqa(path, variant="qa_nota", **kw),
    "truthfulqa": lambda path=None, **kw: load_truthfulqa(path, **kw),
    "mmlu": lambda path=None, **kw: load_mmlu(path, **kw),
    "arc-easy": lambda path=None, **kw: load_arc(path, subset="easy", **kw),
    "arc-challenge": lambda path=None, **kw: load_arc(path, subset="challenge", **kw),
    "jsonl": lambda path=None, **kw: load_jsonl(path, **kw),
}


def load_dataset(
    name: str, path: str | os.PathLike[str] | None = None, *, limit: int | None = None, **kw: Any
) -> list[MCQuestion]:
    """Load a dataset by registry name (see ``DATASETS``), keeping the first ``limit`` questions."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be at least 1, got {limit}")
    qs = DATASETS[name](path, **kw)
    return qs[:limit] if limit is not None else qs
