"""Dedupe, split, tokenize and cache the rows of any data format (``metakd_ray.data.FORMATS``).

``prepare``

1. drops exact duplicate (text, text_pair) rows within a domain (the Amazon data has 147),
2. splits each domain into train/dev/test, test first then dev, stratified by label with a fixed
   seed (``data.split_seed``); formats with ``group_by_text`` (MNLI) keep every row of one
   premise in one split instead,
3. optionally subsamples each split (the quickstart keeps a few hundred reviews per domain),
4. tokenizes in chunks and writes each split as an Arrow IPC file (``metakd_ray.data.split``:
   ragged int32 token ids, memory-mapped when read), keyed by a hash of the data files' bytes,
   the tokenizer, the max length and the split settings, so a second run re-tokenizes nothing,
5. with ``distill.unlabelled_per_domain`` or ``data.unlabelled_path``, builds the distilling
   students' transfer set: one file per domain, written as it is tokenized.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from metakd_ray.config import DATA_ROOT_ENV, Config, model_path
from metakd_ray.data import FORMATS
from metakd_ray.data.split import SCHEMA, Split, SplitWriter, concat, read_split
from metakd_ray.errors import MetaKDError
from metakd_ray.io import atomic_dir, atomic_file, atomic_write_text, content_key, file_sha256, read_json, text_table

SPLITS = ("train", "dev", "test")
CHUNK = 4096  # rows tokenized and written at a time
CACHE_FORMAT = "arrow-1"  # part of the cache key: a cache in an older layout is rebuilt


@dataclass
class PreparedData:
    splits: dict[str, Split]  # train / dev / test, memory-mapped
    domains: list[str]
    labels: list[str]
    key: str  # cache key: identifies data + tokenizer + split settings
    directory: Path
    # the distilling students' unlabelled text, per domain (``transfer_set``); empty without one
    transfer: dict[str, Split] = field(default_factory=dict)
    transfer_key: str = ""  # what the transfer set was made from ("" without one)

    def domain_id(self, name: str) -> int:
        return self.domains.index(name)

    def split_path(self, name: str) -> Path:
        return self.directory / f"{name}.arrow"


# --------------------------------------------------------------------------- loading


def load_rows(cfg: Config) -> tuple[list[dict], list[Path]]:
    """All rows of the configured domains, plus the data files they came from (for the cache key)."""
    fmt = FORMATS[cfg.data.format]
    root = cfg.data_path
    if fmt.local and not root.exists():
        fetch = {"amazon": "`metakd-ray data fetch amazon`",
                 "mnli_tsv": "`metakd-ray data fetch mnli` (then data.path=multinli)"}.get(cfg.data.format)
        raise MetaKDError(f"data path {root} not found: " + (f"get the data with {fetch}, or set" if fetch else "set")
                          + f" data.root (or ${DATA_ROOT_ENV}) and data.path to where your copy is")
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
    ``distill.unlabelled_per_domain`` or ``data.unlabelled_path`` the data also holds a transfer set."""
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
                write_rows(tmp / f"{name}.arrow", split[name], tokenizer, cfg)
            atomic_write_text(tmp / "meta.json", json.dumps({"key": key, "domains": cfg.data.domains,
                                                            "labels": cfg.label_names,
                                                            "rows": {n: len(split[n]) for n in SPLITS}}))
        data = load_prepared(directory)
        if not quiet:
            print(f"[prepare] tokenized {sum(len(v) for v in split.values())} examples -> {directory}")
    elif not quiet:
        print(f"[prepare] reusing tokenized splits from {directory}")
    del rows
    data.transfer, data.transfer_key = transfer_set(cfg, data, quiet)
    counts = split_counts(data)
    atomic_write_text(cfg.out / "splits.json", json.dumps(counts, indent=2))
    if not quiet:
        print(format_counts(counts))
    return data


def load_prepared(directory: Path) -> PreparedData | None:
    """The cached tokenized splits, or None when they are missing or any file is damaged."""
    meta = read_json(directory / "meta.json")
    if not meta:
        return None
    splits = {}
    for name in SPLITS:
        split = open_split(directory / f"{name}.arrow", meta.get("rows", {}).get(name))
        if split is None:
            return None
        splits[name] = split
    return PreparedData(splits=splits, domains=meta["domains"], labels=meta["labels"], key=meta["key"],
                        directory=directory)


