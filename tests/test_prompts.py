"""Prompt templates: rendering, validation, user files, and (integration) letters that follow options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blackbox_proxy import prompts as pr
from blackbox_proxy.prompts import PromptTemplate, TemplateError
from blackbox_proxy.types import MCQuestion

Q = MCQuestion("q", "  What is 2 + 2?  ", ("three", "four\n  exactly", "five", "six"), 1)


def test_default_template_renders_both_forms() -> None:
    t = pr.DEFAULT_TEMPLATE
    assert t.name == pr.DEFAULT_TEMPLATE_NAME and pr.resolve_template(None) is t
    msgs = pr.mc_messages(Q)
    assert msgs == t.messages(Q) and msgs[-1]["role"] == "user"
    text = pr.mc_text(Q)
    assert text == t.completion(Q) and text.endswith("Answer:")
    for body in (msgs[-1]["content"], text):
        assert "What is 2 + 2?" in body and "A. three\nB. four exactly\nC. five\nD. six" in body
    # the default names no letter list (listing "A, B, C or D" biased Qwen-1.5B to "A")
    assert "A, B, C or D" not in msgs[-1]["content"]


def test_placeholders_values() -> None:
    t = PromptTemplate(
        "all",
        chat="{question}|{options}|{letters}|{letter_list}|{first}|{last}|{n}|{{literal}}",
        text="{question}\n{options}\nAnswer:",
        system="Pick one of {letters}.",
        option="({label}) {text} [{index}]",
    )
    five = MCQuestion("f", "Q?", tuple("vwxyz"), 0)
    sysm, user = t.messages(five)
    assert sysm == {"role": "system", "content": "Pick one of A, B, C, D or E."}
    assert user["content"] == (
        "Q?|(A) v [1]\n(B) w [2]\n(C) x [3]\n(D) y [4]\n(E) z [5]|A, B, C, D or E|A, B, C, D, E|A|E|5|{literal}"
    )
    assert t.completion(five).startswith("Q?\n(A) v [1]")
    assert pr.letters_phrase(("A", "B")) == "A or B" and pr.letters_phrase(("A",)) == "A"


def test_every_builtin_template_renders_every_option() -> None:
    five = MCQuestion("f", "Which planet?", ("Mercury", "Venus", "Earth", "Mars", "Jupiter"), 2)
    for name, t in pr.TEMPLATES.items():
        assert pr.get_template(name) is t and pr.resolve_template(name) is t
        for body in (t.messages(five)[-1]["content"], t.completion(five)):
            assert "Which planet?" in body, name
            assert all(f"{lab}. {c}" in body for lab, c in zip(five.labels, five.choices, strict=True)), name
    assert "Reply with just one letter: A, B, C or D." in pr.mc_messages(Q, "legacy")[0]["content"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chat": "{question} {opts}"}, r"unknown placeholder '\{opts\}'; allowed"),
        ({"chat": "{question} only"}, r"'chat' form: missing placeholder\(s\) \{options\}"),
        ({"text": "{options}"}, r"'text' form: missing placeholder\(s\) \{question\}"),
        ({"chat": "{} {question} {options}"}, "positional placeholder"),
        ({"chat": "{question:>10} {options}"}, "format spec or conversion"),
        ({"chat": "{question!r} {options}"}, "format spec or conversion"),
        ({"chat": "{question} {options} }"}, "literal braces"),
        ({"chat": "   "}, "'chat' form is empty"),
        ({"option": "{label}"}, r"needs both \{label\} and \{text\}"),
        ({"option": "{label} {text} {question}"}, r"unknown placeholder '\{question\}'"),
        ({"system": "{nope}"}, r"'system' form: unknown placeholder"),
        ({"name": ""}, "non-empty name"),
    ],
)
def test_template_validation(kwargs: dict[str, str], match: str) -> None:
    base = {"name": "t", "chat": "{question}\n{options}", "text": "{question}\n{options}\nAnswer:"}
    with pytest.raises(TemplateError, match=match):
        PromptTemplate(**{**base, **kwargs})


def test_load_template_json(tmp_path: Path) -> None:
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"chat": "Q: {question}\n{options}", "system": "Be brief."}))
    t = pr.load_template(p)
    assert t.name == "mine" and t.text == t.chat == "Q: {question}\n{options}"
    assert t.messages(Q)[0] == {"role": "system", "content": "Be brief."}
    assert pr.resolve_template(str(p)) == t and pr.mc_text(Q, t).startswith("Q: What is 2 + 2?")
    # to_dict round-trips through a file
    p2 = tmp_path / "round.json"
    p2.write_text(json.dumps(pr.TEMPLATES["system"].to_dict()))
    assert pr.load_template(p2) == pr.TEMPLATES["system"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"chat": "{question} {options}", "prompt": "x"}', r"unknown key\(s\) \['prompt'\]"),
        ('{"chat": 3}', r"key\(s\) \['chat'\] must be strings"),
        ('["chat"]', "expected a JSON object"),
        ('{"chat": ', "not valid JSON"),
        ('{"system": "x"}', "needs a 'chat' or a 'text' form"),
        (
            '{"chat": "{question} {choices}"}',
            r"bad\.json: template 'bad', 'chat' form: unknown placeholder '\{choices\}'",
        ),
    ],
)
def test_load_template_json_errors(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(TemplateError, match=match):
        pr.load_template(p)


def test_load_template_text_formats(tmp_path: Path) -> None:
    whole = tmp_path / "whole.txt"
    whole.write_text("\nQuestion: {question}\n{options}\nAnswer:\n\n")
    t = pr.load_template(whole)
    assert t.chat == t.text == "Question: {question}\n{options}\nAnswer:" and t.system == ""
    sec = tmp_path / "sec.prompt"
    sec.write_text(
        "[name]\nmy-template\n[system]\nYou answer quizzes.\n[chat]\nQuestion: {question}\n\n{options}\n"
        "[text]\n{question}\n{options}\nAnswer:\n[option]\n{label}) {text}\n"
    )
    t = pr.load_template(sec)
    assert t.name == "my-template" and t.system == "You answer quizzes."
    assert t.chat == "Question: {question}\n\n{options}"  # blank lines inside a section are kept
    assert t.completion(Q) == "What is 2 + 2?\nA) three\nB) four exactly\nC) five\nD) six\nAnswer:"


def test_load_template_text_errors(tmp_path: Path) -> None:
    dup = tmp_path / "dup.txt"
    dup.write_text("[chat]\n{question} {options}\n[chat]\nagain\n")
    with pytest.raises(TemplateError, match=r"section \[chat\] appears twice"):
        pr.load_template(dup)
    bad = tmp_path / "bad.txt"
    bad.write_text("Question: {question}\n{option}\n")
    with pytest.raises(TemplateError, match=r"bad\.txt: .*unknown placeholder '\{option\}'"):
        pr.load_template(bad)
    with pytest.raises(pr.InputError, match="does not exist"):
        pr.load_template(tmp_path / "missing.txt")
    with pytest.raises(TemplateError, match="unknown prompt template 'nonesuch'"):
        pr.resolve_template("nonesuch")
    with pytest.raises(TemplateError, match="unknown prompt template 'nonesuch'; built-in"):
        pr.get_template("nonesuch")


def test_messages_to_text_adds_one_answer_cue() -> None:
    assert pr.messages_to_text([{"role": "user", "content": "Q?\nA. x"}]) == "Q?\nA. x\nAnswer:"
    assert pr.messages_to_text(pr.mc_messages(Q)).count("Answer:") == 1
    with pytest.raises(pr.InputError, match="no messages"):
        pr.messages_to_text([])


# -- integration: the served base's chosen letter follows its option under cyclic shifts ------------

#: Easy questions (written for this test, not from any benchmark), so that a small model's choice
#: can depend on content rather than on letter position.
EASY = [
    ("What color is the sky on a clear day?", ("blue", "green", "red", "black")),
    ("How many legs does a dog have?", ("four", "two", "six", "eight")),
    ("Which animal says 'meow'?", ("cat", "cow", "duck", "horse")),
    ("What is the opposite of hot?", ("cold", "tall", "loud", "fast")),
    ("Which of these is a fruit?", ("apple", "chair", "stone", "shoe")),
    ("What do bees make?", ("honey", "milk", "silk", "wool")),
    ("What is frozen water called?", ("ice", "steam", "sand", "smoke")),
    ("Which planet do we live on?", ("Earth", "Mars", "Jupiter", "Venus")),
]


def follow_rate(provider: Any, template: PromptTemplate, k: int = 20) -> tuple[float, list[str]]:
    """Share of (question, shift >= 1) where the chosen letter moved with the option chosen unshifted."""
    from blackbox_proxy.candidates import match_candidates
    from blackbox_proxy.debias import cyclic_shift

    def choice(q: MCQuestion) -> int:
        top = provider.top_logprobs(template.messages(q), k)
        lp = match_candidates(top, q.labels)
        floor = top.missing_bound()
        vals = [floor if lp[lab] is None else lp[lab] for lab in q.labels]
        return max(range(len(vals)), key=vals.__getitem__)

    moved, letters = 0, []
    total = 0
    for i, (text, choices) in enumerate(EASY):
        q = MCQuestion(f"e{i}", text, choices, 0)
        ref = choice(q)
        letters.append(q.labels[ref])
        for s in range(1, 4):
            got = choice(cyclic_shift(q, s))
            letters.append(q.labels[got])
            moved += int((got + s) % 4 == ref)
            total += 1
    return moved / total, letters


@pytest.fixture(scope="module")
def qwen_server() -> Any:
    """Qwen2.5-Coder-1.5B-Instruct served by llama.cpp (the project's "hosted" base).

    The smaller models cannot show the property: on these 8 questions SmolLM2-135M's chosen option
    followed the shift in 2 of 24 prompts (``plain`` template) and Qwen-0.5B's in 4 of 24
    (``letter-only``) and 1 of 24 (``plain``): both answer by position.
    """
    from blackbox_proxy.server import LocalServer

    with LocalServer("qwen2.5-coder-1.5b-instruct", "qwen-1.5b", n_ctx=2048, n_threads=2) as server:
        yield server


@pytest.mark.integration
def test_chosen_letter_moves_with_its_option(qwen_server: Any) -> None:
    from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider

    provider = OpenAIChatProvider(qwen_server.model, qwen_server.base_url, max_k=None, timeout=120)
    try:
        rate, letters = follow_rate(provider, pr.DEFAULT_TEMPLATE)
    finally:
        provider.close()
    print(
        f"\n{qwen_server.model}: the chosen option followed the shift in {rate:.2f} of 24 shifted prompts; "
        f"letters {''.join(letters)}"
    )
    # a model answering by letter position alone would score 0 here; by content, 1
    assert rate > 0.5, (rate, letters)
    assert len(set(letters)) >= 3, letters  # the answers are spread over the letters
