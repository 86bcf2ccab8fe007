"""The shipped 40-question TruthfulQA MC1 sample: loader, and the script that built it.

``load_sample()`` reads ``truthfulqa_mc1_sample.jsonl`` (next to this file) as MCQuestions. The file
was made by ``python -m blackbox_proxy.data.truthfulqa_sample /path/to/truthfulqa/mc_task.json``:
40 of the 208 four-option MC1 questions, drawn with ``random.Random(SEED)``, each with its options
shuffled by ``random.Random(f"{SEED}:{index}")`` (the source lists the true option first).
TruthfulQA is Apache-2.0; see README.md here for attribution.
"""

from __future__ import annotations

import json
import random
import sys
from importlib import resources
from pathlib import Path

from ..errors import InputError
from ..files import iter_jsonl
from ..types import MCQuestion

FILENAME = "truthfulqa_mc1_sample.jsonl"
SEED = 20240101
N = 40
N_OPTIONS = 4


def load_sample() -> list[MCQuestion]:
    """The shipped sample as MCQuestions (ids ``truthfulqa_<source index>``)."""
    path = resources.files(__package__).joinpath(FILENAME)
    out = []
    for n, rec in iter_jsonl(str(path), what="shipped sample"):
        try:
            out.append(MCQuestion(rec["id"], rec["question"], tuple(rec["choices"]), rec["answer"]))
        except (KeyError, InputError) as exc:
            raise InputError(f"{FILENAME}:{n}: {exc}") from None
    return out


def build(mc_task: str | Path, out: str | Path) -> int:
    """Write the sample from TruthfulQA's ``mc_task.json``; returns the number of questions."""
    data = json.loads(Path(mc_task).read_text(encoding="utf-8"))
    pool = [i for i, rec in enumerate(data) if len(rec["mc1_targets"]) == N_OPTIONS]
    chosen = sorted(random.Random(SEED).sample(pool, N))
    with Path(out).open("w", encoding="utf-8") as fh:
        for i in chosen:
            items = list(data[i]["mc1_targets"].items())
            random.Random(f"{SEED}:{i}").shuffle(items)
            gold = next(j for j, (_, v) in enumerate(items) if int(v) == 1)
            rec = {
                "id": f"truthfulqa_{i}",
                "question": data[i]["question"],
                "choices": [t for t, _ in items],
                "answer": gold,
                "source": "TruthfulQA mc_task.json (MC1)",
                "source_index": i,
            }
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return len(chosen)


if __name__ == "__main__":
    src = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/truthfulqa/mc_task.json"
    dest = Path(__file__).with_name(FILENAME)
    print(f"wrote {build(src, dest)} questions to {dest}")
