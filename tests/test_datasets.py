"""Dataset loaders on the real files in /work/shared/data, and their edge cases on small files."""

from __future__ import annotations

import collections
import json
from datetime import date
from pathlib import Path

import pytest

from blackbox_proxy.evaluation import datasets as ds
from blackbox_proxy.evaluation.datasets import DatasetError

DATA = ds.default_data_dir()


@pytest.fixture(scope="module")
def rtqa() -> list:
    return ds.load_realtimeqa(DATA)


# --------------------------------------------------------------------------- RealtimeQA, real files


def test_realtimeqa_count_after_dedup(rtqa: list) -> None:
    assert len(rtqa) == 7852
    ids = [q.id for q in rtqa]
    assert len(set(ids)) == len(ids)
    # every question answered, gold index valid, no empty choices left
    assert all(q.answer is not None and 0 <= q.answer < len(q.choices) for q in rtqa)
    assert all(c.strip() for q in rtqa for c in q.choices)


def test_realtimeqa_choice_counts(rtqa: list) -> None:
    # README: 7,795 x 4, 48 x 2, 4 x 3, 5 x 5 with the 5th empty -> those 5 become 4-choice questions
    counts = collections.Counter(len(q.choices) for q in rtqa)
    assert counts == {4: 7800, 2: 48, 3: 4}


def test_realtimeqa_exact_duplicates_kept_once(rtqa: list) -> None:
    week = [q for q in rtqa if q.meta["week"] == "2023-09-22"]
    raw = [
        json.loads(x) for x in (DATA / "realtimeqa/past/2023/20230922_qa.jsonl").read_text().splitlines() if x
    ]
    assert len(raw) == 40 and len({r["question_id"] for r in raw}) == 30
    assert len(week) == 30


def test_realtimeqa_reused_id_kept_distinct(rtqa: list) -> None:
    by_id = {q.id: q for q in rtqa}
    first, second = by_id["20230414_20"], by_id["20230414_20@20230421"]
    assert first.meta["source_id"] == second.meta["source_id"] == "20230414_20"
    assert first.meta["week"] == "2023-04-14" and second.meta["week"] == "2023-04-21"
    assert "Arcturus" in first.choices and "Greggs" in second.choices
    # the file order is stable: the first occurrence keeps the plain id
    assert [q.id for q in rtqa].index("20230414_20") < [q.id for q in rtqa].index("20230414_20@20230421")


def test_realtimeqa_blank_fifth_choice_dropped(rtqa: list) -> None:
    by_id = {q.id: q for q in rtqa}
    q = by_id["20220708_20"]  # choices 25/39/45/59/"" with answer 3
    assert q.choices == ("25", "39", "45", "59") and q.gold_letter == "D"
    q = by_id["20220204_15"]
    assert q.choices == ("42.2%", "50.1%", "59.4%", "64.3%") and q.answer == 1


def test_realtimeqa_two_and_three_choices(rtqa: list) -> None:
    by_id = {q.id: q for q in rtqa}
    assert by_id["20210409_3"].choices == ("TRUE", "FALSE") and by_id["20210409_3"].gold_letter == "B"
    assert by_id["20210820_3"].labels == ("A", "B", "C") and by_id["20210820_3"].gold_letter == "C"


def test_realtimeqa_dates_normalised(rtqa: list) -> None:
    assert all(len(q.meta["date"]) == 10 and q.meta["date"][4] == "-" for q in rtqa)
    # both spellings occur in the raw files overall
    allraw = collections.Counter()
    for p in (DATA / "realtimeqa").glob("*/*/*_qa.jsonl"):
        for line in p.read_text().splitlines():
            if line.strip():
                allraw["/" if "/" in json.loads(line)["question_date"] else "-"] += 1
    assert allraw["/"] > 0 and allraw["-"] > 0


def test_realtimeqa_date_range(rtqa: list) -> None:
    sel = ds.load_realtimeqa(DATA, weeks="2025-01..2026-07")
    expect = [q for q in rtqa if "2025-01-01" <= q.meta["date"] <= "2026-07-31"]
    assert [q.id for q in sel] == [q.id for q in expect]
    assert 0 < len(sel) < len(rtqa)
    # slash dates work as range bounds too, and single days
    same = ds.load_realtimeqa(DATA, start="2025/01/01", end="2026/07/31")
    assert [q.id for q in same] == [q.id for q in sel]
    one_month = ds.load_realtimeqa(DATA, weeks="2024-02")
    assert one_month and all(q.meta["date"].startswith("2024-02") for q in one_month)
    by_week = ds.load_realtimeqa(DATA, weeks="2024-02", by="week")
    assert by_week and all(q.meta["week"].startswith("2024-02") for q in by_week)


