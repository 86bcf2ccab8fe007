"""Making an expert on CPU: fine-tune a small causal LM on documents or prompt/response pairs.

The output folder is a model spec that :func:`blackbox_proxy.models.load_causal_lm` loads: a full
transformers model (``save_pretrained`` + tokenizer), a LoRA adapter whose base is a local folder
(loads offline), or merged LoRA weights; plus ``expert_card.json`` describing how it was made.

**The document recipe** (the default for document data, measured in benchmarks/RESULTS.md): a LoRA
adapter (r 16 on every linear layer, lr 1e-3) trained on the documents, on question renderings
derived from the documents themselves (:func:`~.training_data.question_renderings`, so a fact is
retrievable by a question in the cloze form option scoring uses), and on replayed general text
sampled from the untouched model (so what it knew is kept); every ``eval_every`` steps the loss on
a held-out slice of the documents (when there are enough) and on held-out replay text is logged to
``training_log.csv`` (+ PNG) and the card; training stops early when the held-out document loss
stops improving or the general loss rises by more than ``max_general_rise`` nats, and the best
weights are kept. Prompt/response pairs keep plain fine-tuning (full weights, lr 5e-5, 1 epoch).

Training is deterministic for a seed: batches come from :class:`~.training_data.BatchPlan`, and a
checkpoint (trainable weights, optimizer, scheduler, RNG states, step) lets ``resume=True`` continue
without repeating finished steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import iter_jsonl
from .training_data import (
    IGNORE,
    BatchPlan,
    TokenSeq,
    collate,
    data_sha256,
    load_examples,
    question_renderings,
    tokenize_documents,
    tokenize_pairs,
    tokenize_renderings,
)

log = logging.getLogger(__name__)

CARD = "expert_card.json"
CHECKPOINTS = "checkpoints"
SCHEDULERS = ("linear", "cosine", "constant")

#: config fields that shape the training trajectory; a resumed run must match them exactly
_TRAJECTORY = (
    "epochs",
    "max_steps",
    "lr",
    "batch_size",
    "grad_accum",
    "max_seq_len",
    "packing",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "seed",
    "warmup_steps",
    "scheduler",
    "weight_decay",
    "max_grad_norm",
    "chat_template",
    "kind",
    "renderings",
    "replay",
    "replay_data",
    "heldout_fraction",
    "eval_every",
    "patience",
    "max_general_rise",
)
#: what the document recipe sets where a field is left at None (see the module docstring)
DOCUMENT_RECIPE: dict[str, Any] = {
    "lora": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lr": 1e-3,
    "epochs": "auto",
    "renderings": True,
    "replay": 0.5,
}
#: the same fields for prompt/response pairs: plain fine-tuning as before
PAIR_RECIPE: dict[str, Any] = {
    "lora": False,
    "lora_r": 8,
    "lora_alpha": 16,
    "lr": None,
    "epochs": 1.0,
    "renderings": False,
    "replay": 0.0,
}
#: the automatic epoch count of documents: at least this many optimizer steps, at most MAX_AUTO_EPOCHS
MIN_AUTO_STEPS = 150
MAX_AUTO_EPOCHS = 12
#: self-sampled replay: prompts (generic, never evaluation questions) and tokens per sample
REPLAY_PROMPTS = (
    "Question:",
    "The",
    "Question: What",
    "In the",
    "Question: Which",
    "Scientists",
    "Question: Why",
    "Many people",
    "Question: Who",
    "The history of",
    "Question: How",
    "A",
)
REPLAY_TOKENS = 64
HELDOUT_REPLAY = 16
#: documents needed before a held-out slice is taken (fewer: every document trains)
MIN_HELDOUT_DOCS = 20
#: held-out document sequences evaluated (the first ones; bounds the cost of each evaluation)
MAX_HELDOUT_SEQS = 48
LOG_CSV = "training_log.csv"
LOG_PNG = "training_log.png"


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune. Fields left at None take the recipe of the data kind (:meth:`for_kind`).

    ``lr=None`` (after the recipe) picks 5e-5 for full fine-tuning and 2e-4 for LoRA.
    """

    epochs: float | str | None = None
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 256
    packing: bool = True
    lora: bool | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    merge_lora: bool = False
    seed: int = 0
    threads: int | None = None
    save_every: int = 50
    keep_checkpoints: bool = False
    warmup_steps: int = 0
    scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    chat_template: bool = True
    kind: str = "auto"
    progress: bool = True
    renderings: bool | None = None
    replay: float | None = None
    replay_data: str | None = None
    heldout_fraction: float = 0.1
    eval_every: int | None = None
    patience: int = 3
    max_general_rise: float = 0.15

    def for_kind(self, kind: str) -> TrainConfig:
        """This config with every None field taken from the recipe of ``kind`` ("text" or "sft")."""
        recipe = dict(DOCUMENT_RECIPE if kind == "text" else PAIR_RECIPE)
        if self.lora is not None and self.lora != recipe["lora"]:
            recipe.update(lr=None, lora_r=8, lora_alpha=16)  # the other mode's plain defaults
        filled = {k: v for k, v in recipe.items() if getattr(self, k) is None}
        return replace(self, **filled)

    @property
    def learning_rate(self) -> float:
        """The learning rate actually used."""
        if self.lr is not None:
            return self.lr
        return 2e-4 if self.lora else 5e-5

    def validate(self) -> None:
        """Raise InputError naming the first bad setting."""
        epochs_ok = self.epochs in (None, "auto") or (
            isinstance(self.epochs, (int, float)) and self.epochs > 0 and math.isfinite(self.epochs)
        )
        checks = [
            (epochs_ok, f"epochs must be > 0 or 'auto', got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.max_seq_len >= 2, f"max_seq_len must be >= 2, got {self.max_seq_len}"),
            (self.lora_r is None or self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}"),
            (
                self.lora_alpha is None or self.lora_alpha > 0,
                f"lora_alpha must be > 0, got {self.lora_alpha}",
            ),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
            (self.save_every >= 0, f"save_every must be >= 0 (0 = never), got {self.save_every}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (
                self.scheduler in SCHEDULERS,
                f"unknown scheduler {self.scheduler!r}; choose one of {SCHEDULERS}",
            ),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (
                self.max_grad_norm >= 0,
                f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}",
            ),
            (
                self.kind in ("auto", "text", "sft"),
                f"unknown data kind {self.kind!r}; choose auto, text or sft",
            ),
            (not self.merge_lora or bool(self.lora), "merge_lora needs lora=True"),
            (self.replay is None or 0 <= self.replay <= 10, f"replay must be in [0, 10], got {self.replay}"),
            (
                0 <= self.heldout_fraction < 1,
                f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}",
            ),
            (
                self.eval_every is None or self.eval_every >= 1,
                f"eval_every must be >= 1, got {self.eval_every}",
            ),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.max_general_rise > 0, f"max_general_rise must be > 0, got {self.max_general_rise}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


