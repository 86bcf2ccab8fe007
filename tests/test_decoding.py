"""Full-logit proxy-tuned generation (decoding.py, the LogitsProcessor, the generate CLI, both backends).

Models: SmolLM2-135M-Instruct on transformers as the base, and a pair that really disagrees
(the same model reading its chat template vs the plain prompt, the paper's set-up for chat
experts); the llama.cpp backend runs the same GGUF; Qwen (llama.cpp) gives a vocabulary mismatch.
Loaded once per module. Threads: 1, since the test machine's 2 cores are shared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from blackbox_proxy.errors import InputError, VocabularyMismatchError
from blackbox_proxy.sampling import GenerationConfig, find_stop, select_tokens, streamable_prefix
from blackbox_proxy.vocabulary import is_padding_token

SMOLLM2 = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Write one sentence about the sea.",
]
N_NEW = 16


# ---------------------------------------------------------------- unit: pure helpers, no models


def test_config_rejects_bad_settings() -> None:
    for kwargs, word in [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
        ({"temperature": 1.0, "top_k": -2}, "top_k"),
        ({"top_p": 0.5}, "temperature"),  # nucleus without sampling is a mistake, not a no-op
        ({"stop": ("",)}, "stop"),
    ]:
        with pytest.raises(InputError, match=word):
            GenerationConfig(**kwargs)
    assert GenerationConfig(stop="###").stop == ("###",)
    assert GenerationConfig(temperature=0.0).greedy


def test_select_tokens_respects_top_k_and_top_p() -> None:
    import torch

    scores = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8], [5.0, 0.0, 0.0, 0.0, 0.0]])
    assert select_tokens(scores, GenerationConfig()).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        seen.update(select_tokens(scores[:1], GenerationConfig(temperature=5.0, top_k=2), gen).tolist())
    assert seen == {1, 2}  # only the two best, and both get sampled at a high temperature
    # top_p so small that only the most likely token survives: sampling equals greedy
    for _ in range(50):
        assert select_tokens(scores, GenerationConfig(temperature=5.0, top_p=0.01), gen).tolist() == [1, 0]


def test_stop_helpers() -> None:
    assert find_stop("abc###def##", ["##", "c#"]) == 2
    assert find_stop("abc", ["x"]) is None
    assert streamable_prefix("hello #", ["###"]) == "hello "  # could become the stop string
    assert streamable_prefix("hello #!", ["###"]) == "hello #!"
    assert streamable_prefix("caf\ufffd", []) == "caf"  # incomplete UTF-8 held back
    assert is_padding_token("[PAD151665]") and is_padding_token("<pad>") and not is_padding_token("pad")


def test_pair_offset_keeps_exclusions_and_ignores_shared_ones() -> None:
    import torch

    from blackbox_proxy.decoding import pair_offset

    inf = float("inf")
    e = torch.tensor([[-1.0, -inf, -inf, -2.0]])
    a = torch.tensor([[-3.0, -1.0, -inf, -2.0]])
    got = pair_offset(e, a, 0.5).tolist()[0]
    assert got[0] == 1.0 and got[1] == -inf and got[2] == 0.0 and got[3] == 0.0


class _Vocab:
    """Just the vocabulary part of a FullLogitsModel, for the pure list logic of shared_vocab_size."""

    def __init__(self, name: str, tokens: list[str], width: int | None = None) -> None:
        self.name, self._tokens = name, tokens
        self.vocab_size = width if width is not None else len(tokens)

    def vocab(self) -> list[str]:
        return self._tokens


def test_shared_vocab_size_allows_only_trailing_padding() -> None:
    from blackbox_proxy.vocabulary import shared_vocab_size

    hub = _Vocab("hub", ["a", "b", "<|end|>"], width=5)  # output layer padded past the tokenizer
    gguf = _Vocab("gguf", ["a", "b", "<|end|>", "[PAD3]", "[PAD4]"])
    assert shared_vocab_size([hub, gguf]) == 3
    with pytest.raises(VocabularyMismatchError, match=r"token id 3 '<extra>'"):
        shared_vocab_size([hub, _Vocab("added", ["a", "b", "<|end|>", "<extra>"])])
    with pytest.raises(VocabularyMismatchError, match=r"token id 1: 'b' vs 'c'"):
        shared_vocab_size([hub, _Vocab("other", ["a", "c", "<|end|>"])])
    with pytest.raises(VocabularyMismatchError, match="returns 2 logits"):
        shared_vocab_size([hub, _Vocab("narrow", ["a", "b", "<|end|>"], width=2)])


# ---------------------------------------------------------------- fixtures: real models, once


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smol() -> Any:
    from blackbox_proxy.decoding import load_model

    return load_model(SMOLLM2, backend="transformers")


@pytest.fixture(scope="module")
def smol_cpp() -> Any:
    from blackbox_proxy.adapters.llama_cpp_local import LlamaCppModel

    return LlamaCppModel(SMOLLM2, n_threads=1, n_ctx=512)


@pytest.fixture(scope="module")
def hf_greedy(smol: Any) -> list[list[int]]:
    """The base's own batched greedy ``generate`` (left padding), EOS and after cut off."""
    tok = smol.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert not bool(enc["attention_mask"].all()), "prompts must differ in length to exercise padding"
    out = smol.model.generate(**enc, max_new_tokens=N_NEW, do_sample=False)
    return [_until_eos(row, smol.eos_token_ids) for row in out[:, enc["input_ids"].shape[1] :].tolist()]


