"""Long runs through faults and kills: ``eval`` on 1,000 MMLU questions behind a fault-injecting proxy.

The real llama.cpp server serves SmolLM2-135M-Instruct ("smollm2"). ``blackbox-proxy eval mmlu``
runs as a subprocess, with a SmolLM2 expert / anti-expert pair (the same model: the offsets are 0,
the scores come from a score cache the clean run fills), first straight against the server (the
clean run), then through ``tests/fault_proxy.py`` (a separate process) hitting 20% of the base
requests with a fault, every kind alike: 429 with Retry-After, 500, a stall past the client's
``--timeout`` (shorter than ``timeout + late_wait``: the late answer must be used), a truncated
JSON body and a 200 without log-probs. The faulty run is killed with SIGKILL twice, at random
moments (when a random number of base answers is stored, plus a random fraction of a second), and
restarted with the same command each time; any other exit that leaves questions unanswered counts
as a restart needed.

Printed at the end: rows, lost rows (questions without an answered row), duplicate ids, paid requests
(forwarded upstream by the proxy) beyond one per question and beyond those the faults spoiled, split
into those in flight at a kill and the rest (goal 0), restarts needed beyond the kills (goal 0), and
agreement with the clean run (goal: identical answers).

Run (defaults: the faulty run at the CLI's ``--timeout 30 --concurrency 4``, a 40 s stall; about
30 minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_faults.py

When the work does not fit ``--budget`` seconds the benchmark stops its run gracefully (SIGTERM:
the answers in flight are stored), saves its state in ``--work`` and exits with status 3; the same
command resumes it in the next slot. ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd

from blackbox_proxy.server import LocalServer

ROOT = Path(__file__).resolve().parents[1]
PAIR = "smollm2-135m-instruct"
STATE = "state.json"
RESUME_EXIT = 3
SETTINGS = (
    "rate",
    "timeout",
    "stall",
    "retry_after",
    "concurrency",
    "clean_timeout",
    "clean_concurrency",
    "seed",
)


class Budget:
    """Seconds left of this invocation's slot."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def count_lines(path: Path) -> int:
    """Complete lines of a file (0 if absent)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}
    e["OPENAI_API_KEY"] = "sk-bench-not-a-secret"
    e.setdefault("PYTHONUNBUFFERED", "1")
    return e


def eval_cmd(args: argparse.Namespace, base_url: str, work: Path, name: str) -> list[str]:
    """The one ``eval`` command of a run (the same command resumes it)."""
    clean = name == "clean"
    timeout = args.clean_timeout if clean else args.timeout
    concurrency = args.clean_concurrency if clean else args.concurrency
    return [
        sys.executable, "-m", "blackbox_proxy.cli", "eval", "mmlu", "--limit", str(args.n),
        "--base-url", base_url, "--model", "smollm2",
        *([] if args.no_pair else ["--expert", PAIR, "--anti-expert", PAIR]),
        "--score-cache", str(work / "scores.sqlite"),
        "--top-logprobs", "10", "--concurrency", str(concurrency), "--timeout", str(timeout),
        "--threads", "1", "--chunk-size", "16",
        "--run-dir", str(work / f"{name}.run"), "--out", str(work / f"{name}.csv"), "--quiet",
    ]  # fmt: skip


def error_ids(table: Path) -> set[str]:
    """Ids of the rows of a results table that hold an error."""
    t = pd.read_csv(table, keep_default_na=False)
    return set(t.loc[t["error"].astype(str) != "", "id"].astype(str))


def proxy_stats(url: str) -> dict[str, Any]:
    root = url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{root}/_fault_proxy/stats", timeout=10) as r:
        return json.loads(r.read())


class ProxyProcess:
    """``tests/fault_proxy.py`` as a process in front of ``upstream``."""

    def __init__(self, upstream: str, args: argparse.Namespace, seed: int) -> None:
        cmd = [
            sys.executable, str(ROOT / "tests" / "fault_proxy.py"), "--upstream", upstream,
            "--rate", str(args.rate), "--seed", str(seed), "--retry-after", str(args.retry_after),
            "--stall", str(args.stall),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline().strip() if self.proc.stdout else ""
        if not line.startswith("http://"):
            self.proc.kill()
            raise SystemExit(f"fault proxy did not start: {line!r}")
        self.base_url = line

    def stats(self) -> dict[str, Any]:
        return proxy_stats(self.base_url)

    def close(self) -> dict[str, Any]:
        s = self.stats()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return s


def run_until_done(
    cmd: list[str], budget: Budget, watch: Path, on_progress: Any = None
) -> tuple[str, int | None, float]:
    """Run ``cmd``; returns ("done" | "failed" | "budget" | "killed", return code, seconds).

    ``on_progress(proc, stored)`` is polled; it returns True when it SIGKILLed the process.
    """
    t0 = time.monotonic()
    log = open(watch.parent.parent / "eval.log", "a", encoding="utf-8")  # noqa: SIM115 - closed below
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, env=env(), stdout=log, stderr=log, cwd=ROOT)
    try:
        while proc.poll() is None:
            if budget.left() < 0:
                proc.send_signal(signal.SIGTERM)  # graceful: the answers in flight are stored
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                return "budget", proc.returncode, time.monotonic() - t0
            if on_progress is not None and on_progress(proc, count_lines(watch)):
                proc.wait()
                return "killed", proc.returncode, time.monotonic() - t0
            time.sleep(0.05)
    finally:
        log.close()
    return ("done" if proc.returncode == 0 else "failed"), proc.returncode, time.monotonic() - t0


def load_state(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    path = work / STATE
    if path.exists():
        st = json.loads(path.read_text())
        if st["n"] != args.n:
            raise SystemExit(f"{work} holds a run of {st['n']} questions; use --fresh or --n {st['n']}")
        now = {k: getattr(args, k) for k in SETTINGS}
        if not (work / "faulty.run").exists():  # the faulty run has not started: today's settings apply
            st["settings"] = now
        elif now != st["settings"]:  # changed mid-run (flags only, the run store does not depend on them)
            stored = count_lines(work / "faulty.run" / "base.jsonl")
            st.setdefault("settings_history", []).append({"until_stored": stored, "settings": st["settings"]})
            st["settings"] = now
        st.setdefault("clean_failures", [])
        return st
    rng = random.Random(args.seed)
    lo, hi = int(0.15 * args.n), int(0.85 * args.n)
    kills = sorted(rng.sample(range(lo, hi), args.kills))
    return {
        "n": args.n,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "kill_at": kills,  # stored base answers of the faulty run at which it is killed
        "kill_delay": [rng.uniform(0, 1.0) for _ in kills],
        "clean_done": False,
        "clean_failures": [],
        "clean_s": 0.0,
        "faulty_done": False,
        "faulty_s": 0.0,
        "kills": [],
        "failures": [],
        "slot_stops": 0,
        "proxy": {"requests": 0, "paid": 0, "spoiled": 0, "dropped": 0, "repaid": 0, "faults": {}},
        "proxies": 0,
        "slots": 0,
    }


def save_state(work: Path, st: dict[str, Any]) -> None:
    tmp = work / (STATE + ".tmp")
    tmp.write_text(json.dumps(st, indent=1))
    tmp.replace(work / STATE)


def add_stats(st: dict[str, Any], s: dict[str, Any]) -> None:
    acc = st["proxy"]
    for k in ("requests", "paid", "spoiled", "dropped", "repaid"):
        acc[k] += int(s.get(k, 0))
    for k, v in (s.get("faults") or {}).items():
        acc["faults"][k] = acc["faults"].get(k, 0) + int(v)
    st["proxies"] += 1


def unaccounted(st: dict[str, Any], live: dict[str, Any], stored: int, *, completed: bool = False) -> int:
    """Paid requests (all proxies so far) not explained by a stored answer or a spoiled body.

    ``completed``: count only the paid requests whose answer has left the proxy (delivered or
    dropped), not those still being computed or held back (in flight).
    """
    live_paid = live["delivered"] + live["dropped"] if completed else live["paid"]
    return st["proxy"]["paid"] + live_paid - st["proxy"]["spoiled"] - live["spoiled"] - stored


def faulty_phase(
    args: argparse.Namespace, st: dict[str, Any], work: Path, server: Any, budget: Budget
) -> bool:
    base = work / "faulty.run" / "base.jsonl"
    proxy = ProxyProcess(server.base_url, args, args.seed + 1000 + st["proxies"])
    cmd = eval_cmd(args, proxy.base_url, work, "faulty")
    try:
        while True:
            nk = len(st["kills"])
            pending = nk < len(st["kill_at"])
            armed: dict[str, float] = {}

            def on_progress(
                proc: subprocess.Popen[bytes],
                stored: int,
                nk: int = nk,
                pending: bool = pending,
                armed: dict[str, float] = armed,
            ) -> bool:
                if not pending or stored < st["kill_at"][nk]:
                    return False
                now = time.monotonic()
                armed.setdefault("at", now + st["kill_delay"][nk])
                if now < armed["at"]:
                    return False
                before = unaccounted(st, proxy.stats(), count_lines(base), completed=True)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                time.sleep(args.settle)  # the requests it left in flight finish upstream and in the proxy
                after = unaccounted(st, proxy.stats(), count_lines(base))
                st["kills"].append({"stored": count_lines(base), "in_flight_paid": after - before})
                return True

            outcome, rc, secs = run_until_done(cmd, budget, base, on_progress)
            st["faulty_s"] += secs
            if outcome == "done":
                retry = error_ids(work / "faulty.csv") - error_ids(work / "clean.csv")
                if not retry:
                    st["faulty_done"] = True
                    return True
                # the run ended with error rows the clean run did not have: one more restart needed
                st["failures"].append({"rc": rc, "stored": count_lines(base), "error_rows": len(retry)})
                if len(st["failures"]) > 20:
                    raise SystemExit("the faulty run needed more than 20 restarts; see eval.log")
                save_state(work, st)
                continue
            if outcome == "budget":
                st["slot_stops"] += 1
                return False
            if outcome == "failed":
                st["failures"].append({"rc": rc, "stored": count_lines(base)})
                if len(st["failures"]) > 20:
                    raise SystemExit("the faulty run failed more than 20 times; see eval.log")
            save_state(work, st)
    finally:
        add_stats(st, proxy.close())
        save_state(work, st)


def report(args: argparse.Namespace, st: dict[str, Any], work: Path) -> None:
    clean = pd.read_csv(work / "clean.csv", keep_default_na=False)
    faulty = pd.read_csv(work / "faulty.csv", keep_default_na=False)
    base_lines = [json.loads(x) for x in (work / "faulty.run" / "base.jsonl").read_text().splitlines() if x]
    stored_ids = [r["id"] for r in base_lines]
    stored_twice = len(stored_ids) - len(set(stored_ids))
    ok = faulty[faulty["error"].astype(str) == ""]
    lost = args.n - len(set(ok["id"]))
    dup = int(faulty["id"].duplicated().sum())
    p = st["proxy"]
    extra = p["paid"] - p["spoiled"] - args.n
    at_kills = sum(k["in_flight_paid"] for k in st["kills"])
    m = clean.merge(faulty, on="id", suffixes=("_c", "_f"))
    same_base = int((m["base_letter_c"] == m["base_letter_f"]).sum())
    same_steer = int((m["steered_letter_c"] == m["steered_letter_f"]).sum())
    lp = [c for c in clean.columns if c.startswith("base_lp_")]
    diffs = []
    for c in lp:
        a = pd.to_numeric(m[f"{c}_c"], errors="coerce")
        b = pd.to_numeric(m[f"{c}_f"], errors="coerce")
        both = a.notna() & b.notna()
        diffs += list((a[both] - b[both]).abs())
    faults = p["faults"]
    n_faults = sum(faults.values())
    print(f"bench_faults: {args.n} MMLU validation questions, eval with --run-dir and resume")
    print(
        f"settings: faults {st['settings']['rate']:.0%} of requests over {len(faults)} kinds, --timeout "
        f"{st['settings']['timeout']:g} s, stall {st['settings']['stall']:g} s, Retry-After "
        f"{st['settings']['retry_after']:g} s, --concurrency {st['settings']['concurrency']}, seed {args.seed}; "
        f"clean run --timeout {st['settings'].get('clean_timeout', st['settings']['timeout']):g} s, "
        f"--concurrency {st['settings'].get('clean_concurrency', st['settings']['concurrency'])}"
    )
    for h in st.get("settings_history", []):
        print(f"  (the faulty run's first {h['until_stored']} base answers ran with {h['settings']})")
    if st.get("clean_failures"):
        print(f"clean run: {len(st['clean_failures'])} failed attempt(s) restarted: {st['clean_failures']}")
    print(
        f"proxy: {p['requests']} requests, {n_faults} faults ({n_faults / max(p['requests'], 1):.1%}): "
        + ", ".join(f"{k} {v}" for k, v in sorted(faults.items()))
    )
    print(
        f"paid {p['paid']}, spoiled by faults {p['spoiled']}, dropped {p['dropped']}, repaid within a proxy "
        f"{p['repaid']}"
    )
    print(
        f"rows: {len(faulty)} (error rows: {len(error_ids(work / 'faulty.csv'))}; clean run "
        f"{len(error_ids(work / 'clean.csv'))})"
    )
    print(f"lost rows: {lost}")
    print(f"duplicate ids: {dup} in the table; base answers stored twice: {stored_twice}")
    print(
        f"paid beyond one per question and the spoiled: {extra} "
        f"({at_kills} in flight at the {len(st['kills'])} kills, {extra - at_kills} otherwise)"
    )
    print(
        f"restarts: {len(st['kills'])} after kill -9, {len(st['failures'])} needed beyond the kills, "
        f"{st['slot_stops']} graceful stops at a slot's end"
    )
    print(
        f"agreement with the clean run: base letter {same_base}/{len(m)}, steered letter {same_steer}/{len(m)}; "
        f"max |base log-prob difference| {max(diffs) if diffs else math.nan:.3g}"
    )
    print(
        f"time: clean run {st['clean_s']:.0f} s (recorded attempts), faulty run {st['faulty_s']:.0f} s "
        f"(kills, restarts and settling included), over {st['slots']} slot(s)"
    )
    summary = json.dumps(
        {
            "rows": len(faulty),
            "lost_rows": lost,
            "duplicate_ids": dup,
            "stored_twice": stored_twice,
            "paid_beyond": extra,
            "paid_beyond_at_kills": at_kills,
            "restarts_beyond_kills": len(st["failures"]),
            "same_base": same_base,
            "same_steered": same_steer,
            "compared": len(m),
            "state": st,
        },
        indent=1,
    )
    (work / "report.json").write_text(summary)
    if args.n >= 1000:
        (ROOT / "benchmarks" / "results" / "bench_faults.json").write_text(summary + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--n", type=int, default=1000, help="MMLU validation questions (default 1000)")
    ap.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "bbp-bench-faults"),
        help="state, run directories and tables (default: a folder in the temp dir)",
    )
    ap.add_argument("--budget", type=float, default=3600.0, help="seconds of work in this invocation")
    ap.add_argument("--rate", type=float, default=0.2, help="share of requests hit by a fault")
    ap.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="faulty run's --timeout (the CLI default, 30; late_wait the same)",
    )
    ap.add_argument("--stall", type=float, default=40.0, help="stall of a stalled answer (s), > --timeout")
    ap.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of the injected 429s")
    ap.add_argument(
        "--concurrency", type=int, default=4, help="faulty run's --concurrency (the CLI default, 4)"
    )
    ap.add_argument("--clean-timeout", type=float, default=30.0, help="clean run's --timeout")
    ap.add_argument("--clean-concurrency", type=int, default=2, help="clean run's --concurrency")
    ap.add_argument("--kills", type=int, default=2, help="kill -9 of the faulty run")
    ap.add_argument(
        "--settle", type=float, help="seconds after a kill before counting (default: the stall + 3 s)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="start over (delete --work)")
    ap.add_argument("--no-pair", action="store_true", help="base only (no expert pair)")
    ap.add_argument("--upstream", help="use this running server (base URL) instead of starting SmolLM2")
    args = ap.parse_args()
    if not args.timeout < args.stall < 2 * args.timeout:
        ap.error("--stall must lie between --timeout and twice it (past the timeout, within the late wait)")
    if args.settle is None:
        args.settle = args.stall + 3.0
    budget = Budget(args.budget)
    work = Path(args.work)
    if args.fresh and work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    st = load_state(work, args)
    st["slots"] += 1
    save_state(work, st)
    if not st["faulty_done"]:
        with contextlib.ExitStack() as stack:
            if args.upstream:
                server: Any = argparse.Namespace(base_url=args.upstream)
            else:
                server = stack.enter_context(LocalServer(PAIR, "smollm2", n_ctx=2048, n_threads=2))
            if not st["clean_done"]:
                cmd = eval_cmd(args, server.base_url, work, "clean")
                while True:
                    outcome, rc, secs = run_until_done(cmd, budget, work / "clean.run" / "base.jsonl")
                    st["clean_s"] += secs
                    if outcome != "failed":
                        break
                    st["clean_failures"].append(
                        {"rc": rc, "stored": count_lines(work / "clean.run" / "base.jsonl")}
                    )
                    save_state(work, st)
                    if len(st["clean_failures"]) > 5:
                        raise SystemExit(f"the clean run failed 6 times; see {work / 'eval.log'}")
                st["clean_done"] = outcome == "done"
                save_state(work, st)
            if st["clean_done"] and budget.left() > 30:
                faulty_phase(args, st, work, server, budget)
    save_state(work, st)
    if not st["faulty_done"]:
        done = count_lines(work / ("faulty.run" if st["clean_done"] else "clean.run") / "base.jsonl")
        phase = "faulty" if st["clean_done"] else "clean"
        print(
            f"bench_faults: slot over in the {phase} run ({done} of {args.n} base answers stored); "
            "run the same command again to resume"
        )
        return RESUME_EXIT
    report(args, st, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
