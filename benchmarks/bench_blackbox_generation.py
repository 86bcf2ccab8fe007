"""Black-box proxy-tuned generation: speculative verification vs one call per token, in one run.

Serves ``--base`` with the real llama.cpp server (llama-cpp-python, through the ``llama-cpp-server``
provider, which checks the server's own tokenisation of every block), steers it with a local pair,
and prints per mode: API calls per generated token, wall time, prompt tokens sent, completion
tokens billed and the changed-token rate; then whether speculative output equals per-token output
token for token (whole generations; each generation starts from an emptied server prompt cache, so
both modes evaluate a prompt the same way), and, with ``--inprocess``, the same through token ids. ``--white-box`` compares black-box
greedy (k = ``--k``) with full-logit greedy on the same GGUF run locally, and counts how often the
full-logit choice lies outside the base's top-k.

    # the Qwen-1.5B GGUF on the llama.cpp server, a SmolLM2 expert made by train-expert (the demo's)
    .venv/bin/python benchmarks/bench_blackbox_generation.py \
        --base qwen2.5-coder-1.5b-instruct --prompts 20 --tokens 64 \
        --expert EXPERT_DIR --anti-expert smollm2-135m-instruct --out qwen_smol_http.json

``--inprocess`` adds the token-id path to the HTTP one, ``--no-server`` runs it alone; a run too long
for one sitting splits with ``--first-prompt``/``--prompts`` or ``--skip-speculative`` /
``--skip-per-token`` plus ``--compare-with EARLIER.json`` (every generation's tokens are saved as
``*_records``). Measured numbers: benchmarks/results/blackbox_generation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

PROMPTS = [
    "The three most important inventions of the nineteenth century were",
    "Here is a short story about a dragon who learned to bake bread.",
    "The best way to spend a rainy afternoon is",
    "My grandfather told me that when he was young,",
    "The function of the heart is to",
    "In the small town where I grew up, every summer",
    "A good teacher is someone who",
    "The recipe for a perfect cup of tea begins with",
    "When the storm finally passed, the villagers",
    "The history of the city begins in",
    "Scientists recently discovered that",
    "The most beautiful place I have ever visited is",
    "Every morning, the old fisherman",
    "The secret to a long and happy life is",
    "On the first day of the journey, we",
    "The lighthouse at the end of the pier",
    "There are many reasons to learn a second language, but",
    "The museum's newest exhibition shows",
    "After the war, the family moved to",
    "The map showed a path through the forest that",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="smollm2-135m-instruct", help="base model spec, served by llama.cpp")
    p.add_argument(
        "--expert", default="smollm2-135m-instruct", help="expert spec (e.g. a train-expert folder)"
    )
    p.add_argument("--anti-expert", default="smollm2-135m-instruct", help="anti-expert spec")
    p.add_argument("--expert-format", choices=("plain", "chat"), default="plain")
    p.add_argument("--anti-format", choices=("plain", "chat"), default="plain")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--prompts", type=int, default=10, help=f"number of prompts (at most {len(PROMPTS)})")
    p.add_argument("--tokens", type=int, default=64, help="tokens per generation")
    p.add_argument("--k", type=int, default=20, help="top log-probs per position")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--inprocess", action="store_true", help="also run through token ids (in-process llama.cpp)"
    )
    p.add_argument("--no-server", action="store_true", help="skip the HTTP server (token ids only)")
    p.add_argument("--first-prompt", type=int, default=0, help="index of the first prompt used")
    p.add_argument("--block-size", type=int, default=8, help="first block length (speculative)")
    p.add_argument("--min-block", type=int, default=2)
    p.add_argument("--max-block", type=int, default=32)
    p.add_argument("--csv", help="append one row per mode and path to this CSV file")
    p.add_argument("--white-box", action="store_true", help="compare with full-logit greedy on the same GGUF")
    p.add_argument("--skip-per-token", action="store_true", help="speculative only (no equality check)")
    p.add_argument(
        "--skip-speculative", action="store_true", help="per-token only (compare with --compare-with)"
    )
    p.add_argument(
        "--compare-with",
        help="a JSON of an earlier run (same prompts): compare its generations with this run's, token for token",
    )
    p.add_argument("--out", help="write all numbers as JSON here")
    return p.parse_args(argv)


def totals(gens: list[Any]) -> dict[str, Any]:
    """Summed accounting of a list of generations."""
    tok = sum(g.accounting.generated_tokens for g in gens)
    calls = sum(g.accounting.api_calls for g in gens)
    changed = sum(len(g.accounting.changed) for g in gens)
    return {
        "generations": len(gens),
        "tokens": tok,
        "api_calls": calls,
        "calls_per_token": calls / tok if tok else 0.0,
        "changed_rate": changed / tok if tok else 0.0,
        "prompt_tokens_sent": sum(g.accounting.prompt_tokens_sent for g in gens),
        "completion_tokens_billed": sum(g.accounting.completion_tokens_billed for g in gens),
        "wall_seconds": sum(g.accounting.wall_seconds for g in gens),
        "base_seconds": sum(g.accounting.base_seconds for g in gens),
        "pair_seconds": sum(g.accounting.pair_seconds for g in gens),
        "retokenized_calls": sum(len(g.accounting.retokenized) for g in gens),
        "tokenize_requests": sum(g.accounting.tokenize_requests for g in gens),
        "retokenization_cuts": sum(len(g.accounting.retokenization_cuts) for g in gens),
    }


def records(gens: list[Any]) -> list[dict[str, Any]]:
    """Per-generation tokens, ids and changed positions (to compare runs made in separate processes)."""
    return [
        {
            "prompt": g.prompt,
            "tokens": list(g.tokens),
            "token_ids": list(g.token_ids),
            "changed": [[c.position, c.base_token, c.steered_token] for c in g.accounting.changed],
            "retokenized": [dict(r) for r in g.accounting.retokenized],
        }
        for g in gens
    ]


def compare_records(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-for-token equality of two lists of generation records (up to a re-tokenised prefix)."""
    same = compared = identical = changed_equal = 0
    by_prompt = {y["prompt"]: y for y in b}
    pairs = [(x, by_prompt[x["prompt"]]) for x in a if x["prompt"] in by_prompt]
    for x, y in pairs:
        cut = min([r["position"] for r in x["retokenized"] + y["retokenized"]] + [10**9])
        ta, tb = x["tokens"][:cut], y["tokens"][:cut]
        n = min(len(ta), len(tb))
        compared += n
        same += sum(p == q for p, q in zip(ta[:n], tb[:n], strict=True))
        identical += ta == tb and x["token_ids"][:cut] == y["token_ids"][:cut]
        changed_equal += x["changed"] == y["changed"]
    return {
        "prompts": len(pairs),
        "prompts_identical": identical,
        "prompts_with_equal_changed_positions": changed_equal,
        "tokens_compared": compared,
        "tokens_equal": same,
    }


