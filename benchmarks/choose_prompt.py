"""Choosing the default multiple-choice prompt by answers, not by letter mass.

For each built-in template (blackbox_proxy.prompts.TEMPLATES, chat form) the served base answers
validation questions at alpha 0 (base only): one request per question, top-k log-probs of the
first token, letters matched by text, a missing letter filled with the floor bound. Reported per
template and data set: accuracy, the share of the most frequent answer letter, KL(answer letters
|| gold letters) (0.5 added to every count), the mean probability mass on the option letters,
and how often a letter was missing from the top k.

The default is picked on ARC-Challenge and MMLU validation only: the most accurate template (mean
of the two) among those whose top-letter share is at most 0.45 on both, else the one with the
smallest worst top-letter share (then accuracy); RealtimeQA 2025+ is reported, not used to choose.

    python benchmarks/choose_prompt.py                                  # serves Qwen-1.5B on :8091
    python benchmarks/choose_prompt.py --base-url http://127.0.0.1:8091/v1 --arc 100 --mmlu 100 \\
        --rtqa 80 --templates legacy,plain,instruct --cache /tmp/prompts.sqlite --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mc_letters import Progress, add_server_args, datasets, provider_for, score

from blackbox_proxy.debias import letter_stats
from blackbox_proxy.prompts import TEMPLATES, resolve_template

MAX_TOP_SHARE = 0.45
CHOOSE_ON = ("arc-challenge-val", "mmlu-val")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(ap)
    ap.add_argument("--templates", default=",".join(TEMPLATES), help="names or files, comma-separated")
    ap.add_argument("--arc", type=int, default=100, help="ARC-Challenge validation questions (0: skip)")
    ap.add_argument(
        "--mmlu", type=int, default=100, help="MMLU validation questions, evenly spaced (0: skip)"
    )
    ap.add_argument("--rtqa", type=int, default=80, help="first RealtimeQA 2025+ questions (0: skip)")
    ap.add_argument("--out", help="write the rows (and per-question letters) as JSON here")
    args = ap.parse_args()

    templates = [resolve_template(t.strip()) for t in args.templates.split(",") if t.strip()]
    data = datasets(args.arc, args.mmlu, args.rtqa)
    rows, answers = [], {}
    with provider_for(args) as provider:
        for t in templates:
            for ds, qs in data.items():
                prog = Progress(len(qs), f"{t.name} / {ds}")
                scored = []
                for q in qs:
                    scored.append(score(provider, t, q, args.k))
                    prog.step()
                letters = [s.letter for s in scored]
                gold = [q.gold_letter or "" for q in qs]
                st = letter_stats(letters, gold, labels="ABCDE")
                rows.append(
                    {
                        "template": t.name,
                        "dataset": ds,
                        "n": len(qs),
                        "accuracy": st.accuracy,
                        "top_letter": max(st.answer_counts, key=st.answer_counts.__getitem__),
                        "top_share": st.top_share,
                        "kl_from_gold": st.kl_from_gold,
                        "answers": "/".join(str(st.answer_counts[x]) for x in "ABCD"),
                        "gold": "/".join(str(st.gold_counts[x]) for x in "ABCD"),
                        "letter_mass": sum(s.mass for s in scored) / len(scored),
                        "missing_rate": sum(1 for s in scored if s.missing) / len(scored),
                    }
                )
                answers[f"{t.name}/{ds}"] = {q.id: s.letter for q, s in zip(qs, scored, strict=True)}
                print(_fmt(rows[-1]), flush=True)

    print(
        "\n| template | data | n | accuracy | top letter (share) | KL from gold | answers A/B/C/D | gold | letter mass | missing |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['template']} | {r['dataset']} | {r['n']} | {r['accuracy']:.3f} | {r['top_letter']} "
            f"({r['top_share']:.2f}) | {r['kl_from_gold']:.3f} | {r['answers']} | {r['gold']} | "
            f"{r['letter_mass']:.3f} | {r['missing_rate']:.3f} |"
        )
    best = choose(rows)
    print(f"\nchosen on ARC/MMLU validation: {best}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "answers": answers, "chosen": best}, indent=1))


def choose(rows: list[dict]) -> str | None:
    """Best mean accuracy on CHOOSE_ON among templates within MAX_TOP_SHARE on each data set; if none
    is within it, the template with the smallest worst top share (to 0.01), then the best accuracy."""
    by_t: dict[str, list[dict]] = {}
    for r in rows:
        if r["dataset"] in CHOOSE_ON:
            by_t.setdefault(r["template"], []).append(r)
    if not by_t:
        return None
    acc = {t: sum(r["accuracy"] for r in rs) / len(rs) for t, rs in by_t.items()}
    worst = {t: round(max(r["top_share"] for r in rs), 2) for t, rs in by_t.items()}
    ok = [t for t in by_t if worst[t] <= MAX_TOP_SHARE]
    if ok:
        return max(ok, key=lambda t: acc[t])
    print(f"no template has every top share <= {MAX_TOP_SHARE}; taking the least biased", file=sys.stderr)
    return min(by_t, key=lambda t: (worst[t], -acc[t]))


def _fmt(r: dict) -> str:
    return (
        f"{r['template']:>12} {r['dataset']:>18} n={r['n']} acc={r['accuracy']:.3f} "
        f"top={r['top_letter']}:{r['top_share']:.2f} kl={r['kl_from_gold']:.3f} answers={r['answers']} "
        f"gold={r['gold']} mass={r['letter_mass']:.3f} missing={r['missing_rate']:.3f}"
    )


if __name__ == "__main__":
    main()
