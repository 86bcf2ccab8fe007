"""Fact injection through the CLI: train an expert on invented-fact documents, steer a served base.

Every step is a ``blackbox-proxy`` command run as a subprocess, exactly as a user types it:

1. ``train-expert EXPERT_BASE DOCS --out OUT/expert`` with its default settings (the document recipe);
2. ``serve BASE --port P`` (the "hosted" model, a black box behind its top-k log-probs);
3. ``mc FACTS ... --expert OUT/expert --anti-expert EXPERT_BASE --expert-scoring options`` and the
   same on unrelated ARC-Challenge / MMLU *validation* questions (never test), one expert for both.

The report (``OUT/report.md`` and ``OUT/summary.json``) gives base and steered accuracy on both
sets, the expert's own option-text accuracy, the commands and their wall times. Usage::

    flock /tmp/bbp-heavy.lock .venv/bin/python benchmarks/fact_injection.py --out-dir /tmp/fi/run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "blackbox_proxy" / "data"
CLI = [sys.executable, "-m", "blackbox_proxy.cli"]


def unrelated_questions(path: Path, n_arc: int, n_mmlu: int, seed: int = 0) -> Path:
    """ARC-Challenge validation (first 4-option questions) + a seeded MMLU validation sample as JSONL."""
    from blackbox_proxy.evaluation.datasets import load_arc, load_mmlu

    arc = [q for q in load_arc(subset="challenge") if len(q.choices) == 4][:n_arc]
    mmlu = load_mmlu()
    idx = list(range(len(mmlu)))
    random.Random(seed).shuffle(idx)
    qs = arc + [mmlu[i] for i in idx[:n_mmlu]]
    with path.open("w") as fh:
        for q in qs:
            rec = {"id": q.id, "question": q.question, "choices": list(q.choices), "answer": q.answer}
            fh.write(json.dumps(rec) + "\n")
    return path


def run(cmd: list[str], log: list[dict], what: str) -> float:
    """Run one CLI command, echo it, record its wall time; raise on failure."""
    shown = " ".join(shlex.quote(c) for c in ["blackbox-proxy", *cmd[len(CLI) :]])
    print(f"$ {shown}", flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t
    sys.stdout.write(proc.stdout[-3000:])
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{what} failed with exit code {proc.returncode}")
    log.append({"step": what, "command": shown, "seconds": round(dt, 1), "stdout_tail": proc.stdout[-1500:]})
    return dt


def accuracy(csv: Path, sweep: list[str]) -> dict:
    """Base, steered (each sweep value) and expert-alone accuracy of an ``mc`` results table."""
    import pandas as pd

    df = pd.read_csv(csv)
    gold = df["gold_letter"].astype(str)
    out = {
        "n": len(df),
        "base": round(float((df["base_letter"].astype(str) == gold).mean()), 4),
        "expert_alone": round(float((df["expert_letter"].astype(str) == gold).mean()), 4),
        "anti_alone": round(float((df["anti_letter"].astype(str) == gold).mean()), 4),
        "steered": {},
        "base_letters": df["base_letter"].astype(str).value_counts().to_dict(),
    }
    for s in sweep:
        col = f"steered_letter@{s}"
        if col in df:
            out["steered"][s] = round(float((df[col].astype(str) == gold).mean()), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument(
        "--expert-base", default="smollm2-135m-instruct", help="the anti-expert; the expert is it tuned"
    )
    ap.add_argument("--base", default="qwen2.5-coder-1.5b-instruct", help="the served base model")
    ap.add_argument("--docs", default=str(DATA / "invented_facts_docs.jsonl"))
    ap.add_argument("--facts", default=str(DATA / "invented_facts_mc.jsonl"))
    ap.add_argument("--unrelated", default=None, help="JSONL of unrelated questions (default: ARC/MMLU val)")
    ap.add_argument("--n-arc", type=int, default=50)
    ap.add_argument("--n-mmlu", type=int, default=50)
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--sweep", default="1,0.5,2", help="alphas; the first is the main column (default 1)")
    ap.add_argument("--calibration", default=None, help="--option-calibration (default: the CLI's)")
    ap.add_argument("--train-args", default="", help="extra train-expert flags (default: none)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=JSONL", help="more question sets")
    ap.add_argument("--cache", default=None, help="SQLite cache of base responses (reruns cost nothing)")
    args = ap.parse_args()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    expert = out / "expert"
    if not (expert / "expert_card.json").exists():
        cmd = [*CLI, "train-expert", args.expert_base, args.docs, "--out", str(expert), "--quiet"]
        run(cmd + shlex.split(args.train_args), log, "train-expert")
    card = json.loads((expert / "expert_card.json").read_text())
    unrelated = (
        Path(args.unrelated)
        if args.unrelated
        else unrelated_questions(out / "unrelated.jsonl", args.n_arc, args.n_mmlu)
    )

    server = subprocess.Popen(
        [*CLI, "serve", args.base, "--port", str(args.port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        t = time.perf_counter()
        assert server.stdout is not None
        url = ""
        for line in server.stdout:
            if "/v1" in line:
                url = line.strip().split()[-1]
                break
        if not url:
            raise SystemExit("the server did not start")
        log.append(
            {
                "step": "serve",
                "command": f"blackbox-proxy serve {args.base} --port {args.port}",
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        pair = ["--expert", str(expert), "--anti-expert", args.expert_base, "--expert-scoring", "options"]
        if args.calibration:
            pair += ["--option-calibration", args.calibration]
        common = ["--base-url", url, "--model", args.base, *pair, "--sweep", args.sweep, "--quiet"]
        if args.cache:
            common += ["--cache", args.cache]
        results = {}
        sets = [("facts", args.facts), ("unrelated", str(unrelated))]
        sets += [tuple(e.split("=", 1)) for e in args.extra]
        for name, path in sets:
            csv = out / f"{name}.csv"
            run([*CLI, "mc", path, *common, "--out", str(csv)], log, f"mc {name}")
            results[name] = accuracy(csv, args.sweep.split(","))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    summary = {
        "expert": {
            k: card.get(k)
            for k in (
                "format",
                "steps",
                "best_step",
                "train_seconds",
                "prepare_seconds",
                "early_stop",
                "data_counts",
            )
        },
        "eval_log": card.get("eval_log"),
        "results": results,
        "commands": log,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"results": results, "times": {c["step"]: c["seconds"] for c in log}}, indent=2))


if __name__ == "__main__":
    main()
