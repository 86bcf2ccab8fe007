"""Training documents for a news expert from RealtimeQA's retrieved articles, without label leakage.

The upstream layout (``past/YYYY/YYYYMMDD_qa.jsonl`` questions, ``YYYYMMDD_gcs.jsonl`` Google-search
articles retrieved per question) is read for a range of weeks. Documents are the retrieved articles
(title and text) and, optionally, the quiz ``evidence`` passages with their HTML stripped. The
question text, the answer options and the gold answer are never written into a document: an expert
trained on this corpus learns the news, not the answer key.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from .dates import parse_date_range
from .errors import InputError
from .files import iter_jsonl
from .text import strip_html

_WEEK_FILE = re.compile(r"^(\d{8})_(qa|gcs)\.jsonl$")


@dataclass(frozen=True)
class CorpusDoc:
    """One training document and where it came from."""

    text: str
    source: str  # "article" (retrieved search result) or "evidence" (quiz evidence passage)
    week: str
    question_id: str
    url: str = ""
    title: str = ""
    publish_date: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CorpusStats:
    """Counts from one corpus build (what was read, kept and skipped)."""

    weeks: int = 0
    weeks_without_articles: int = 0
    questions: int = 0
    articles_seen: int = 0
    articles_kept: int = 0
    duplicate_urls: int = 0
    empty_or_short: int = 0
    evidence_kept: int = 0
    characters: int = 0
    first_week: str = ""
    last_week: str = ""
    skipped_files: list[str] = field(default_factory=list)

    @property
    def documents(self) -> int:
        return self.articles_kept + self.evidence_kept

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["documents"] = self.documents
        return d


def parse_weeks(spec: str) -> tuple[date, date]:
    """``"2025-01..2026-07"`` -> (first day, last day), inclusive; both ends are required here."""
    if not spec or not spec.strip():
        raise InputError("empty week range: use e.g. 2025-01..2026-07")
    start, stop = parse_date_range(spec)
    if start is None or stop is None:
        raise InputError(f"week range {spec!r} needs both ends, e.g. 2025-01..2026-07")
    return start, stop


def _week_files(
    data_dir: Path, start: date, stop: date, stats: CorpusStats
) -> list[tuple[str, Path, Path | None]]:
    root = data_dir / "past"
    if not root.is_dir():
        raise InputError(f"{data_dir} is not a RealtimeQA data folder: it has no past/ sub-folder")
    found: dict[str, dict[str, Path]] = {}
    for year in range(start.year, stop.year + 1):
        folder = root / str(year)
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            m = _WEEK_FILE.match(f.name)
            if not m:
                if f.name.endswith(("_qa.jsonl", "_gcs.jsonl")):
                    stats.skipped_files.append(f.name)  # e.g. upstream's 20220617-20220624_qa.jsonl
                continue
            found.setdefault(m[1], {})[m[2]] = f
    weeks = []
    for key in sorted(found):
        day = date(int(key[:4]), int(key[4:6]), int(key[6:]))
        if start <= day <= stop and "qa" in found[key]:
            weeks.append((key, found[key]["qa"], found[key].get("gcs")))
    return weeks


def normalize_url(url: str) -> str:
    """URL key for de-duplication: trimmed, fragment and trailing slash dropped, scheme/host lower-cased."""
    u = url.strip().split("#", 1)[0].rstrip("/")
    scheme, sep, rest = u.partition("://")
    if not sep:
        return u
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}"


def article_text(title: str, text: str) -> str:
    """The document text of one retrieved article: its title, a blank line, its body."""
    title, text = " ".join(str(title or "").split()), str(text or "").strip()
    return f"{title}\n\n{text}" if title and text else (title or text)


def build_corpus(
    data_dir: str | os.PathLike[str],
    weeks: str,
    *,
    include_evidence: bool = False,
    min_chars: int = 200,
    progress: bool = True,
) -> tuple[list[CorpusDoc], CorpusStats]:
    """Documents for the weeks in ``weeks`` (e.g. ``"2025-01..2026-07"``), de-duplicated by URL.

    Articles with fewer than ``min_chars`` characters of text are skipped (counted in the stats).
    Evidence passages (``include_evidence``) are de-duplicated by their text.
    """
    if min_chars < 0:
        raise InputError(f"min_chars must be >= 0, got {min_chars}")
    start, stop = parse_weeks(weeks)
    stats = CorpusStats()
    files = _week_files(Path(data_dir), start, stop, stats)
    if not files:
        raise InputError(f"no RealtimeQA weeks between {start} and {stop} under {Path(data_dir) / 'past'}")
    from tqdm.auto import tqdm

    docs: list[CorpusDoc] = []
    seen_urls: set[str] = set()
    seen_evidence: set[str] = set()
    stats.weeks, stats.first_week, stats.last_week = len(files), files[0][0], files[-1][0]
    for week, qa_path, gcs_path in tqdm(files, desc="build-corpus", unit="week", disable=not progress):
        questions = [rec for _, rec in iter_jsonl(qa_path, what="RealtimeQA file")]
        stats.questions += len(questions)
        if gcs_path is None:
            stats.weeks_without_articles += 1
        else:
            for _, rec in iter_jsonl(gcs_path, what="RealtimeQA search file"):
                qid = str(rec.get("question_id", ""))
                for art in rec.get("search_result") or []:
                    stats.articles_seen += 1
                    key = normalize_url(str(art.get("url") or ""))
                    body = str(art.get("text") or "")
                    if len(body.strip()) < max(min_chars, 1):
                        stats.empty_or_short += 1
                        continue
                    if key and key in seen_urls:
                        stats.duplicate_urls += 1
                        continue
                    if key:
                        seen_urls.add(key)
                    text = article_text(str(art.get("title") or ""), body)
                    docs.append(
                        CorpusDoc(
                            text,
                            "article",
                            week,
                            qid,
                            str(art.get("url") or ""),
                            " ".join(str(art.get("title") or "").split()),
                            str(art.get("publish_date") or ""),
                        )
                    )
                    stats.articles_kept += 1
        if include_evidence:
            for q in questions:
                ev = strip_html(str(q.get("evidence") or ""))
                if ev and ev not in seen_evidence:
                    seen_evidence.add(ev)
                    docs.append(
                        CorpusDoc(
                            ev,
                            "evidence",
                            week,
                            str(q.get("question_id", "")),
                            str(q.get("question_url") or ""),
                        )
                    )
                    stats.evidence_kept += 1
    stats.characters = sum(len(d.text) for d in docs)
    return docs, stats


def write_corpus(docs: list[CorpusDoc], out: str | os.PathLike[str]) -> Path:
    """Write documents as JSONL (``text`` plus provenance fields), atomically."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d.to_dict(), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
