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

``--shifts N`` also scores every cyclic option shift of N evenly spaced questions per data set
(plus one of each other option count): the template's own letter prior (PriDe's estimate, the
answer distribution on a question the model cannot answer) and the accuracy and spread after
dividing it out. Every wording screened so far shares one prior (B 0.30-0.39; RESULTS.md).

    python benchmarks/choose_prompt.py                                  # serves Qwen-1.5B on :8091
    python benchmarks/choose_prompt.py --base-url http://127.0.0.1:8091/v1 --arc 100 --mmlu 100 \\
        --rtqa 80 --templates legacy,plain,instruct --cache /tmp/prompts.sqlite --out results.json
    python benchmarks/choose_prompt.py --templates letter-only,my_template.json --arc 25 --mmlu 25 \
        --rtqa 0 --shifts 4 --cache /tmp/prompts.sqlite
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mc_letters import Progress, add_server_args, datasets, provider_for, score, spread

from blackbox_proxy import debias as db
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
    ap.add_argument(
        "--shifts",
        type=int,
        default=0,
        help="also score every cyclic option shift of this many evenly spaced questions per data set: "
        "the template's letter prior (PriDe estimate) and the answers after dividing it out",
    )
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
                prior_cols = {}
                if args.shifts:
                    prior_cols = prior_and_pride(provider, t, qs, scored, args.shifts, args.k)
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
                        **prior_cols,
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
    if any("prior4" in r for r in rows):
        print(
            "\n| template | data | letter prior A/B/C/D (4 options) | PriDe accuracy | PriDe top share | PriDe answers | extra calls |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            if "prior4" in r:
                pri = "/".join(f"{v:.2f}" for v in r["prior4"].values())
                print(
                    f"| {r['template']} | {r['dataset']} | {pri} | {r['pride_accuracy']:.3f} | "
                    f"{r['pride_top_share']:.2f} | {r['pride_answers']} | {r['pride_extra_calls']} |"
                )
    best = choose(rows)
    print(f"\nchosen on ARC/MMLU validation: {best}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "answers": answers, "chosen": best}, indent=1))


def prior_and_pride(provider, template, qs: list, scored: list, n_est: int, k: int) -> dict:
    """The template's letter prior from every cyclic shift of ``n_est`` evenly spaced questions of
    ``qs`` (PriDe's estimate), and the accuracy / spread of PriDe's answers with that prior."""
    est = [q.id for q in spread(qs, n_est)]
    covered = {len(q.choices) for q in qs if q.id in set(est)}
    for q in qs:  # one question of every other option count, so each count has a prior
        if len(q.choices) not in covered:
            est.append(q.id)
            covered.add(len(q.choices))
    p = db.plan("pride", qs, estimation_ids=est)
    extra = {e.key: score(provider, template, e.question, k).logprobs for e in p.extra}
    observed = {q.id: s.logprobs for q, s in zip(qs, scored, strict=True)}
    r = db.apply(p, observed, extra)
    st = letter_stats([r.letter(q.id) or "" for q in qs], [q.gold_letter or "" for q in qs], labels="ABCDE")
    four = r.prior.get("by_n_options", {}).get("4", {})
    return {
        "prior4": {lab: round(v, 3) for lab, v in four.items()},
        "prior_max": max(four.values()) if four else float("nan"),
        "pride_accuracy": st.accuracy,
        "pride_top_share": st.top_share,
        "pride_answers": "/".join(str(st.answer_counts[x]) for x in "ABCD"),
        "pride_extra_calls": r.extra_calls,
    }


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
        + (
            f" prior={r['prior4']} pride_acc={r['pride_accuracy']:.3f} pride_top={r['pride_top_share']:.2f} "
            f"pride_answers={r['pride_answers']} (+{r['pride_extra_calls']} calls)"
            if "prior4" in r
            else ""
        )
    )


if __name__ == "__main__":
    main()
