"""RealtimeQA temporal adaptation with the document recipe, driven through the CLI, stage by stage.

The paper's section 7 on this machine's models: a small expert is tuned on the news articles
retrieved for recent RealtimeQA questions and steers the served Qwen-1.5B base (a black box:
top-k log-probs of the first answer token). Every stage is one or more real ``blackbox-proxy``
calls and is resumable, so each fits a short slot on shared cores (run one stage at a time):

1. ``corpus``: ``build-corpus`` writes the articles of ``--train-weeks`` (never questions,
   options, answers or evidence passages);
2. ``train``: ``train-expert ANTI corpus.jsonl`` with the document recipe's defaults (LoRA,
   question renderings, replay, held-out article slice and general set), capped at
   ``--max-steps``; ``--resume`` continues from the last checkpoint, and the held-out losses land
   in the expert card (``eval_log``) and ``training_log.csv``;
3. ``eval``: serves the base once (llama.cpp) and runs ``eval realtimeqa`` on each evaluation set
   with option-text and letter scoring: base, expert alone, anti-expert alone (= the expert
   before training), proxy at each ``--sweep`` alpha, the mean-offset and shuffled-offset
   controls with paired tests, and ``--debias`` (PriDe by default); runs resume from their
   ``.run`` folders and base answers come from ``--cache``.

    python benchmarks/realtimeqa_temporal.py corpus --out-dir /tmp/temporal
    python benchmarks/realtimeqa_temporal.py train --out-dir /tmp/temporal --max-steps 40
    python benchmarks/realtimeqa_temporal.py eval --out-dir /tmp/temporal --cache /tmp/base.sqlite

Numbers and their reading: benchmarks/RESULTS.md, "RealtimeQA temporal adaptation".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "blackbox_proxy.cli"]

#: Evaluation sets: name -> ``eval realtimeqa`` selection flags. ``trained-week`` holds the
#: questions whose articles the expert was tuned on; ``first-80`` is the prompt bar's set.
EVAL_SETS = {
    "trained-week": ["--weeks", "2026/07/05..2026/07/12"],
    "first-80": ["--weeks", "2025-01..2026-12", "--limit", "80"],
}


def run(cmd: list[str], log: Path | None = None, timeout: float | None = None) -> int:
    """Run one CLI call (stdout+stderr to ``log`` when given); its exit code."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t = time.perf_counter()
    if log is None:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    else:
        with open(log, "w", encoding="utf-8") as fh:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
    print(f"  -> rc {rc}, {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return rc


def stage_corpus(args: argparse.Namespace, out: Path) -> int:
    """Write the articles of ``--train-weeks`` to OUT/corpus.jsonl."""
    return run(
        [*CLI, "build-corpus", "--data-dir", args.data_dir, "--weeks", args.train_weeks]
        + ["--out", str(out / "corpus.jsonl")]
    )


def stage_train(args: argparse.Namespace, out: Path) -> int:
    """train-expert with the document recipe's defaults, capped and resumable; prints the held-out log."""
    rc = run(
        [*CLI, "train-expert", args.anti_expert, str(out / "corpus.jsonl"), "--out", str(out / "expert")]
        + ["--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every)]
        + ["--save-every", str(args.eval_every), "--threads", str(args.threads), "--resume", "--quiet"]
    )
    card = out / "expert" / "expert_card.json"
    if card.exists():
        c = json.loads(card.read_text())
        for row in c.get("eval_log") or []:
            print(json.dumps(row))
    return rc


def stage_eval(args: argparse.Namespace, out: Path) -> int:
    """Serve the base once; eval realtimeqa per set and scoring mode (resumable, cached base)."""
    url = f"http://127.0.0.1:{args.port}/v1"
    serve = subprocess.Popen(
        [*CLI, "serve", args.base, "--port", str(args.port), "--threads", str(args.threads)],
        cwd=ROOT,
        stdout=open(out / "serve.log", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/models", timeout=2).close()
                break
            except OSError:
                time.sleep(1)
        else:
            print("the base server did not come up; see serve.log", file=sys.stderr)
            return 2
        common = ["--base-url", url, "--model", args.base, "--top-logprobs", str(args.top_logprobs)]
        common += ["--expert", str(out / "expert"), "--anti-expert", args.anti_expert]
        common += ["--sweep", args.sweep, "--debias", args.debias, "--threads", str(args.threads), "-q"]
        if args.cache:
            common += ["--cache", args.cache]
        worst = 0
        for name in args.sets.split(","):
            for scoring in args.scoring.split(","):
                tag = f"{name}_{scoring}"
                cmd = [*CLI, "eval", "realtimeqa", "--data-dir", args.data_dir, *EVAL_SETS[name], *common]
                cmd += ["--expert-scoring", scoring, "--out", str(out / f"{tag}.csv")]
                worst = max(worst, run(cmd, out / f"{tag}.log"))
        return worst
    finally:
        serve.terminate()
        serve.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("corpus", "train", "eval"))
    ap.add_argument("--out-dir", required=True, help="corpus, expert, runs and logs go here")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "realtimeqa"))
    ap.add_argument("--train-weeks", default="2026/07/05..2026/07/12", help="articles of these weeks")
    ap.add_argument("--base", default="qwen2.5-coder-1.5b-instruct", help="served base model spec")
    ap.add_argument("--anti-expert", default="smollm2-135m-instruct", help="untouched small model")
    ap.add_argument("--max-steps", type=int, default=40, help="cap on training steps (default 40)")
    ap.add_argument("--eval-every", type=int, default=10, help="held-out evaluation interval (steps)")
    ap.add_argument("--sets", default=",".join(EVAL_SETS), help=f"evaluation sets: {list(EVAL_SETS)}")
    ap.add_argument("--scoring", default="options,letters", help="expert scoring modes to run")
    ap.add_argument("--sweep", default="0.5,1,2", help="alphas (default 0.5,1,2)")
    ap.add_argument("--debias", default="pride", help="letter-bias correction (default pride)")
    ap.add_argument("--top-logprobs", type=int, default=20)
    ap.add_argument("--port", type=int, default=8091)
    ap.add_argument("--cache", help="SQLite cache of base responses")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, _terminated)  # so a timeout also stops the CLI calls and the server
    return {"corpus": stage_corpus, "train": stage_train, "eval": stage_eval}[args.stage](args, out)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # subprocess.run kills its child, stage_eval stops the server


if __name__ == "__main__":
    sys.exit(main())