def first_retok(*gens: Any) -> int:
    return min([r["position"] for g in gens for r in g.accounting.retokenized] + [10**9])


def compare(spec: list[Any], slow: list[Any]) -> dict[str, Any]:
    """Token-for-token equality of the two modes: whole generations, and up to the first re-tokenised
    prefix of either (what a server that cannot say how it tokenises allows)."""
    same = compared = identical = clean = 0
    whole = sum(a.tokens == b.tokens for a, b in zip(spec, slow, strict=True))
    whole_tokens = sum(
        sum(x == y for x, y in zip(a.tokens, b.tokens, strict=False)) for a, b in zip(spec, slow, strict=True)
    )
    for a, b in zip(spec, slow, strict=True):
        cut = first_retok(a, b)
        clean += cut >= 10**9
        ta, tb = a.tokens[:cut], b.tokens[:cut]
        n = min(len(ta), len(tb))
        compared += n
        same += sum(x == y for x, y in zip(ta[:n], tb[:n], strict=True))
        identical += ta == tb
    return {
        "prompts": len(spec),
        "prompts_identical": whole,
        "tokens_equal_in_whole_generations": whole_tokens,
        "tokens_per_token_mode": sum(len(b.tokens) for b in slow),
        "changed_positions_equal": sum(
            [(c.position, c.steered_token) for c in a.accounting.changed]
            == [(c.position, c.steered_token) for c in b.accounting.changed]
            for a, b in zip(spec, slow, strict=True)
        ),
        "prompts_identical_before_retokenisation": identical,
        "prompts_without_retokenisation": clean,
        "tokens_compared": compared,
        "tokens_equal": same,
    }


def run_mode(
    provider: Any, pairs: list[Any], prompts: list[str], args: argparse.Namespace, spec: bool
) -> list[Any]:
    from blackbox_proxy.blackbox_decoding import BlackBoxProxyGenerator
    from blackbox_proxy.errors import BlackboxProxyError

    gen = BlackBoxProxyGenerator(
        provider,
        pairs,
        top_logprobs=args.k,
        speculative=spec,
        block_size=args.block_size,
        min_block=args.min_block,
        max_block=args.max_block,
    )
    out = []
    for p in prompts:
        if hasattr(provider, "reset_cache"):
            provider.reset_cache()
        try:
            out.append(gen.generate(p, max_new_tokens=args.tokens))
        except BlackboxProxyError as exc:  # keep what was generated, say why it stopped
            print(f"{p!r}: stopped early: {exc}", file=sys.stderr)
            out.append(exc.partial)  # type: ignore[attr-defined]
    return out


