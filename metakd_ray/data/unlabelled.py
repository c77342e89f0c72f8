"""Your own unlabelled text as the distilling students' transfer set (``data.unlabelled_path``).

    data:
      unlabelled_path: my-unlabelled.jsonl     # or .csv / .parquet / a directory of books.txt, dvd.txt, ...

A ``.csv``, ``.jsonl`` or ``.parquet`` file has ``data.text_column`` (and ``data.text_pair_column``
for pairs) and ``data.domain_column``; a ``.txt`` file holds one text per line, all of the domain
its name gives (``books.txt``); a directory holds such files. No labels. Any size: the files are
read, checked and tokenized ``CHUNK`` rows at a time and written to one Arrow file per domain as
they go, so memory does not grow with the file. A text that is also in a dev or test split is left
out (distilling on it would leak the evaluation text). A bad row is one ``error:`` line naming the
file and the row.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metakd_ray.config import Config, model_path
from metakd_ray.data.prepare import CHUNK, PreparedData, encode, load_tokenizer, open_split
from metakd_ray.data.split import Split, SplitWriter
from metakd_ray.errors import MetaKDError
from metakd_ray.io import atomic_dir, atomic_write_text, content_key, file_sha256, read_json

SUFFIXES = (".txt", ".csv", ".jsonl", ".parquet")


def source_files(cfg: Config) -> list[Path]:
    path = cfg.unlabelled_path
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise MetaKDError(f"data.unlabelled_path: directory {path} has no {', '.join(SUFFIXES)} files")
        return files
    if not path.is_file():
        raise MetaKDError(f"data.unlabelled_path: {path} not found (expected a {', '.join(SUFFIXES)} file "
                          "or a directory of them)")
    if path.suffix.lower() not in SUFFIXES:
        raise MetaKDError(f"data.unlabelled_path: {path} has unknown type {path.suffix!r} "
                          f"(expected {', '.join(SUFFIXES)})")
    return [path]


def read_rows(path: Path, cfg: Config) -> Iterator[tuple[str, str, str, str]]:
    """(text, text_pair, domain, where) for every row of one file, checked as it is read."""
    data = cfg.data
    suffix = path.suffix.lower()
    if suffix == ".txt":
        number = 0
        with open(path, encoding="utf-8") as fh:
            try:
                for number, line in enumerate(fh, start=1):
                    if line.strip():  # blank lines separate nothing
                        yield _checked(line, "", path.stem, f"file {path} line {number}", cfg,
                                       f"the file name {path.name}")
            except UnicodeDecodeError as exc:
                raise MetaKDError(f"file {path}: not valid UTF-8 near line {number + 1} ({exc.reason})") from None
        return
    columns = [data.text_column, data.domain_column] + ([data.text_pair_column] if data.text_pair_column else [])
    if suffix == ".csv":
        yield from _csv_rows(path, columns, cfg)
    elif suffix == ".jsonl":
        yield from _jsonl_rows(path, columns, cfg)
    else:
        yield from _parquet_rows(path, columns, cfg)


def _csv_rows(path: Path, columns: list[str], cfg: Config):
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            header = reader.fieldnames or []
            _check_columns(path, columns, header)
            for record in reader:
                yield _record(record, f"file {path} line {reader.line_num}", cfg)
        except UnicodeDecodeError as exc:
            raise MetaKDError(f"file {path}: not valid UTF-8 near line {reader.line_num + 1} ({exc.reason})") from None
        except csv.Error as exc:
            raise MetaKDError(f"file {path} line {reader.line_num}: not valid CSV ({exc})") from None


def _jsonl_rows(path: Path, columns: list[str], cfg: Config):
    with open(path, encoding="utf-8") as fh:
        number = 0
        try:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"file {path} line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MetaKDError(f"{where}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise MetaKDError(f"{where}: expected a JSON object with {', '.join(map(repr, columns))}")
                missing = [c for c in columns if c not in record]
                if missing:
                    raise MetaKDError(f"{where}: missing key(s) {missing} (set data.text_column / domain_column)")
                yield _record(record, where, cfg)
        except UnicodeDecodeError as exc:
            raise MetaKDError(f"file {path}: not valid UTF-8 near line {number + 1} ({exc.reason})") from None


def _parquet_rows(path: Path, columns: list[str], cfg: Config):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise MetaKDError(f"file {path}: cannot be read as parquet ({type(exc).__name__}: {exc})") from None
    _check_columns(path, columns, parquet.schema_arrow.names)
    number = 0
    for batch in parquet.iter_batches(batch_size=CHUNK, columns=columns):
        for record in batch.to_pylist():
            number += 1
            yield _record(record, f"file {path} row {number}", cfg)


def _check_columns(path: Path, columns: list[str], found: list[str]) -> None:
    missing = [c for c in columns if c not in found]
    if missing:
        raise MetaKDError(f"file {path}: missing column(s) {missing} (columns: {list(found)}; "
                          "set data.text_column / text_pair_column / domain_column)")


def _record(record: dict, where: str, cfg: Config):
    data = cfg.data
    pair = record.get(data.text_pair_column) if data.text_pair_column else ""
    return _checked(record.get(data.text_column), pair, record.get(data.domain_column), where, cfg,
                    f"column {data.domain_column!r}")


def _checked(text, pair, domain, where: str, cfg: Config, domain_from: str):
    if not isinstance(text, str) or not text.strip():
        raise MetaKDError(f"{where}: empty or non-text value in column {cfg.data.text_column!r}")
    if pair is None or not isinstance(pair, str):
        raise MetaKDError(f"{where}: non-text value in column {cfg.data.text_pair_column!r}")
    if domain not in cfg.data.domains:
        raise MetaKDError(f"{where}: domain {domain!r} ({domain_from}) is not one of data.domains "
                          f"{cfg.data.domains}; leave such rows out or add the domain")
    return text.strip(), pair.strip(), domain, where


def user_transfer_set(cfg: Config, data: PreparedData, quiet: bool = True) -> tuple[str, dict[str, Split]]:
    """Every text of ``data.unlabelled_path`` per domain, tokenized like the splits and cached
    under the token cache (one Arrow file per domain), labels -1; with the cache's key."""
    files = source_files(cfg)
    d = cfg.data
    key = content_key(data.key, [[f.name, file_sha256(f)] for f in files], d.text_column, d.text_pair_column,
                      d.domain_column)
    directory = data.directory / f"transfer-{key}"
    meta = read_json(directory / "meta.json")
    if meta:
        splits = {dom: open_split(directory / f"{dom}.arrow", n) for dom, n in meta["rows"].items()}
        if all(s is not None for s in splits.values()):
            return key, splits
    held_out = pa.concat_arrays([data.splits[s].table.column("uid").combine_chunks() for s in ("dev", "test")])
    tokenizer = load_tokenizer(model_path(cfg.model.teacher))
    dropped = 0
    with atomic_dir(directory) as tmp:
        writers = {dom: SplitWriter(tmp / f"{dom}.arrow") for dom in data.domains}
        try:
            for chunk in _chunks(r for f in files for r in read_rows(f, cfg)):
                batch = encode([{"text": t, "text_pair": p, "label": -1, "domain": dom} for t, p, dom, _ in chunk],
                               tokenizer, cfg)
                keep = pc.invert(pc.is_in(batch.column("uid"), value_set=held_out))
                dropped += len(chunk) - (pc.sum(keep).as_py() or 0)
                batch = batch.filter(keep)
                ids = batch.column("domain_id").to_numpy()
                for d_id in np.unique(ids):
                    writers[data.domains[d_id]].write(batch.filter(pa.array(ids == d_id)))
        finally:
            for w in writers.values():
                w.close()
        rows = {dom: w.rows for dom, w in writers.items()}
        atomic_write_text(tmp / "meta.json", json.dumps({"key": key, "files": [str(f) for f in files],
                                                        "rows": rows, "dropped_in_dev_or_test": dropped}))
    if not quiet:
        print(f"[prepare] transfer set from {cfg.unlabelled_path}: "
              + ", ".join(f"{dom} {n}" for dom, n in rows.items())
              + (f" texts ({dropped} left out: also in a dev or test split)" if dropped else " texts"), flush=True)
    return key, {dom: open_split(directory / f"{dom}.arrow") for dom in data.domains}


def _chunks(rows: Iterator, size: int = CHUNK) -> Iterator[list]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
