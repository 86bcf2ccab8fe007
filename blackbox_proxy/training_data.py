"""Training data for experts: loading documents or prompt/response pairs, tokenizing, batching.

Two kinds of data make an expert (see DESIGN.md): plain documents for continued pre-training (JSONL
with a ``text`` field, a folder of ``.txt`` files, or one ``.txt`` file) and prompt/response pairs for
supervised fine-tuning (JSONL with ``prompt`` and ``response``), where the loss falls on the response
only. Everything here is deterministic: the same data, tokenizer and seed give the same batches.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import iter_jsonl

KINDS = ("auto", "text", "sft")
IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One training record: a document (``text``) or a prompt/response pair."""

    text: str | None = None
    prompt: str | None = None
    response: str | None = None


@dataclass(frozen=True)
class TokenSeq:
    """One tokenized training sequence; ``labels`` is IGNORE where no loss is taken."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_targets(self) -> int:
        """Number of positions that carry loss (a label at position 0 is never predicted)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def _txt_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise InputError(f"folder {path} holds no .txt files")
    return files


def data_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a data file, or of a folder's .txt files (relative names and contents, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in _txt_files(p):
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
            h.update(f.read_bytes())
            h.update(b"\0")
    else:
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _record_kind(rec: Any, where: str) -> str:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "prompt" in rec or "response" in rec:
        for key in ("prompt", "response"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise InputError(f"{where}: field {key!r} must be a non-empty string")
        return "sft"
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise InputError(f"{where}: field 'text' must be a string")
        return "text"
    raise InputError(f"{where}: a record needs 'text' (documents) or 'prompt' and 'response' (pairs)")


def load_examples(path: str | os.PathLike[str], kind: str = "auto") -> tuple[str, list[Example]]:
    """Read training data; returns (kind, examples) with kind ``text`` or ``sft``.

    ``auto`` infers the kind from the records; every record of a JSONL file must be of one kind.
    Empty documents are dropped; an empty data set is an error.
    """
    if kind not in KINDS:
        raise InputError(f"unknown data kind {kind!r}; choose one of {KINDS}")
    p = Path(path)
    if not p.exists():
        raise InputError(f"training data {p} does not exist")
    if p.is_dir() or p.suffix.lower() == ".txt":
        if kind == "sft":
            raise InputError(f"{p}: .txt data are documents; prompt/response pairs need a JSONL file")
        files = _txt_files(p) if p.is_dir() else [p]
        texts = [f.read_text(encoding="utf-8") for f in files]
        examples = [Example(text=t) for t in texts if t.strip()]
        found = "text"
    else:
        examples, kinds = [], set()
        for i, rec in iter_jsonl(p, what="training data"):
            where = f"{p}:{i}"
            k = _record_kind(rec, where)
            kinds.add(k)
            if len(kinds) > 1:
                raise InputError(f"{where}: mixes documents ('text') and pairs ('prompt'/'response')")
            if k == "sft":
                examples.append(Example(prompt=rec["prompt"], response=rec["response"]))
            elif rec["text"].strip():
                examples.append(Example(text=rec["text"]))
        found = kinds.pop() if kinds else "text"
    if kind != "auto" and kind != found:
        raise InputError(f"{p}: asked for {kind!r} data but the records are {found!r}")
    if not examples:
        raise InputError(f"training data {p} holds no non-empty examples")
    return found, examples


def _encode(tok: Any, text: str, special: bool) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _chunks(ids: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(ids), size):
        piece = ids[i : i + size]
        if len(piece) >= 2:  # a single token predicts nothing
            yield piece


def tokenize_documents(
    texts: Sequence[str], tok: Any, max_seq_len: int, packing: bool = True
) -> list[TokenSeq]:
    """Documents -> sequences of at most ``max_seq_len`` tokens, loss on every token.

    Each document is tokenized as the tokenizer does by default (e.g. a BOS token) and ends with
    EOS. With ``packing`` all documents are concatenated and cut into full-length blocks, so short
    documents waste no padding; without it each document is cut on its own.
    """
    if max_seq_len < 2:
        raise InputError(f"max_seq_len must be at least 2, got {max_seq_len}")
    eos = tok.eos_token_id
    docs = []
    for t in texts:
        ids = _encode(tok, t, True)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        docs.append(ids)
    if packing:
        stream = [i for ids in docs for i in ids]
        pieces = list(_chunks(stream, max_seq_len))
    else:
        pieces = [c for ids in docs for c in _chunks(ids, max_seq_len)]
    return [TokenSeq(tuple(c), tuple(c)) for c in pieces]


def render_pair(tok: Any, prompt: str, response: str, chat_template: bool = True) -> tuple[str, str]:
    """(prompt text, response text) exactly as the model sees them at inference and in training.

    With ``chat_template`` the prompt is one user turn plus the generation prompt, and the response
    text is what the template adds after it (the answer and its end-of-turn marker).
    """
    if not chat_template:
        return prompt, response + (tok.eos_token or "")
    if not getattr(tok, "chat_template", None):
        raise InputError(
            "the base model's tokenizer has no chat template; pass chat_template=False "
            "(CLI: --no-chat-template) to train on plain 'prompt + response' text"
        )
    user = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise InputError("the chat template renders the prompt differently with and without the answer")
    return head, full[len(head) :]


def tokenize_pairs(
    pairs: Sequence[tuple[str, str]], tok: Any, max_seq_len: int, chat_template: bool = True
) -> tuple[list[TokenSeq], int]:
    """Prompt/response pairs -> sequences with loss on the response only; returns (seqs, skipped).

    The prompt is tokenized alone (as at inference) and the response tokens follow it. A pair whose
    prompt leaves no room for a response token within ``max_seq_len`` is skipped and counted.
    """
    seqs, skipped = [], 0
    for prompt, response in pairs:
        head, tail = render_pair(tok, prompt, response, chat_template)
        p_ids = _encode(tok, head, not chat_template)
        r_ids = _encode(tok, tail, False)
        ids = (p_ids + r_ids)[:max_seq_len]
        labels = ([IGNORE] * len(p_ids) + r_ids)[:max_seq_len]
        seq = TokenSeq(tuple(ids), tuple(labels))
        if seq.n_targets == 0:
            skipped += 1
            continue
        seqs.append(seq)
    return seqs, skipped


def collate(seqs: Sequence[TokenSeq], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors ``input_ids``, ``attention_mask`` and ``labels`` for one micro-batch."""
    import torch

    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class BatchPlan:
    """The deterministic stream of micro-batches over epochs: index -> list of sequence indices.

    Epoch ``e`` visits the sequences in a permutation drawn from ``seed`` and ``e`` alone, so the
    position in the stream is all a resumed run needs to continue exactly where it stopped.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int) -> None:
        if n_items < 1:
            raise InputError("no training sequences")
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.per_epoch = math.ceil(n_items / batch_size)
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        import torch

        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n_items, generator=g).tolist()}
        return self._perms[epoch]

    def batch(self, index: int) -> list[int]:
        """Sequence indices of micro-batch ``index`` (counted from the very first one)."""
        epoch, j = divmod(index, self.per_epoch)
        perm = self._perm(epoch)
        return perm[j * self.batch_size : (j + 1) * self.batch_size]


