"""vLLM as the serving engine: one real vLLM CPU server (SmolLM2, float32, eager) for the whole run.

Ground truth is the same weights in-process (transformers, float32, full vocabulary). vLLM lives
in its own venv (.venv-vllm, scripts/install_vllm.sh). A missing vLLM is a failure, unless
BLACKBOX_PROXY_VLLM_OPTIONAL=1 says it may be absent (then these tests skip).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from blackbox_proxy.adapters.base import ProviderOptions, create_provider
from blackbox_proxy.adapters.continuation import CapabilityError
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
from blackbox_proxy.adapters.vllm import (
    EXACT,
    ServedModel,
    ServedScorer,
    ServerExpertPair,
    VLLMChatProvider,
    VLLMCompletionsProvider,
    require_exact,
)

from blackbox_proxy.candidates import match_candidates
from blackbox_proxy.errors import CandidateError, InputError
from blackbox_proxy.evaluation.datasets import load_truthfulqa
from blackbox_proxy.prompts import mc_messages, mc_text

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SMOLLM2 = "smollm2-135m-instruct"
OPTIONAL_ENV = "BLACKBOX_PROXY_VLLM_OPTIONAL"
#: vLLM float32 vs transformers float32 on CPU (different kernels): measured max 2e-5
TOL = 1e-3
MC = [
    {
        "role": "user",
        "content": "Which planet is known as the Red Planet?\nA) Venus\nB) Jupiter\nC) Mars\nD) Saturn\nAnswer:",
    }
]
LABELS = ("A", "B", "C", "D")
#: a second name of the served model: a served pair with two names runs two models' requests
ALIAS = "smollm2-twin"


def _vllm_processes(port: int) -> list[int]:
    """Pids of live processes whose command line is a vLLM server on ``port`` (from /proc)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in cmd and str(port).encode() in cmd:
            pids.append(int(d))
    return pids


@pytest.fixture(scope="session")
def vllm_server() -> Iterator[Any]:
    """`blackbox-proxy serve smollm2 --engine vllm`: SmolLM2-135M-Instruct, float32, eager, two names.

    Started through the CLI as a user would; yields an object with ``base_url`` and ``model``; at
    the end a SIGTERM must stop vLLM and its engine-core child and free the port.
    """
    import select
    import signal
    import subprocess
    import sys
    from types import SimpleNamespace

    from blackbox_proxy.vllm_server import vllm_python

    try:
        vllm_python()
    except InputError as exc:
        if os.environ.get(OPTIONAL_ENV) == "1":
            pytest.skip(f"vLLM is not installed and {OPTIONAL_ENV}=1: {exc}")
        pytest.fail(f"vLLM is required for these tests: {exc} (or set {OPTIONAL_ENV}=1 to skip them)")
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "blackbox_proxy.cli", "serve", "smollm2", "--model", SMOLLM2]
    cmd += ["--engine", "vllm", "--dtype", "float32", "--n-ctx", "2048", "--alias", ALIAS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 400)
    url = proc.stdout.readline().strip() if ready else ""  # type: ignore[union-attr]
    if not url.startswith("http://"):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"serve --engine vllm printed no base URL: {url!r}; stderr:\n{err[-3000:]}")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    print(f"\nvLLM server ready in {time.monotonic() - t0:.1f} s at {url}")
    try:
        yield SimpleNamespace(base_url=url, model="smollm2", port=port)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, f"serve exited with {code} on SIGTERM"
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the vLLM port is still open after SIGTERM"
    deadline = time.monotonic() + 10
    while _vllm_processes(port) and time.monotonic() < deadline:  # killed children are reaped shortly
        time.sleep(0.2)
    assert not _vllm_processes(port), "vLLM processes outlived serve's SIGTERM"


@pytest.fixture(scope="module")
def local() -> Any:
    """The same weights in-process: transformers, float32, full-vocabulary log-softmax."""
    from blackbox_proxy.models import load_model

    return load_model(SMOLLM2, "transformers")


@pytest.fixture(scope="module")
def chat(vllm_server: Any) -> VLLMChatProvider:
    return VLLMChatProvider(vllm_server.model, vllm_server.base_url, timeout=120)


@pytest.fixture(scope="module")
def comp(vllm_server: Any) -> VLLMCompletionsProvider:
    return VLLMCompletionsProvider(vllm_server.model, vllm_server.base_url, timeout=120)


@pytest.fixture(scope="module")
def served(vllm_server: Any) -> ServedModel:
    return ServedModel(vllm_server.model, vllm_server.base_url)


