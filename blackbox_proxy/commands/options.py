"""The flags every command shares, and the factories that turn them into a provider, pairs and an engine.

One meaning per flag in every command:

* ``--alpha A[,A2...]``: one steering weight per expert pair (a single value applies to all pairs);
* ``--sweep S1,S2,...``: the alphas reported side by side from one scoring (each scales the
  per-pair weights; with one pair at ``--alpha 1`` they are the alphas themselves);
* ``--top-logprobs K``, ``--limit N``, ``--threads N``, ``--out FILE`` likewise everywhere.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from ..combine import POLICIES, STRATEGIES
from ..debias import METHODS as DEBIAS_METHODS
from ..errors import InputError
from ..models import BACKENDS
from ..option_scoring import CALIBRATIONS, DEFAULT_CALIBRATION, SCORING_MODES

#: the in-process base when no server is named (an offline stand-in for a hosted API)
DEFAULT_EMBEDDED_BASE = "smollm2-135m-instruct"


def default_threads() -> int:
    """CPU threads per local model: every core, up to 8 (more rarely helps small models)."""
    return max(1, min(8, os.cpu_count() or 1))


# --------------------------------------------------------------------------- value parsers


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    return parse


#: argparse type: an integer >= 1
positive_int = _int_at_least(1)
#: argparse type: an integer >= 0
non_negative_int = _int_at_least(0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return v


def parse_numbers(text: str, flag: str) -> tuple[float, ...]:
    """``"1"`` or ``"0,0.5,1"`` -> finite numbers; a clear error names the flag and the bad part."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            a = float(part)
        except ValueError:
            raise InputError(f"{flag}: {part!r} is not a number") from None
        if not math.isfinite(a):
            raise InputError(f"{flag} must be finite, got {part!r}")
        out.append(a)
    if not out:
        raise InputError(f"{flag} given without any value")
    return tuple(out)


# --------------------------------------------------------------------------- flag groups


def add_provider_args(p: argparse.ArgumentParser | Any) -> None:
    """The base provider: which one, where, how many alternatives, and its transport."""
    g = p.add_argument_group("base model (black-box provider)")
    g.add_argument(
        "--provider",
        metavar="NAME",
        help="registered provider (built in: openai, openai-chat, openai-completions, llama-cpp, "
        "llama-cpp-server (llama-cpp-python's server: its own tokenisation is checked, so black-box "
        "generation is exact over text), vllm, vllm-chat, vllm-completions; plugins add more); "
        "default: openai when a base URL is known, else llama-cpp (in-process)",
    )
    g.add_argument(
        "--base-url",
        help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1 (default $OPENAI_BASE_URL)",
    )
    g.add_argument(
        "--model",
        help=f"base model name at --base-url, or a model spec in-process (default {DEFAULT_EMBEDDED_BASE})",
    )
    g.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default OPENAI_API_KEY); never give the key itself",
    )
    g.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        default="chat",
        help="prompt form (default %(default)s)",
    )
    g.add_argument(
        "--prompt-template",
        metavar="NAME|FILE",
        help="the multiple-choice prompt of base and pairs: a built-in name or a template file with named "
        "placeholders ({question}, {options}, {letters}...; see README); default: the measured default",
    )
    g.add_argument(
        "--top-logprobs",
        type=positive_int,
        default=5,
        metavar="K",
        help="top log-probs per request (default 5)",
    )
    g.add_argument(
        "--max-k",
        type=non_negative_int,
        metavar="N",
        help="largest K the server accepts (default: OpenAI's 20 chat / 5 completions at api.openai.com, "
        "no limit elsewhere; 0 = no limit)",
    )
    g.add_argument("--concurrency", type=positive_int, default=4, help="base requests in flight (default 4)")
    g.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        help="seconds per attempt of a base request; a late answer is still awaited, not bought again "
        "(default 30)",
    )
    g.add_argument("--retries", type=non_negative_int, default=5, help="retries per base request (default 5)")
    g.add_argument("--cache", metavar="FILE", help="SQLite cache of base responses (keyed without secrets)")