# --------------------------------------------------------------------------- question renderings

#: the cloze format option scoring reads an expert with (kept equal to option_scoring.CLOZE_TEMPLATE)
QA_TEMPLATE = "Question: {question}\nAnswer:"
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'])")
_BE = re.compile(r"^(?P<subj>[^,;:]{3,80}?) (?P<be>is|are|was|were) (?P<obj>.+)$")
_PASSIVE_BY = re.compile(
    r"^(?P<subj>[^,;:]{3,80}?) (?P<be>is|are|was|were) (?P<verb>[a-z]+) by (?P<agent>.+)$"
)
_LEAD = re.compile(r"^(?P<subj>(?:[A-Z][\w'-]*)(?: (?:[A-Z][\w'-]*|of|the|de|von))*) (?P<pred>[a-z].+)$")
_ENTITY = re.compile(r"(?<![\w-])(?:[A-Z][\w'-]*[\w])(?: [A-Z][\w'-]*[\w])*")
_CLAUSE_END = re.compile(r",| which | who | where | when | because | whose | and (?:is|was|has)\b")
_STOP_LEAD = frozenset(
    [
        "A",
        "An",
        "The",
        "This",
        "That",
        "These",
        "Those",
        "It",
        "Its",
        "In",
        "On",
        "At",
        "From",
        "For",
        "Most",
        "Many",
        "Some",
        "Every",
        "Each",
        "Visitors",
        "There",
        "Here",
        "When",
        "While",
        "After",
        "Before",
        "Above",
        "Below",
        "Since",
        "During",
        "He",
        "She",
        "They",
        "We",
        "You",
        "I",
    ]
)
#: irregular past tenses a leading-name sentence may continue with (regular verbs end in -s or -ed)
_IRREGULAR = frozenset(
    [
        "wrote",
        "built",
        "made",
        "came",
        "found",
        "began",
        "grew",
        "gave",
        "held",
        "led",
        "ran",
        "rose",
        "sold",
        "taught",
        "won",
        "took",
        "became",
        "bought",
        "brought",
        "drew",
        "flew",
        "fought",
        "knew",
        "left",
        "lost",
        "met",
        "paid",
        "put",
        "read",
        "said",
        "sang",
        "saw",
        "sent",
        "set",
        "spoke",
        "stood",
        "told",
        "thought",
        "threw",
        "wore",
    ]
)