def local_next(local: Any, ids: list[int]) -> Any:
    """Full-vocabulary log-probs of the token after ``ids`` (a float tensor over the vocabulary)."""
    return local.logprobs([ids], 1)[0, -1]


def assert_top_matches(top: Any, ref: Any, k: int) -> None:
    """The k returned values are the k largest of the local distribution (order and text not trusted)."""
    want = sorted(ref.topk(k).values.tolist(), reverse=True)
    got = sorted((e.logprob for e in top.top_entries()), reverse=True)
    assert len(got) == k
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < TOL


# ------------------------------------------------------------------------------ plain providers


def test_chat_top_logprobs_equal_local_full_vocabulary(chat: VLLMChatProvider, local: Any) -> None:
    top = chat.top_logprobs(MC, 5)
    assert top.provider == "vllm-chat" and top.usage is not None and top.usage.prompt_tokens > 0
    assert_top_matches(top, local_next(local, local.encode_chat(MC)), 5)


def test_completions_top_logprobs_equal_local(comp: VLLMCompletionsProvider, local: Any) -> None:
    text = "The capital of France is"
    top = comp.top_logprobs(text, 5)
    assert_top_matches(top, local_next(local, local.encode(text)), 5)
    assert top.chosen is not None and top.chosen.token == " Paris"


def test_registry_builds_vllm_providers(vllm_server: Any) -> None:
    import blackbox_proxy.adapters.vllm  # noqa: F401  (registers "vllm", "vllm-chat", "vllm-completions")

    opts = ProviderOptions(vllm_server.model, base_url=vllm_server.base_url)
    p = create_provider("vllm", opts)
    assert isinstance(p, VLLMChatProvider) and EXACT in p.capabilities and "continue" in p.capabilities
    assert p.max_k is None
    c = create_provider(
        "vllm", ProviderOptions(vllm_server.model, base_url=vllm_server.base_url, endpoint="completions")
    )
    assert isinstance(c, VLLMCompletionsProvider) and EXACT in c.capabilities
    with pytest.raises(InputError, match="base URL"):
        create_provider("vllm", ProviderOptions("m", base_url=None, api_key_env=None))


# ------------------------------------------------------------------------------ the exact policy


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_exact_at_k1_no_candidate_missing_and_values_equal_local(
    endpoint: str, chat: VLLMChatProvider, comp: VLLMCompletionsProvider, local: Any
) -> None:
    q = load_truthfulqa()[0]
    prov: Any = chat if endpoint == "chat" else comp
    prompt: Any = mc_messages(q) if endpoint == "chat" else mc_text(q)
    ids = local.encode_chat(prompt) if endpoint == "chat" else local.encode(prompt)
    ref = local_next(local, ids)

    plain = prov.top_logprobs(prompt, 1)
    assert any(v is None for v in match_candidates(plain, q.labels).values())  # k=1: some are missing

    top = prov.top_logprobs(prompt, 1, candidates=q.labels)
    matched = match_candidates(top, q.labels)
    assert all(v is not None for v in matched.values()), matched
    exact = [e for e in top.entries if e.id is not None]
    assert len(exact) >= 2 * len(q.labels)  # " A" and "A" at least, for every label
    for e in exact:
        assert abs(e.logprob - float(ref[e.id])) < TOL, (e, float(ref[e.id]))
    # the top-1 entry is still there, and is the local argmax
    assert top.k == 1 and abs(top.top_entries()[0].logprob - float(ref.max())) < TOL
    for lab, lp in matched.items():  # pooled over variants exactly as the local side would
        ids_l = [e.id for e in exact if e.token.strip(" .():\n") == lab]
        assert lp == pytest.approx(float(ref[ids_l].logsumexp(0)), abs=TOL)


def test_exact_async_equals_sync_and_without_top_k(vllm_server: Any, chat: VLLMChatProvider) -> None:
    sync = chat.top_logprobs(MC, 3, candidates=LABELS)
    # the same top-k and the same candidates: one prompt's requests are never in flight together
    # (vLLM batched a concurrent top-k + logprob_token_ids pair and answered the top-k request with the
    # requested ids), so this repeats to catch the 1-in-4 case
    for _ in range(4):
        got = asyncio.run(chat.atop_logprobs(MC, 3, candidates=LABELS))
        assert [e.token for e in got.top_entries()] == [e.token for e in sync.top_entries()]
        assert got.known() == pytest.approx(sync.known(), abs=TOL)
    only = VLLMChatProvider(vllm_server.model, vllm_server.base_url, with_top_k=False, max_ids=3)
    lean = only.top_logprobs(MC, 3, candidates=LABELS)  # ids split over several requests (max_ids=3)
    assert lean.usage is not None and lean.usage.requests >= 3
    m1, m2 = match_candidates(lean, LABELS), match_candidates(sync, LABELS)
    assert m1 == pytest.approx(m2, abs=TOL)


