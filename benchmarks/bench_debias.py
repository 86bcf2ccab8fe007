"""Letter-bias correction on a served base: none / pride / calibrate / permute (blackbox_proxy.debias).

Each question of ARC-Challenge and MMLU validation is scored by the served base (alpha 0, chat
form of the template, top-k first-token log-probs, missing letters floor-filled) under all of its
cyclic option shifts, plus the content-free questions; each method then uses only the scores its
plan asks for, so all four are compared on the same answers. PriDe's estimation set is random:
it is drawn with several seeds and the accuracy is averaged (the letter counts shown are seed 0's).

    python benchmarks/bench_debias.py --base-url http://127.0.0.1:8091/v1 --arc 100 --mmlu 100 \\
        --cache /tmp/prompts.sqlite --out debias.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mc_letters import Progress, add_server_args, datasets, provider_for, score

from blackbox_proxy import debias as db
from blackbox_proxy.prompts import resolve_template


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(ap)
    ap.add_argument("--template", help="prompt template name or file (default: the package default)")
    ap.add_argument("--arc", type=int, default=100, help="ARC-Challenge validation questions (0: skip)")
    ap.add_argument(
        "--mmlu", type=int, default=100, help="MMLU validation questions, evenly spaced (0: skip)"
    )
    ap.add_argument("--rtqa", type=int, default=0, help="first RealtimeQA 2025+ questions (default 0: skip)")
    ap.add_argument("--fractions", default="0.05,0.1,0.2", help="PriDe estimation fractions")
    ap.add_argument("--seeds", type=int, default=5, help="PriDe estimation draws per fraction (default 5)")
    ap.add_argument("--out", help="write rows and priors as JSON here")
    args = ap.parse_args()

    template = resolve_template(args.template)
    data = datasets(args.arc, args.mmlu, args.rtqa)
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    rows, priors = [], {}
    with provider_for(args) as provider:
        for ds, qs in data.items():
            full = db.plan("permute", qs)
            cal = db.plan("calibrate", qs)
            todo = list(qs) + [e.question for e in full.extra] + [e.question for e in cal.extra]
            prog = Progress(len(todo), f"{template.name} / {ds}")
            scores = {}
            for q in todo:
                scores[q.id] = score(provider, template, q, args.k).logprobs
                prog.step()
            observed = {q.id: scores[q.id] for q in qs}
            extra = {k: v for k, v in scores.items() if k not in observed}
            gold = [q.gold_letter or "" for q in qs]
            follow = follow_rate(qs, observed, extra)
            print(
                f"{ds}: the chosen option moved with the shift in {follow:.3f} of shifted prompts", flush=True
            )

            for method in ("none", "calibrate", "permute"):
                p = db.plan(method, qs)
                r = db.apply(p, observed, {e.key: extra[e.key] for e in p.extra})
                rows.append(row(ds, qs, method, r, follow_rate=follow))
                priors[f"{ds}/{method}"] = r.prior
            for f in fractions:
                accs, results = [], []
                for seed in range(args.seeds):
                    p = db.plan("pride", qs, fraction=f, seed=seed)
                    r = db.apply(p, observed, {e.key: extra[e.key] for e in p.extra})
                    results.append(r)
                    accs.append(sum(r.letter(q.id) == g for q, g in zip(qs, gold, strict=True)) / len(qs))
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                rows.append(row(ds, qs, f"pride f={f:g}", results[0], statistics.mean(accs), accuracy_sd=sd))
                priors[f"{ds}/pride f={f:g} seed 0"] = results[0].prior
            for r in rows[-3 - len(fractions) :]:
                print(_fmt(r), flush=True)

    print(
        "\n| data | method | n | accuracy | answers A/B/C/D | gold | top share | KL from gold | extra calls | calls/question |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sd = f" ± {r['accuracy_sd']:.3f}" if "accuracy_sd" in r else ""
        print(
            f"| {r['dataset']} | {r['method']} | {r['n']} | {r['accuracy']:.3f}{sd} | {r['answers']} | {r['gold']} "
            f"| {r['top_share']:.2f} | {r['kl_from_gold']:.3f} | {r['extra_calls']} | {r['calls_per_question']:.2f} |"
        )
    print("\npriors (4-option questions):")
    for k, v in priors.items():
        four = v.get("by_n_options", {}).get("4")
        if four:
            print(f"  {k}: " + " ".join(f"{lab}={p:.3f}" for lab, p in four.items()))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"template": template.name, "rows": rows, "priors": priors}, indent=1)
        )


def follow_rate(qs: list, observed: dict, extra: dict) -> float:
    """Share of (question, shift >= 1) whose chosen option (letters mapped back) is the unshifted choice."""
    hits = total = 0
    for q in qs:
        labs = q.labels
        ref = max(labs, key=observed[q.id].__getitem__)
        for s in range(1, len(labs)):
            back = db.unshift(extra[f"{q.id}#cyc{s}"], s, labs)
            hits += int(max(labs, key=back.__getitem__) == ref)
            total += 1
    return hits / total


def row(ds: str, qs: list, method: str, r: db.DebiasResult, acc: float | None = None, **kw: object) -> dict:
    """One table row: accuracy and letter spread of ``r``'s answers on ``qs``."""
    gold = [q.gold_letter or "" for q in qs]
    st = db.letter_stats([r.letter(q.id) for q in qs], gold, labels="ABCDE")
    return {
        "dataset": ds,
        "method": method,
        "n": len(qs),
        "accuracy": st.accuracy if acc is None else acc,
        "answers": "/".join(str(st.answer_counts[x]) for x in "ABCD"),
        "gold": "/".join(str(st.gold_counts[x]) for x in "ABCD"),
        "top_share": st.top_share,
        "kl_from_gold": st.kl_from_gold,
        "extra_calls": r.extra_calls,
        "calls_per_question": 1 + r.extra_calls / len(qs),
        **kw,
    }


def _fmt(r: dict) -> str:
    return (
        f"{r['dataset']:>18} {r['method']:>14} acc={r['accuracy']:.3f} answers={r['answers']} gold={r['gold']} "
        f"top={r['top_share']:.2f} kl={r['kl_from_gold']:.3f} extra={r['extra_calls']}"
    )


if __name__ == "__main__":
    main()