@dataclass(frozen=True)
class TrainResult:
    """What ``expert_card.json`` records about a trained expert."""

    out: str
    format: str
    base: str
    base_path: str
    data: str
    data_sha256: str
    data_kind: str
    n_examples: int
    n_sequences: int
    skipped_examples: int
    steps: int
    epochs_done: float
    final_loss: float
    losses: list[float]
    tokens: int
    target_tokens: int
    train_seconds: float
    tokens_per_second: float
    seed: int
    lr: float
    lora: dict[str, Any] | None
    config: dict[str, Any]
    resumed_from_step: int
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    eval_log: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = 0
    early_stop: str = ""
    data_counts: dict[str, int] = field(default_factory=dict)
    prepare_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_card(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The expert card of a trained expert folder."""
    path = Path(folder) / CARD
    if not path.exists():
        raise InputError(f"{folder} has no {CARD}: not an expert made by train_expert")
    return json.loads(path.read_text())


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _base_location(base: str) -> str:
    """Where the base weights live: a local folder (so adapters load offline) or a hub id."""
    from .models import resolve, safetensors_dir

    src = resolve(base)
    return src.spec if src.kind == "hub" else str(safetensors_dir(base))


def _lr_lambda(cfg: TrainConfig, total_steps: int):
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "constant":
            return 1.0
        span = max(1, total_steps - warm)
        done = min(1.0, (step - warm) / span)
        if cfg.scheduler == "linear":
            return 1.0 - done
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


def _trainable(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _write_checkpoint(root: Path, step: int, model: Any, optimizer: Any, scheduler: Any, state: dict) -> Path:
    """Write a checkpoint atomically (temporary folder, then rename) and drop older ones."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(
        {n: p.detach().contiguous() for n, p in _trainable(model).items()}, str(tmp / "trainable.safetensors")
    )
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``out/checkpoints``, or None."""
    root = Path(out) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def _read_checkpoint(ckpt: Path, model: Any, optimizer: Any, scheduler: Any) -> dict:
    import torch
    from safetensors.torch import load_file

    params = _trainable(model)
    saved = load_file(str(ckpt / "trainable.safetensors"))
    if set(saved) != set(params):
        raise InputError(f"checkpoint {ckpt} holds other parameters than this model trains")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return json.loads((ckpt / "state.json").read_text())


def _token_loss_sum(model: Any, batch: dict[str, Any]) -> Any:
    """Summed cross-entropy over target tokens; logits are computed only where a target follows."""
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = out.logits
    if logits.shape[1] != keep.numel():  # a model without logits_to_keep support returned all positions
        logits = logits[:, :-1][:, keep]
    picked = targets[:, keep]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), picked.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def _optimizer(params: list, cfg: TrainConfig) -> Any:
    """AdamW, fused where torch supports it on CPU (several times faster for full fine-tuning)."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _prepare_out(out: Path, resume: bool) -> None:
    if (out / CARD).exists() and not resume:
        raise InputError(f"{out} already holds a trained expert ({CARD}); choose another --out")
    if latest_checkpoint(out) is not None and not resume:
        raise InputError(f"{out} holds checkpoints of an unfinished run; pass --resume or remove it")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")