def add_pair_args(p: argparse.ArgumentParser | Any, *, required: bool = False) -> None:
    """Expert pairs and their weights (``--alpha`` one per pair), how they score and where they run."""
    g = p.add_argument_group("expert pairs")
    g.add_argument(
        "--expert",
        action="append",
        metavar="SPEC",
        required=required,
        help="tuned expert model spec (packaged name, folder, GGUF, llama-cpp:SPEC); repeat for several pairs",
    )
    g.add_argument(
        "--anti-expert",
        action="append",
        metavar="SPEC",
        required=required,
        help="untuned anti-expert, one per --expert",
    )
    g.add_argument(
        "--alpha",
        metavar="A[,A...]",
        help="steering weight, one per pair (comma-separated; one value applies to all pairs; default 1)",
    )
    g.add_argument(
        "--expert-backend",
        choices=BACKENDS,
        default="auto",
        help="local backend of the pairs: transformers, llama-cpp, or auto (GGUF files on llama.cpp)",
    )
    g.add_argument(
        "--expert-scoring",
        choices=SCORING_MODES,
        default="letters",
        help="what the pairs score: the option letters (default), or each option's text as the answer "
        "to a cloze question (for experts that learned facts as text; needs one tokenizer per pair)",
    )
    g.add_argument(
        "--option-calibration",
        choices=CALIBRATIONS,
        default=DEFAULT_CALIBRATION,
        help=f"how option-text scores are calibrated (default {DEFAULT_CALIBRATION}; see README)",
    )
    g.add_argument(
        "--no-chat-template", action="store_true", help="experts read plain text, not their chat template"
    )
    g.add_argument(
        "--batch-size", type=positive_int, default=8, help="questions per expert forward pass (default 8)"
    )
    g.add_argument(
        "--score-cache",
        metavar="FILE",
        help="SQLite cache of expert-pair scores, keyed by the models' weight digests and the rendered "
        "prompt, so re-runs, sweeps and new debias methods never rescore (default: "
        "$BLACKBOX_PROXY_CACHE/expert-scores.sqlite; --no-score-cache turns it off)",
    )
    g.add_argument("--no-score-cache", action="store_true", help="score every question afresh")
    g.add_argument(
        "--chunk-size",
        type=positive_int,
        help="questions per expert-scoring chunk; finished rows are saved per chunk (default: --batch-size)",
    )


def add_combination_args(p: argparse.ArgumentParser | Any) -> None:
    """--missing and --strategy: how base and expert scores are combined."""
    p.add_argument(
        "--missing",
        choices=POLICIES,
        default="floor",
        help="options absent from the top-k: floor (fill with the top-k bound), exclude, error",
    )
    p.add_argument("--strategy", choices=STRATEGIES, default="proxy", help="fusion strategy (default proxy)")
    p.add_argument(
        "--debias",
        choices=DEBIAS_METHODS,
        default="none",
        help="correct the base's letter bias: pride (prior from cyclic permutations of a fraction of the "
        "questions), calibrate (content-free prompts), permute (every question under every cyclic "
        "permutation); the extra calls are counted (default none)",
    )
    p.add_argument(
        "--debias-fraction",
        type=positive_float,
        default=0.1,
        metavar="F",
        help="share of questions PriDe estimates its prior on (default 0.1)",
    )


def add_sweep_arg(p: argparse.ArgumentParser | Any, default: str | None = None) -> None:
    """``--sweep``: alphas reported side by side (each scales every pair's ``--alpha``)."""
    p.add_argument(
        "--sweep",
        metavar="S[,S...]",
        default=default,
        help="alphas reported side by side from one scoring, each scaling the per-pair --alpha "
        f"(default {default or 1})",
    )