def open_split(path: Path, rows: int | None = None) -> Split | None:
    """The split in ``path`` memory-mapped, or None when it is missing, damaged or not ``rows`` long."""
    if not path.is_file():
        return None
    try:
        split = read_split(path)
    except (pa.ArrowInvalid, OSError) as exc:
        print(f"[cache] {path} is damaged ({str(exc).splitlines()[0][:120]}); rebuilding it", flush=True)
        return None
    if rows is not None and len(split) != rows:
        print(f"[cache] {path} is damaged ({len(split)} rows, expected {rows}); rebuilding it", flush=True)
        return None
    return split


def general_corpus(cfg: Config, data: PreparedData) -> Split:
    """The text that general distillation reads: every domain's training split plus, with
    ``general.unlabelled_per_domain`` > 0, that many more texts per domain from the rest of its
    training partition (``unlabelled_split``). Labels are never read (the extra rows have none)."""
    train = data.splits["train"]
    more = unlabelled_split(cfg, data, cfg.general.unlabelled_per_domain)
    return concat(train, more) if more is not None else train


def unlabelled_split(cfg: Config, data: PreparedData, per_domain: int) -> Split | None:
    """Up to ``per_domain`` texts per domain from the training partition that
    ``data.max_train_per_domain`` left out (``split_rows``; never dev or test), labels -1, tokenized
    like the splits and cached beside them; None when there are none."""
    if not per_domain:
        return None
    path = data.directory / f"unlabelled-{per_domain}.arrow"
    split = open_split(path)
    if split is None:
        rows, _ = load_rows(cfg)
        extra = split_rows(rows, cfg, per_domain)["unlabelled"]
        del rows
        if not extra:
            return None
        with atomic_file(path) as tmp:
            write_rows(tmp, extra, load_tokenizer(model_path(cfg.model.teacher)), cfg)
        split = read_split(path)
    return split


def transfer_set(cfg: Config, data: PreparedData, quiet: bool = True) -> tuple[dict[str, Split], str]:
    """The distilling students' transfer set per domain, and a key of what it was made from: up to
    ``distill.unlabelled_per_domain`` texts of the training partition that ``data.max_train_per_domain``
    left out, then every text of the domain in ``data.unlabelled_path`` (``metakd_ray.data.unlabelled``).
    Labels are -1; the teachers and the labelled splits are unaffected."""
    parts: dict[str, list[Split]] = {d: [] for d in data.domains}
    remainder = unlabelled_split(cfg, data, cfg.distill.unlabelled_per_domain)
    if remainder is not None:
        for d_id, domain in enumerate(data.domains):
            parts[domain].append(remainder.for_domains([d_id]))
    user_key = ""
    if cfg.data.unlabelled_path:
        from metakd_ray.data.unlabelled import user_transfer_set

        user_key, splits = user_transfer_set(cfg, data, quiet)
        for domain, split in splits.items():
            parts[domain].append(split)
    transfer = {d: concat(*p) if len(p) > 1 else p[0] for d, p in parts.items() if sum(len(s) for s in p)}
    return transfer, (content_key(cfg.distill.unlabelled_per_domain, user_key) if transfer else "")


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


def write_rows(path: Path, rows: list[dict], tokenizer, cfg: Config) -> None:
    """``rows`` tokenized ``CHUNK`` at a time into the Arrow IPC file ``path``."""
    with SplitWriter(path) as writer:
        for start in range(0, len(rows), CHUNK):
            writer.write(encode(rows[start:start + CHUNK], tokenizer, cfg))


def encode(rows: list[dict], tokenizer, cfg: Config) -> pa.RecordBatch:
    """Rows (``text``, ``text_pair``, ``label``, ``domain``) tokenized as one record batch of ``SCHEMA``."""
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows]
    has_pairs = any(pairs)
    if cfg.data.truncation == "head_tail" and not has_pairs:
        full = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        enc = {"input_ids": [head_tail(ids, cfg.data.max_length) for ids in full]}
    else:
        enc = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=cfg.data.max_length)
    token_types = enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]]
    domains = cfg.data.domains
    return pa.record_batch({
        "uid": [row_uid(r["domain"], r["text"], r["text_pair"]) for r in rows],
        "domain": [r["domain"] for r in rows],
        "domain_id": pa.array([domains.index(r["domain"]) for r in rows], pa.int64()),
        "label": pa.array([r["label"] for r in rows], pa.int64()),
        "text": texts,
        "text_pair": pairs,
        "input_ids": pa.array(enc["input_ids"], pa.list_(pa.int32())),
        "token_type_ids": pa.array(token_types, pa.list_(pa.int8())),
    }, schema=SCHEMA)