def test_realtimeqa_evidence_html_stripped(rtqa: list) -> None:
    raw_html = 0
    for p in sorted((DATA / "realtimeqa/backnumber").glob("*/*_qa.jsonl"))[:40]:
        raw_html += sum("<a " in line for line in p.read_text().splitlines())
    assert raw_html > 0
    assert not any("<a " in q.meta["evidence"] or "href=" in q.meta["evidence"] for q in rtqa)
    assert sum(bool(q.meta["evidence"]) for q in rtqa) > 1000


def test_realtimeqa_nota_variant() -> None:
    qs = ds.load_realtimeqa(DATA, variant="qa_nota")
    assert len(qs) > 4000
    assert sum(q.choices[-1].lower().startswith("none of the above") for q in qs) > 0.9 * len(qs)


def test_parse_dates_and_ranges() -> None:
    assert (
        ds.parse_date("2022/06/16")
        == ds.parse_date("2022-06-16")
        == ds.parse_date("20220616")
        == date(2022, 6, 16)
    )
    assert ds.parse_date_range("2025-01..2026-07") == (date(2025, 1, 1), date(2026, 7, 31))
    assert ds.parse_date_range("2024-02") == (date(2024, 2, 1), date(2024, 2, 29))
    assert ds.parse_date_range("..2023") == (None, date(2023, 12, 31))
    assert ds.parse_date_range("2025-12..") == (date(2025, 12, 1), None)
    for bad in ("2025-13", "2025/02/30", "yesterday", "2026..2025"):
        with pytest.raises(DatasetError):
            ds.parse_date_range(bad)


def test_strip_html() -> None:
    assert ds.strip_html('See <a href="https://x.y">the &amp; story</a>\n here.') == "See the & story here."
    assert ds.strip_html("") == ""


def test_clean_choices_remaps_gold() -> None:
    assert ds.clean_choices(["a", "", "c", "d"], 2, "t") == (["a", "c", "d"], 1)
    assert ds.clean_choices(["a", "b", "c", "d", ""], 3, "t") == (["a", "b", "c", "d"], 3)
    with pytest.raises(DatasetError, match="empty choice"):
        ds.clean_choices(["a", "", "c"], 1, "where")
    with pytest.raises(DatasetError, match="out of range"):
        ds.clean_choices(["a", "b"], 2, "where")


def _write_rtqa(root: Path, records: list[dict], name: str = "20250103_qa.jsonl") -> Path:
    d = root / "past" / "2025"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _rec(qid: str, **kw) -> dict:
    r = {
        "question_id": qid,
        "question_date": "2025-01-03",
        "question_source": "CNN",
        "question_url": "u",
        "question_sentence": "Q?",
        "choices": ["a", "b", "c", "d"],
        "answer": ["1"],
        "evidence": "",
    }
    r.update(kw)
    return r


def test_realtimeqa_skips_range_and_side_files(tmp_path: Path) -> None:
    root = _write_rtqa(tmp_path, [_rec("20250103_0"), _rec("20250103_1", answer=[])])
    _write_rtqa(root, [_rec("20250103_9")], "20250103-20250110_qa.jsonl")
    _write_rtqa(root, [_rec("20250103_8")], "pm_qa.jsonl")
    qs = ds.load_realtimeqa(root)
    assert [q.id for q in qs] == ["20250103_0"]


def test_realtimeqa_bad_records_named(tmp_path: Path) -> None:
    root = _write_rtqa(tmp_path, [_rec("20250103_0", choices=["a", "", "c"], answer=["1"])])
    with pytest.raises(DatasetError, match=r"20250103_qa\.jsonl:1.*empty choice"):
        ds.load_realtimeqa(root)
    root2 = _write_rtqa(tmp_path / "b", [_rec("20250103_0", answer=["x"])])
    with pytest.raises(DatasetError, match="not an integer"):
        ds.load_realtimeqa(root2)
    with pytest.raises(DatasetError, match="not a RealtimeQA folder"):
        ds.load_realtimeqa(tmp_path / "b" / "past")
    with pytest.raises(DatasetError, match="does not exist"):
        ds.load_realtimeqa(tmp_path / "nowhere")


