"""Multiple-choice prompt templates, in one place for the base model and the expert pair.

A :class:`PromptTemplate` renders a question two ways, so that the first answer token *is* the
option letter and its log-prob can be read off a top-k list (base) or the full vocabulary
(experts):

* :meth:`PromptTemplate.messages` / :func:`mc_messages` - chat style: an optional system message
  and one user message, for chat endpoints and for local models with a chat template (each model
  applies its own template to it);
* :meth:`PromptTemplate.completion` / :func:`mc_text` - completion style, for completion
  endpoints and for local models without a chat template.

Placeholders (Python ``str.format`` fields; write ``{{`` / ``}}`` for literal braces):

==================  =====================================================================
``{question}``      the question text, surrounding white space stripped (required)
``{options}``       the option lines joined by newlines, each rendered with ``option`` (required)
``{letters}``       the option letters as a phrase: ``A, B, C or D``
``{letter_list}``   the option letters comma-separated: ``A, B, C, D``
``{first}``         the first letter (``A``); ``{last}`` the last one (``D``)
``{n}``             the number of options
==================  =====================================================================

The per-option line format ``option`` takes ``{label}`` (the letter), ``{text}`` (the option
text, internal white space collapsed; both required) and ``{index}`` (1-based position).

Built-in templates are in :data:`TEMPLATES` (see :func:`get_template`); the default,
:data:`DEFAULT_TEMPLATE`, was chosen by accuracy and letter spread on ARC-Challenge and MMLU
validation with the served Qwen2.5-Coder-1.5B-Instruct at alpha 0 (``benchmarks/choose_prompt.py``;
numbers in its docstring and in ``benchmarks/RESULTS.md``). User templates come from files through
:func:`load_template` (JSON or a sectioned text format, both described there).
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .types import MCQuestion


class TemplateError(InputError):
    """A prompt template is malformed: unknown or missing placeholder, bad braces, bad file."""


#: Placeholders of the question-level forms (``chat``, ``text``, ``system``).
QUESTION_FIELDS = ("question", "options", "letters", "letter_list", "first", "last", "n")
#: Placeholders of the per-option line format.
OPTION_FIELDS = ("label", "text", "index")
#: Placeholders every ``chat`` and ``text`` form must contain.
REQUIRED_FIELDS = ("question", "options")

#: Opening instruction of the ``legacy`` template (the project's first default).
INSTRUCTION = "Answer the following multiple-choice question with the letter of the correct option"
#: The ``legacy`` chat prompt's closing line. Listing the letters in order made Qwen-1.5B answer
#: the first one it lists: 74 "A" of 80 RealtimeQA answers (see ``benchmarks/RESULTS.md``).
REMINDER = "Reply with just one letter: {letters}."


def _fields(fmt: str, allowed: Sequence[str], where: str) -> set[str]:
    """The placeholder names of ``fmt``; TemplateError for unknown names, specs or bad braces."""
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as exc:
        raise TemplateError(f"{where}: {exc} (write {{{{ and }}}} for literal braces)") from None
    names: set[str] = set()
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise TemplateError(
                f"{where}: positional placeholder '{{{name}}}'; use named ones: {list(allowed)}"
            )
        if name not in allowed:
            raise TemplateError(f"{where}: unknown placeholder '{{{name}}}'; allowed: {list(allowed)}")
        if spec or conv:
            raise TemplateError(
                f"{where}: placeholder '{{{name}}}' must not carry a format spec or conversion"
            )
        names.add(name)
    return names


def letters_phrase(labels: Sequence[str]) -> str:
    """``A, B, C or D`` for four labels; the label alone for one."""
    return ", ".join(labels[:-1]) + " or " + labels[-1] if len(labels) > 1 else labels[0]


@dataclass(frozen=True)
class PromptTemplate:
    """A named multiple-choice prompt: chat form (``system`` + ``chat``) and completion form (``text``).

    Every form is a ``str.format`` string over :data:`QUESTION_FIELDS`; ``option`` formats one
    option line over :data:`OPTION_FIELDS`. Construction validates all of them (TemplateError).
    """

    name: str
    chat: str
    text: str
    system: str = ""
    option: str = "{label}. {text}"
    description: str = ""

    def __post_init__(self) -> None:
        if not str(self.name).strip():
            raise TemplateError("a prompt template needs a non-empty name")
        for form in ("chat", "text"):
            fmt = getattr(self, form)
            if not isinstance(fmt, str) or not fmt.strip():
                raise TemplateError(f"template {self.name!r}: the {form!r} form is empty")
            got = _fields(fmt, QUESTION_FIELDS, f"template {self.name!r}, {form!r} form")
            missing = [f for f in REQUIRED_FIELDS if f not in got]
            if missing:
                raise TemplateError(
                    f"template {self.name!r}, {form!r} form: missing placeholder(s) "
                    + ", ".join("{" + m + "}" for m in missing)
                )
        if not isinstance(self.system, str):
            raise TemplateError(f"template {self.name!r}: 'system' must be a string")
        _fields(self.system, QUESTION_FIELDS, f"template {self.name!r}, 'system' form")
        got = _fields(self.option, OPTION_FIELDS, f"template {self.name!r}, 'option' format")
        if not {"label", "text"} <= got:
            raise TemplateError(f"template {self.name!r}, 'option' format: needs both {{label}} and {{text}}")

    def values(self, q: MCQuestion) -> dict[str, str]:
        """The placeholder values for question ``q``."""
        labels = q.labels
        lines = [
            self.option.format(label=lab, text=" ".join(str(c).split()), index=i + 1)
            for i, (lab, c) in enumerate(zip(labels, q.choices, strict=True))
        ]
        return {
            "question": str(q.question).strip(),
            "options": "\n".join(lines),
            "letters": letters_phrase(labels),
            "letter_list": ", ".join(labels),
            "first": labels[0],
            "last": labels[-1],
            "n": str(len(labels)),
        }

    def messages(self, q: MCQuestion) -> list[dict[str, str]]:
        """Chat form: an optional system message, then one user message."""
        v = self.values(q)
        out = [{"role": "system", "content": self.system.format(**v)}] if self.system.strip() else []
        out.append({"role": "user", "content": self.chat.format(**v)})
        return out

    def completion(self, q: MCQuestion) -> str:
        """Completion form: the ``text`` template filled in (the system message is not used)."""
        return self.text.format(**self.values(q))

    def to_dict(self) -> dict[str, Any]:
        """All fields; ``PromptTemplate(**d)`` or a JSON file of it gives the template back."""
        return asdict(self)


# --------------------------------------------------------------------------- built-in templates

_PLAIN = "Question: {question}\n{options}\nAnswer with the letter of the correct option.\nAnswer:"

#: Built-in templates by name. Measured on the served Qwen2.5-Coder-1.5B-Instruct, alpha 0, chat
#: form, top-20 first-token log-probs (``benchmarks/choose_prompt.py``; see DEFAULT_TEMPLATE).
TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate(
            "legacy",
            chat=f"{INSTRUCTION} only, no explanation.\n\nQuestion: {{question}}\n{{options}}\n\n{REMINDER}",
            text=f"{INSTRUCTION}.\n\nQuestion: {{question}}\n{{options}}\nAnswer:",
            description="the first default: closing line lists the letters (biases to the first listed)",
        ),
        PromptTemplate(
            "plain",
            chat=_PLAIN,
            text=_PLAIN,
            description="Question / options / 'Answer with the letter of the correct option.' / Answer:",
        ),
        PromptTemplate(
            "instruct",
            chat=f"{INSTRUCTION}.\n\nQuestion: {{question}}\n{{options}}\nAnswer:",
            text=f"{INSTRUCTION}.\n\nQuestion: {{question}}\n{{options}}\nAnswer:",
            description="opening instruction, question, options, 'Answer:' cue; no letter list",
        ),
        PromptTemplate(
            "mmlu",
            chat="The following is a multiple choice question. Answer with the letter of the correct "
            "option.\n\n{question}\n{options}\nAnswer:",
            text="The following is a multiple choice question.\n\n{question}\n{options}\nAnswer:",
            description="MMLU-harness style header, bare question, options, 'Answer:'",
        ),
        PromptTemplate(
            "letter-only",
            chat="Question: {question}\n{options}\n\nReply with the letter of the correct option only.",
            text=_PLAIN,
            description="question and options, closing request for the letter without listing letters",
        ),
        PromptTemplate(
            "system",
            system="You answer multiple-choice questions. Reply with the letter of the correct option only.",
            chat="Question: {question}\n{options}",
            text=_PLAIN,
            description="instruction in a system message, question and options in the user message",
        ),
    )
}

#: Name of the default template, chosen by answers on validation data (served
#: Qwen2.5-Coder-1.5B-Instruct, alpha 0, chat form, top-20; ``benchmarks/choose_prompt.py``,
#: ``benchmarks/bench_debias.py``; numbers in benchmarks/RESULTS.md):
#:
#: ==============  ========================  ========================  ===========================
#: template        ARC-C val (100)           MMLU val (50)             letter prior (cyclic shifts)
#: ==============  ========================  ========================  ===========================
#: plain           0.560, top B 0.41, m .46  0.400, top B 0.46, m .35  B .32-.33, others .20-.26
#: letter-only     0.590, top B 0.40, m .97  0.400, top B 0.46, m .92  B .34, others .17-.27
#: ==============  ========================  ========================  ===========================
#:
#: (accuracy, most frequent answer letter and its share, mean probability on the letters ``m``).
#: On validation the two tie on accuracy (McNemar p 0.61 / 1.0); ``plain`` has the flatter letter
#: prior and its chosen option follows a cyclic shift of the options more often (0.958 vs 0.92 of
#: 24 shifted prompts). The prior is what decides on questions the model cannot know, and there
#: the difference is large: on 80 RealtimeQA 2025+ questions ``letter-only`` answers "B" 59 % of
#: the time (accuracy 0.362), ``plain`` 40 % (0.400). ``letter-only`` was the default before for
#: its letter mass (the letters fill a top-5 list); ``plain`` often leaves a letter outside a
#: top-5 list (71-82 % of validation questions), which the ``floor`` policy fills with its bound:
#: ask for more log-probs (``--top-logprobs 20`` where the provider allows it) when steering.
DEFAULT_TEMPLATE_NAME = "plain"


def get_template(name: str) -> PromptTemplate:
    """A built-in template by name; TemplateError listing the known names."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown prompt template {name!r}; built-in: {sorted(TEMPLATES)}") from None