def test_exact_rejects_a_label_with_no_single_token_spelling(chat: VLLMChatProvider) -> None:
    with pytest.raises(CandidateError, match="not a single token"):
        chat.top_logprobs(MC, 1, candidates=("A", "Quintarovelia"))


def test_exact_on_a_server_without_the_capability_names_it(llama_server: Any) -> None:
    with pytest.raises(CapabilityError, match="exact"):
        require_exact(OpenAIChatProvider(llama_server.model, llama_server.base_url, max_k=None))
    fake = VLLMChatProvider(llama_server.model, llama_server.base_url, timeout=60, max_retries=0)
    with pytest.raises(CapabilityError, match="exact"):
        fake.top_logprobs(MC, 1, candidates=LABELS)


# ------------------------------------------------------------------------------ continuation, blocks


def test_continue_final_message_continues_the_partial_answer(chat: VLLMChatProvider, local: Any) -> None:
    prefix = "The answer is"
    cont = chat.continue_prefix(prefix, 3, 2, messages=MC)
    assert len(cont.positions) == 3 and cont.text == "".join(cont.tokens)
    ids = local.tokenizer.apply_chat_template(
        [*MC, {"role": "assistant", "content": prefix}],
        continue_final_message=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    ref = local_next(local, list(ids))
    first = cont.positions[0]
    assert first.chosen is not None and abs(first.chosen.logprob - float(ref.max())) < TOL
    assert_top_matches(first, ref, 2)


def test_score_block_gives_every_position_in_one_request(comp: VLLMCompletionsProvider, local: Any) -> None:
    prefix, block = "The capital of France is", " Paris, and the capital of Italy"
    comp.score_block(prefix, block, k=3)  # tokenises prefix and block once (cached afterwards)
    before = comp.transport.stats()["attempts"]
    cont = comp.score_block(prefix, block, k=4)
    assert comp.transport.stats()["attempts"] - before == 1  # the whole block in one request
    pre, blk = local.encode(prefix), local.encode(block, add_special_tokens=False)
    assert [p.chosen.id for p in cont.positions[:-1]] == blk and len(cont.positions) == len(blk) + 1
    lp = local.logprobs([pre + blk], len(blk) + 1)[0]
    for j, pos in enumerate(cont.positions):
        if j < len(blk):
            assert abs(pos.chosen.logprob - float(lp[j, blk[j]])) < TOL
        assert_top_matches(pos, lp[j], 4)


# ------------------------------------------------------------------------------ experts on a server


def test_served_scorer_equals_the_in_process_scorer(served: ServedModel, local: Any) -> None:
    from blackbox_proxy.experts import CandidateScorer

    qs = load_truthfulqa()[:6]
    prompts: list[Any] = [*qs, mc_text(qs[0])]
    cands = [q.labels for q in qs] + [("A", "B", "Quintaro")]  # "Quintaro": several tokens
    remote = ServedScorer(served).score(prompts, cands)
    here = CandidateScorer(local).score(prompts, cands)
    for r, h in zip(remote, here, strict=True):
        assert r.keys() == h.keys()
        for lab in r:
            assert abs(r[lab] - h[lab]) < TOL, (lab, r[lab], h[lab])


def true_sum(local: Any, prompt: str, text: str) -> float:
    """log P(text | prompt) from one unpadded forward pass of the local model (the ground truth)."""
    p, t = local.encode(prompt), local.encode(text, add_special_tokens=False)
    lp = local.logprobs([p + t], len(t) + 1)[0]
    return math.fsum(float(lp[j, tok]) for j, tok in enumerate(t))


def test_server_pair_gives_the_in_process_pair_scores(served: ServedModel, local: Any) -> None:
    from blackbox_proxy.experts import ExpertPair
    from blackbox_proxy.option_scoring import CONTENT_FREE, cloze_prompt, option_text

    qs = load_truthfulqa()[:4]
    remote = ServerExpertPair(served, served)
    here = ExpertPair(local, local)
    r_letters, h_letters = remote.score(qs, list(LABELS)), here.score(qs, list(LABELS))
    for r, h in zip(r_letters, h_letters, strict=True):
        assert r.expert == pytest.approx(h.expert, abs=TOL)
        assert r.offsets() == pytest.approx(h.offsets(), abs=TOL)
    r_opts, h_opts = remote.score_options(qs), here.score_options(qs)
    for q, r, h in zip(qs, r_opts, h_opts, strict=True):
        assert r.n_tokens == h.n_tokens
        assert r.expert == pytest.approx(h.expert, abs=TOL)
        for lab, choice in zip(q.labels, q.choices, strict=True):  # against unbatched ground truth
            assert r.expert[lab] == pytest.approx(
                true_sum(local, cloze_prompt(q), option_text(choice)), abs=TOL
            )
            assert r.expert_cf[lab] == pytest.approx(
                true_sum(local, CONTENT_FREE, option_text(choice)), abs=TOL
            )
    assert remote.identity()["backend"] == "vllm-server"
    assert remote.expert.max_context == 2048


def test_served_model_refuses_full_logit_decoding(served: ServedModel) -> None:
    with pytest.raises(CapabilityError, match="in-process"):
        served.open([[1, 2, 3]])


# ------------------------------------------------------------------------------ vLLM vs llama.cpp


def test_same_mc_answers_from_vllm_and_llama_cpp(chat: VLLMChatProvider, llama_server: Any) -> None:
    """Same weights: llama.cpp computes with the Q4_1 blocks, vLLM with their float32 dequantisation."""
    llama = OpenAIChatProvider(llama_server.model, llama_server.base_url, max_k=None, timeout=60)
    qs = load_truthfulqa()[:30]

    async def exact_all() -> list[Any]:
        return await asyncio.gather(*(chat.atop_logprobs(mc_messages(q), 1, candidates=q.labels) for q in qs))

    tops = asyncio.run(exact_all())
    rows = []
    for q, v in zip(qs, tops, strict=True):
        ll = llama.top_logprobs(mc_messages(q), 20)
        rows.append((q, match_candidates(v, q.labels), match_candidates(ll, q.labels)))
    diffs = [abs(mv[lab] - ml[lab]) for q, mv, ml in rows for lab in q.labels if ml[lab] is not None]
    tol = max(diffs)
    decided = agree = same = 0
    for q, mv, ml in rows:
        ranked = sorted(q.labels, key=lambda lab: -mv[lab])
        known = [lab for lab in q.labels if ml[lab] is not None]
        best_l = max(known, key=lambda lab: ml[lab]) if known else None
        same += best_l == ranked[0]
        if mv[ranked[0]] - mv[ranked[1]] > 2 * tol:  # a margin no per-letter difference can flip
            decided += 1
            agree += best_l == ranked[0]
    print(
        f"\nvLLM vs llama.cpp, {len(diffs)} letter log-probs: max |diff| {tol:.3f}, mean "
        f"{sum(diffs) / len(diffs):.3f}; same answer on {same}/{len(qs)}, decided {decided}, agree {agree}"
    )
    assert tol < QUANT_TOL
    assert decided >= 5 and agree == decided
    assert same >= 0.8 * len(qs)


#: vLLM (float32 dequantised Q4_1) vs llama.cpp (Q4_1 kernels), SmolLM2 letter log-probs on 30
#: TruthfulQA questions: measured max |diff| 0.29, mean 0.07 (148 values); the same answer on 29/30
QUANT_TOL = 0.4


def test_log_probs_are_finite(chat: VLLMChatProvider) -> None:
    top = chat.top_logprobs(MC, 1, candidates=LABELS)
    assert all(math.isfinite(e.logprob) for e in top.entries)


def test_mc_with_exact_policy_through_the_cli(vllm_server: Any, tmp_path: Any) -> None:
    """`mc --provider vllm --missing exact` at k=1: no option is ever missing, through the engine."""
    import json

    import pandas as pd

    from blackbox_proxy.cli import main

    qs = [
        {
            "id": "mars",
            "question": "Which planet is known as the Red Planet?",
            "choices": ["Venus", "Mars", "Io"],
        },
        {"id": "sum", "question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1},
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in qs))
    out = tmp_path / "r.csv"
    argv = [
        "mc",
        str(path),
        "--provider",
        "vllm",
        "--base-url",
        vllm_server.base_url,
        "--model",
        vllm_server.model,
    ]
    assert main([*argv, "--missing", "exact", "--top-logprobs", "1", "--out", str(out), "-q"]) == 0
    df = pd.read_csv(out, keep_default_na=False)
    assert (df["error"] == "").all() and (df["n_missing"] == 0).all()
    assert all(
        df.loc[i, f"base_lp_{lab}"] != "" for i, q in enumerate(qs) for lab in "ABCD"[: len(q["choices"])]
    )


def test_mc_with_a_served_pair_through_the_cli(vllm_server: Any, local: Any, tmp_path: Any) -> None:
    """`mc --expert vllm:NAME@URL --anti-expert vllm:NAME2@URL`: the pair is scored by the server.

    Expert and anti-expert are the same weights under two names (two models' requests), so the
    offsets are zero and the expert's letter log-probs must equal the in-process model's.
    """
    import json

    import pandas as pd

    from blackbox_proxy.cli import main
    from blackbox_proxy.experts import ExpertPair

    qs = load_truthfulqa()[:3]
    path = tmp_path / "q.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": q.id, "question": q.question, "choices": list(q.choices), "answer": q.answer})
            + "\n"
            for q in qs
        )
    )
    url = vllm_server.base_url
    out = tmp_path / "r.csv"
    argv = [
        "mc", str(path), "--provider", "vllm", "--base-url", url, "--model", vllm_server.model,
        "--expert", f"vllm:{vllm_server.model}@{url}", "--anti-expert", f"vllm:{ALIAS}@{url}",
        "--score-cache", str(tmp_path / "scores.sqlite"), "--out", str(out), "-q",
    ]  # fmt: skip
    assert main(argv) == 0
    df = pd.read_csv(out, keep_default_na=False)
    assert (df["error"] == "").all()
    assert (df["steered_letter"] == df["base_letter"]).all()
    here = ExpertPair(local, local).score(qs, list(LABELS))
    for i, sc in enumerate(here):
        for lab in set(qs[i].labels) & set(LABELS):
            assert abs(float(df.loc[i, f"expert_lp_{lab}"]) - sc.expert[lab]) < TOL
            assert abs(float(df.loc[i, f"offset_{lab}"])) < TOL
    mixed = [a if a != f"vllm:{ALIAS}@{url}" else SMOLLM2 for a in argv]
    assert main(mixed) == 2  # one side served, the other local: one line, no work


