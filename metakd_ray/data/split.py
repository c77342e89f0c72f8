"""Tokenized rows as an Arrow table: ragged int32 token ids, memory-mapped from the token cache.

A ``Split`` is a view of a table with the columns

    uid, domain (string)  domain_id, label (int64)  input_ids (list<int32>)  token_type_ids (list<int8>)

(the cache files also keep ``text``/``text_pair``, which ``export`` and ``predict`` read). Rows are never padded
in storage: ``batch`` pads the rows it is asked for to the longest of them. Opened from an Arrow
IPC file (``read_split``), a split costs page cache, not process memory, and ``take``/``slice``
views it without copying. Sent to a Ray task, a split travels as an Arrow IPC buffer of its own
rows and training columns only (not the table it was cut from), and the task reads it in place
from the object store.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa

# what a model step reads; uid and text stay in the cache file
TRAINING_COLUMNS = ("domain_id", "label", "input_ids", "token_type_ids")
SCHEMA = pa.schema([("uid", pa.string()), ("domain", pa.string()), ("domain_id", pa.int64()), ("label", pa.int64()),
                    ("text", pa.string()), ("text_pair", pa.string()),
                    ("input_ids", pa.list_(pa.int32())), ("token_type_ids", pa.list_(pa.int8()))])


class Split:
    """Rows of a tokenized split; row i of every column is one example."""

    def __init__(self, table: pa.Table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def _column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy()

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """[N] int64 class ids (-1: unlabelled)."""
        return self._column("label")

    @functools.cached_property
    def domain_ids(self) -> np.ndarray:
        """[N] int64, indices into the data's domain list."""
        return self._column("domain_id")

    @property
    def uids(self) -> np.ndarray:
        """[N] str, stable across runs: "<domain>/<sha1 of text>" (materialised on each call)."""
        return np.asarray(self.table.column("uid").to_pylist(), dtype=object)

    @functools.cached_property
    def _ids(self) -> "_Ragged":
        return _Ragged(self.table.column("input_ids"))

    @functools.cached_property
    def _types(self) -> "_Ragged":
        return _Ragged(self.table.column("token_type_ids"))

    @property
    def lengths(self) -> np.ndarray:
        """[N] int64 real tokens per row."""
        return self._ids.lengths

    def tokens(self, i: int) -> np.ndarray:
        """The token ids of row ``i``."""
        return self._ids.row(i)

    def take(self, index) -> "Split":
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (np.diff(index) == 1).all():  # a run of rows: a view, no copy
            return Split(self.table.slice(int(index[0]), len(index)))
        return Split(self.table.take(pa.array(index)))

    def for_domains(self, domain_ids) -> "Split":
        return self.take(np.flatnonzero(np.isin(self.domain_ids, list(domain_ids))))

    def select(self, columns=TRAINING_COLUMNS) -> "Split":
        return Split(self.table.select([c for c in columns if c in self.table.column_names]))

    def batch(self, index) -> dict:
        """Rows ``index`` as int64 CPU tensors, padded with 0 to their longest row:
        ``input_ids``, ``attention_mask``, ``token_type_ids`` [B, W]; ``labels``, ``domain_ids`` [B]."""
        import torch

        index = np.asarray(index, dtype=np.int64)
        rows = self._ids.rows(index)
        types = self._types.rows(index)
        width = max((len(r) for r in rows), default=0)
        ids = np.zeros((len(index), width), dtype=np.int64)
        tt = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for i, (r, t) in enumerate(zip(rows, types)):
            ids[i, :len(r)], tt[i, :len(t)], mask[i, :len(r)] = r, t, 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "token_type_ids": torch.from_numpy(tt), "labels": torch.from_numpy(self.labels[index]),
                "domain_ids": torch.from_numpy(self.domain_ids[index])}

    def __reduce__(self):
        # Pickling an Arrow slice would send the buffers of the whole table it views; the IPC
        # stream of the training columns holds only these rows (and Ray keeps it out of band).
        return _from_ipc, (pickle.PickleBuffer(to_ipc(self.select().table)),)


def _from_ipc(buffer) -> Split:
    return Split(pa.ipc.open_stream(pa.py_buffer(buffer)).read_all())


def to_ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def concat(*splits: Split) -> Split:
    """The rows of each split in turn (no copy: the result is chunked)."""
    tables = [s.table for s in splits]
    columns = [c for c in tables[0].column_names if all(c in t.column_names for t in tables)]
    return Split(pa.concat_tables([t.select(columns) for t in tables]))


class _Ragged:
    """A list<int> column as per-chunk (offsets, values) numpy views: row i is values[o[i]:o[i+1]]."""

    def __init__(self, column: pa.ChunkedArray):
        self.offsets = [c.offsets.to_numpy() for c in column.chunks]
        self.values = [c.values.to_numpy() for c in column.chunks]
        self.starts = np.cumsum([0] + [len(c) for c in column.chunks])

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        if not self.offsets:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(o) for o in self.offsets]).astype(np.int64)

    def row(self, i: int) -> np.ndarray:
        c = int(np.searchsorted(self.starts, i, side="right")) - 1
        j = i - self.starts[c]
        return self.values[c][self.offsets[c][j]:self.offsets[c][j + 1]]

    def rows(self, index: np.ndarray) -> list[np.ndarray]:
        return [self.row(int(i)) for i in index]


# --------------------------------------------------------------------------- files


def read_split(path: Path) -> Split:
    """A split memory-mapped from an Arrow IPC file (raises on a missing or damaged file)."""
    return Split(pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all())


class SplitWriter:
    """Writes record batches of ``SCHEMA`` to an Arrow IPC file as they come (bounded memory)."""

    def __init__(self, path: Path):
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, SCHEMA)
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self.writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> None:
        self.writer.close()
        self.sink.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
