"""What steering costs over the base alone: proxy-tuned / base-only wall time on the same requests.

For each setting, on the same questions and the same base requests (one chat request per question,
top-``k`` first-token log-probs), in one run:

  base-only    ``Reranker(provider, ())``           (the base alone, through the same engine)
  proxy-tuned  ``Reranker(provider, pair, 1.0)``    (the same requests, the pair scoring alongside)

and prints the ratio proxy / base, questions per second, and where the proxy-tuned run's time went
(the engine's :attr:`Reranker.timings`: waiting for the first answer, pair compute in the worker
thread, waiting for base answers the pair could not hide, our own overhead). Settings:

  local   the base on the local llama.cpp server (``LocalServer``), ``--local-concurrency`` requests
          in flight (the server answers one at a time; 2 keeps it busy)
  hosted  a hosted-API stand-in: ``tests/fault_proxy.py --latency 0.3,0.6`` in front of the same
          server (each answer held 300-600 ms, drawn per request), ``--hosted-concurrency`` 8

Then the pair alone, without the server running work: with and without the shared-prefix KV reuse
of the transformers backend (questions/s and the gain), the largest log-prob difference between
the two, and whether every steered answer of the proxy-tuned run is the same under the reference
scores (transformers, no reuse). ``--before-src DIR`` also measures round 1's engine (a source tree
of commit 5faf00f, e.g. ``git archive 5faf00f | tar -x -C DIR``) on the same server: its ratio.

The server and the pair share this machine's cores: ``--server-threads`` and ``--threads`` (torch)
say how many each uses. Each run must fit a 12-minute slot on 2 cores; run the settings one at a time::

    python benchmarks/bench_mc_overhead.py --settings local --n 200
    python benchmarks/bench_mc_overhead.py --settings hosted --n 200
    python benchmarks/bench_mc_overhead.py --settings local --n 40 --before-src /tmp/bbp-before

Measured 2026-12-02, session 5 (2 cores, nothing else running; 200 questions; pair SmolLM2 as two
specs, ``--expert transformers:smollm2-135m-instruct``, so both sides are computed as for a trained
expert; transformers float32, prefix reuse on): local 424.4 s -> 486.9 s, ratio 1.147 (goal 1.2);
hosted stand-in with ``--pin --server-threads 1 --threads 1`` 634.9 s -> 657.4 s, ratio 1.035 (goal
1.05); engine overhead under 0.05 s; the same base letter 200/200 in both. Earlier (32 questions,
``--before-src``, a pair given as one spec and so computed once): local 1.089, round 1 (5faf00f)
1.266, pair alone 2.00 q/s without the prefix reuse and 2.56 q/s with it. Details:
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def questions(n: int, datasets: str) -> list[Any]:
    """``n`` validation questions, taken in turn from each dataset (MMLU, ARC...)."""
    from blackbox_proxy.evaluation.datasets import load_dataset

    pools = [load_dataset(name) for name in datasets.split(",") if name]
    out: list[Any] = []
    i = 0
    while len(out) < n and any(i < len(p) for p in pools):
        out.extend(p[i] for p in pools if i < len(p))
        i += 1
    return out[:n]


def timed_score(engine: Any, qs: list[Any]) -> tuple[float, list[Any]]:
    """Wall seconds and records of one engine pass over ``qs``."""
    t = time.perf_counter()
    recs = asyncio.run(engine.ascore(qs))
    return time.perf_counter() - t, recs


def set_prefix_reuse(pair: Any, on: bool) -> None:
    """Turn the transformers backend's shared-prefix KV reuse on or off for both models."""
    for m in (pair.expert, pair.anti_expert):
        if hasattr(m, "prefix_reuse"):
            m.prefix_reuse = on
            m.clear_prefix_cache()