# --------------------------------------------------------------------------- other datasets


def test_truthfulqa_mc1_shuffled() -> None:
    qs = ds.load_truthfulqa(DATA / "truthfulqa")
    assert len(qs) == 817
    raw = json.loads((DATA / "truthfulqa/mc_task.json").read_text())
    for q, r in zip(qs, raw, strict=True):
        true = next(t for t, v in r["mc1_targets"].items() if v == 1)
        assert q.choices[q.answer] == true
        assert sorted(q.choices) == sorted(r["mc1_targets"])
    # shuffling moves the gold away from A most of the time, and is seeded
    assert sum(q.answer == 0 for q in qs) < 0.4 * len(qs)
    again = ds.load_truthfulqa(DATA / "truthfulqa")
    assert [q.choices for q in again] == [q.choices for q in qs]
    other = ds.load_truthfulqa(DATA / "truthfulqa", seed=1)
    assert [q.choices for q in other] != [q.choices for q in qs]


def test_mmlu() -> None:
    qs = ds.load_mmlu(DATA / "mmlu")
    assert len(qs) == 1531
    assert all(len(q.choices) == 4 for q in qs)
    assert len(ds.load_mmlu(DATA / "mmlu", split="dev")) == 285
    sub = ds.load_mmlu(DATA / "mmlu", subjects=["abstract_algebra"])
    assert sub and all(q.meta["source"] == "abstract_algebra" for q in sub)
    assert sub[0].choices == ("4", "8", "12", "6") and sub[0].answer == 0


def test_arc_digit_and_letter_keys() -> None:
    easy = ds.load_arc(DATA / "arc", subset="easy")
    chal = ds.load_arc(DATA / "arc", subset="challenge")
    assert (len(easy), len(chal)) == (570, 299)
    raw = [json.loads(x) for x in (DATA / "arc/arc_easy_validation.jsonl").read_text().splitlines() if x]
    n_digit = 0
    for q, r in zip(easy, raw, strict=True):
        lab = r["choices"]["label"]
        assert q.choices[q.answer] == r["choices"]["text"][lab.index(r["answerKey"])]
        n_digit += r["answerKey"].isdigit()
    assert n_digit == 21
    assert {len(q.choices) for q in easy} == {3, 4, 5}


def test_arc_bad_key(tmp_path: Path) -> None:
    p = tmp_path / "arc.jsonl"
    p.write_text(
        json.dumps(
            {
                "id": "x",
                "question": "q",
                "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                "answerKey": "3",
            }
        )
        + "\n"
    )
    with pytest.raises(DatasetError, match="answerKey '3'"):
        ds.load_arc(p)


def test_generic_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "q.jsonl"
    p.write_text(
        json.dumps({"id": "a", "question": "2+2?", "choices": ["3", "4"], "answer": 1, "topic": "math"})
        + "\n\n"
        + json.dumps({"id": "b", "question": "Sky?", "choices": ["blue", "green", "red"]})
        + "\n"
    )
    qs = ds.load_dataset("jsonl", p)
    assert [q.id for q in qs] == ["a", "b"]
    assert qs[0].gold_letter == "B" and qs[0].meta == {"topic": "math"} and qs[1].answer is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "question": "q", "choices": ["x", "y"], "answer": "1"}) + "\n")
    with pytest.raises(DatasetError, match="0-based integer"):
        ds.load_jsonl(bad)
    bad.write_text(
        '{"id": "a", "question": "q", "choices": ["x", "y"]}\n{"id": "a", "question": "q", "choices": ["x", "y"]}\n'
    )
    with pytest.raises(DatasetError, match="duplicate id"):
        ds.load_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(DatasetError, match="bad.jsonl:1"):
        ds.load_jsonl(bad)


def test_registry() -> None:
    assert set(ds.DATASETS) >= {"realtimeqa", "truthfulqa", "mmlu", "arc-easy", "arc-challenge", "jsonl"}
    assert len(ds.load_dataset("arc-challenge", DATA / "arc", limit=7)) == 7
    assert len(ds.load_dataset("realtimeqa", DATA, weeks="2026-01..2026-07", limit=5)) == 5
    with pytest.raises(DatasetError, match="unknown dataset"):
        ds.load_dataset("squad")
    with pytest.raises(DatasetError, match="limit"):
        ds.load_dataset("mmlu", DATA / "mmlu", limit=0)
