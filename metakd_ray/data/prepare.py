"""Dedupe, split, tokenize and cache the rows of any data format (``metakd_ray.data.FORMATS``).

``prepare``

1. drops exact duplicate (text, text_pair) rows within a domain (the Amazon data has 147),
2. splits each domain into train/dev/test, test first then dev, stratified by label with a fixed
   seed (``data.split_seed``); formats with ``group_by_text`` (MNLI) keep every row of one
   premise in one split instead,
3. optionally subsamples each split (the quickstart keeps a few hundred reviews per domain),
4. tokenizes and caches the splits as parquet, keyed by a hash of the data files' bytes, the
   tokenizer, the max length and the split settings, so a second run re-tokenizes nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metakd_ray.config import DATA_ROOT_ENV, Config, model_path
from metakd_ray.data import FORMATS
from metakd_ray.errors import MetaKDError
from metakd_ray.io import (atomic_dir, atomic_file, atomic_write_text, content_key, file_sha256, read_json,
                           read_parquet, text_table)

SPLITS = ("train", "dev", "test")


@dataclass
class Split:
    """One tokenized split as padded numpy arrays (row i of every array is one example)."""

    input_ids: np.ndarray  # [N, L] int64, 0-padded
    attention_mask: np.ndarray  # [N, L] int64
    token_type_ids: np.ndarray  # [N, L] int64
    labels: np.ndarray  # [N] int64
    domain_ids: np.ndarray  # [N] int64 (index into PreparedData.domains)
    uids: np.ndarray  # [N] str, stable across runs: "<domain>/<sha1 of text>"

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index) -> "Split":
        index = np.asarray(index)
        return Split(*(getattr(self, f)[index] for f in Split.__dataclass_fields__))

    def for_domains(self, domain_ids) -> "Split":
        return self.take(np.flatnonzero(np.isin(self.domain_ids, list(domain_ids))))

    def tensors(self) -> dict:
        import torch

        return {f: torch.tensor(getattr(self, f)) for f in ("input_ids", "attention_mask", "token_type_ids",
                                                                  "labels", "domain_ids")}


@dataclass
class PreparedData:
    splits: dict[str, Split]
    domains: list[str]
    labels: list[str]
    key: str  # cache key: identifies data + tokenizer + split settings
    directory: Path

    def domain_id(self, name: str) -> int:
        return self.domains.index(name)


# --------------------------------------------------------------------------- loading


def load_rows(cfg: Config) -> tuple[list[dict], list[Path]]:
    """All rows of the configured domains, plus the data files they came from (for the cache key)."""
    fmt = FORMATS[cfg.data.format]
    root = cfg.data_path
    if fmt.local and not root.exists():
        raise MetaKDError(f"data path {root} not found: set data.root (or ${DATA_ROOT_ENV}) and data.path "
                          f"to where your copy of the data is")
    return fmt.load(root, cfg.data, cfg.label_names)


# --------------------------------------------------------------------------- splitting


def split_rows(rows: list[dict], cfg: Config, unlabelled_per_domain: int = 0) -> dict[str, list[dict]]:
    """Dedupe within each domain, then split each domain and subsample. With
    ``unlabelled_per_domain`` > 0 also an ``unlabelled`` list: up to that many rows per domain from
    the training partition that ``data.max_train_per_domain`` left out (never dev or test), with
    their labels dropped (-1); the other splits are the same as without it."""
    data_cfg = cfg.data
    grouped = FORMATS[data_cfg.format].group_by_text
    out = {s: [] for s in SPLITS}
    if unlabelled_per_domain:
        out["unlabelled"] = []
    limits = {"train": data_cfg.max_train_per_domain, "dev": data_cfg.max_dev_per_domain,
              "test": data_cfg.max_test_per_domain}
    for domain in data_cfg.domains:
        seen, unique = set(), []
        for r in rows:
            key = (r["text"], r["text_pair"])
            if r["domain"] == domain and key not in seen:
                seen.add(key)
                unique.append(r)
        if len(unique) < 10:
            raise MetaKDError(f"data: domain {domain!r} has {len(unique)} distinct examples; at least 10 are needed "
                              "for a train/dev/test split")
        rng = np.random.default_rng(data_cfg.split_seed)
        labels = np.array([r["label"] for r in unique])
        if grouped:
            groups = [r["text"] for r in unique]
            test, rest = _group_split(groups, np.arange(len(unique)), data_cfg.test_fraction, rng)
            dev, train = _group_split(groups, rest, data_cfg.dev_fraction, rng)
        else:
            test, rest = _stratified_split(labels, np.arange(len(unique)), data_cfg.test_fraction, rng)
            dev, train = _stratified_split(labels, rest, data_cfg.dev_fraction, rng)
        taken = {}
        for name, index in (("train", train), ("dev", dev), ("test", test)):
            if limits[name] and len(index) > limits[name]:
                index = stratified_take(labels, index, limits[name], rng)
            if len(index) == 0:
                raise MetaKDError(f"data: domain {domain!r} has an empty {name} split; "
                                  "use more data or larger fractions")
            taken[name] = index
            out[name] += [unique[i] for i in sorted(index)]
        if unlabelled_per_domain:  # drawn last, so the rng gives the labelled splits what it gives without it
            rest = rng.permutation(np.setdiff1d(train, taken["train"]))[:unlabelled_per_domain]
            out["unlabelled"] += [dict(unique[i], label=-1) for i in sorted(rest)]
    return out


def _stratified_split(labels: np.ndarray, index: np.ndarray, fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Split ``index`` into (part, rest) with ``fraction`` of every label in ``part``."""
    part = []
    for label in np.unique(labels[index]):
        members = rng.permutation(index[labels[index] == label])
        part.append(members[: int(round(len(members) * fraction))])
    part = np.concatenate(part)
    return part, np.setdiff1d(index, part)


