"""Making an expert on CPU: fine-tune a small causal LM on documents or prompt/response pairs.

The output folder is a model spec that :func:`blackbox_proxy.models.load_causal_lm` loads: a full
transformers model (``save_pretrained`` + tokenizer), a LoRA adapter whose base is a local folder
(loads offline), or merged LoRA weights; plus ``expert_card.json`` describing how it was made.

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
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import InputError
from .training_data import (
    IGNORE,
    BatchPlan,
    TokenSeq,
    collate,
    data_sha256,
    load_examples,
    tokenize_documents,
    tokenize_pairs,
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
)


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune. ``lr=None`` picks 5e-5 for full fine-tuning and 2e-4 for LoRA."""

    epochs: float = 1.0
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 256
    packing: bool = True
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
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

    @property
    def learning_rate(self) -> float:
        """The learning rate actually used."""
        if self.lr is not None:
            return self.lr
        return 2e-4 if self.lora else 5e-5

    def validate(self) -> None:
        """Raise InputError naming the first bad setting."""
        checks = [
            (self.epochs > 0 and math.isfinite(self.epochs), f"epochs must be > 0, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.max_seq_len >= 2, f"max_seq_len must be >= 2, got {self.max_seq_len}"),
            (self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}"),
            (self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}"),
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
            (not self.merge_lora or self.lora, "merge_lora needs lora=True"),
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


def _sequences(kind: str, examples: list, tok: Any, cfg: TrainConfig) -> tuple[list[TokenSeq], int]:
    if kind == "text":
        return tokenize_documents([e.text for e in examples], tok, cfg.max_seq_len, cfg.packing), 0
    return tokenize_pairs([(e.prompt, e.response) for e in examples], tok, cfg.max_seq_len, cfg.chat_template)


def train_expert(
    base: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune ``base`` on ``data`` into the expert folder ``out``; returns its card.

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
    sha = data_sha256(data)
    fingerprint = {"base": base, "data_sha256": sha, **{k: getattr(cfg, k) for k in _TRAJECTORY}}
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:  # refuse a mismatched checkpoint before loading any weights
        saved_fp = json.loads((ckpt / "state.json").read_text()).get("fingerprint", {})
        diff = {k: (saved_fp.get(k), v) for k, v in fingerprint.items() if saved_fp.get(k) != v}
        if diff:
            raise InputError(f"cannot resume from {ckpt}: settings differ (checkpoint, now): {diff}")
    _seed_all(cfg.seed)
    model, tok = _build_model(base, cfg)
    seqs, skipped = _sequences(kind, examples, tok, cfg)
    if not seqs:
        raise InputError(f"no training sequence fits max_seq_len={cfg.max_seq_len} ({skipped} pairs skipped)")
    if skipped:
        log.warning(
            "skipped %d pairs whose prompt leaves no room for the response in %d tokens",
            skipped,
            cfg.max_seq_len,
        )

    plan = BatchPlan(len(seqs), cfg.batch_size, cfg.seed)
    if cfg.max_steps is not None:
        total_steps, total_micro = cfg.max_steps, cfg.max_steps * cfg.grad_accum
    else:
        total_micro = math.ceil(cfg.epochs * plan.per_epoch)
        total_steps = math.ceil(total_micro / cfg.grad_accum)

    optimizer = _optimizer(list(_trainable(model).values()), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    state: dict[str, Any] = {"step": 0, "tokens": 0, "target_tokens": 0, "losses": [], "train_seconds": 0.0}
    resumed_from = 0
    if ckpt is not None:
        state = _read_checkpoint(ckpt, model, optimizer, scheduler)
        resumed_from = state["step"]
        log.info("resuming from %s (step %d of %d)", ckpt, resumed_from, total_steps)

    out.mkdir(parents=True, exist_ok=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    params = list(_trainable(model).values())
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
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{run_tokens / max(elapsed, 1e-9):.0f}")
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
    )
    (out / CARD).write_text(json.dumps(result.to_dict(), indent=2))
    if not cfg.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return result