# --------------------------------------------------------------------------- user files

_SECTIONS = ("chat", "text", "system", "option", "name", "description")


def load_template(path: str | os.PathLike[str]) -> PromptTemplate:
    """A template from a user file: JSON (``.json``) or the sectioned text format (anything else).

    JSON: an object with ``chat`` and/or ``text`` (one given alone serves both forms) and optional
    ``system``, ``option``, ``name`` (default: the file's stem), ``description``; other keys are
    rejected.

    Text: the whole file is the template for both forms, unless it starts with a section line.
    Section lines are exactly ``[chat]``, ``[text]``, ``[system]``, ``[option]``, ``[name]`` or
    ``[description]`` on a line of their own; each section runs to the next one, blank lines
    around it removed. For example::

        [system]
        You answer multiple-choice questions.
        [chat]
        Question: {question}
        {options}
        [text]
        Question: {question}
        {options}
        Answer:

    Placeholders are validated (TemplateError naming the file, the form and the placeholder).
    """
    from .files import read_text

    p = Path(path)
    raw = read_text(p, "prompt template")
    if p.suffix.lower() == ".json":
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TemplateError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(obj, dict):
            raise TemplateError(f"{p}: expected a JSON object with 'chat' and/or 'text'")
        unknown = sorted(set(obj) - set(_SECTIONS))
        if unknown:
            raise TemplateError(f"{p}: unknown key(s) {unknown}; allowed: {list(_SECTIONS)}")
        bad = [k for k, v in obj.items() if not isinstance(v, str)]
        if bad:
            raise TemplateError(f"{p}: key(s) {bad} must be strings")
        sections: dict[str, str] = dict(obj)
    else:
        sections = _parse_sections(raw, p)
    return _from_sections(sections, p)


