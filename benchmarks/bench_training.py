"""Training throughput on this machine: SmolLM2-135M full fine-tuning vs Qwen2.5-Coder-0.5B LoRA.

Each configuration trains a few steps on real news documents (RealtimeQA retrieved articles of
January 2025, via the corpus builder; synthetic text when the data folder is absent) in a fresh
child process, so the peak resident memory (RSS) of one run is measured alone. Reports tokens/s
over all steps (the first, slower step included), seconds per step and peak RSS, and the ratios.

    python benchmarks/bench_training.py [--steps 3] [--threads 2] [--seq-len 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "smollm2-full": {"base": "smollm2-135m-instruct", "lora": False, "batch_size": 4},
    "qwen0.5b-lora": {"base": "qwen2.5-coder-0.5b-instruct", "lora": True, "batch_size": 4},
}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "realtimeqa"


def _documents(path: Path) -> str:
    """Write training documents; returns where they came from."""
    if (DATA / "past" / "2025").exists():
        from blackbox_proxy.corpus import build_corpus, write_corpus

        docs, _ = build_corpus(DATA, "2025-01", progress=False)
        write_corpus(docs, path)
        return f"RealtimeQA articles 2025-01 ({len(docs)} documents)"
    rows = [
        {"text": f"Report {i}: the committee met on day {i} and approved budget line {i * 7}."}
        for i in range(400)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return "synthetic sentences"


def run_one(name: str, data: str, steps: int, threads: int, seq_len: int) -> dict:
    """Train one configuration in this process and return its measurements."""
    from blackbox_proxy.training import TrainConfig, train_expert

    c = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            max_steps=steps, lora=c["lora"], batch_size=c["batch_size"], max_seq_len=seq_len, threads=threads,
            save_every=0, progress=False, seed=0,
        )  # fmt: skip
        t0 = time.perf_counter()
        card = train_expert(c["base"], data, Path(tmp) / "out", cfg)
        wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "config": name, "base": c["base"], "mode": "lora" if c["lora"] else "full", "steps": card.steps,
        "batch_size": c["batch_size"], "seq_len": seq_len, "threads": threads, "tokens": card.tokens,
        "train_seconds": card.train_seconds, "seconds_per_step": round(card.train_seconds / card.steps, 2),
        "tokens_per_second": card.tokens_per_second, "wall_seconds_with_load_and_save": round(wall, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1), "final_loss": card.final_loss,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one configuration
        print(json.dumps(run_one(args.one, args.data, args.steps, args.threads, args.seq_len)))
        return 0

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "docs.jsonl"
        source = _documents(data)
        print(
            f"data: {source}; {args.steps} steps, {args.threads} threads, seq len {args.seq_len}",
            file=sys.stderr,
        )
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
        for name in args.configs:
            cmd = [sys.executable, __file__, "--one", name, "--data", str(data), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--seq-len", str(args.seq_len)]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return proc.returncode
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    cols = ["config", "mode", "steps", "batch_size", "seq_len", "tokens", "seconds_per_step", "tokens_per_second",
            "peak_rss_mb", "wall_seconds_with_load_and_save"]  # fmt: skip
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(r[c]) for c in cols))
    if len(results) == 2:
        a, b = results
        print(
            f"ratio tokens/s {a['config']} / {b['config']}: {a['tokens_per_second'] / b['tokens_per_second']:.2f}"
        )
        print(f"ratio peak RSS {b['config']} / {a['config']}: {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}")
    load = os.getloadavg()[0]
    print(
        f"machine: {os.cpu_count()} CPUs, 1-min load average {load:.1f} at the end (other jobs share the cores)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