# ------------------------------------------------------------------------------ black-box generation


def test_black_box_generation_with_a_served_pair_equals_the_in_process_pair(
    vllm_server: Any, comp: VLLMCompletionsProvider, served: ServedModel, local: Any
) -> None:
    """Base and pair all on vLLM (no model in-process): the same steered tokens as the local pair."""
    from blackbox_proxy.blackbox_decoding import BlackBoxProxyGenerator
    from blackbox_proxy.experts import ExpertPair
    from blackbox_proxy.sampling import GenerationConfig

    remote = ServerExpertPair(served, ServedModel(ALIAS, vllm_server.base_url))
    remote.expert_format, remote.anti_format = "chat", "plain"  # a pair that really changes tokens
    here = ExpertPair(local, local, expert_format="chat", anti_format="plain")
    cfg = GenerationConfig(max_new_tokens=20, analysis=True)
    changed = 0
    for prompt in ("Once upon a time, a dragon who loved to bake bread", "The function of the heart is to"):
        r = BlackBoxProxyGenerator(comp, [remote], top_logprobs=8).generate(prompt, cfg)
        h = BlackBoxProxyGenerator(comp, [here], top_logprobs=8).generate(prompt, cfg)
        a = r.accounting  # one request per block per model (a last empty block at end of text: none)
        assert 2 * (a.api_calls - 1) <= a.pair_requests <= 2 * a.api_calls
        assert h.accounting.pair_requests == 0
        changed += len(r.accounting.changed)
        i = next((j for j, (a, b) in enumerate(zip(r.tokens, h.tokens, strict=False)) if a != b), None)
        if i is not None:  # only across a near-tie (vLLM vs transformers kernels: ~1e-5)
            assert min(r.trace[i].margin, h.trace[i].margin) < 1e-2, (prompt, i, r.tokens, h.tokens)
        assert [(c.position, c.steered_token) for c in r.accounting.changed if c.position < (i or 99)] == [
            (c.position, c.steered_token) for c in h.accounting.changed if c.position < (i or 99)
        ]
    assert changed >= 2


