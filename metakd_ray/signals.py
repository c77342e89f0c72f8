"""What a frozen teacher tells its students, and where it is kept (``distill.teacher_signals``).

One eval-mode teacher pass per (teacher, domain) over the domain's student rows writes, batch by
batch, into ``<output_dir>/teacher_outputs/<teacher>/<domain>-<key>/``:

    soft.npy     [N, C + 2 + H] float32   logits z^T, t, λ and the domain vector h_d^T of each row
    hidden.npy   [T, S, H] float16        (cache only) real tokens only, T = Σ_i L_i: the hidden states
                                          0, map(j) and map(j) - 1 for every mapped layer map(j)
    offsets.npy  [N + 1] int64            (cache only) row i's tokens are hidden[offsets[i]:offsets[i+1]]
    meta.json    written last             rows, layers, widths

so a pass never holds more than one batch, whatever N. Soft labels are always kept (C + 2 + H
floats per text); the hidden states only in ``cache`` mode, where stage 1 recomputes the
attention targets per batch from the state entering each mapped layer:

    A^T_j = (h_{j-1} W_Q + b_Q)(h_{j-1} W_K + b_K)ᵀ / √d      (``modeling.attention_scores``)

which is O(L) bytes per text on disk instead of the maps' O(L²). In ``live`` mode the teacher runs
in each stage-1 step instead. ``auto`` (``plan``) caches only when stage 1 reads each text's
internals more than once, on CPUs, within ``distill.cache_budget_gb``.

Students read a pass by row (``TeacherSignals``, ``os.pread``): a task holds the batch it trains
on, and the rest stays on disk (and in the OS page cache).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metakd_ray.cluster import autocast
from metakd_ray.config import Config
from metakd_ray.data.split import Split
from metakd_ray.io import atomic_dir, atomic_write_json, read_json
from metakd_ray.modeling import attention_scores
from metakd_ray.scores import expertise_weight
from metakd_ray.training import batch_at, eval_batch_size, forward, model_device

FILES = ("soft.npy", "hidden.npy", "offsets.npy")


def stored_layers(layer_map: list[int]) -> list[int]:
    """Teacher hidden states a cache keeps: the embeddings (0), each mapped layer's output map(j)
    (the hidden-state targets) and its input map(j) - 1 (for its attention targets)."""
    return sorted({0, *layer_map, *(j - 1 for j in layer_map)})


# --------------------------------------------------------------------------- writing


class NpyWriter:
    """An ``.npy`` file of a known shape written front to back, a block of rows at a time."""

    def __init__(self, path: Path, dtype, shape: tuple):
        self.fh = open(path, "wb")
        self.dtype = np.dtype(dtype)
        np.lib.format.write_array_header_1_0(self.fh, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                       "fortran_order": False, "shape": tuple(shape)})

    def write(self, block: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())

    def close(self) -> None:
        self.fh.close()


@torch.no_grad()
def teacher_pass(cfg: Config, rows: Split, t: np.ndarray, teacher, internals: bool, directory: Path) -> dict:
    """One eval-mode pass of ``teacher`` (on its device) over ``rows`` with prototype scores ``t``,
    written to ``directory`` as described above; returns its ``meta.json``. An unlabelled row has
    no gold label: the teacher's own prediction stands in for it in λ."""
    teacher.eval()
    device = model_device(teacher)
    layers = stored_layers(cfg.layer_map) if internals else []
    n, width = len(rows), teacher.encoder.config.hidden_size
    classes = teacher.config.num_labels
    lengths = rows.lengths
    started = time.time()
    size = eval_batch_size(device)
    # one staging buffer for every batch's states: a fresh one per batch would fragment the heap
    # (glibc) into a peak that creeps up with the number of batches
    staging = torch.empty(size * int(lengths.max(initial=0)) * len(layers) * width, dtype=torch.float16)
    with atomic_dir(directory) as tmp:
        soft = NpyWriter(tmp / "soft.npy", np.float32, (n, classes + 2 + width))
        hidden = NpyWriter(tmp / "hidden.npy", np.float16, (int(lengths.sum()), len(layers), width)) if layers else None
        try:
            for start in range(0, n, size):
                index = np.arange(start, min(start + size, n))
                b = batch_at(rows, index, device)
                with autocast(device, cfg.precision):
                    o = forward(teacher, b, internals=bool(layers), scores=False)
                logits = o.logits.float().cpu()
                labels = b["labels"].cpu()
                gold = torch.where(labels >= 0, labels, logits.argmax(-1))
                t_batch = torch.from_numpy(t[index]).float()
                lam = expertise_weight(logits, gold, t_batch)
                soft.write(torch.cat([logits, t_batch[:, None], lam[:, None], o.domain_vector.float().cpu()], -1).numpy())
                if hidden:
                    shape = (len(index), b["input_ids"].shape[1], len(layers), width)
                    states = staging[:int(np.prod(shape))].view(shape)  # [B, W, S, H]
                    for s, j in enumerate(layers):
                        states[:, :, s].copy_(o.hidden_states[j])
                    for i, k in enumerate(index):
                        hidden.write(states[i, :lengths[k]].numpy())
        finally:
            soft.close()
            if hidden:
                hidden.close()
        if layers:
            np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        meta = {"rows": n, "classes": classes, "width": width, "layers": layers, "tokens": int(lengths.sum()),
                "seconds": round(time.time() - started, 2)}
        atomic_write_json(tmp / "meta.json", meta)
    return meta


