"""Echo scoring on a model that adds a BOS token (Gemma-3-270m): llama-cpp-python's layout is aligned.

Slow (Gemma's 262,144-token vocabulary makes every echo row expensive on the server), so marked
``slow``; ``tests/test_adapters_server.py`` covers the shifted layout of SmolLM2 quickly.
"""

from __future__ import annotations

from typing import Any

import pytest
from blackbox_proxy.adapters.openai_completions import ALIGNED, OpenAICompletionsProvider
from test_adapters_server import TOL, true_token_logprobs

from blackbox_proxy.models import gguf_path
from blackbox_proxy.server import LocalServer

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]
GEMMA = "gemma-3-270m"


@pytest.fixture(scope="module")
def gemma_server() -> Any:
    with LocalServer(GEMMA, "gemma", n_ctx=256) as srv:
        yield srv


def test_gemma_echo_is_aligned_and_matches_full_logits(gemma_server: Any) -> None:
    from llama_cpp import Llama

    comp = OpenAICompletionsProvider(gemma_server.model, gemma_server.base_url, max_k=None, timeout=300)
    assert comp.echo_layout() == ALIGNED
    score = comp.score_text("The capital of France is", " Paris")
    llm = Llama(model_path=str(gguf_path(GEMMA)), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    truth = true_token_logprobs(llm, "The capital of France is Paris")
    assert [t.token for t in score.tokens] == [" Paris"] == [truth[-1][0]]
    assert abs(score.tokens[0].logprob - truth[-1][1]) < TOL
    assert score.layout == ALIGNED