def _parse_sections(raw: str, p: Path) -> dict[str, str]:
    lines = raw.splitlines()
    headers = {f"[{s}]" for s in _SECTIONS}
    first = next((ln for ln in lines if ln.strip()), "")
    if first.strip() not in headers:
        return {"chat": raw.strip("\n"), "text": raw.strip("\n")}
    out: dict[str, list[str]] = {}
    current: str | None = None
    for ln in lines:
        if ln.strip() in headers:
            current = ln.strip()[1:-1]
            if current in out:
                raise TemplateError(f"{p}: section [{current}] appears twice")
            out[current] = []
        elif current is not None:
            out[current].append(ln)
    return {k: "\n".join(v).strip("\n") for k, v in out.items()}


def _from_sections(sections: Mapping[str, str], p: Path) -> PromptTemplate:
    chat = sections.get("chat") or sections.get("text")
    text = sections.get("text") or sections.get("chat")
    if not chat or not text:
        raise TemplateError(f"{p}: a prompt template needs a 'chat' or a 'text' form (or both)")
    try:
        return PromptTemplate(
            name=(sections.get("name") or p.stem).strip(),
            chat=chat,
            text=text,
            system=sections.get("system", ""),
            option=sections.get("option") or "{label}. {text}",
            description=sections.get("description", ""),
        )
    except TemplateError as exc:
        raise TemplateError(f"{p}: {exc}") from None


