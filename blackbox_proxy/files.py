"""Reading and writing the product's files: one JSONL reader, a durable JSONL store, atomic writers.

Every JSONL file the product reads (questions, datasets, training data, run stores) goes through
:func:`iter_jsonl`, so a bad line is always reported as ``path:line: reason``. Every file the
product writes goes through :func:`atomic_write_bytes` (temporary file in the same folder, fsync,
rename), so a crash never leaves a half-written result where a finished one was expected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import InputError

log = logging.getLogger(__name__)


class FileFormatError(InputError):
    """A file's content is malformed; the message names the file and, where it applies, the line."""


def read_text(path: str | os.PathLike[str], what: str = "file") -> str:
    """The UTF-8 text of ``path``, or one clear InputError (missing, a folder, unreadable, not UTF-8)."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {p} is a directory, not a file")
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} {p} does not exist") from None
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{what} {p} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {p}: {exc.strerror or exc}") from None


def iter_jsonl(
    path: str | os.PathLike[str], *, what: str = "JSONL file", lenient: bool = False
) -> Iterator[tuple[int, dict[str, Any] | FileFormatError]]:
    """(line number, record) for each non-blank line of a JSONL file of JSON objects.

    A malformed line raises :class:`FileFormatError` naming ``path:line``; with ``lenient`` the
    error is yielded in the record's place instead, so a caller can skip it and go on.
    """
    p = Path(path)
    text = read_text(p, what)
    for n, raw in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not raw.strip():
            continue
        err: FileFormatError | None = None
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            err = FileFormatError(f"{p}:{n}: not valid JSON ({exc.msg} at column {exc.colno})")
        else:
            if not isinstance(rec, dict):
                err = FileFormatError(f"{p}:{n}: expected a JSON object, got {type(rec).__name__}")
        if err is not None:
            if not lenient:
                raise err
            yield n, err
            continue
        yield n, rec


def check_output_path(
    path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]] = (), what: str = "--out"
) -> Path:
    """Check an output path before any work: refuse a folder, an input file, or a place that cannot be
    written; create missing parent folders."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {p} is a directory; give a file name")
    for i in inputs:
        with contextlib.suppress(OSError):
            if Path(i).exists() and p.exists() and p.samefile(i):
                raise InputError(f"{what} {p} is also an input file; refusing to overwrite it")
        if Path(os.path.abspath(i)) == Path(os.path.abspath(p)):
            raise InputError(f"{what} {p} is also an input file; refusing to overwrite it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise InputError(f"{what} {p}: cannot create folder {parent} ({exc.strerror or exc})") from None
    if not parent.is_dir():
        raise InputError(f"{what} {p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{what} {p}: folder {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{what} {p} exists and is not writable")
    return p


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise InputError(f"cannot write {p}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"cannot write {p}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return p


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """:func:`atomic_write_text` of ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_table(df: Any, path: str | os.PathLike[str]) -> Path:
    """Write a pandas DataFrame atomically as CSV or Parquet, chosen by the file extension."""
    import io

    p = Path(path)
    ext = p.suffix.lower()
    if ext == ".csv":
        return atomic_write_text(p, df.to_csv(index=False))
    if ext in (".parquet", ".pq"):
        buf = io.BytesIO()
        try:
            df.to_parquet(buf, index=False)
        except ImportError as exc:
            raise InputError(f"writing Parquet needs pyarrow ({exc}); use a .csv file instead") from None
        return atomic_write_bytes(p, buf.getvalue())
    raise InputError(f"{p}: unknown table extension {ext!r}; use .csv or .parquet")


class JsonlStore:
    """Append-only JSONL keyed by ``id``: each append is flushed and fsynced; damage is found, not hidden.

    :meth:`load` keeps every good record: a torn last line (a killed write) is cut off the file; a
    corrupt line elsewhere is reported (file and line number) and skipped, so only its record is redone.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        #: ``path:line: reason`` of each corrupt line found by the last :meth:`load`
        self.problems: list[str] = []

    def load(self) -> dict[str, dict[str, Any]]:
        """Every good record by id (a later line for the same id wins)."""
        out: dict[str, dict[str, Any]] = {}
        self.problems = []
        if not self.path.exists():
            return out
        data = self.path.read_bytes()
        lines = data.splitlines(keepends=True)
        if lines and not lines[-1].endswith(b"\n"):  # a torn last write
            torn = lines.pop()
            log.warning("%s: dropping %d bytes of an unfinished record", self.path, len(torn))
            with self.path.open("r+b") as fh:
                fh.truncate(len(data) - len(torn))
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "id" not in rec:
                    raise ValueError("not a record with an id")
            except (ValueError, UnicodeDecodeError) as exc:
                msg = f"{self.path}:{n}: corrupt record skipped ({exc}); it will be redone"
                self.problems.append(msg)
                log.warning(msg)
                continue
            out[str(rec["id"])] = rec
        return out

    def append(self, rec: Mapping[str, Any]) -> None:
        """Write one record as a line and make it durable before returning."""
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