def row_uid(domain: str, text: str, pair: str) -> str:
    """A row's id survives re-splitting and re-tokenizing: its domain and a hash of its text."""
    return f"{domain}/{hashlib.sha1((text + chr(9) + pair).encode()).hexdigest()[:16]}"


def _cache_key(cfg: Config, files: list[Path], tokenizer_path: str) -> str:
    """Identifies the data files' bytes, the tokenizer and every setting that changes the splits."""
    data_files = [[f.name, file_sha256(f)] for f in files] or [cfg.data.path]
    tok_dir = Path(tokenizer_path)
    tokenizer = ([file_sha256(tok_dir / n) for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
                  if (tok_dir / n).is_file()] if tok_dir.exists() else [tokenizer_path])
    # Every data setting changes the splits except those applied later.
    settings = {k: v for k, v in cfg.to_dict()["data"].items() if k not in ("root", "path", "target_fraction",
                                                                              "held_out_domain", "unlabelled_path")}
    return content_key(data_files, tokenizer, cfg.label_names, settings, CACHE_FORMAT)


def subsample_fraction(split: Split, fraction: float, seed: int) -> np.ndarray:
    """Rows of a (single-domain) split to keep for ``data.target_fraction`` (data scarcity),
    label-stratified and in split order."""
    if fraction >= 1.0:
        return np.arange(len(split))
    k = max(len(np.unique(split.labels)), int(round(len(split) * fraction)))
    return np.sort(stratified_take(split.labels, np.arange(len(split)), k, np.random.default_rng(seed)))


def eval_sample(split: Split, per_domain: int, seed: int) -> Split:
    """At most ``per_domain`` rows of each domain of ``split`` (label-stratified, fixed by ``seed``):
    what training scores every few steps, so an evaluation costs the same whatever the dev set's size."""
    if not per_domain:
        return split
    keep = []
    rng = np.random.default_rng(seed)
    for d in np.unique(split.domain_ids):
        rows = np.flatnonzero(split.domain_ids == d)
        keep.append(stratified_take(split.labels, rows, per_domain, rng) if len(rows) > per_domain else rows)
    keep = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    return split if len(keep) == len(split) else split.take(keep)


# --------------------------------------------------------------------------- reporting


def split_counts(data: PreparedData) -> dict:
    """{domain: {split: {label: count, "total": n}}} (and the transfer set's size as "unlabelled"),
    plus a leakage check across the labelled splits."""
    import pyarrow.compute as pc

    counts = {}
    for d_id, domain in enumerate(data.domains):
        counts[domain] = {}
        for name, split in data.splits.items():
            labels = split.labels[split.domain_ids == d_id]
            per = {lab: int((labels == i).sum()) for i, lab in enumerate(data.labels)}
            per["total"] = int(len(labels))
            counts[domain][name] = per
        if data.transfer:
            counts[domain]["unlabelled"] = {"total": len(data.transfer.get(domain, ()))}
    uids = [s.table.column("uid").combine_chunks() for s in data.splits.values()]
    overlap = sum(pc.sum(pc.is_in(a, value_set=b)).as_py() or 0 for i, a in enumerate(uids) for b in uids[i + 1:])
    return {"domains": data.domains, "labels": data.labels, "cache_key": data.key,
            "counts": counts, "texts_in_two_splits": overlap}


def format_counts(summary: dict) -> str:
    labels = summary["labels"]
    rows = [[domain, name, per["total"]] + [per.get(lab, "") for lab in labels]
            for domain, per_split in summary["counts"].items() for name, per in per_split.items()]
    table = text_table(["domain", "split", "total"] + [lab[:12] for lab in labels], rows,
                       [14, 11, 7] + [14] * len(labels), left=2)
    return f"{table}\ntexts in two splits: {summary['texts_in_two_splits']}"
