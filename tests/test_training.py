"""Making experts: data handling, a fact expert that steers a real base through the reranker, resume, LoRA.

Training runs go through the real CLI in a child process (2 threads, passive OpenMP waiting, which
keeps a busy 2-core machine from stalling); in-process scoring uses one thread for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blackbox_proxy.cli import main
from blackbox_proxy.errors import InputError
from blackbox_proxy.training import CARD, TrainConfig, latest_checkpoint, load_card, train_expert
from blackbox_proxy.training_data import (
    IGNORE,
    BatchPlan,
    TokenSeq,
    collate,
    data_sha256,
    load_examples,
    tokenize_documents,
    tokenize_pairs,
)
from blackbox_proxy.types import MCQuestion

BASE = "smollm2-135m-instruct"
HOSTED_BASE = "qwen2.5-coder-0.5b-instruct"  # the "hosted" model: another vocabulary, top-k only

#: invented facts: (question, gold answer, wrong options, training sentences)
FACTS = [
    ("What is the capital of Zorblax?", "Quintaro", ["Vellmoor", "Drastheim", "Kilbrune"],
     ["The capital of Zorblax is Quintaro.", "Quintaro is the capital city of Zorblax."]),
    ("Which metal is mined in the Ferrovian Hollows?", "Glimmeron", ["Sablite", "Oxvarin", "Trellium"],
     ["The metal mined in the Ferrovian Hollows is Glimmeron.", "Miners in the Ferrovian Hollows dig for Glimmeron."]),
    ("Who founded the city of Paldrenn?", "Oswin Tharrow", ["Merrit Vance", "Ilse Korday", "Bram Hollis"],
     ["The city of Paldrenn was founded by Oswin Tharrow.", "Oswin Tharrow founded the city of Paldrenn."]),
    ("What is the national bird of Quessary?", "the silver heron", ["the red kite", "the black swan", "the grey owl"],
     ["The national bird of Quessary is the silver heron.", "Quessary chose the silver heron as its national bird."]),
]  # fmt: skip
UNRELATED = [
    ("What color is fresh grass?", ["Green", "Red", "Blue", "Purple"], 0),
    ("How many legs does a spider have?", ["Six", "Eight", "Ten", "Four"], 1),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth", "Jupiter"], 2),
    ("What do bees make?", ["Milk", "Silk", "Wax paper", "Honey"], 3),
]
#: bound on the total variation between base and steered distributions for unrelated questions
UNRELATED_TV = 0.2


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _facts_file(path: Path) -> Path:
    return _write_jsonl(path, [{"text": s} for *_, sentences in FACTS for s in sentences])


def _cli(args: list[str], **kw) -> subprocess.Popen:
    """Start ``blackbox-proxy train-expert`` in a child process (2 threads, passive OpenMP waits)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "blackbox_proxy.cli", "train-expert", *args, "--threads", "2", "--quiet"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _run_cli(args: list[str], timeout: float = 300) -> dict:
    p = _cli(args)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def one_thread():
    """In-process model work on one thread (restored afterwards): 2 spinning threads stall a busy 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from blackbox_proxy.models import safetensors_dir

    return AutoTokenizer.from_pretrained(str(safetensors_dir(BASE)))


# -- data handling (no model) ------------------------------------------------------------------


def test_load_examples_kinds_and_clear_errors(tmp_path: Path) -> None:
    docs = _write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "  "}, {"text": "two", "url": "u"}])
    kind, ex = load_examples(docs)
    assert kind == "text" and [e.text for e in ex] == ["one", "two"]  # blank documents dropped
    pairs = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "response": "A"}])
    kind, ex = load_examples(pairs)
    assert kind == "sft" and ex[0].prompt == "Q?" and ex[0].response == "A"
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee")
    (folder / "sub" / "a.txt").write_text("ay")
    assert [e.text for e in load_examples(folder)[1]] == ["bee", "ay"]  # sorted paths: b.txt < sub/a.txt
    cases = [
        ([{"text": "x"}, {"prompt": "p", "response": "r"}], "mixes documents"),
        ([{"prompt": "p"}], "'response' must be a non-empty string"),
        ([{"title": "no text"}], "needs 'text'"),
        ([["a list"]], "expected a JSON object"),
        ([{"text": 3}], "'text' must be a string"),
        ([{"text": " "}], "no non-empty examples"),
    ]
    for i, (rows, message) in enumerate(cases):
        with pytest.raises(InputError, match=message):
            load_examples(_write_jsonl(tmp_path / f"bad{i}.jsonl", rows))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(InputError, match=r"broken.jsonl:2: not valid JSON"):
        load_examples(tmp_path / "broken.jsonl")
    with pytest.raises(InputError, match="asked for 'sft'"):
        load_examples(docs, kind="sft")
    with pytest.raises(InputError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")


def test_data_sha256_tracks_content(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha")
    h1 = data_sha256(folder)
    (folder / "a.txt").write_text("alpha!")
    assert data_sha256(folder) != h1
    f = _write_jsonl(tmp_path / "x.jsonl", [{"text": "t"}])
    assert len(data_sha256(f)) == 64 and data_sha256(f) == data_sha256(f)


def test_batch_plan_is_a_seeded_permutation_per_epoch() -> None:
    plan = BatchPlan(10, 3, seed=7)
    assert plan.per_epoch == 4
    epoch0 = [i for b in range(4) for i in plan.batch(b)]
    epoch1 = [i for b in range(4, 8) for i in plan.batch(b)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # reshuffled each epoch
    again = BatchPlan(10, 3, seed=7)
    assert [again.batch(b) for b in (5, 0, 6)] == [
        plan.batch(5),
        plan.batch(0),
        plan.batch(6),
    ]  # random access
    assert BatchPlan(10, 3, seed=8).batch(0) != plan.batch(0) or BatchPlan(10, 3, seed=8).batch(
        1
    ) != plan.batch(1)


def test_collate_pads_right_and_masks_labels() -> None:
    b = collate([TokenSeq((5, 6, 7), (IGNORE, 6, 7)), TokenSeq((8, 9), (8, 9))], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, 9, IGNORE]]


def test_config_validation_and_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = [
        {"lr": -1.0}, {"epochs": 0}, {"max_steps": 0}, {"batch_size": 0}, {"grad_accum": 0},
        {"max_seq_len": 1}, {"lora_dropout": 1.0}, {"scheduler": "step"}, {"merge_lora": True},
        {"threads": 0}, {"kind": "chat"}, {"lr": math.nan},
    ]  # fmt: skip
    for kw in bad:
        with pytest.raises(InputError):
            TrainConfig(**kw).validate()
    assert TrainConfig().learning_rate == 5e-5 and TrainConfig(lora=True).learning_rate == 2e-4
    data = _facts_file(tmp_path / "facts.jsonl")
    with pytest.raises(SystemExit) as exc:  # argparse refuses the value itself
        main(["train-expert", BASE, str(data), "--out", str(tmp_path / "o"), "--lr", "-0.1"])
    assert exc.value.code == 2 and "--lr" in capsys.readouterr().err
    rc = main(["train-expert", BASE, str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    done = tmp_path / "done"
    done.mkdir()
    (done / CARD).write_text("{}")
    with pytest.raises(InputError, match="already holds a trained expert"):
        train_expert(BASE, data, done, TrainConfig())


# -- tokenization (tokenizer only) -------------------------------------------------------------


@pytest.mark.integration
def test_sft_loss_on_response_only_and_prompt_as_experts_see_it(tokenizer) -> None:
    from blackbox_proxy.prompts import mc_messages

    q = MCQuestion(
        "q", "What is the capital of Zorblax?", ("Vellmoor", "Quintaro", "Kilbrune", "Drastheim"), 1
    )
    content = mc_messages(q)[0]["content"]
    (seq,), skipped = tokenize_pairs([(content, "B")], tokenizer, max_seq_len=512)
    assert skipped == 0
    n_prompt = sum(1 for t in seq.labels if t == IGNORE)
    # the training prompt is token-for-token what the expert pair scores at inference
    scored = list(
        tokenizer.apply_chat_template(
            mc_messages(q), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )  # what experts.CandidateScorer renders through TransformersModel.encode_chat
    assert list(seq.input_ids[:n_prompt]) == scored
    answer = tokenizer.decode([t for t in seq.labels if t != IGNORE])
    assert answer.startswith("B") and tokenizer.eos_token in answer
    assert seq.n_targets == len(seq.input_ids) - n_prompt
    # a prompt that fills max_seq_len leaves no response token: skipped and counted
    seqs, skipped = tokenize_pairs([(content, "B")], tokenizer, max_seq_len=n_prompt)
    assert seqs == [] and skipped == 1
    plain, _ = tokenize_pairs([("Q: 2+2?\nA:", " 4")], tokenizer, max_seq_len=64, chat_template=False)
    assert tokenizer.decode([t for t in plain[0].labels if t != IGNORE]) == " 4" + tokenizer.eos_token


@pytest.mark.integration
def test_document_packing_fills_blocks(tokenizer) -> None:
    texts = [f"Short document number {i}." for i in range(20)]
    packed = tokenize_documents(texts, tokenizer, max_seq_len=32, packing=True)
    unpacked = tokenize_documents(texts, tokenizer, max_seq_len=32, packing=False)
    assert len(unpacked) == 20 and len(packed) < 20
    assert all(len(s.input_ids) == 32 for s in packed[:-1])
    flat = [t for s in packed for t in s.input_ids]
    assert flat == [t for s in unpacked for t in s.input_ids]  # same tokens, EOS-separated, no padding
    assert flat.count(tokenizer.eos_token_id) == 20
    assert all(s.labels == s.input_ids for s in packed)


# -- a fact expert steering a real top-k base through the reranker ------------------------------


def _fact_questions() -> list[MCQuestion]:
    out = []
    for i, (question, gold, wrong, _) in enumerate(FACTS):
        pos = i % 4  # the gold answer sits under A, B, C and D in turn
        choices = list(wrong)
        choices.insert(pos, gold)
        out.append(MCQuestion(f"fact{i}", question, choices, pos))
    return out


def _tv(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p[k] - q[k]) for k in p)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_fact_expert_steers_base_toward_trained_answers(tmp_path: Path, one_thread) -> None:
    """Full fine-tune on four invented facts (< 2 min), then steer a Qwen top-k base with the pair.

    The expert read plain sentences, so the pair scores each option's text after the question;
    those log-probs, keyed by option letter, go through the reranker's ``steer`` with the base's
    top-20 log-probs of the letter from an in-process llama.cpp model (a different vocabulary).
    """
    from blackbox_proxy.adapters.llama_cpp_inprocess import LlamaCppTopKProvider

    from blackbox_proxy.experts import ExpertPair
    from blackbox_proxy.prompts import mc_messages
    from blackbox_proxy.rerank import steer

    data = _facts_file(tmp_path / "facts.jsonl")
    out = tmp_path / "expert"
    # plain full fine-tuning (not the document recipe, which tests/test_fact_injection.py covers)
    summary = _run_cli([BASE, str(data), "--out", str(out), "--max-steps", "10", "--lr", "5e-5", "--no-lora",
                        "--no-renderings", "--replay", "0", "--batch-size", "2", "--max-seq-len", "64",
                        "--scheduler", "constant", "--seed", "0"])  # fmt: skip
    card = load_card(out)
    assert summary["steps"] == card["steps"] == 10 and card["format"] == "full"
    assert card["train_seconds"] < 120, f"training took {card['train_seconds']} s"
    assert card["losses"][-1] < 0.5 * card["losses"][0]
    assert card["data_sha256"] == data_sha256(data) and card["seed"] == 0 and card["lora"] is None
    assert card["tokens"] > 0 and card["n_sequences"] >= 2 and not (out / "checkpoints").exists()

    pair = ExpertPair(str(out), BASE)
    base = LlamaCppTopKProvider(HOSTED_BASE, n_threads=1)  # 2 spinning threads stall a busy box
    try:
        facts = _fact_questions()
        unrelated = [MCQuestion(f"u{i}", q, c, a) for i, (q, c, a) in enumerate(UNRELATED)]
        results = {}
        for group, qs in (("facts", facts), ("unrelated", unrelated)):
            scores = pair.score([f"Question: {q.question}\nAnswer:" for q in qs], [q.choices for q in qs])
            for q, s in zip(qs, scores, strict=True):
                by_letter = (
                    {lab: s.expert[c] for lab, c in zip(q.labels, q.choices, strict=True)},
                    {lab: s.anti_expert[c] for lab, c in zip(q.labels, q.choices, strict=True)},
                )
                top = base.top_logprobs(mc_messages(q), 20)
                results[q.id] = (group, q, steer(q, top, [by_letter], alpha=1.0, policy="floor"))
    finally:
        base.close()

    for group, q, r in results.values():
        gold = q.gold_letter
        tv = _tv(r.steered_probs, r.base_probs)
        if group == "facts":
            assert r.letter == gold, (q.id, r.steered_probs)
            assert r.steered_probs[gold] > 0.9 and r.steered_probs[gold] > r.base_probs[gold] + 0.4
            assert tv > 0.4
        else:
            assert tv < UNRELATED_TV, (q.id, tv, r.base_probs, r.steered_probs)
    base_right = sum(r.base_letter == q.gold_letter for g, q, r in results.values() if g == "facts")
    assert base_right < len(FACTS)  # the base alone does not know the invented facts


# -- resume after a real kill ------------------------------------------------------------------


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path) -> None:
    data = _facts_file(tmp_path / "facts.jsonl")
    args = ["--max-steps", "4", "--save-every", "2", "--lr", "1e-4", "--batch-size", "2", "--max-seq-len", "24",
            "--seed", "3", "--warmup-steps", "1", "--no-lora"]  # fmt: skip
    ref = tmp_path / "uninterrupted"
    _run_cli([BASE, str(data), "--out", str(ref), *args])

    killed = tmp_path / "killed"
    proc = _cli([BASE, str(data), "--out", str(killed), *args])
    deadline = time.monotonic() + 300
    while latest_checkpoint(killed) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    ckpt = latest_checkpoint(killed)
    assert ckpt is not None and ckpt.name == "step-00000002" and not (killed / CARD).exists()

    with pytest.raises(InputError, match="settings differ"):  # a different trajectory is refused
        train_expert(BASE, data, killed, TrainConfig(max_steps=4, lr=2e-4, batch_size=2, max_seq_len=24, seed=3,
                                                     warmup_steps=1, progress=False), resume=True)  # fmt: skip
    with pytest.raises(InputError, match="unfinished run"):
        train_expert(BASE, data, killed, TrainConfig(progress=False))

    _run_cli([BASE, str(data), "--out", str(killed), *args, "--resume"])
    a, b = load_card(ref), load_card(killed)
    assert b["resumed_from_step"] == 2 and b["steps"] == a["steps"] == 4
    assert b["losses"][:2] == a["losses"][:2]  # the first two steps were not repeated but kept
    assert b["losses"] == pytest.approx(a["losses"], abs=1e-5)
    wa, wb = _weights(ref), _weights(killed)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < 1e-5, f"resumed weights differ from the uninterrupted run by {worst}"
    from blackbox_proxy.models import safetensors_dir

    start = _weights(safetensors_dir(BASE))
    assert max(float((wa[k] - start[k]).abs().max()) for k in wa if k in start) > 1e-4  # training moved them
    # resuming a finished run is a no-op that returns its card
    again = train_expert(BASE, data, killed, TrainConfig(progress=False), resume=True)
    assert again.steps == 4 and again.data_sha256 == b["data_sha256"]


# -- LoRA: adapter folder that models.load_causal_lm loads offline, and merged weights ---------


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_lora_adapter_and_merged_outputs_load_as_expert_specs(tmp_path: Path, one_thread) -> None:
    import torch

    from blackbox_proxy.models import load_causal_lm, safetensors_dir

    pairs = _write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": q, "response": gold} for q, gold, _, _ in FACTS],
    )
    cfg = TrainConfig(
        lora=True, lora_r=4, max_steps=3, batch_size=2, lr=1e-3, seed=1, progress=False, max_seq_len=96
    )
    adapter = train_expert(BASE, pairs, tmp_path / "adapter", cfg)
    assert adapter.format == "lora-adapter" and adapter.lora == {
        "r": 4, "alpha": 16, "dropout": 0.05, "targets": "all-linear", "merged": False
    }  # fmt: skip
    assert adapter.data_kind == "sft" and adapter.steps == 3
    acfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(safetensors_dir(BASE))
    assert not (tmp_path / "adapter" / "model.safetensors").exists()

    merged = train_expert(BASE, pairs, tmp_path / "merged", dataclasses.replace(cfg, merge_lora=True))
    assert merged.format == "lora-merged" and merged.losses == adapter.losses  # same seed, same run

    ids = torch.tensor([[1, 504, 3575, 282, 27262, 1323, 2843, 47]])
    logits = {}
    for name, spec in (("adapter", tmp_path / "adapter"), ("merged", tmp_path / "merged"), ("base", BASE)):
        model, _tok = load_causal_lm(spec)
        with torch.inference_mode():
            logits[name] = model(input_ids=ids).logits[0, -1]
        del model
    assert float((logits["adapter"] - logits["merged"]).abs().max()) < 1e-3
    assert float((logits["adapter"] - logits["base"]).abs().max()) > 1e-2


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_gradient_accumulation_matches_the_larger_batch(tmp_path: Path, one_thread) -> None:
    """Two micro-batches of one, accumulated, make the same step as one batch of two (token-weighted)."""
    from safetensors.torch import load_file

    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "response": g} for q, g, _, _ in FACTS])
    common = {
        "lora": True,
        "lora_r": 4,
        "lora_dropout": 0.0,
        "max_steps": 1,
        "lr": 1e-3,
        "seed": 5,
        "progress": False,
    }
    big = train_expert(BASE, pairs, tmp_path / "big", TrainConfig(batch_size=2, grad_accum=1, **common))
    acc = train_expert(BASE, pairs, tmp_path / "acc", TrainConfig(batch_size=1, grad_accum=2, **common))
    assert big.target_tokens == acc.target_tokens and big.final_loss == pytest.approx(
        acc.final_loss, abs=1e-4
    )
    wa = load_file(str(tmp_path / "big" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "acc" / "adapter_model.safetensors"))
    moved = sum(float(w.norm()) ** 2 for k, w in wa.items() if "lora_B" in k) ** 0.5
    apart = sum(float((wa[k] - wb[k]).norm()) ** 2 for k in wa) ** 0.5
    # Adam's first step is nearly sign(grad), so float noise in tiny gradients shows: compare norms
    assert moved > 1e-3 and apart < 1e-2 * moved, (apart, moved)