def test_pair_drafted_blocks_verified_in_one_call_equal_per_token_decoding(
    comp: VLLMCompletionsProvider, local: Any
) -> None:
    """draft='pair': the expert drafts, vLLM scores each drafted block in one prompt_logprobs call
    (after the token ids emitted so far); the steered tokens are those of per-token decoding up to
    where that re-tokenises its text prefix, and the calls are fewer than the tokens."""
    from blackbox_proxy.blackbox_decoding import BlackBoxProxyGenerator
    from blackbox_proxy.experts import ExpertPair
    from blackbox_proxy.sampling import GenerationConfig

    pair = ExpertPair(local, local, expert_format="chat", anti_format="plain")  # really changes tokens
    cfg = GenerationConfig(max_new_tokens=24, analysis=True)
    calls = {"pair": 0, "base": 0, "per-token": 0}
    tokens = compared = changed = 0
    for prompt in (
        "Once upon a time, a dragon who loved to bake bread",
        "The function of the heart is to",
        "def add(a, b):",
    ):
        drafted = BlackBoxProxyGenerator(comp, [pair], top_logprobs=8, draft="pair").generate(prompt, cfg)
        by_base = BlackBoxProxyGenerator(comp, [pair], top_logprobs=8).generate(prompt, cfg)
        slow = BlackBoxProxyGenerator(comp, [pair], top_logprobs=8, speculative=False).generate(prompt, cfg)
        a = drafted.accounting
        assert a.draft == "pair" and a.verified_drafts >= 1 and not a.retokenized
        assert all(t is not None for t in drafted.token_ids)  # ids from score_block: no text re-sent
        calls["pair"] += a.api_calls
        calls["base"] += by_base.accounting.api_calls
        calls["per-token"] += slow.accounting.api_calls
        tokens += len(drafted.tokens)
        changed += len(a.changed)
        for other in (slow, by_base):
            i = next(
                (j for j, (x, y) in enumerate(zip(drafted.tokens, other.tokens, strict=False)) if x != y),
                None,
            )
            cut = min([r["position"] for r in other.accounting.retokenized] + [len(drafted.tokens)])
            if i is not None and i < cut:  # only across a near-tie (prompt vs decode kernels: ~1e-5)
                assert min(drafted.trace[i].margin, other.trace[i].margin) < 1e-2, (prompt, i)
                cut = i
            compared += cut
            # the same steering changes, each reported against the base's own top-1
            assert [(c.position, c.base_token, c.steered_token) for c in a.changed if c.position < cut] == [
                (c.position, c.base_token, c.steered_token)
                for c in other.accounting.changed
                if c.position < cut
            ]
    assert changed >= 2  # the pair really steers
    assert compared >= 20  # enough positions before any re-tokenised prefix
    assert calls["pair"] < tokens  # fewer calls than tokens
    print(f"\ncalls for {tokens} tokens: {calls}; positions compared {compared}")