def _build_model(base: str, cfg: TrainConfig) -> tuple[Any, Any]:
    from .models import load_causal_lm, resolve

    src = resolve(base)
    if (
        cfg.lora
        and not cfg.merge_lora
        and src.kind == "dir"
        and src.path
        and (src.path / "adapter_config.json").exists()
    ):
        raise InputError(
            f"base {base!r} is itself a LoRA adapter; a new adapter needs a plain base folder: use merge_lora"
        )
    model, tok = load_causal_lm(base)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets: Any = cfg.lora_targets
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        lcfg = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lcfg)
        except ValueError as exc:
            raise InputError(f"LoRA target modules {cfg.lora_targets!r} do not fit {base!r}: {exc}") from exc
    model.train()
    return model, tok


def _save_output(out: Path, model: Any, tok: Any, base: str, cfg: TrainConfig) -> str:
    """Save the expert where models.load_causal_lm finds it; returns the format name."""
    if cfg.lora and cfg.merge_lora:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(out), safe_serialization=True)
        fmt = "lora-merged"
    elif cfg.lora:
        for pc in model.peft_config.values():
            pc.base_model_name_or_path = _base_location(base)
        model.save_pretrained(str(out))
        fmt = "lora-adapter"
    else:
        model.save_pretrained(str(out), safe_serialization=True)
        fmt = "full"
    tok.save_pretrained(str(out))
    return fmt


def _versions() -> dict[str, str]:
    import torch
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        v["peft"] = peft.__version__
    except ImportError:
        pass
    return v


