"""Atomic file and directory writes, content keys, and the fixed-width text tables we print.

A failed or interrupted run must never leave a half-written result where a finished one was:
everything is written beside its destination under a temporary name and renamed into place.
Every cached output is named by a ``content_key`` of the inputs it was made from, so a changed
input gets a new cache entry instead of a stale one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yields a temporary path beside ``path``; what was written there replaces ``path`` only when
    the block ends without an error (readers never see a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path):
    """The JSON at ``path``, or None when it is missing or damaged (so the result is made again)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"[cache] {path} is damaged (not valid JSON); rebuilding it", flush=True)
        return None


def safetensors_whole(path: Path) -> bool:
    """The file exists and its safetensors header matches its size (a truncated copy fails), read
    without loading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as fh:
            fh.keys()
        return True
    except Exception:  # missing, truncated or not safetensors at all
        return False


def read_parquet(path: Path):
    """The pyarrow table at ``path``, or None when it is missing or damaged (so it is rebuilt)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        return None
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        print(f"[cache] {path} is damaged ({str(exc).splitlines()[0][:120]}); rebuilding it", flush=True)
        return None


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def content_key(*parts) -> str:
    """16 hex digits of the sha256 of ``parts`` as canonical JSON: the name of a cached output."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def text_table(header: list[str], rows: list[list], widths: list[int], left: int = 1) -> str:
    """A fixed-width table: the first ``left`` columns left-aligned, the others right-aligned, and
    the header underlined."""

    def line(cells) -> str:
        return "".join(f"{c!s:<{w}}" if i < left else f"{c!s:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))

    head = line(header)
    return "\n".join([head, "-" * len(head)] + [line(r) for r in rows])