def white_box(
    base_spec: str, pairs: list[Any], prompts: list[str], bb: list[Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Full-logit greedy over the whole vocabulary vs the black-box output, on the same GGUF locally.

    The base's full rows come from the same in-process llama.cpp evaluation as the black-box token-id
    path (one token per decode), so the two differ only in the candidate set (top-k vs everything).
    """
    import llama_cpp
    import numpy as np
    import torch
    from blackbox_proxy.adapters.llama_cpp_inprocess import LlamaCppTopKProvider

    from blackbox_proxy.decoding import render_prompt

    prov = LlamaCppTopKProvider(base_spec, endpoint="completions", n_threads=args.threads)
    llm = prov._llm
    pair = pairs[0]
    if llm.n_vocab() != pair.expert.vocab_size:
        raise SystemExit(
            f"--white-box needs a pair with the base's vocabulary ({llm.n_vocab()} vs {pair.expert.vocab_size})"
        )

    def base_row(seq: list[int]) -> Any:
        prov._evaluate(llm, seq)
        return torch.from_numpy(np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64))

    identical = outside_at_divergence = inside_at_divergence = steps = outside_steps = 0
    divergences = []
    for prompt, g in zip(prompts, bb, strict=True):
        prompt_ids = prov.tokenize(prompt)
        sessions = [
            pair.expert.open([render_prompt(pair.expert, prompt, pair.expert_format)]),
            pair.anti_expert.open([render_prompt(pair.anti_expert, prompt, pair.anti_format)]),
        ]
        ids: list[int] = []
        flags: list[bool] = []
        margins: list[float] = []
        try:
            for _ in range(args.tokens):
                n = pair.expert.vocab_size
                b = torch.log_softmax(base_row(prompt_ids + ids)[:n], -1)
                e = torch.log_softmax(sessions[0].logits()[0, :n].double(), -1)
                a = torch.log_softmax(sessions[1].logits()[0, :n].double(), -1)
                steered = b + pair.alpha * (e - a)
                top2 = torch.topk(steered, 2).values
                margins.append(float(top2[0] - top2[1]))
                tok = int(steered.argmax())
                flags.append(tok in set(torch.topk(b, args.k).indices.tolist()))
                ids.append(tok)
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
                    break
                for s in sessions:
                    s.feed([tok])
        finally:
            for s in sessions:
                s.close()
        steps += len(flags)
        outside_steps += sum(not f for f in flags)
        full_text = llm.detokenize(ids, prev_tokens=prompt_ids).decode("utf-8", errors="replace")
        pos = 0
        by_id = all(t is not None for t in g.token_ids)
        while pos < min(len(ids), len(g.tokens)) and (
            ids[pos] == g.token_ids[pos]
            if by_id
            else llm.detokenize(ids[: pos + 1], prev_tokens=prompt_ids).decode("utf-8", errors="replace")
            == "".join(g.tokens[: pos + 1])
        ):
            pos += 1
        if pos >= min(len(ids), len(g.tokens)) or (
            not by_id and (full_text.startswith(g.text) or g.text.startswith(full_text))
        ):
            identical += 1
        else:
            outside = not flags[pos] if pos < len(flags) else False
            outside_at_divergence += outside
            inside_at_divergence += not outside
            divergences.append(
                {
                    "prompt": prompt,
                    "position": pos,
                    "full_logit_choice_outside_top_k": outside,
                    "full_logit_margin": margins[pos] if pos < len(margins) else None,
                }
            )
    prov.close()
    return {
        "prompts": len(prompts),
        "identical": identical,
        "diverged_where_full_logit_choice_outside_top_k": outside_at_divergence,
        "diverged_with_choice_inside_top_k": inside_at_divergence,
        "full_logit_steps": steps,
        "full_logit_steps_outside_top_k": outside_steps,
        "outside_rate": outside_steps / steps if steps else 0.0,
        "divergences": divergences,
    }


def ratios(results: dict[str, Any], path: str) -> dict[str, float] | None:
    """Speculative over per-token, measured in this run, for one path ("server" or "ids")."""
    a, b = results.get(f"{path}_speculative"), results.get(f"{path}_per_token")
    if not a or not b:
        return None
    return {
        key: a[key] / b[key] if b[key] else float("nan")
        for key in ("api_calls", "calls_per_token", "wall_seconds", "prompt_tokens_sent")
    }


def write_csv(path: str, results: dict[str, Any], args: argparse.Namespace) -> None:
    """Append one row per (path, mode) with the configuration and the accounting totals."""
    import csv
    import os

    rows = []
    for key in ("server_speculative", "server_per_token", "ids_speculative", "ids_per_token"):
        if key not in results:
            continue
        where, mode = key.split("_", 1)
        eq = results.get(f"{where}_equality", {})
        rows.append(
            {
                "base": args.base,
                "expert": args.expert,
                "anti_expert": args.anti_expert,
                "alpha": args.alpha,
                "k": args.k,
                "path": where,
                "mode": mode,
                **results[key],
                "tokens_equal": eq.get("tokens_equal"),
                "tokens_compared": eq.get("tokens_compared"),
            }
        )
    if not rows:
        return
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from blackbox_proxy.adapters.llama_cpp_inprocess import LlamaCppTopKProvider
    from blackbox_proxy.adapters.llama_cpp_server import LlamaCppServerProvider

    class ServerBase(LlamaCppServerProvider):
        """The served base, its prompt cache emptied before each generation (outside the accounting).

        llama-cpp-python keeps one cache and evaluates only the part of a prompt it has not seen, and
        its numbers move by ~0.01 with how a prompt is split; starting every generation from an
        unrelated one-token prompt makes both modes evaluate each prompt the same way.
        """

        def reset_cache(self) -> None:
            self.continue_prefix("\n", 1, 1)

    from blackbox_proxy.experts import ExpertPair
    from blackbox_proxy.models import load_model
    from blackbox_proxy.server import LocalServer

    torch.set_num_threads(args.threads)
    prompts = PROMPTS[args.first_prompt : args.first_prompt + args.prompts]
    t0 = time.perf_counter()
    expert, anti = load_model(args.expert), load_model(args.anti_expert)
    pairs = [
        ExpertPair(
            expert, anti, alpha=args.alpha, expert_format=args.expert_format, anti_format=args.anti_format
        )
    ]
    print(f"pair loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    results: dict[str, Any] = {"config": vars(args)}
    spec: list[Any] = []

    def save() -> None:  # after every stage, so a run cut short keeps what it measured
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(results, fh, indent=1)

    if not args.no_server:
        with LocalServer(args.base, "base", n_ctx=2048, n_threads=args.threads) as srv:
            provider = ServerBase(srv.model, srv.base_url, timeout=120)
            if not args.skip_speculative:
                spec = run_mode(provider, pairs, prompts, args, True)
                results["server_speculative"] = totals(spec)
                results["server_speculative_records"] = records(spec)
                save()
            if not args.skip_per_token:
                slow = run_mode(provider, pairs, prompts, args, False)
                results["server_per_token"] = totals(slow)
                results["server_per_token_records"] = records(slow)
                if spec:
                    results["server_equality"] = compare(spec, slow)
                save()
    if args.inprocess or args.no_server:
        inproc = LlamaCppTopKProvider(args.base, endpoint="completions", n_threads=args.threads)
        try:
            ispec: list[Any] = []
            if not args.skip_speculative:
                ispec = run_mode(inproc, pairs, prompts, args, True)
                results["ids_speculative"] = totals(ispec)
                results["ids_speculative_records"] = records(ispec)
                save()
            if not args.skip_per_token:
                islow = []
                for i in range(0, len(prompts), 5):  # saved every 5 prompts: a run cut short keeps them
                    islow += run_mode(inproc, pairs, prompts[i : i + 5], args, False)
                    results["ids_per_token"] = totals(islow)
                    results["ids_per_token_records"] = records(islow)
                    if ispec:
                        results["ids_equality"] = compare_records(records(ispec), records(islow))
                    save()
        finally:
            inproc.close()
        spec = ispec or spec  # token ids: the exact black-box output to compare with the white-box path
    if args.compare_with:
        with open(args.compare_with) as fh:
            old = json.load(fh)
        for where in ("server", "ids"):
            for mine, theirs in (("speculative", "per_token"), ("per_token", "speculative")):
                a, b = results.get(f"{where}_{mine}_records"), old.get(f"{where}_{theirs}_records")
                if a and b:
                    results[f"{where}_equality_with_earlier_{theirs}"] = compare_records(b, a)
        save()
    if args.white_box:
        results["white_box_agreement"] = white_box(args.base, pairs, prompts, spec, args)
    for where in ("server", "ids"):
        r = ratios(results, where)
        if r is not None:
            results[f"{where}_speculative_over_per_token"] = r
    results["examples"] = [{"prompt": prompts[0], "text": spec[0].text}] if spec else []
    shown = {k: v for k, v in results.items() if k != "config" and not k.endswith("_records")}
    print(json.dumps(shown, indent=1))
    save()
    if args.csv:
        write_csv(args.csv, results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