def _clause(text: str, max_words: int = 12) -> str:
    """The first clause of a phrase: up to a comma or relative pronoun, at most ``max_words`` words."""
    head = _CLAUSE_END.split(text, maxsplit=1)[0].strip().rstrip(".!?;:")
    words = head.split()
    return " ".join(words[:max_words]) if words else ""


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2].istitle() and text.split()[0] in _STOP_LEAD else text


def sentences(text: str) -> list[str]:
    """A document's sentences (a plain splitter: end punctuation followed by a capital)."""
    return [s.strip() for s in _SENTENCE.split(" ".join(text.split())) if len(s.split()) >= 3]


def question_renderings(text: str) -> list[tuple[str, str]]:
    """Question/answer pairs derived from one document's sentences alone (no model, deterministic).

    Each statement is turned into the questions it answers, in the cloze format that option scoring
    reads an expert with (:data:`QA_TEMPLATE`): "The capital of X is Y." gives "What is the capital
    of X?" -> "Y" and "What is Y?" -> "the capital of X"; "A was built by B." gives "Who built a?"
    -> "B"; "Name verbs object." gives "Who verbs object?" -> "Name" and "Name verbs what?" ->
    "object"; every other named entity E gives the sentence with E replaced by "what" -> "E".
    Returns (prompt, answer) pairs; the answer carries no leading space.
    """
    out: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(question: str, answer: str) -> None:
        question, answer = " ".join(question.split()), _clause(answer)
        if len(question.split()) < 3 or not answer or question in seen:
            return
        seen.add(question)
        out.append((QA_TEMPLATE.format(question=question), answer))

    for s in sentences(text):
        body = s.rstrip(".!?")
        m = _PASSIVE_BY.match(body)
        if m and m["verb"].endswith(("ed", "en", "lt", "de", "wn", "un", "ght")):
            add(f"Who {m['verb']} {_lower_first(m['subj'])}?", m["agent"])
        m = _BE.match(body)
        if m:
            subj, be, obj = _lower_first(m["subj"]), m["be"], m["obj"]
            add(f"What {be} {subj}?", obj)
            short = _clause(obj, 8)
            if short and len(short.split()) <= 6:
                add(f"What {be} {short}?", m["subj"])
        m = _LEAD.match(body)
        if m and m["subj"].split()[0] not in _STOP_LEAD and not _BE.match(body):
            pred = m["pred"]
            verb, _, obj = pred.partition(" ")
            if verb.endswith(("s", "ed")) or verb in _IRREGULAR:
                add(f"Who {_clause(pred, 20)}?", m["subj"])
                if obj:
                    add(f"{m['subj']} {verb} what?", obj)
        for e in _ENTITY.finditer(body):
            if e.start() == 0 or e.group() in _STOP_LEAD:
                continue
            add(body[: e.start()] + "what" + body[e.end() :] + "?", e.group())
    return out


def tokenize_renderings(pairs: Sequence[tuple[str, str]], tok: Any, max_seq_len: int) -> list[TokenSeq]:
    """Question renderings -> sequences with loss on the answer (" " + answer + EOS) only."""
    seqs, _ = tokenize_pairs([(p, " " + a) for p, a in pairs], tok, max_seq_len, chat_template=False)
    return seqs