def resolve_template(spec: PromptTemplate | str | os.PathLike[str] | None) -> PromptTemplate:
    """A template from a template, a built-in name, a file path, or None (the default)."""
    if spec is None:
        return TEMPLATES[DEFAULT_TEMPLATE_NAME]
    if isinstance(spec, PromptTemplate):
        return spec
    s = str(spec)
    if s in TEMPLATES:
        return TEMPLATES[s]
    if isinstance(spec, os.PathLike) or os.sep in s or Path(s).suffix or Path(s).exists():
        return load_template(s)
    raise TemplateError(f"unknown prompt template {s!r}: not a built-in name {sorted(TEMPLATES)} nor a file")


#: The default template, as an object.
DEFAULT_TEMPLATE: PromptTemplate = TEMPLATES[DEFAULT_TEMPLATE_NAME]


# --------------------------------------------------------------------------- renderings


def mc_messages(q: MCQuestion, template: PromptTemplate | str | None = None) -> list[dict[str, str]]:
    """Chat prompt for ``q`` under ``template`` (a template, a built-in name, or None: the default)."""
    return resolve_template(template).messages(q)


def mc_text(q: MCQuestion, template: PromptTemplate | str | None = None) -> str:
    """Completion prompt for ``q`` under ``template`` (a template, a built-in name, or None: the default)."""
    return resolve_template(template).completion(q)


def messages_to_text(messages: Sequence[Mapping[str, str]]) -> str:
    """Plain-text rendering of chat messages for a model without a chat template.

    The message contents are joined by blank lines and an ``Answer:`` cue is appended unless the
    last one already ends with it (used only when a local model has no chat template or templates
    are turned off).
    """
    if not messages:
        raise InputError("empty chat prompt: no messages")
    parts = []
    for i, m in enumerate(messages):
        if "content" not in m:
            raise InputError(f"chat message {i} has no 'content'")
        parts.append(str(m["content"]).strip())
    body = "\n\n".join(p for p in parts if p)
    return body if body.endswith("Answer:") else body + "\nAnswer:"