def _split_heldout(texts: list[str], cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): a seeded slice once there are MIN_HELDOUT_DOCS."""
    n_held = int(round(len(texts) * cfg.heldout_fraction))
    if len(texts) < MIN_HELDOUT_DOCS or n_held < 1:
        return texts, []
    order = list(range(len(texts)))
    random.Random(cfg.seed + 7919).shuffle(order)
    held = set(order[:n_held])
    return [t for i, t in enumerate(texts) if i not in held], [texts[i] for i in sorted(held)]


def _sample_replay(model: Any, tok: Any, n: int, seed: int) -> list[str]:
    """``n`` general texts sampled from the untouched model (adapters disabled), seeded."""
    import contextlib

    import torch

    disable = getattr(model, "disable_adapter", None)
    ctx = disable() if callable(disable) else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    side, tok.padding_side = tok.padding_side, "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen = torch.Generator().manual_seed(seed + 104729)
    texts: list[str] = []
    try:
        with ctx, torch.inference_mode():
            for start in range(0, n, 16):
                prompts = [REPLAY_PROMPTS[i % len(REPLAY_PROMPTS)] for i in range(start, min(n, start + 16))]
                enc = tok(prompts, return_tensors="pt", padding=True)
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                ids = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=0.8,
                    top_p=0.95,
                    max_new_tokens=REPLAY_TOKENS,
                    pad_token_id=pad,
                )
                width = enc["input_ids"].shape[1]
                for p, row in zip(prompts, ids, strict=True):
                    texts.append(p + tok.decode(row[width:], skip_special_tokens=True))
    finally:
        tok.padding_side = side
        if was_training:
            model.train()
    return texts


def _draw_replay(pool: list[str], n: int, rnd: random.Random) -> list[str]:
    """``n`` replay texts from ``pool``; the last HELDOUT_REPLAY are the held-out general set.

    A pool of at least ``n`` texts gives ``n`` distinct ones. A smaller pool is cycled for the
    training part, but the held-out texts are set aside first, so the general loss is measured on
    texts the run never trains on (it would otherwise fall for memorising the replay set).
    """
    if not pool:
        return []
    if len(pool) >= n:
        return [pool[i] for i in rnd.sample(range(len(pool)), n)]
    held_n = min(HELDOUT_REPLAY, n)
    if len(pool) <= held_n:  # too few texts to keep the two sets apart
        return [pool[i % len(pool)] for i in rnd.sample(range(n), n)]
    order = rnd.sample(range(len(pool)), len(pool))
    held, rest = order[:held_n], order[held_n:]
    return [pool[rest[i % len(rest)]] for i in range(n - held_n)] + [pool[i] for i in held]


def _replay_texts(out: Path, model: Any, tok: Any, cfg: TrainConfig, n: int) -> list[str]:
    """Replay texts: from ``replay_data`` or sampled from the untouched model; kept in ``out`` for resume."""
    cache = out / "replay_samples.jsonl"
    if cache.exists():
        texts = [str(rec["text"]) for _, rec in iter_jsonl(cache, what="replay samples")]
        if len(texts) == n:
            return texts
    if cfg.replay_data:
        _, exs = load_examples(cfg.replay_data, "text")
        texts = _draw_replay([e.text for e in exs if e.text], n, random.Random(cfg.seed + 31))
    else:
        texts = _sample_replay(model, tok, n, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def _sequences(kind: str, examples: list, tok: Any, cfg: TrainConfig) -> tuple[list[TokenSeq], int]:
    if kind == "text":
        return tokenize_documents([e.text for e in examples], tok, cfg.max_seq_len, cfg.packing), 0
    return tokenize_pairs([(e.prompt, e.response) for e in examples], tok, cfg.max_seq_len, cfg.chat_template)


@dataclass
class _Data:
    """What one run trains and evaluates on."""

    train: list[TokenSeq]
    skipped: int = 0
    heldout: list[TokenSeq] = field(default_factory=list)
    general: list[TokenSeq] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _build_data(kind: str, examples: list, out: Path, model: Any, tok: Any, cfg: TrainConfig) -> _Data:
    """Training sequences (documents, renderings, replay) and the held-out sets of the recipe."""
    if kind != "text":
        seqs, skipped = _sequences(kind, examples, tok, cfg)
        return _Data(seqs, skipped, counts={"pairs": len(seqs)})
    texts, held = _split_heldout([e.text for e in examples], cfg)
    doc_seqs = tokenize_documents(texts, tok, cfg.max_seq_len, cfg.packing)
    rend = [r for t in texts for r in question_renderings(t)] if cfg.renderings else []
    rend_seqs = tokenize_renderings(rend, tok, cfg.max_seq_len)
    train = doc_seqs + rend_seqs
    held_seqs = tokenize_documents(held, tok, cfg.max_seq_len, cfg.packing)[:MAX_HELDOUT_SEQS] if held else []
    data = _Data(train, heldout=held_seqs)
    n_replay = min(512, max(8, math.ceil(cfg.replay * len(train)))) if cfg.replay else 0
    if n_replay:
        replay = _replay_texts(out, model, tok, cfg, n_replay + HELDOUT_REPLAY)
        rep_seqs = tokenize_documents(replay[:n_replay], tok, cfg.max_seq_len, packing=False)
        data.general = tokenize_documents(replay[n_replay:], tok, cfg.max_seq_len, packing=False)
        data.train = train + rep_seqs
    data.counts = {
        "documents": len(texts),
        "heldout_documents": len(held),
        "document_sequences": len(doc_seqs),
        "renderings": len(rend_seqs),
        "replay_sequences": len(data.train) - len(train),
        "heldout_replay_sequences": len(data.general),
    }
    return data


def _mean_loss(model: Any, seqs: list[TokenSeq], pad: int, batch_size: int) -> float | None:
    """Mean per-token loss of ``seqs`` (no gradient), or None when there are none."""
    import torch

    if not seqs:
        return None
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(seqs), batch_size):
            b = collate(seqs[i : i + batch_size], pad)
            total += float(_token_loss_sum(model, b))
            n += int((b["labels"][:, 1:] != IGNORE).sum())
    if was_training:
        model.train()
    return round(total / max(n, 1), 6)


LOG_FIELDS = ("step", "epoch", "train_loss", "heldout_loss", "general_loss", "lr", "seconds")


def _write_log(out: Path, rows: list[dict[str, Any]]) -> None:
    """The loss log as CSV, and as a PNG when matplotlib is installed."""
    import csv
    import io

    from .files import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / LOG_CSV, buf.getvalue())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (
        ("train_loss", "training"),
        ("heldout_loss", "held-out documents"),
        ("general_loss", "held-out general text"),
    ):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / LOG_PNG, dpi=100)
    plt.close(fig)


def train_expert(
    base: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune ``base`` on ``data`` into the expert folder ``out``; returns its card.

    Fields of ``config`` left at None follow the recipe of the data kind (documents: LoRA,
    question renderings, replay, held-out early stopping; pairs: plain fine-tuning).
    ``resume=True`` continues from the newest checkpoint in ``out`` (or starts afresh when there is
    none; returns the existing card when the run already finished). A checkpoint from a run with
    different data or trajectory settings is refused.
    """
    import torch

    cfg = config or TrainConfig()
    cfg.validate()
    base, out = str(base), Path(out)
    _prepare_out(out, resume)
    if resume and (out / CARD).exists():
        log.info("%s is already complete; nothing to resume", out)
        return TrainResult(**load_card(out))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    kind, examples = load_examples(data, cfg.kind)
    cfg = cfg.for_kind(kind)
    cfg.validate()
    sha = data_sha256(data)
    fingerprint = {"base": base, "data_sha256": sha, **{k: getattr(cfg, k) for k in _TRAJECTORY}}
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:  # refuse a mismatched checkpoint before loading any weights
        saved_fp = json.loads((ckpt / "state.json").read_text()).get("fingerprint", {})
        diff = {k: (saved_fp.get(k), v) for k, v in fingerprint.items() if saved_fp.get(k) != v}
        if diff:
            raise InputError(f"cannot resume from {ckpt}: settings differ (checkpoint, now): {diff}")
    _seed_all(cfg.seed)
    t_prep = time.perf_counter()
    model, tok = _build_model(base, cfg)
    d = _build_data(kind, examples, out, model, tok, cfg)
    prep_seconds = time.perf_counter() - t_prep
    seqs, skipped = d.train, d.skipped
    if not seqs:
        raise InputError(f"no training sequence fits max_seq_len={cfg.max_seq_len} ({skipped} pairs skipped)")
    if skipped:
        log.warning(
            "skipped %d pairs whose prompt leaves no room for the response in %d tokens",
            skipped,
            cfg.max_seq_len,
        )
    _seed_all(cfg.seed)

    plan = BatchPlan(len(seqs), cfg.batch_size, cfg.seed)
    epochs = cfg.epochs
    if epochs == "auto":
        epochs = min(MAX_AUTO_EPOCHS, max(1.0, MIN_AUTO_STEPS * cfg.grad_accum / plan.per_epoch))
    if cfg.max_steps is not None:
        total_steps, total_micro = cfg.max_steps, cfg.max_steps * cfg.grad_accum
    else:
        total_micro = math.ceil(float(epochs) * plan.per_epoch)
        total_steps = math.ceil(total_micro / cfg.grad_accum)
    evaluating = bool(d.heldout or d.general)
    eval_every = cfg.eval_every or max(1, math.ceil(total_steps / 10))

    optimizer = _optimizer(list(_trainable(model).values()), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    state: dict[str, Any] = {
        "step": 0,
        "tokens": 0,
        "target_tokens": 0,
        "losses": [],
        "train_seconds": 0.0,
        "eval_log": [],
        "best": None,
        "stopped": "",
    }
    resumed_from = 0
    if ckpt is not None:
        state = {**state, **_read_checkpoint(ckpt, model, optimizer, scheduler)}
        resumed_from = state["step"]
        log.info("resuming from %s (step %d of %d)", ckpt, resumed_from, total_steps)

    out.mkdir(parents=True, exist_ok=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    params = list(_trainable(model).values())
    best_weights: dict[str, Any] | None = None

    def evaluate(step: int, elapsed: float) -> bool:
        """Log the held-out losses at ``step``; True when training should stop."""
        nonlocal best_weights
        recent = state["losses"][-eval_every:] if step else []
        row = {
            "step": step,
            "epoch": round(step * cfg.grad_accum / plan.per_epoch, 4),
            "train_loss": round(sum(recent) / len(recent), 6) if recent else None,
            "heldout_loss": _mean_loss(model, d.heldout, pad, cfg.batch_size),
            "general_loss": _mean_loss(model, d.general, pad, cfg.batch_size),
            "lr": round(scheduler.get_last_lr()[0], 10),
            "seconds": round(state["train_seconds"] + elapsed, 2),
        }
        state["eval_log"].append(row)
        _write_log(out, state["eval_log"])
        first = state["eval_log"][0]
        damaged = (
            row["general_loss"] is not None
            and first["general_loss"] is not None
            and row["general_loss"] > first["general_loss"] + cfg.max_general_rise
        )
        if damaged:
            state["stopped"] = (
                f"general loss rose from {first['general_loss']} to {row['general_loss']} at step {step}"
            )
            return True
        better = d.heldout and (state["best"] is None or row["heldout_loss"] < state["best"]["heldout_loss"])
        if not d.heldout or better:  # without held-out documents the newest undamaged state is best
            state["best"] = row
            best_weights = {n: p.detach().clone() for n, p in _trainable(model).items()} if step else None
            return False
        if state["best"] is not None and step - state["best"]["step"] >= cfg.patience * eval_every:
            state["stopped"] = f"held-out loss has not improved since step {state['best']['step']}"
            return True
        return False

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=state["step"],
        desc="train-expert",
        unit="step",
        file=sys.stderr,
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    run_tokens, t0 = 0, time.perf_counter()
    if evaluating and not state["eval_log"]:
        evaluate(0, 0.0)
    try:
        for step in range(state["step"], total_steps):
            micro = range(step * cfg.grad_accum, min((step + 1) * cfg.grad_accum, total_micro))
            batches = [collate([seqs[i] for i in plan.batch(m)], pad) for m in micro]
            n_targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for b in batches:
                loss = _token_loss_sum(model, b) / max(n_targets, 1)
                loss.backward()
                step_loss += float(loss.detach())
                run_tokens += int(b["attention_mask"].sum())
            if not math.isfinite(step_loss):
                raise InputError(
                    f"training diverged at step {step + 1}: loss is {step_loss} (try a lower lr)"
                )
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            state["step"] = step + 1
            state["losses"].append(round(step_loss, 6))
            state["target_tokens"] += n_targets
            elapsed = time.perf_counter() - t0
            bar.update(1)
            post = {"loss": f"{step_loss:.4f}", "tok_s": f"{run_tokens / max(elapsed, 1e-9):.0f}"}
            if evaluating and (state["step"] % eval_every == 0 or state["step"] == total_steps):
                stop = evaluate(state["step"], elapsed)
                last = state["eval_log"][-1]
                for key, short in (("heldout_loss", "heldout"), ("general_loss", "general")):
                    if last[key] is not None:
                        post[short] = f"{last[key]:.4f}"
                if stop:
                    bar.set_postfix(post)
                    log.info("early stop: %s", state["stopped"])
                    break
            bar.set_postfix(post)
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total_steps:
                snap = dict(
                    state,
                    tokens=state["tokens"] + run_tokens,
                    train_seconds=state["train_seconds"] + elapsed,
                    fingerprint=fingerprint,
                )
                _write_checkpoint(out / CHECKPOINTS, state["step"], model, optimizer, scheduler, snap)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    state["tokens"] += run_tokens
    state["train_seconds"] += elapsed
    best_step = state["step"]
    if evaluating and state["best"] is not None and state["best"]["step"] != state["step"]:
        best_step = state["best"]["step"]
        if best_weights is not None:  # keep the best evaluated weights, not the last ones
            with torch.no_grad():
                for n, p in _trainable(model).items():
                    p.copy_(best_weights[n])
        else:  # best was before any step (only after a resume can this lose track)
            log.warning("the best held-out loss was at step 0; keeping the final weights")
            best_step = state["step"]

    model.eval()
    fmt = _save_output(out, model, tok, base, cfg)
    lora = None
    if cfg.lora:
        lora = {
            "r": cfg.lora_r,
            "alpha": cfg.lora_alpha,
            "dropout": cfg.lora_dropout,
            "targets": cfg.lora_targets,
            "merged": cfg.merge_lora,
        }
    result = TrainResult(
        out=str(out.resolve()),
        format=fmt,
        base=base,
        base_path=_base_location(base),
        data=str(Path(data).resolve()),
        data_sha256=sha,
        data_kind=kind,
        n_examples=len(examples),
        n_sequences=len(seqs),
        skipped_examples=skipped,
        steps=state["step"],
        epochs_done=round(min(state["step"] * cfg.grad_accum, total_micro) / plan.per_epoch, 4),
        final_loss=state["losses"][-1] if state["losses"] else float("nan"),
        losses=state["losses"],
        tokens=state["tokens"],
        target_tokens=state["target_tokens"],
        train_seconds=round(state["train_seconds"], 3),
        tokens_per_second=round(run_tokens / elapsed, 1) if elapsed > 0 else 0.0,
        seed=cfg.seed,
        lr=cfg.learning_rate,
        lora=lora,
        config={f.name: getattr(cfg, f.name) for f in fields(cfg)},
        resumed_from_step=resumed_from,
        versions=_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        eval_log=state["eval_log"],
        best_step=best_step,
        early_stop=state["stopped"],
        data_counts=d.counts,
        prepare_seconds=round(prep_seconds, 3),
    )
    (out / CARD).write_text(json.dumps(result.to_dict(), indent=2))
    if not cfg.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return result