def test_generate_command_drafts_with_the_pair_and_verifies_on_vllm(
    vllm_server: Any, comp: VLLMCompletionsProvider, local: Any, tmp_path: Any
) -> None:
    """`generate --draft pair --provider vllm`: the user's path prints the same text as the Python
    generator and reports the verified drafts; on a base without block scoring it is one line."""
    import subprocess
    import sys

    from blackbox_proxy.blackbox_decoding import BlackBoxProxyGenerator
    from blackbox_proxy.experts import ExpertPair
    from blackbox_proxy.sampling import GenerationConfig

    prompt = "The function of the heart is to"
    report = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "blackbox_proxy.cli", "generate", prompt, "--provider", "vllm"]
    cmd += ["--base-url", vllm_server.base_url, "--model", vllm_server.model, "--top-logprobs", "8"]
    cmd += [
        "--expert",
        SMOLLM2,
        "--anti-expert",
        SMOLLM2,
        "--expert-format",
        "chat",
        "--anti-format",
        "plain",
    ]
    cmd += ["--max-new-tokens", "16", "--draft", "pair", "--report", str(report)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    pair = ExpertPair(local, local, expert_format="chat", anti_format="plain")
    want = BlackBoxProxyGenerator(comp, [pair], top_logprobs=8, draft="pair").generate(
        prompt, GenerationConfig(max_new_tokens=16)
    )
    assert out.stdout == want.text
    acct = json.loads(report.read_text())["accounting"]
    assert acct["draft"] == "pair" and acct["verified_drafts"] >= 1
    assert acct["api_calls"] < acct["generated_tokens"]
    plain = [*cmd[:6], "openai-completions", *cmd[7:]]  # a Completions base without score_block
    bad = subprocess.run(plain, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "score_block" in bad.stderr.strip().splitlines()[-1]