def add_run_args(p: argparse.ArgumentParser | Any) -> None:
    """Threads, the run directory and the progress bar."""
    p.add_argument(
        "--threads",
        type=positive_int,
        default=default_threads(),
        help=f"CPU threads for each local model (default {default_threads()}: the cores, up to 8)",
    )
    p.add_argument("--run-dir", help="where raw scores are stored for resume (default OUT.run)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------- factories


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` to torch (llama.cpp models take it at load time)."""
    import torch

    torch.set_num_threads(int(getattr(args, "threads", None) or default_threads()))


def provider_options(args: argparse.Namespace) -> Any:
    """:class:`~blackbox_proxy.adapters.base.ProviderOptions` from the provider flags."""
    from ..adapters.base import ProviderOptions

    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or None
    name = args.provider or ("openai" if base_url else "llama-cpp")
    model = args.model
    if not model:
        if name == "llama-cpp":
            model = DEFAULT_EMBEDDED_BASE
        else:
            raise InputError("--model is required with --base-url (the model name the server knows)")
    return name, ProviderOptions(
        model=model,
        base_url=base_url,
        endpoint=args.endpoint,
        api_key_env=args.api_key_env or None,
        timeout=args.timeout,
        max_retries=args.retries,
        max_concurrency=args.concurrency,
        cache=args.cache,
        max_k="default" if args.max_k is None else args.max_k,
        threads=getattr(args, "threads", None),
    )


def build_provider(args: argparse.Namespace) -> Any:
    """The base provider the flags name (``--provider``, else by whether a base URL is known)."""
    from ..adapters.base import create_provider

    name, opts = provider_options(args)
    return create_provider(name, opts)


def pair_alphas(args: argparse.Namespace, n_pairs: int) -> tuple[float, ...]:
    """``--alpha``: one weight per pair (one value applies to every pair)."""
    if args.alpha is None:
        return (1.0,) * n_pairs
    if n_pairs == 0:
        raise InputError("--alpha needs --expert and --anti-expert")
    alphas = parse_numbers(args.alpha, "--alpha")
    if len(alphas) == 1:
        return alphas * n_pairs
    if len(alphas) != n_pairs:
        hint = f"; to report several alphas side by side use --sweep {args.alpha}" if n_pairs == 1 else ""
        raise InputError(f"{n_pairs} expert pairs but {len(alphas)} values in --alpha {args.alpha}{hint}")
    return alphas


def sweep_values(args: argparse.Namespace, default: tuple[float, ...] = (1.0,)) -> tuple[float, ...]:
    """``--sweep`` values (deduplicated, in order)."""
    if getattr(args, "sweep", None) is None:
        return default
    return tuple(dict.fromkeys(parse_numbers(args.sweep, "--sweep")))


def build_pairs(args: argparse.Namespace) -> list[Any]:
    """The expert pairs the flags name (loaded lazily, on first scoring); [] for none.

    A pair whose two specs are ``vllm:NAME@URL`` is served by vLLM
    (:class:`~blackbox_proxy.adapters.vllm.ServerExpertPair`): nothing is loaded in-process.
    """
    from ..adapters.vllm import SERVED_PREFIX, ServerExpertPair
    from ..experts import ExpertPair
    from ..models import resolve, split_backend

    experts, antis = args.expert or [], args.anti_expert or []
    if len(experts) != len(antis):
        raise InputError(
            f"{len(experts)} --expert but {len(antis)} --anti-expert: give one anti-expert per expert"
        )
    pair_alphas(args, len(experts))  # a bad --alpha fails before any model spec is looked at

    def served(spec: str) -> bool:
        return str(spec).startswith(SERVED_PREFIX)

    for e, a in zip(experts, antis, strict=True):
        if served(e) != served(a):
            raise InputError(
                f"--expert {e!r} and --anti-expert {a!r}: a pair is served by vLLM on both sides "
                f"({SERVED_PREFIX}NAME@URL) or loaded locally on both sides, not one of each"
            )
    local = [s for s in [*experts, *antis] if not served(s)]
    for spec in set(local):
        resolve(split_backend(spec, args.expert_backend)[1])  # unknown specs fail now, before any request
    load: dict[str, Any] = {}
    backend_of = {s: split_backend(s, args.expert_backend)[0] for s in local}
    if any(b == "llama-cpp" for b in backend_of.values()):
        load = {"n_threads": getattr(args, "threads", None) or default_threads()}
    pairs: list[Any] = []
    for e, a in zip(experts, antis, strict=True):
        common = {"chat_template": not args.no_chat_template, "batch_size": args.batch_size}
        if served(e):
            pairs.append(ServerExpertPair(e, a, **common))
            continue
        opts = load if backend_of[e] == "llama-cpp" or backend_of[a] == "llama-cpp" else {}
        pairs.append(ExpertPair(e, a, backend=args.expert_backend, load_options=opts, **common))
    return pairs


def build_engine(args: argparse.Namespace, provider: Any = None, pairs: list[Any] | None = None) -> Any:
    """The multiple-choice engine (:class:`~blackbox_proxy.rerank.Reranker`) the flags describe."""
    from ..rerank import Reranker

    pairs = build_pairs(args) if pairs is None else pairs
    provider = build_provider(args) if provider is None else provider
    return Reranker(
        provider,
        pairs,
        pair_alphas(args, len(pairs)),
        policy=args.missing,
        strategy=args.strategy,
        k=args.top_logprobs,
        endpoint=args.endpoint,
        base_concurrency=getattr(args, "concurrency", None),
        chunk_size=getattr(args, "chunk_size", None),
        expert_scoring=getattr(args, "expert_scoring", "letters"),
        option_calibration=getattr(args, "option_calibration", DEFAULT_CALIBRATION),
        score_cache=score_cache_path(args) if pairs else None,
        template=getattr(args, "prompt_template", None),
    )


def score_cache_path(args: argparse.Namespace) -> str | None:
    """``--score-cache``, else the default file in the product's cache folder (None with --no-score-cache)."""
    from ..models import cache_root

    if getattr(args, "no_score_cache", False):
        return None
    path = getattr(args, "score_cache", None)
    if path:
        return str(path)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return str(root / "expert-scores.sqlite")