def signals_ready(directory: Path) -> bool:
    """A finished pass is in ``directory``: its meta.json (written last) is there and every file
    has the size its shape gives. A damaged one is reported and removed."""
    meta = read_json(directory / "meta.json")
    needed = FILES if meta and meta.get("layers") else FILES[:1]
    if meta and all(_npy_whole(directory / f) for f in needed):
        return True
    if directory.exists():
        print(f"[distill] {directory} is damaged (incomplete or truncated); rebuilding it", flush=True)
        shutil.rmtree(directory, ignore_errors=True)
    return False


def _npy_whole(path: Path) -> bool:
    try:
        rows = NpyRows(path)
    except (OSError, ValueError):
        return False
    with rows:
        return os.fstat(rows.fd).st_size == rows.offset + rows.nbytes * rows.shape[0]


# --------------------------------------------------------------------------- reading


class NpyRows:
    """Rows of an ``.npy`` file read on demand with ``os.pread``: memory holds what was asked for."""

    def __init__(self, path: Path):
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            self.shape, _, self.dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(fh))
            self.offset = fh.tell()
        self.row_shape = self.shape[1:]
        self.nbytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def rows(self, index) -> np.ndarray:
        """Rows ``index`` (any order) as one array [len(index), *row_shape]."""
        out = np.empty((len(index), *self.row_shape), dtype=self.dtype)
        for i, r in enumerate(index):
            out[i] = np.frombuffer(os.pread(self.fd, self.nbytes, self.offset + int(r) * self.nbytes),
                                   self.dtype).reshape(self.row_shape)
        return out

    def span(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 in one read."""
        data = os.pread(self.fd, (stop - start) * self.nbytes, self.offset + start * self.nbytes)
        return np.frombuffer(data, self.dtype).reshape((stop - start, *self.row_shape))

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TeacherSignals:
    """A finished teacher pass (see above), read by row."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.meta = read_json(self.directory / "meta.json")
        self._soft = NpyRows(self.directory / "soft.npy")
        self.layers: list[int] = self.meta["layers"]
        if self.layers:
            self._hidden = NpyRows(self.directory / "hidden.npy")
            self._offsets = NpyRows(self.directory / "offsets.npy")

    def __len__(self) -> int:
        return self.meta["rows"]

    @property
    def has_internals(self) -> bool:
        return bool(self.layers)

    def soft(self, index) -> dict[str, torch.Tensor]:
        """``logits`` [B, C], ``t``, ``lambda`` [B] and ``domain_vector`` [B, H] of rows ``index``."""
        block = torch.from_numpy(self._soft.rows(index))
        c = self.meta["classes"]
        return {"logits": block[:, :c], "t": block[:, c], "lambda": block[:, c + 1], "domain_vector": block[:, c + 2:]}

    def hidden(self, index, width: int) -> dict[int, torch.Tensor]:
        """{teacher layer: [B, width, H] float16} for rows ``index``, zero past each row's tokens."""
        width_h = self.meta["width"]
        out = np.zeros((len(index), width, len(self.layers), width_h), dtype=np.float16)
        for i, r in enumerate(index):
            start, stop = self._offsets.span(int(r), int(r) + 2)
            block = self._hidden.span(int(start), int(stop))
            out[i, :len(block)] = block
        stacked = torch.from_numpy(out)
        return {layer: stacked[:, :, s] for s, layer in enumerate(self.layers)}

    def close(self) -> None:
        for rows in (self._soft, getattr(self, "_hidden", None), getattr(self, "_offsets", None)):
            if rows:
                rows.close()


# --------------------------------------------------------------------------- stage-1 targets


class LiveTargets:
    """Stage-1 targets from the teacher run on the student's batch (``teacher_signals: live``)."""

    def __init__(self, teacher, layer_map: list[int]):
        self.teacher, self.layer_map = teacher.eval(), layer_map

    @torch.no_grad()
    def __call__(self, batch: dict, index, soft: dict):
        o = forward(self.teacher, batch, internals=True)
        return ([o.hidden_states[j] for j in [0] + self.layer_map],
                [o.attention_scores[j - 1] for j in self.layer_map], o.domain_vector)


class CachedTargets:
    """Stage-1 targets from a cached pass (``teacher_signals: cache``): the hidden states as stored,
    the attention scores recomputed from the state entering each mapped layer with that layer's
    query and key (the rest of the teacher is not kept)."""

    def __init__(self, signals: TeacherSignals, teacher, layer_map: list[int], device: torch.device):
        attention = teacher.self_attention()
        self.modules = torch.nn.ModuleList([attention[j - 1] for j in layer_map]).to(device).eval()
        self.signals, self.layer_map, self.device = signals, layer_map, device

    @torch.no_grad()
    def __call__(self, batch: dict, index, soft: dict):
        width = batch["input_ids"].shape[1]
        stored = {j: h.to(self.device, non_blocking=True).float() for j, h in self.signals.hidden(index, width).items()}
        attn = [attention_scores(m, stored[j - 1]) for m, j in zip(self.modules, self.layer_map)]
        return [stored[j] for j in [0] + self.layer_map], attn, soft["domain_vector"].to(self.device)


# --------------------------------------------------------------------------- auto


@dataclass(frozen=True)
class PassSize:
    texts: int  # rows of the pass
    tokens: int  # their real tokens
    reads: int  # rows stage 1 reads from it, over every student (steps x batch size)


@dataclass(frozen=True)
class SignalPlan:
    internals: bool  # cache the hidden states
    line: str  # the one line that says the estimate and the choice


def plan(cfg: Config, passes: dict[tuple, PassSize], trials: int = 1) -> SignalPlan:
    """Whether the teacher passes keep hidden states. ``passes``: every (teacher, domain) pass the
    students read; ``trials`` multiplies the reads (every trial of a sweep reads the same passes).

    ``auto`` caches when stage 1 reads its texts more than once on average (Σ reads / Σ texts > 1),
    the students train on CPUs (on a GPU the teacher's forward costs less than reading its states
    back) and the estimate Σ tokens · S · H · 2 bytes (S stored layers of width H, fp16) fits
    ``distill.cache_budget_gb`` and half the free disk."""
    dcfg = cfg.distill
    mode = dcfg.teacher_signals
    read = [p for p in passes.values() if p.reads]
    texts = sum(p.texts for p in read)
    reads = sum(p.reads for p in read) * trials / max(1, texts)
    estimate = sum(p.tokens for p in read) * len(stored_layers(cfg.layer_map)) * cfg.teacher_arch.width * 2
    size = (f"{estimate / 1e9:.2f} GB of hidden states for {len(read)} teacher pass(es), "
            f"~{estimate / max(1, texts) / 1e3:.0f} KB per text")
    if not read:
        return SignalPlan(False, "[distill] teacher signals: soft labels only (no stage 1 reads the teacher's "
                                 "hidden states)")
    if mode != "auto":
        what = f"cache: {size}" if mode == "cache" else "live: the teacher runs in every stage-1 step"
        return SignalPlan(mode == "cache", f"[distill] teacher signals: {what}; stage 1 reads each text "
                                           f"{reads:.2f} time(s)")
    cfg.out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cfg.out).free
    if dcfg.gpus_per_task > 0:
        why = (f"the students train on a GPU, where the teacher's forward is cheaper than reading its states "
               f"back (a cache would take {size})")
    elif reads <= 1:
        why = f"stage 1 reads each text {reads:.2f} time(s), so a cache ({size}) would be read at most once"
    elif estimate > dcfg.cache_budget_gb * 1e9:
        why = f"a cache would take {size}, over distill.cache_budget_gb={dcfg.cache_budget_gb:g}"
    elif estimate > free / 2:
        why = f"a cache would take {size}, over half the free disk ({free / 1e9:.1f} GB)"
    else:
        return SignalPlan(True, f"[distill] teacher signals: auto -> cache: stage 1 reads each text {reads:.2f} "
                                f"times; {size}, within distill.cache_budget_gb={dcfg.cache_budget_gb:g}")
    return SignalPlan(False, f"[distill] teacher signals: auto -> live: {why}")