def _until_eos(ids: list[int], eos: frozenset[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def _decoder(base: Any, expert: Any, anti: Any, alpha: float, expert_format: str = "chat") -> Any:
    from blackbox_proxy.decoding import ProxyDecoder, ProxyPair

    return ProxyDecoder(base, ProxyPair(expert, anti, alpha=alpha, expert_format=expert_format))


@pytest.fixture(scope="module")
def steered(smol: Any) -> list[Any]:
    """alpha = 1 with the chat-template expert: the proxy-tuned batch every parity test compares with."""
    return _decoder(smol, smol, smol, 1.0).generate(PROMPTS, max_new_tokens=N_NEW)


# ---------------------------------------------------------------- exactness


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_alpha_zero_reproduces_base_greedy_generate(
    smol: Any, hf_greedy: list[list[int]], steered: list[Any]
) -> None:
    out = _decoder(smol, smol, smol, 0.0).generate(PROMPTS, max_new_tokens=N_NEW)
    assert [list(g.token_ids) for g in out] == hf_greedy
    # the pair is not a no-op: at alpha = 1 the continuations change
    assert [list(g.token_ids) for g in steered] != hf_greedy


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_identical_expert_and_anti_expert_reproduce_base(smol: Any, hf_greedy: list[list[int]]) -> None:
    out = _decoder(smol, smol, smol, 2.0, expert_format="plain").generate(PROMPTS, max_new_tokens=N_NEW)
    assert [list(g.token_ids) for g in out] == hf_greedy


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_batched_equals_one_at_a_time(smol: Any, steered: list[Any]) -> None:
    dec = _decoder(smol, smol, smol, 1.0)
    singles = [dec.generate(p, max_new_tokens=N_NEW)[0] for p in PROMPTS]
    assert [g.token_ids for g in singles] == [g.token_ids for g in steered]
    assert [g.text for g in singles] == [g.text for g in steered]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_logits_processor_route_matches_decoder(smol: Any, steered: list[Any]) -> None:
    from transformers import LogitsProcessorList

    from blackbox_proxy.decoding import ProxyPair
    from blackbox_proxy.logits_processor import ProxyTuningLogitsProcessor

    tok = smol.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    proc = ProxyTuningLogitsProcessor(
        ProxyPair(smol, smol, alpha=1.0, expert_format="chat"), PROMPTS, base=smol
    )
    out = smol.model.generate(
        **enc, max_new_tokens=N_NEW, do_sample=False, logits_processor=LogitsProcessorList([proc])
    )
    routed = [_until_eos(r, smol.eos_token_ids) for r in out[:, enc["input_ids"].shape[1] :].tolist()]
    assert routed == [list(g.token_ids) for g in steered]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_llama_cpp_backend_alpha_zero_matches_llama_cpp_greedy(smol_cpp: Any) -> None:
    from llama_cpp import Llama

    from blackbox_proxy.models import gguf_path

    out = _decoder(smol_cpp, smol_cpp, smol_cpp, 0.0).generate(PROMPTS, max_new_tokens=N_NEW)
    ref = Llama(str(gguf_path(SMOLLM2)), n_ctx=512, n_threads=1, verbose=False)
    for prompt, g in zip(PROMPTS, out, strict=True):
        own = []
        for t in ref.generate(ref.tokenize(prompt.encode()), top_k=1, temp=0.0, reset=True):
            own.append(t)
            if t in smol_cpp.eos_token_ids or len(own) == N_NEW:
                break
        assert list(g.token_ids) == own


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_llama_cpp_backend_batched_equals_single_and_mixes_with_transformers(
    smol: Any, smol_cpp: Any
) -> None:
    dec = _decoder(smol_cpp, smol_cpp, smol_cpp, 1.0)
    batched = dec.generate(PROMPTS, max_new_tokens=12)
    singles = [dec.generate(p, max_new_tokens=12)[0] for p in PROMPTS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in singles]
    assert any(len(set(g.token_ids)) > 1 for g in batched)
    # a transformers base with a llama.cpp pair: one vocabulary, so it runs and follows the pair
    mixed = _decoder(smol, smol_cpp, smol_cpp, 1.0).generate(PROMPTS[0], max_new_tokens=4)[0]
    assert len(mixed.token_ids) == 4


# ---------------------------------------------------------------- vocabulary, stops, streaming


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_vocabulary_mismatch_names_first_differing_token(smol: Any) -> None:
    from blackbox_proxy.adapters.llama_cpp_local import LlamaCppModel

    qwen = LlamaCppModel(QWEN, n_threads=1, n_ctx=256)
    with pytest.raises(VocabularyMismatchError) as err:
        _decoder(smol, qwen, qwen, 1.0)
    msg = str(err.value)
    first = next(i for i, (a, b) in enumerate(zip(smol.vocab(), qwen.vocab(), strict=False)) if a != b)
    assert f"token id {first}:" in msg
    assert repr(smol.vocab()[first]) in msg and repr(qwen.vocab()[first]) in msg
    assert SMOLLM2 in msg and QWEN in msg


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_stop_strings_cut_text_and_stream(smol: Any, steered: list[Any]) -> None:
    dec = _decoder(smol, smol, smol, 1.0)
    full = steered[1]  # the fibonacci prompt: code with several words to stop at
    words = [w for w in full.text.split() if len(w) >= 2]
    assert len(words) >= 3, full.text
    stop = words[2]
    cut = full.text.find(stop)
    got = dec.generate(PROMPTS[1], max_new_tokens=N_NEW, stop=[stop])[0]
    assert got.finish_reason == "stop"
    assert got.text == full.text[:cut]
    assert list(got.token_ids) == list(full.token_ids[: len(got.token_ids)])
    chunks = list(dec.stream(PROMPTS[1], max_new_tokens=N_NEW, stop=[stop]))
    assert "".join(chunks) == got.text
    assert all(stop not in c for c in chunks)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_stream_yields_the_generated_text(smol: Any, steered: list[Any]) -> None:
    chunks = list(_decoder(smol, smol, smol, 1.0).stream(PROMPTS[0], max_new_tokens=N_NEW))
    assert len(chunks) > 3
    assert "".join(chunks) == steered[0].text


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_analysis_records_each_models_logprob(smol: Any, steered: list[Any]) -> None:
    import torch

    from blackbox_proxy.decoding import render_prompt

    g = _decoder(smol, smol, smol, 1.0).generate(PROMPTS[0], max_new_tokens=6, analysis=True)[0]
    frame = g.analysis_frame()
    assert list(frame["token_id"]) == list(g.token_ids) == list(steered[0].token_ids[:6])
    first = g.analysis[0]
    tok = first.token_id
    with torch.inference_mode():
        plain = torch.tensor([render_prompt(smol, PROMPTS[0], "plain")])
        chat = torch.tensor([render_prompt(smol, PROMPTS[0], "chat")])
        base_lp = torch.log_softmax(smol.model(plain).logits[0, -1].float(), -1)
        chat_lp = torch.log_softmax(smol.model(chat).logits[0, -1].float(), -1)
    assert first.base_logprob == pytest.approx(float(base_lp[tok]), abs=1e-4)
    assert first.anti_logprobs[0] == pytest.approx(float(base_lp[tok]), abs=1e-4)
    assert first.expert_logprobs[0] == pytest.approx(float(chat_lp[tok]), abs=1e-4)
    expected = torch.log_softmax(base_lp + chat_lp - base_lp, -1)[tok]  # alpha = 1: the expert's distribution
    assert first.steered_logprob == pytest.approx(float(expected), abs=1e-3)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_seeded_sampling_is_reproducible_and_top_k_one_is_greedy(smol: Any, steered: list[Any]) -> None:
    dec = _decoder(smol, smol, smol, 1.0)
    a = dec.generate(PROMPTS[2], max_new_tokens=8, temperature=1.3, top_p=0.95, seed=7)[0]
    b = dec.generate(PROMPTS[2], max_new_tokens=8, temperature=1.3, top_p=0.95, seed=7)[0]
    assert a.token_ids == b.token_ids
    k1 = dec.generate(PROMPTS[2], max_new_tokens=8, temperature=0.8, top_k=1, seed=3)[0]
    assert k1.token_ids == steered[2].token_ids[:8]


# ---------------------------------------------------------------- CLI


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_cli_streams_only_the_continuation(steered: list[Any]) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "blackbox_proxy.cli", "generate", PROMPTS[0],
        "--base", SMOLLM2, "--expert", SMOLLM2, "--anti-expert", SMOLLM2, "--expert-format", "chat",
        "--alpha", "1", "--max-new-tokens", str(N_NEW), "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == steered[0].text
    bad = subprocess.run(
        cmd + ["--top-p", "0.5"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert "top_p" in bad.stderr