def run_setting(name: str, base_url: str, model: str, pair: Any, qs: list[Any], args: Any) -> dict[str, Any]:
    """Base-only then proxy-tuned over the same questions through one provider; timings."""
    from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider

    from blackbox_proxy.rerank import Reranker

    conc = args.local_concurrency if name == "local" else args.hosted_concurrency
    provider = OpenAIChatProvider(model, base_url, max_k=None, timeout=600, max_concurrency=conc)
    try:
        warm = Reranker(provider, (), k=args.k, base_concurrency=conc)
        asyncio.run(warm.ascore(qs[: min(4, len(qs))]))  # the server's first requests are slow
        base_eng = Reranker(provider, (), k=args.k, base_concurrency=conc)
        t_base, base_recs = timed_score(base_eng, qs)
        print(f"[{name}] base only: {t_base:.1f} s", flush=True)
        proxy_eng = Reranker(provider, pair, 1.0, k=args.k, base_concurrency=conc)
        t_proxy, proxy_recs = timed_score(proxy_eng, qs)
        print(f"[{name}] proxy-tuned: {t_proxy:.1f} s {json.dumps(proxy_eng.timings)}", flush=True)
    finally:
        provider.close()
    same_base = sum(
        a.top is not None
        and b.top is not None
        and proxy_eng.derive(a).base_letter == base_eng.derive(b).base_letter
        for a, b in zip(proxy_recs, base_recs, strict=True)
    )
    return {
        "setting": name,
        "concurrency": conc,
        "t_base": t_base,
        "t_proxy": t_proxy,
        "base_timings": base_eng.timings,
        "proxy_timings": proxy_eng.timings,
        "errors": sum(bool(r.error) for r in proxy_recs) + sum(bool(r.error) for r in base_recs),
        "same_base_letter": same_base,
        "records": proxy_recs,
        "engine": proxy_eng,
    }


def pair_alone(pair: Any, qs: list[Any], reuse: bool) -> tuple[float, list[Any]]:
    """Wall seconds and scores of the pair over ``qs`` in engine-sized chunks, nothing else running."""
    set_prefix_reuse(pair, reuse)
    chunk = pair.batch_size
    t = time.perf_counter()
    out: list[Any] = []
    for s in range(0, len(qs), chunk):
        part = qs[s : s + chunk]
        out.extend(pair.score(part, [q.labels for q in part]))
    return time.perf_counter() - t, out


def pin(pid: int | None, cores: str) -> None:
    """Every thread of process ``pid`` onto ``cores`` (``taskset -a``); new threads inherit it."""
    if pid is None:
        raise SystemExit("the server is not running: nothing to pin")
    subprocess.run(["taskset", "-a", "-cp", cores, str(pid)], check=True, capture_output=True)


