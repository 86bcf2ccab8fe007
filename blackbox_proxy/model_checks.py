"""Cheap checks of model files before a loader touches them: one clear line instead of a traceback.

* :func:`check_model_folder`: a transformers folder (or a LoRA adapter folder) has a readable
  ``config.json``, complete weights (every safetensors file as long as its header says) and a tokenizer;
* :func:`check_gguf_file`: a ``.gguf`` file starts with the GGUF magic and holds every tensor its
  header lists (not truncated).

They read headers only (kilobytes), never the weights themselves.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from .errors import ModelSpecError

#: files of which one makes a tokenizer transformers can load
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
#: a safetensors header larger than this is not a header (the format caps it at 100 MB)
_MAX_HEADER = 100_000_000


def _json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelSpecError(f"{what} {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ModelSpecError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ModelSpecError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def check_safetensors(path: str | os.PathLike[str]) -> int:
    """Check one safetensors file's header against its size; returns the number of tensors.

    A file cut short (an interrupted copy or save) fails here with the missing byte count.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelSpecError(f"weights file {p} is truncated ({size} bytes, not even a header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ModelSpecError(
                    f"weights file {p} is truncated or not safetensors (header of {n} bytes in a {size}-byte file)"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise ModelSpecError(f"cannot read weights file {p}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelSpecError(f"weights file {p} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ModelSpecError(f"weights file {p} has a corrupt safetensors header")
    end = 0
    tensors = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelSpecError(f"weights file {p}: tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
        tensors += 1
    expected = 8 + n + end
    if size < expected:
        raise ModelSpecError(
            f"weights file {p} is truncated: {size} bytes, its header needs {expected} "
            f"({expected - size} missing); copy or save the model again"
        )
    return tensors


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """The weight files of ``stem`` (model or adapter_model): single, or the shards of an index."""
    for ext, index in ((".safetensors", ".safetensors.index.json"), (".bin", ".bin.index.json")):
        single = folder / f"{stem}{ext}"
        if single.exists():
            return [single]
        idx = folder / f"{stem}{index}"
        if idx.exists():
            data = _json_file(idx, "weights index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelSpecError(f"weights index {idx} has no weight_map")
            shards = sorted({str(v) for v in weight_map.values()})
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise ModelSpecError(
                    f"model folder {folder}: {len(missing)} of {len(shards)} weight shards listed in "
                    f"{idx.name} are missing (first: {missing[0]})"
                )
            return [folder / s for s in shards]
    return []


def check_model_folder(path: str | os.PathLike[str]) -> Path:
    """Check a transformers model folder or LoRA adapter folder; returns its path, or one ModelSpecError.

    Checks: the folder exists; ``config.json`` (or ``adapter_config.json``) is a JSON object; the
    weights are there and every safetensors file is complete; a tokenizer file is there.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelSpecError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelSpecError(f"{folder} is not a folder")
    adapter = (folder / "adapter_config.json").exists()
    config = folder / ("adapter_config.json" if adapter else "config.json")
    if not config.exists():
        raise ModelSpecError(f"model folder {folder} has no config.json: not a transformers model folder")
    if not isinstance(_json_file(config, "model config"), dict):
        raise ModelSpecError(f"model config {config} is not a JSON object")
    weights = _weight_files(folder, "adapter_model" if adapter else "model")
    if not weights:
        want = "adapter_model.safetensors" if adapter else "model.safetensors (or shards with an index)"
        raise ModelSpecError(f"model folder {folder} has no weights: expected {want}")
    for w in weights:
        if w.suffix == ".safetensors":
            check_safetensors(w)
        elif w.stat().st_size == 0:
            raise ModelSpecError(f"weights file {w} is empty")
    present = [f for f in TOKENIZER_FILES if (folder / f).exists()]
    if not present:
        raise ModelSpecError(
            f"model folder {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
            "save the tokenizer with the model (tokenizer.save_pretrained) or copy it from the base model"
        )
    if "tokenizer.json" in present:
        _json_file(folder / "tokenizer.json", "tokenizer file")
    if (folder / "tokenizer_config.json").exists():
        _json_file(folder / "tokenizer_config.json", "tokenizer config")
    return folder


_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Reader:
    """Little-endian reads from a file that fail with EOFError when it ends early."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> bytes:
        n = self.unpack("Q")
        if n > _MAX_HEADER:
            raise ValueError(f"a string of {n} bytes in the header")
        return self.take(n)

    def value(self, vtype: int) -> Any:
        if vtype in _GGUF_SCALAR:
            return self.unpack(_GGUF_SCALAR[vtype])
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            itype, count = self.unpack("I"), self.unpack("Q")
            if itype in _GGUF_SCALAR:  # skip numbers in one read
                self.take(struct.calcsize("<" + _GGUF_SCALAR[itype]) * count)
            else:
                for _ in range(count):
                    self.value(itype)
            return None
        raise ValueError(f"unknown metadata value type {vtype}")


def _gguf_required_size(fh: Any) -> tuple[int, int]:
    """(bytes the header says the file holds, number of tensors) of an open GGUF file after its magic."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    r = _Reader(fh)
    version = r.unpack("I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    alignment = 32
    for _ in range(n_kv):
        key = r.string()
        value = r.value(r.unpack("I"))
        if key == b"general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    end = 0
    for _ in range(n_tensors):
        r.string()
        dims = [r.unpack("Q") for _ in range(r.unpack("I"))]
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(r.unpack("I"))]
        offset = r.unpack("Q")
        count = 1
        for d in dims:
            count *= d
        end = max(end, offset + count // block * type_size)
    data_start = -(-fh.tell() // alignment) * alignment
    return data_start + end, n_tensors


def check_gguf_file(path: str | os.PathLike[str]) -> Path:
    """Check a GGUF file: the magic, a readable header, and every listed tensor inside the file (not truncated)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelSpecError(f"model file {p} does not exist")
    if not p.is_file():
        raise ModelSpecError(f"{p} is not a file")
    try:
        size = p.stat().st_size
        with p.open("rb", buffering=1 << 16) as fh:
            magic = fh.read(4)
            if magic != b"GGUF":
                raise ModelSpecError(f"{p} is not a GGUF model file (it starts with {magic!r}, not b'GGUF')")
            try:
                needed, n_tensors = _gguf_required_size(fh)
            except EOFError:
                raise ModelSpecError(
                    f"model file {p} is truncated inside its header ({size} bytes)"
                ) from None
            except (ValueError, KeyError, struct.error) as exc:
                raise ModelSpecError(f"model file {p} has a damaged GGUF header ({exc})") from None
    except OSError as exc:
        raise ModelSpecError(f"cannot read model file {p}: {exc.strerror or exc}") from None
    if n_tensors == 0:
        raise ModelSpecError(f"model file {p} holds no tensors")
    if size < needed:
        raise ModelSpecError(
            f"model file {p} is truncated: {size} bytes, its header needs {needed} ({needed - size} missing)"
        )
    return p