def _group_split(groups: list[str], index: np.ndarray, fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Split ``index`` so that rows sharing a group (MNLI premise) land on the same side."""
    keys = sorted({groups[i] for i in index})
    order = rng.permutation(len(keys))
    target, part_keys, count = fraction * len(index), set(), 0
    sizes = {}
    for i in index:
        sizes[groups[i]] = sizes.get(groups[i], 0) + 1
    for k in order:
        if count >= target:
            break
        part_keys.add(keys[k])
        count += sizes[keys[k]]
    part = np.array([i for i in index if groups[i] in part_keys], dtype=int)
    return part, np.setdiff1d(index, part)


def stratified_take(labels: np.ndarray, index: np.ndarray, k: int, rng) -> np.ndarray:
    """``k`` of ``index`` keeping label proportions (largest-remainder rounding)."""
    index = np.asarray(index)
    classes, counts = np.unique(labels[index], return_counts=True)
    quota = counts * k / counts.sum()
    take = np.floor(quota).astype(int)
    for j in np.argsort(-(quota - take))[: k - take.sum()]:
        take[j] += 1
    return np.concatenate([rng.permutation(index[labels[index] == c])[:n] for c, n in zip(classes, take)])


# --------------------------------------------------------------------------- prepare + cache


def prepare(cfg: Config, quiet: bool = False) -> PreparedData:
    """Load, split and tokenize (or reuse the cache); write ``splits.json`` to the output dir. With
    ``distill.unlabelled_per_domain`` > 0 the data also holds an ``unlabelled`` split."""
    rows, files = load_rows(cfg)
    tokenizer_path = model_path(cfg.model.teacher)
    key = _cache_key(cfg, files, tokenizer_path)
    directory = cfg.out / "cache" / f"data-{key}"
    data = load_prepared(directory)
    if data is None:
        split = split_rows(rows, cfg)
        tokenizer = load_tokenizer(tokenizer_path)
        with atomic_dir(directory) as tmp:
            for name in SPLITS:
                pq.write_table(_encode(split[name], tokenizer, cfg), tmp / f"{name}.parquet")
            atomic_write_text(tmp / "meta.json", json.dumps({"key": key, "domains": cfg.data.domains,
                                                            "labels": cfg.label_names}))
        data = load_prepared(directory)
        if not quiet:
            print(f"[prepare] tokenized {sum(len(v) for v in split.values())} examples -> {directory}")
    elif not quiet:
        print(f"[prepare] reusing tokenized splits from {directory}")
    transfer = unlabelled_split(cfg, data, cfg.distill.unlabelled_per_domain)
    if transfer is not None:  # the distilling students' extra, teacher-labelled text
        data.splits["unlabelled"] = transfer
    counts = split_counts(data)
    atomic_write_text(cfg.out / "splits.json", json.dumps(counts, indent=2))
    if not quiet:
        print(format_counts(counts))
    return data


def load_prepared(directory: Path) -> PreparedData | None:
    """The cached tokenized splits, or None when they are missing or any file is damaged."""
    meta = read_json(directory / "meta.json")
    tables = {name: read_parquet(directory / f"{name}.parquet") for name in SPLITS} if meta else {}
    if not meta or any(t is None for t in tables.values()):
        return None
    domains, labels = meta["domains"], meta["labels"]
    splits = {name: _split_of(table, domains) for name, table in tables.items()}
    return PreparedData(splits=splits, domains=domains, labels=labels, key=meta["key"], directory=directory)


def _split_of(table: pa.Table, domains: list[str]) -> Split:
    """A tokenized table as arrays padded to its longest row."""
    ids = table.column("input_ids").to_pylist()
    types_ = table.column("token_type_ids").to_pylist()
    width = max(len(x) for x in ids)
    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    token_type_ids = np.zeros_like(input_ids)
    attention_mask = np.zeros_like(input_ids)
    for i, (seq, tt) in enumerate(zip(ids, types_)):
        input_ids[i, : len(seq)] = seq
        token_type_ids[i, : len(seq)] = tt
        attention_mask[i, : len(seq)] = 1
    return Split(
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
        labels=np.array(table.column("label").to_pylist(), dtype=np.int64),
        domain_ids=np.array([domains.index(d) for d in table.column("domain").to_pylist()], dtype=np.int64),
        uids=np.array(table.column("uid").to_pylist()),
    )


def general_corpus(cfg: Config, data: PreparedData) -> Split:
    """The text that general distillation reads: every domain's training split plus, with
    ``general.unlabelled_per_domain`` > 0, that many more texts per domain from the rest of its
    training partition (``unlabelled_split``). Labels are never read (the extra rows have none)."""
    train = data.splits["train"]
    more = unlabelled_split(cfg, data, cfg.general.unlabelled_per_domain)
    return concatenated(train, more) if more is not None else train


def unlabelled_split(cfg: Config, data: PreparedData, per_domain: int) -> Split | None:
    """Up to ``per_domain`` texts per domain from the training partition that
    ``data.max_train_per_domain`` left out (``split_rows``; never dev or test), labels -1, tokenized
    like the splits and cached beside them; None when there are none."""
    if not per_domain:
        return None
    path = data.directory / f"unlabelled-{per_domain}.parquet"
    table = read_parquet(path)
    if table is None:
        rows, _ = load_rows(cfg)
        extra = split_rows(rows, cfg, per_domain)["unlabelled"]
        if not extra:
            return None
        table = _encode(extra, load_tokenizer(model_path(cfg.model.teacher)), cfg)
        with atomic_file(path) as tmp:
            pq.write_table(table, tmp)
    return _split_of(table, data.domains)


def concatenated(first: Split, second: Split) -> Split:
    """The rows of ``first`` then those of ``second``, padded to a common width."""
    width = max(first.input_ids.shape[1], second.input_ids.shape[1])
    first, second = _padded(first, width), _padded(second, width)
    return Split(*(np.concatenate([getattr(first, f), getattr(second, f)]) for f in Split.__dataclass_fields__))


def _padded(split: Split, width: int) -> Split:
    """``split`` with its token arrays zero-padded on the right to ``width`` columns."""
    pad = width - split.input_ids.shape[1]
    if pad == 0:
        return split
    wide = {f: np.pad(getattr(split, f), ((0, 0), (0, pad))) for f in ("input_ids", "attention_mask", "token_type_ids")}
    return Split(**wide, labels=split.labels, domain_ids=split.domain_ids, uids=split.uids)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise MetaKDError(f"config key 'model.teacher': cannot load a tokenizer from {path!r} "
                          f"({type(exc).__name__})") from None


def head_tail(ids: list[int], max_length: int) -> list[int]:
    """``[CLS] t_1 .. t_n [SEP]`` cut to ``max_length`` tokens keeping the first quarter of the room
    and the last three quarters (Sun et al. 2019, "How to fine-tune BERT for text classification":
    head 128 + tail 382 of 510 was best on long reviews):

        [CLS] t_1 .. t_h  t_{n-r+1} .. t_n [SEP],   h = (max_length - 2) // 4,  r = max_length - 2 - h
    """
    if len(ids) <= max_length:
        return list(ids)
    head = (max_length - 2) // 4
    tail = max_length - 2 - head
    return list(ids[:1 + head]) + list(ids[len(ids) - 1 - tail:])


def _encode(rows: list[dict], tokenizer, cfg: Config) -> pa.Table:
    """Rows tokenized as one parquet-ready table (uid, domain, label, text, text_pair, token ids)."""
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows]
    has_pairs = any(pairs)
    if cfg.data.truncation == "head_tail" and not has_pairs:
        full = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        enc = {"input_ids": [head_tail(ids, cfg.data.max_length) for ids in full]}
    else:
        enc = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=cfg.data.max_length)
    token_types = enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]]
    # A row's id survives re-splitting and re-tokenizing: its domain and a hash of its text.
    uids = [f"{r['domain']}/{hashlib.sha1((r['text'] + chr(9) + r['text_pair']).encode()).hexdigest()[:16]}"
            for r in rows]
    return pa.table({
        "uid": uids,
        "domain": [r["domain"] for r in rows],
        "label": pa.array([r["label"] for r in rows], pa.int64()),
        "text": texts,
        "text_pair": pairs,
        "input_ids": pa.array(enc["input_ids"], pa.list_(pa.int32())),
        "token_type_ids": pa.array(token_types, pa.list_(pa.int8())),
    })


def _cache_key(cfg: Config, files: list[Path], tokenizer_path: str) -> str:
    """Identifies the data files' bytes, the tokenizer and every setting that changes the splits."""
    data_files = [[f.name, file_sha256(f)] for f in files] or [cfg.data.path]
    tok_dir = Path(tokenizer_path)
    tokenizer = ([file_sha256(tok_dir / n) for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
                  if (tok_dir / n).is_file()] if tok_dir.exists() else [tokenizer_path])
    # Every data setting changes the splits except target_fraction and held_out_domain, applied later.
    settings = {k: v for k, v in cfg.to_dict()["data"].items() if k not in ("root", "path", "target_fraction",
                                                                              "held_out_domain")}
    return content_key(data_files, tokenizer, cfg.label_names, settings)


def subsample_fraction(split: Split, fraction: float, seed: int) -> Split:
    """Keep ``fraction`` of a (single-domain) split, label-stratified (data-scarcity setting)."""
    if fraction >= 1.0:
        return split
    k = max(len(np.unique(split.labels)), int(round(len(split) * fraction)))
    index = stratified_take(split.labels, np.arange(len(split)), k, np.random.default_rng(seed))
    return split.take(np.sort(index))


# --------------------------------------------------------------------------- reporting


def split_counts(data: PreparedData) -> dict:
    """{domain: {split: {label: count, "total": n}}} plus a leakage check across splits."""
    counts = {}
    for d_id, domain in enumerate(data.domains):
        counts[domain] = {}
        for name, split in data.splits.items():
            labels = split.labels[split.domain_ids == d_id]
            per = {lab: int((labels == i).sum()) for i, lab in enumerate(data.labels)}
            per["total"] = int(len(labels))
            counts[domain][name] = per
    uid_sets = [set(s.uids) for s in data.splits.values()]
    overlap = sum(len(a & b) for i, a in enumerate(uid_sets) for b in uid_sets[i + 1:])
    return {"domains": data.domains, "labels": data.labels, "cache_key": data.key,
            "counts": counts, "texts_in_two_splits": overlap}


def format_counts(summary: dict) -> str:
    labels = summary["labels"]
    rows = [[domain, name, per["total"]] + [per[lab] for lab in labels]
            for domain, per_split in summary["counts"].items() for name, per in per_split.items()]
    table = text_table(["domain", "split", "total"] + [lab[:12] for lab in labels], rows,
                       [14, 11, 7] + [14] * len(labels), left=2)
    return f"{table}\ntexts in two splits: {summary['texts_in_two_splits']}"