def start_latency_proxy(upstream: str, latency: str, seed: int) -> tuple[subprocess.Popen[str], str]:
    """``tests/fault_proxy.py`` as its own process (no faults, ``latency`` held per answer); its URL."""
    cmd = [sys.executable, str(REPO / "tests" / "fault_proxy.py"), "--upstream", upstream, "--rate", "0"]
    cmd += ["--latency", latency, "--seed", str(seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.terminate()
        raise SystemExit(f"the latency proxy did not start: {url!r}")
    return proc, url


# --------------------------------------------------------------------------- round 1 (before)

BEFORE_WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
from blackbox_proxy.adapters.openai_chat import OpenAIChatProvider
from blackbox_proxy.experts import ExpertPair
from blackbox_proxy.models import load_causal_lm
from blackbox_proxy.rerank import Reranker
from blackbox_proxy.evaluation.datasets import load_dataset
url, model, spec_e, spec_a = sys.argv[1:5]
n, k, conc, datasets = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8]), sys.argv[9]
pools = [load_dataset(d) for d in datasets.split(",")]
qs = [q for i in range(n) for p in pools for q in p[i : i + 1]][:n]
pair = ExpertPair(load_causal_lm(spec_e), load_causal_lm(spec_a))
pair.score(qs[:2], [q.labels for q in qs[:2]])
provider = OpenAIChatProvider(model, url, max_k=None, timeout=600, max_concurrency=conc)
Reranker(provider, (), k=k, base_concurrency=conc).answer_many(qs[:4], progress=False)
t = time.perf_counter(); Reranker(provider, (), k=k, base_concurrency=conc).answer_many(qs, progress=False)
t_base = time.perf_counter() - t
t = time.perf_counter(); Reranker(provider, pair, 1.0, k=k, base_concurrency=conc).answer_many(qs, progress=False)
t_proxy = time.perf_counter() - t
print(json.dumps({"t_base": t_base, "t_proxy": t_proxy, "n": len(qs)}))
"""


def run_before(src: str, base_url: str, model: str, args: Any, n: int) -> dict[str, Any]:
    """Round 1's engine (source tree ``src``) on the same server: base-only and proxy-tuned seconds."""
    root = Path(src).resolve()
    link = root / "blackbox_proxy" / "adapters"
    if not link.exists():  # the source tree maps adapters/ into the package as pyproject does
        link.symlink_to(root / "adapters", target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(root)}
    argv = [base_url, model, args.expert, args.anti_expert, str(args.threads), str(n), str(args.k)]
    argv += [str(args.local_concurrency), args.datasets]
    out = subprocess.run(
        [sys.executable, "-c", BEFORE_WORKER, *argv], env=env, capture_output=True, text=True, cwd=root
    )
    if out.returncode != 0:
        raise SystemExit(f"round-1 run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="questions (default 200)")
    ap.add_argument(
        "--datasets", default="mmlu,arc-challenge", help="taken in turn (default mmlu,arc-challenge)"
    )
    ap.add_argument("--base", default="qwen2.5-coder-1.5b-instruct", help="served by llama.cpp as the base")
    ap.add_argument("--expert", default="smollm2-135m-instruct")
    ap.add_argument("--anti-expert", default="smollm2-135m-instruct")
    ap.add_argument("--backend", default="auto", help="pair backend: auto, transformers, llama-cpp")
    ap.add_argument("--k", type=int, default=20, help="top log-probs per request (default 20)")
    ap.add_argument("--batch-size", type=int, default=8, help="pair batch size (default 8)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the pair (default 2)")
    ap.add_argument("--server-threads", type=int, default=2, help="llama.cpp server threads (default 2)")
    ap.add_argument("--settings", default="local,hosted", help="local, hosted or both (default both)")
    ap.add_argument("--local-concurrency", type=int, default=2)
    ap.add_argument("--hosted-concurrency", type=int, default=8)
    ap.add_argument("--latency", default="0.3,0.6", help="hosted stand-in: LO,HI seconds per answer")
    ap.add_argument("--no-prefix-reuse", action="store_true", help="proxy runs without the prefix KV reuse")
    ap.add_argument("--skip-pair-alone", action="store_true", help="no pair-alone timing and answer check")
    ap.add_argument("--before-src", help="source tree of round 1 (commit 5faf00f): also its ratio")
    ap.add_argument("--before-n", type=int, help="questions for the round-1 run (default --n)")
    ap.add_argument(
        "--omp-wait",
        choices=("default", "passive"),
        default="default",
        help="OpenMP wait policy of torch's threads (passive: no spinning that steals the server's cores)",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="hosted setting: the server's threads on core 0 (the provider's hardware), this process "
        "(the pair) on core 1, so the pair does not compete with the base's compute as it would not "
        "against a real API (use with --server-threads 1 --threads 1)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    settings = [s for s in args.settings.split(",") if s]
    if any(s not in ("local", "hosted") for s in settings):
        ap.error(f"--settings takes local and/or hosted, got {args.settings!r}")

    if args.omp_wait == "passive":  # read when torch starts its OpenMP runtime
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    from blackbox_proxy.experts import ExpertPair
    from blackbox_proxy.models import load_model
    from blackbox_proxy.rerank import derive
    from blackbox_proxy.server import LocalServer

    torch.set_num_threads(args.threads)
    qs = questions(args.n, args.datasets)
    n = len(qs)
    t = time.perf_counter()
    opts: dict[str, Any] = {"shared": False} if args.expert == args.anti_expert else {}
    if args.backend == "llama-cpp":
        opts["n_threads"] = args.threads
    pair = ExpertPair(
        load_model(args.expert, args.backend, **opts),
        load_model(args.anti_expert, args.backend, **opts),
        batch_size=args.batch_size,
    )
    set_prefix_reuse(pair, not args.no_prefix_reuse)
    pair.score(qs[:2], [q.labels for q in qs[:2]])  # warm-up (allocations, lazy init)
    t_load = time.perf_counter() - t
    print(f"pair loaded and warm in {t_load:.1f} s ({type(pair.expert).__name__})", flush=True)

    results: list[dict[str, Any]] = []
    before: dict[str, Any] | None = None
    with LocalServer(args.base, "base", n_threads=args.server_threads) as srv:
        for name in settings:
            set_prefix_reuse(pair, not args.no_prefix_reuse)
            if name == "local":
                results.append(run_setting(name, srv.base_url, srv.model, pair, qs, args))
                continue
            proc, url = start_latency_proxy(srv.base_url, args.latency, args.seed)
            if args.pin:
                pin(srv.pid, "0")
                pin(os.getpid(), "1")
            try:
                results.append(run_setting(name, url, srv.model, pair, qs, args))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
                if args.pin:
                    every = f"0-{(os.cpu_count() or 1) - 1}"
                    pin(srv.pid, every)
                    pin(os.getpid(), every)
        if args.before_src:
            before = run_before(args.before_src, srv.base_url, srv.model, args, args.before_n or n)
            print(f"round 1: {json.dumps(before)}", flush=True)

    alone: dict[bool, tuple[float, list[Any]]] = {}
    if not args.skip_pair_alone:
        for reuse in (False, True):
            alone[reuse] = pair_alone(pair, qs, reuse)
            print(
                f"pair alone (prefix reuse {'on' if reuse else 'off'}): {alone[reuse][0]:.1f} s", flush=True
            )

    # ------------------------------------------------------------------ report
    print(
        f"\n{n} questions ({args.datasets}); base {args.base} on llama.cpp ({args.server_threads} threads), ",
        end="",
    )
    print(f"top-{args.k}; pair {args.expert} - {args.anti_expert} ({type(pair.expert).__name__}, ", end="")
    print(
        f"{args.threads} torch threads, batch {args.batch_size}, prefix reuse {'off' if args.no_prefix_reuse else 'on'})"
    )
    for r in results:
        tb, tp, tm = r["t_base"], r["t_proxy"], r["proxy_timings"]
        extra = f", latency {args.latency} s" if r["setting"] == "hosted" else ""
        if r["setting"] == "hosted" and args.pin:
            extra += ", server pinned to core 0, pair to core 1"
        print(f"\n[{r['setting']}] concurrency {r['concurrency']}{extra}")
        print(f"  base only     {tb:7.1f} s  {n / tb:6.2f} q/s")
        print(f"  proxy-tuned   {tp:7.1f} s  {n / tp:6.2f} q/s")
        goal = 1.2 if r["setting"] == "local" else 1.05
        print(f"  ratio proxy / base  {tp / tb:.3f}  (goal {goal})")
        print(
            f"  proxy run: first base answer {tm['first_base_s']:.1f} s, pair compute {tm['pair_s']:.1f} s, "
            f"base wait not hidden {tm['base_wait_s']:.1f} s, our overhead {tm['overhead_s']:.2f} s; "
            f"base busy {tm['base_busy_s']:.1f} s of {tm['wall_s']:.1f} s"
        )
        bt = r["base_timings"]
        print(
            f"  base-only run: base busy {bt['base_busy_s']:.1f} s, overhead {bt['wall_s'] - bt['base_busy_s']:.2f} s"
        )
        print(f"  same base letter in both runs: {r['same_base_letter']}/{n}; error rows {r['errors']}")
    if before is not None:
        nb = before["n"]
        print(f"\n[before: round 1, commit 5faf00f, local, {nb} questions, its default prompt]")
        print(
            f"  base only {before['t_base']:.1f} s, proxy-tuned {before['t_proxy']:.1f} s, ratio {before['t_proxy'] / before['t_base']:.3f}"
        )
    if alone:
        (t_off, ref), (t_on, new) = alone[False], alone[True]
        diff = max(
            abs(getattr(x, side)[k] - getattr(y, side)[k])
            for x, y in zip(ref, new, strict=True)
            for side in ("expert", "anti_expert")
            for k in x.expert
        )
        print("\n[pair alone, nothing else running]")
        print(f"  prefix reuse off  {t_off:7.1f} s  {n / t_off:6.2f} q/s")
        print(f"  prefix reuse on   {t_on:7.1f} s  {n / t_on:6.2f} q/s  (gain {t_off / t_on:.2f}x)")
        print(f"  largest |log-prob difference| on vs off: {diff:.2e}")
        for r in results:
            eng = r["engine"]
            same = 0
            for rec, sc in zip(r["records"], ref, strict=True):
                if rec.top is None:
                    continue
                a = eng.derive(rec).letter
                b = derive(type(rec)(rec.id, rec.labels, rec.gold, rec.top, (sc,)), eng.alphas).letter
                same += a == b
            print(
                f"  [{r['setting']}] steered answers equal to the reference path (transformers, no reuse): {same}/{n}"
            )


if __name__ == "__main__":
    main()
