"""Your own data as one CSV, JSONL or Parquet file with text, label and domain columns.

The column names are ``data.text_column`` (and ``data.text_pair_column`` for sentence pairs),
``data.label_column`` and ``data.domain_column``; the label set is ``data.labels`` (required).
"""

from __future__ import annotations

from pathlib import Path

from metakd_ray.data.formats import DataFormat, labelled_row, select_domains
from metakd_ray.errors import MetaKDError


def _read_frame(path: Path, fmt: str):
    import pandas as pd
    import pyarrow.parquet as pq

    if fmt == "csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if fmt == "jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    return pq.read_table(path).to_pandas()


def load(path: Path, data, labels: list[str]) -> tuple[list[dict], list[Path]]:
    if not path.is_file():
        raise MetaKDError(f"data: file {path} not found (data.format={data.format} expects one file)")
    try:
        frame = _read_frame(path, data.format)
    except UnicodeDecodeError as exc:
        raise MetaKDError(f"file {path}: not valid UTF-8 at byte {exc.start}") from None
    except Exception as exc:
        raise MetaKDError(f"file {path}: cannot be read as {data.format} ({type(exc).__name__}: {exc})") from None
    pair_column = [data.text_pair_column] if data.text_pair_column else []
    missing = [c for c in [data.text_column, data.label_column, data.domain_column] + pair_column
               if c not in frame.columns]
    if missing:
        raise MetaKDError(f"file {path}: missing column(s) {missing} (columns: {list(frame.columns)}; "
                          "set data.text_column / label_column / domain_column)")
    rows = []
    for number, rec in enumerate(frame.to_dict("records"), start=1):
        text = rec[data.text_column]
        if not isinstance(text, str) or not text.strip():
            raise MetaKDError(f"file {path} row {number}: empty or non-text value in column {data.text_column!r}")
        pair = str(rec[data.text_pair_column]) if data.text_pair_column else ""
        rows.append(labelled_row(text, pair, str(rec[data.label_column]), str(rec[data.domain_column]),
                                 labels, f"file {path} row {number}"))
    return select_domains(rows, data.domains, path), [path]


FORMATS = tuple(DataFormat(name, load) for name in ("csv", "jsonl", "parquet"))
