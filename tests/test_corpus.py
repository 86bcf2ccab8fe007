"""The RealtimeQA corpus builder: week ranges, URL de-duplication, HTML stripping, and no label leakage."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from blackbox_proxy.cli import main
from blackbox_proxy.corpus import (
    article_text,
    build_corpus,
    normalize_url,
    parse_weeks,
    strip_html,
    write_corpus,
)
from blackbox_proxy.errors import InputError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "realtimeqa"
if not DATA.exists():
    DATA = Path("/work/shared/data/realtimeqa")


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _question(qid: str, n: int) -> dict:
    """A question whose sentence, options and evidence carry unique markers absent from every article."""
    return {
        "question_id": qid,
        "question_date": "2025/01/01",
        "question_source": "CNN",
        "question_url": f"https://quiz.example/{qid}",
        "question_sentence": f"QMARK{n} which event happened this week?",
        "choices": [f"OPTMARK{n}a", f"OPTMARK{n}b", f"OPTMARK{n}c", f"OPTMARK{n}d"],
        "answer": ["2"],
        "evidence": f'The council <a href="https://x.example/{n}" target="_blank">voted &amp; passed</a> plan {n}.',
    }


def _article(url: str, title: str, body: str) -> dict:
    return {"url": url, "title": title, "text": body, "authors": [], "publish_date": "2025/01/02"}


LONG = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 5


@pytest.fixture()
def upstream(tmp_path: Path) -> Path:
    """A tiny RealtimeQA folder in the upstream layout: three weeks, one shared URL, one odd file."""
    root = tmp_path / "rqa"
    past = root / "past"
    _write(past / "2025" / "20250103_qa.jsonl", [_question("20250103_0", 0), _question("20250103_1", 1)])
    _write(
        past / "2025" / "20250103_gcs.jsonl",
        [
            {
                "question_id": "20250103_0",
                "search_time": "t",
                "search_result": [
                    _article("https://news.example/a", "Story A", "Body of story A. " + LONG),
                    _article("https://news.example/b/", "Story B", "Body of story B. " + LONG),
                ],
            },
            {
                "question_id": "20250103_1",
                "search_time": "t",
                "search_result": [
                    _article(
                        "https://NEWS.example/b#top", "Story B again", "Body of story B. " + LONG
                    ),  # same URL
                    _article("https://news.example/short", "Short", "too short"),
                ],
            },
        ],
    )
    _write(past / "2025" / "20250110_qa.jsonl", [_question("20250110_0", 2)])  # week without articles
    _write(past / "2025" / "20250228_qa.jsonl", [_question("20250228_0", 3)])
    _write(
        past / "2025" / "20250228_gcs.jsonl",
        [
            {
                "question_id": "20250228_0",
                "search_time": "t",
                "search_result": [
                    _article("https://news.example/c", "Story C", "Body of story C. " + LONG),
                ],
            },
        ],
    )
    _write(past / "2025" / "20250103-20250110_qa.jsonl", [_question("odd", 9)])  # not a weekly file
    return root


def test_parse_weeks_months_days_and_errors() -> None:
    assert parse_weeks("2025-01..2026-07") == (date(2025, 1, 1), date(2026, 7, 31))
    assert parse_weeks("2024-02") == (date(2024, 2, 1), date(2024, 2, 29))
    assert parse_weeks("2025-01-10..2025-12") == (date(2025, 1, 10), date(2025, 12, 31))
    assert parse_weeks("2025") == (date(2025, 1, 1), date(2025, 12, 31))
    for bad in ("", "..2025-01", "2025-13", "2025-02..2025-01", "jan..feb", "2025-02-30"):
        with pytest.raises(InputError):
            parse_weeks(bad)


def test_strip_html_and_url_normalisation() -> None:
    assert strip_html('Cuba <a href="u" target="_blank">suffered a collapse</a> &amp; more<br/>') == (
        "Cuba suffered a collapse & more"
    )
    assert normalize_url("HTTPS://News.Example/Path/#frag") == "https://news.example/Path"
    assert normalize_url(" https://a.example/x ") == normalize_url("https://a.example/x/")
    assert article_text(" Title ", "Body.\n") == "Title\n\nBody."


def test_builds_articles_deduplicated_by_url_within_weeks(upstream: Path) -> None:
    docs, stats = build_corpus(upstream, "2025-01", progress=False)
    assert [d.url for d in docs] == ["https://news.example/a", "https://news.example/b/"]
    assert docs[0].text == "Story A\n\nBody of story A. " + LONG.strip()
    assert stats.weeks == 2 and stats.weeks_without_articles == 1 and stats.questions == 3
    assert (stats.articles_seen, stats.articles_kept, stats.duplicate_urls, stats.empty_or_short) == (
        4,
        2,
        1,
        1,
    )
    assert stats.skipped_files == ["20250103-20250110_qa.jsonl"]
    assert {d.source for d in docs} == {"article"}
    wide, wstats = build_corpus(upstream, "2025-01..2025-02", progress=False)
    assert [d.week for d in wide] == ["20250103", "20250103", "20250228"] and wstats.documents == 3
    with pytest.raises(InputError, match="no RealtimeQA weeks"):
        build_corpus(upstream, "2024-01..2024-12", progress=False)
    with pytest.raises(InputError, match="no past/"):
        build_corpus(upstream / "past", "2025-01", progress=False)


def test_no_document_is_built_from_questions_or_answers(upstream: Path) -> None:
    """Markers placed only in question sentences and options never reach a document."""
    docs, stats = build_corpus(upstream, "2025-01..2025-02", include_evidence=True, progress=False)
    assert stats.questions == 4 and stats.evidence_kept == 4 and stats.documents == len(docs) == 3 + 4
    assert any(d.source == "evidence" for d in docs)
    for d in docs:
        assert "QMARK" not in d.text and "OPTMARK" not in d.text, d
        assert "<" not in d.text and "&amp;" not in d.text
    ev = [d for d in docs if d.source == "evidence"]
    assert ev[0].text == "The council voted & passed plan 0."


def test_cli_writes_jsonl(upstream: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "docs.jsonl"
    rc = main(
        [
            "build-corpus",
            "--data-dir",
            str(upstream),
            "--weeks",
            "2025-01..2025-02",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) >= {"text", "source", "week", "question_id", "url"} for r in rows)
    assert json.loads(capsys.readouterr().out.strip())["documents"] == 3
    rc = main(["build-corpus", "--data-dir", str(upstream), "--weeks", "2025-99", "--out", str(out)])
    assert rc == 2 and "invalid month '2025-99'" in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "past" / "2025").exists(), reason="RealtimeQA data folder not present")
def test_real_realtimeqa_2025_01_to_2026_07(tmp_path: Path) -> None:
    """On the real data: every document is a retrieved article (or stripped evidence), none is an answer key."""
    docs, stats = build_corpus(DATA, "2025-01..2026-07", include_evidence=True, progress=False)
    assert stats.weeks > 70 and stats.questions > 1000 and stats.articles_kept > 4000
    assert stats.articles_kept + stats.duplicate_urls + stats.empty_or_short == stats.articles_seen
    assert len({normalize_url(d.url) for d in docs if d.source == "article"}) == stats.articles_kept

    retrieved: dict[str, set[str]] = {}
    questions: dict[str, dict] = {}
    for year in ("2025", "2026"):
        for f in sorted((DATA / "past" / year).glob("*_gcs.jsonl")):
            for line in f.read_text().splitlines():
                for a in json.loads(line)["search_result"]:
                    retrieved.setdefault(a["url"], set()).add(article_text(a["title"], a["text"]))
        for f in sorted((DATA / "past" / year).glob("*_qa.jsonl")):
            for line in f.read_text().splitlines():
                if line.strip():
                    q = json.loads(line)
                    questions[q["question_id"]] = q

    answer_keys: set[str] = set()
    for q in questions.values():
        gold = q["choices"][int(q["answer"][0])]
        s = q["question_sentence"].strip()
        answer_keys |= {
            s,
            gold,
            f"{s} {gold}",
            f"{s}\n{gold}",
            f"{s}\n\n{gold}",
            f"Question: {s}\nAnswer: {gold}",
        }
    for d in docs:
        assert d.text not in answer_keys
        if d.source == "article":
            assert d.text in retrieved[d.url], f"article {d.url} was not built from its retrieved text"
        else:
            assert d.text == strip_html(questions[d.question_id]["evidence"]) and "<a " not in d.text
        assert d.text.split("\n", 1)[0].strip() not in answer_keys
    path = write_corpus(docs, tmp_path / "docs.jsonl")
    assert sum(1 for _ in path.open()) == stats.documents
