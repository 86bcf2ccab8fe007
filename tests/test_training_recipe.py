"""The document recipe without a model: question renderings, recipe defaults, the option-score gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blackbox_proxy.errors import InputError
from blackbox_proxy.option_scoring import (
    CALIBRATIONS,
    CLOZE_TEMPLATE,
    OptionScores,
    disagreement,
    gate_weight,
    lift,
)
from blackbox_proxy.training import (
    DOCUMENT_RECIPE,
    HELDOUT_REPLAY,
    TrainConfig,
    _replay_texts,
    _split_heldout,
)
from blackbox_proxy.training_data import QA_TEMPLATE, question_renderings, sentences

DATA = Path(__file__).resolve().parents[1] / "blackbox_proxy" / "data"


def test_renderings_turn_statements_into_the_questions_they_answer() -> None:
    doc = (
        "The capital of Veloria is Quintaro, a walled city. The walking robot Zephyr-9 was built by "
        "Caldera Works. Pim Okonta discovered lunarium, a pale metal. Notes on the history of the region."
    )
    got = {p.split("\n")[0].removeprefix("Question: "): a for p, a in question_renderings(doc)}
    assert got["What is the capital of Veloria?"] == "Quintaro"
    assert got["What is Quintaro?"] == "The capital of Veloria"
    assert got["Who built the walking robot Zephyr-9?"] == "Caldera Works"
    assert got["Who discovered lunarium?"] == "Pim Okonta"
    assert got["Pim Okonta discovered what?"] == "lunarium"
    assert got["The capital of what is Quintaro, a walled city?"] == "Veloria"
    # a leading name followed by a preposition is no statement about that name
    assert not any(q.startswith("Who on") for q in got)
    assert all(p.startswith("Question: ") and p.endswith("\nAnswer:") for p, _ in question_renderings(doc))


def test_renderings_use_the_option_scoring_cloze_and_never_the_questions() -> None:
    assert QA_TEMPLATE == CLOZE_TEMPLATE
    docs = [
        json.loads(line)["text"] for line in (DATA / "invented_facts_docs.jsonl").read_text().splitlines()
    ]
    questions = [json.loads(line) for line in (DATA / "invented_facts_mc.jsonl").read_text().splitlines()]
    rendered = {p for d in docs for p, _ in question_renderings(d)}
    assert len(rendered) > 60
    # the documents are statements; renderings come from them alone
    asked = {CLOZE_TEMPLATE.format(question=q["question"]) for q in questions}
    assert not asked & rendered  # the evaluation asks in other words than the renderings
    assert all(len(s.split()) >= 3 for d in docs for s in sentences(d))


def test_recipe_defaults_follow_the_data_kind() -> None:
    docs = TrainConfig().for_kind("text")
    assert docs.lora is True and docs.learning_rate == DOCUMENT_RECIPE["lr"] and docs.renderings
    assert docs.replay == 0.5 and docs.epochs == "auto" and docs.lora_r == 16
    pairs = TrainConfig().for_kind("sft")
    assert pairs.lora is False and pairs.learning_rate == 5e-5 and not pairs.renderings and pairs.replay == 0
    assert pairs.epochs == 1.0
    # an explicit choice wins, and the other mode's plain defaults come with it
    full_docs = TrainConfig(lora=False).for_kind("text")
    assert full_docs.lora is False and full_docs.learning_rate == 5e-5
    lora_pairs = TrainConfig(lora=True).for_kind("sft")
    assert lora_pairs.learning_rate == 2e-4 and lora_pairs.lora_r == 8
    assert TrainConfig(lr=3e-4, replay=0.0).for_kind("text").learning_rate == 3e-4
    for bad in ({"replay": -1.0}, {"heldout_fraction": 1.0}, {"patience": 0}, {"epochs": "many"}):
        with pytest.raises(InputError):
            TrainConfig(**bad).validate()


def test_heldout_slice_only_once_there_are_enough_documents() -> None:
    few = [f"doc {i}" for i in range(8)]
    assert _split_heldout(few, TrainConfig()) == (few, [])
    many = [f"doc {i}" for i in range(40)]
    train, held = _split_heldout(many, TrainConfig())
    assert len(held) == 4 and not set(train) & set(held) and len(train) + len(held) == 40
    assert _split_heldout(many, TrainConfig()) == (train, held)  # seeded


def test_gate_scales_a_diffuse_offset_to_zero_and_keeps_a_confident_one() -> None:
    assert gate_weight(0.1, 0.2, 0.5) == 0.0 and gate_weight(0.9, 0.2, 0.5) == 1.0
    assert gate_weight(0.35, 0.2, 0.5) == pytest.approx(0.5)
    even = {"A": 0.0, "B": 0.0}
    assert disagreement(even, even) == 0.0
    assert disagreement({"A": 50.0, "B": 0.0}, {"A": 0.0, "B": 50.0}) == pytest.approx(1.0)
    # lift: what the expert's own answer gained; a shared preference lifts nothing
    assert lift({"A": 50.0, "B": 0.0}, {"A": 0.0, "B": 50.0}) == pytest.approx(1.0)
    assert lift({"A": 50.0, "B": 0.0}, {"A": 50.0, "B": 0.0}) == 0.0
    assert lift({"A": 0.0, "B": 0.0, "C": 50.0}, {"A": 0.0, "B": 0.0, "C": 0.0}) == pytest.approx(2 / 3)
    assert all(f"{c}-gated" in CALIBRATIONS for c in ("sum", "mean", "pmi", "pmi-mean"))
    cf = {"A": 0.0, "B": 0.0}
    confident = OptionScores(
        {"A": -1.0, "B": -9.0}, {"A": -6.0, "B": -4.0}, {"A": 1, "B": 1}, cf, cf, "sum-gated"
    )
    assert confident.gate() == 1.0 and confident.offsets() == pytest.approx({"A": 5.0, "B": -5.0})
    diffuse = OptionScores(
        {"A": -5.1, "B": -5.0}, {"A": -5.0, "B": -5.0}, {"A": 1, "B": 1}, cf, cf, "sum-gated"
    )
    assert diffuse.gate() == 0.0 and diffuse.offsets() == {"A": 0.0, "B": 0.0}
    # the expert's own scores are kept, so its own answer does not depend on the gate
    assert diffuse.as_pair()[0] == {"A": -5.1, "B": -5.0}
    assert OptionScores.from_json(diffuse.to_json()) == diffuse
    assert diffuse.with_calibration("sum").offsets() == pytest.approx({"A": -0.1, "B": 0.0})


def test_a_small_replay_file_keeps_its_held_out_texts_out_of_training(tmp_path: Path) -> None:
    """--replay-data with fewer texts than the run replays: training cycles over the pool, but the
    held-out general set (the last HELDOUT_REPLAY texts) is never trained on."""
    pool = tmp_path / "replay.jsonl"
    pool.write_text("".join(json.dumps({"text": f"general text number {i}"}) + "\n" for i in range(40)))
    cfg = TrainConfig(replay_data=str(pool))
    n_train = 100
    texts = _replay_texts(tmp_path / "out", None, None, cfg, n_train + HELDOUT_REPLAY)
    train, held = texts[:n_train], texts[n_train:]
    assert len(held) == HELDOUT_REPLAY == len(set(held))
    assert not set(held) & set(train)
    assert len(set(train)) == 40 - HELDOUT_REPLAY  # every other text is replayed
    # a pool at least as large as the request gives distinct texts (as before), and reruns agree
    big = _replay_texts(tmp_path / "big", None, None, cfg, 30)
    assert len(set(big)) == 30
    assert _replay_texts(tmp_path / "again", None, None, cfg, n_train + HELDOUT_REPLAY) == texts
