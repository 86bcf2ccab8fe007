"""A server-hosted expert pair vs the same pair in-process: the offsets must agree (float32 both).

Run: ``python benchmarks/vllm_pair_offsets.py [--questions 20] [--expert SPEC] [--anti SPEC]``.
Serves the expert and the anti-expert with vLLM (float32, one server each), scores the same
TruthfulQA questions with :class:`ServerExpertPair` (letters through ``logprob_token_ids``; option
texts through ``prompt_logprobs`` when both share a tokenizer) and with
:class:`~blackbox_proxy.experts.ExpertPair` in-process (transformers), and reports the largest
offset difference and the answer agreement. Writes ``benchmarks/results/vllm_pair_offsets.json``.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from pathlib import Path

from blackbox_proxy.adapters.vllm import ServedModel, ServerExpertPair

from blackbox_proxy.evaluation.datasets import load_truthfulqa
from blackbox_proxy.experts import ExpertPair
from blackbox_proxy.files import atomic_write_json
from blackbox_proxy.vllm_server import VLLMServer

OUT = Path(__file__).parent / "results" / "vllm_pair_offsets.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--expert", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--anti", default="smollm2-135m-instruct")
    ap.add_argument("--options", action="store_true", help="also option-text scoring (needs one tokenizer)")
    args = ap.parse_args()
    qs = load_truthfulqa()[: args.questions]
    with ExitStack() as stack:
        t0 = time.perf_counter()
        e_srv = stack.enter_context(VLLMServer(args.expert, "expert", kv_cache_gib=1))
        a_srv = stack.enter_context(VLLMServer(args.anti, "anti", kv_cache_gib=1))
        startup = time.perf_counter() - t0
        remote = ServerExpertPair(ServedModel("expert", e_srv.base_url), ServedModel("anti", a_srv.base_url))
        here = ExpertPair(args.expert, args.anti, backend="transformers")
        t1 = time.perf_counter()
        r = remote.score(qs, ["A", "B", "C", "D"])
        t_remote = time.perf_counter() - t1
        t1 = time.perf_counter()
        h = here.score(qs, ["A", "B", "C", "D"])
        t_local = time.perf_counter() - t1
        diffs = [abs(x.offsets()[k] - y.offsets()[k]) for x, y in zip(r, h, strict=True) for k in x.expert]
        same = sum(
            max(x.offsets(), key=x.offsets().get) == max(y.offsets(), key=y.offsets().get)  # type: ignore[arg-type]
            for x, y in zip(r, h, strict=True)
        )
        result = {
            "expert": args.expert,
            "anti_expert": args.anti,
            "questions": len(qs),
            "letters_max_abs_offset_diff": max(diffs),
            "letters_mean_abs_offset": sum(abs(v) for x in h for v in x.offsets().values()) / len(diffs),
            "letters_same_argmax_offset": same,
            "seconds_server_pair": round(t_remote, 2),
            "seconds_in_process_pair": round(t_local, 2),
            "startup_seconds_both_servers": round(startup, 1),
        }
        if args.options:
            ro, ho = remote.score_options(qs), here.score_options(qs)
            od = [abs(x.offsets()[k] - y.offsets()[k]) for x, y in zip(ro, ho, strict=True) for k in x.expert]
            result["options_max_abs_offset_diff"] = max(od)
        atomic_write_json(OUT, result)
        print(result)


if __name__ == "__main__":
    main()
