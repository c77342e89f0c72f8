"""Multi-domain text-classification data: load, dedupe, split, tokenize, cache.

Every loader produces the same rows: ``text``, ``text_pair`` ("" for single sentences),
``label`` (class id into the config's label set) and ``domain``. ``prepare`` then

1. drops exact duplicate (text, text_pair) rows within a domain (the Amazon data has 147),
2. splits each domain into train/dev/test (spec decision 14: stratified by label with a fixed
   seed; MNLI grouped by premise so no premise is in two splits),
3. optionally subsamples each split (the quickstart keeps a few hundred reviews per domain),
4. tokenizes and caches the splits as parquet, keyed by a hash of the data files' bytes, the
   tokenizer, the max length and the split settings, so a second run re-tokenizes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metakd_ray.config import DATA_ROOT_ENV, Config, model_path
from metakd_ray.errors import MetaKDError
from metakd_ray.io import atomic_dir, atomic_write_text, file_sha256

SPLITS = ("train", "dev", "test")
AMAZON_FILES = {"negative": "negative.review", "positive": "positive.review"}
_REVIEW_TEXT = re.compile(r"<review_text>(.*?)</review_text>", re.S)


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


# --------------------------------------------------------------------------- raw loaders


def load_rows(cfg: Config) -> tuple[list[dict], list[Path]]:
    """All rows of the configured domains, plus the data files they came from (for hashing)."""
    fmt = cfg.data.format
    if fmt == "mnli_hub":
        return _load_mnli_hub(cfg), []
    root = cfg.data_path
    if not root.exists():
        raise MetaKDError(f"data path {root} not found: set data.root (or ${DATA_ROOT_ENV}) and data.path "
                          f"to where your copy of the data is")
    if fmt == "amazon":
        return _load_amazon(root, cfg.data.domains, cfg.label_names)
    if fmt == "mnli_tsv":
        return _load_mnli_tsv(root, cfg.data.domains, cfg.label_names)
    return _load_table(root, cfg)


def parse_review_file(path: Path) -> list[str]:
    """Texts of the ``<review_text>`` fields of one Blitzer ``.review`` file (pseudo-XML, so regex)."""
    raw = _read_text(path)
    opened, closed = raw.count("<review>"), raw.count("</review>")
    if opened == 0:
        raise MetaKDError(f"file {path}: no <review> blocks found (expected Blitzer .review format)")
    if opened != closed:
        raise MetaKDError(f"file {path}: truncated or malformed: {opened} <review> but {closed} </review> tags")
    blocks = raw.split("</review>")[:-1]
    texts = []
    for number, block in enumerate(blocks, start=1):
        match = _REVIEW_TEXT.search(block)
        text = html.unescape(match.group(1)).strip() if match else ""
        if not text:
            raise MetaKDError(f"file {path}: review {number} has no <review_text> content")
        texts.append(text)
    return texts


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MetaKDError(f"file {path}: not valid UTF-8 at byte {exc.start}") from None


def _load_amazon(root: Path, domains: list[str], labels: list[str]) -> tuple[list[dict], list[Path]]:
    if set(labels) != set(AMAZON_FILES):
        raise MetaKDError(f"config key 'data.labels': the amazon format has labels negative/positive, got {labels}")
    rows, files = [], []
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    for domain in domains:
        directory = root / domain
        if not directory.is_dir():
            raise MetaKDError(f"data: domain {domain!r} has no directory {directory} (found: {', '.join(available)})")
        for label, filename in AMAZON_FILES.items():
            path = directory / filename
            if not path.is_file():
                raise MetaKDError(f"data: file {path} not found (expected {', '.join(AMAZON_FILES.values())} per domain)")
            files.append(path)
            rows += [{"text": t, "text_pair": "", "label": labels.index(label), "domain": domain}
                     for t in parse_review_file(path)]
    return rows, files


def _load_mnli_tsv(root: Path, domains: list[str], labels: list[str]) -> tuple[list[dict], list[Path]]:
    files = sorted(root.glob("*.tsv")) if root.is_dir() else [root]
    if not files:
        raise MetaKDError(f"data: no .tsv files in {root} (expected sentence1/sentence2/label/genre TSVs)")
    rows = []
    for path in files:
        lines = _read_text(path).splitlines()
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        needed = ("sentence1", "sentence2", "label", "genre")
        if not header or any(c not in header for c in needed):
            raise MetaKDError(f"file {path}: missing column(s) {[c for c in needed if c not in (header or [])]} "
                              f"(expected header {' '.join(needed)})")
        col = {c: header.index(c) for c in needed}
        for number, fields in enumerate(reader, start=2):
            if len(fields) != len(header):
                raise MetaKDError(f"file {path} line {number}: expected {len(header)} tab-separated fields, got {len(fields)}")
            rows.append(_labelled_row(fields[col["sentence1"]], fields[col["sentence2"]], fields[col["label"]],
                                      fields[col["genre"]], labels, f"file {path} line {number}"))
    return _select_domains(rows, domains, root), files


def _load_mnli_hub(cfg: Config) -> list[dict]:
    """MNLI from the Hugging Face hub (``data.path`` = dataset id, default nyu-mll/multi_nli)."""
    import datasets

    name = cfg.data.path or "nyu-mll/multi_nli"
    try:
        ds = datasets.load_dataset(name)
    except Exception as exc:  # network, auth and format errors all surface here
        raise MetaKDError(f"data: cannot load {name!r} from the hub ({type(exc).__name__}: {exc}); "
                          "use data.format=mnli_tsv with a local copy when offline") from None
    hub_labels = ["entailment", "neutral", "contradiction"]
    rows = []
    for split in ("train", "validation_matched"):
        for ex in ds[split]:
            if ex["label"] < 0:
                continue  # no gold label
            rows.append(_labelled_row(ex["premise"], ex["hypothesis"], hub_labels[ex["label"]], ex["genre"],
                                      cfg.label_names, f"hub {name}/{split}"))
    return _select_domains(rows, cfg.data.domains, Path(name))


def _load_table(path: Path, cfg: Config) -> tuple[list[dict], list[Path]]:
    d = cfg.data
    if not path.is_file():
        raise MetaKDError(f"data: file {path} not found (data.format={d.format} expects one file)")
    try:
        if d.format == "csv":
            import pandas as pd

            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif d.format == "jsonl":
            import pandas as pd

            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            frame = pq.read_table(path).to_pandas()
    except UnicodeDecodeError as exc:
        raise MetaKDError(f"file {path}: not valid UTF-8 at byte {exc.start}") from None
    except Exception as exc:
        raise MetaKDError(f"file {path}: cannot be read as {d.format} ({type(exc).__name__}: {exc})") from None
    columns = [d.text_column, d.label_column, d.domain_column] + ([d.text_pair_column] if d.text_pair_column else [])
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MetaKDError(f"file {path}: missing column(s) {missing} (columns: {list(frame.columns)}; "
                          "set data.text_column / label_column / domain_column)")
    rows = []
    for number, rec in enumerate(frame.to_dict("records"), start=1):
        text = rec[d.text_column]
        if not isinstance(text, str) or not text.strip():
            raise MetaKDError(f"file {path} row {number}: empty or non-text value in column {d.text_column!r}")
        pair = str(rec[d.text_pair_column]) if d.text_pair_column else ""
        rows.append(_labelled_row(text, pair, str(rec[d.label_column]), str(rec[d.domain_column]),
                                  cfg.label_names, f"file {path} row {number}"))
    return _select_domains(rows, d.domains, path), [path]


def _labelled_row(text: str, pair: str, label: str, domain: str, labels: list[str], where: str) -> dict:
    if label not in labels:
        raise MetaKDError(f"{where}: label {label!r} is not in the label set {labels} (config key data.labels)")
    if not text.strip():
        raise MetaKDError(f"{where}: empty text")
    return {"text": text.strip(), "text_pair": pair.strip(), "label": labels.index(label), "domain": domain}


def _select_domains(rows: list[dict], domains: list[str], source: Path) -> list[dict]:
    found = sorted({r["domain"] for r in rows})
    for domain in domains:
        if domain not in found:
            raise MetaKDError(f"data: domain {domain!r} has no rows in {source} (found: {', '.join(found)})")
    wanted = set(domains)
    return [r for r in rows if r["domain"] in wanted]


# --------------------------------------------------------------------------- splitting


def split_rows(rows: list[dict], cfg: Config) -> dict[str, list[dict]]:
    """Dedupe within each domain, then split each domain (decision 14) and subsample."""
    d = cfg.data
    grouped = cfg.data.format in ("mnli_tsv", "mnli_hub")
    out = {s: [] for s in SPLITS}
    limits = {"train": d.max_train_per_domain, "dev": d.max_dev_per_domain, "test": d.max_test_per_domain}
    for domain in d.domains:
        seen, unique = set(), []
        for r in rows:
            key = (r["text"], r["text_pair"])
            if r["domain"] == domain and key not in seen:
                seen.add(key)
                unique.append(r)
        if len(unique) < 10:
            raise MetaKDError(f"data: domain {domain!r} has {len(unique)} distinct examples; at least 10 are needed "
                              "for a train/dev/test split")
        rng = np.random.default_rng(d.split_seed)
        labels = np.array([r["label"] for r in unique])
        if grouped:
            groups = [r["text"] for r in unique]
            test, rest = _group_split(groups, np.arange(len(unique)), d.test_fraction, rng)
            dev, train = _group_split(groups, rest, d.dev_fraction, rng)
        else:
            test, rest = _stratified_split(labels, np.arange(len(unique)), d.test_fraction, rng)
            dev, train = _stratified_split(labels, rest, d.dev_fraction, rng)
        for name, index in (("train", train), ("dev", dev), ("test", test)):
            if limits[name] and len(index) > limits[name]:
                index = stratified_take(labels, index, limits[name], rng)
            if len(index) == 0:
                raise MetaKDError(f"data: domain {domain!r} has an empty {name} split; use more data or larger fractions")
            out[name] += [unique[i] for i in sorted(index)]
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
    """Load, split and tokenize (or reuse the cache); write ``splits.json`` to the output dir."""
    rows, files = load_rows(cfg)
    tokenizer_path = model_path(cfg.model.teacher)
    key = _cache_key(cfg, files, tokenizer_path)
    directory = cfg.out / "cache" / f"data-{key}"
    if not (directory / "meta.json").is_file():
        split = split_rows(rows, cfg)
        tokenizer = load_tokenizer(tokenizer_path)
        with atomic_dir(directory) as tmp:
            for name in SPLITS:
                _write_split(tmp / f"{name}.parquet", split[name], tokenizer, cfg)
            atomic_write_text(tmp / "meta.json", json.dumps({"key": key, "domains": cfg.data.domains,
                                                            "labels": cfg.label_names}))
        if not quiet:
            print(f"[prepare] tokenized {sum(len(v) for v in split.values())} examples -> {directory}")
    elif not quiet:
        print(f"[prepare] reusing tokenized splits from {directory}")
    data = load_prepared(directory)
    counts = split_counts(data)
    atomic_write_text(cfg.out / "splits.json", json.dumps(counts, indent=2))
    if not quiet:
        print(format_counts(counts))
    return data


def load_prepared(directory: Path) -> PreparedData:
    meta = json.loads((directory / "meta.json").read_text())
    domains, labels = meta["domains"], meta["labels"]
    splits = {}
    for name in SPLITS:
        table = pq.read_table(directory / f"{name}.parquet")
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
        splits[name] = Split(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            labels=np.array(table.column("label").to_pylist(), dtype=np.int64),
            domain_ids=np.array([domains.index(d) for d in table.column("domain").to_pylist()], dtype=np.int64),
            uids=np.array(table.column("uid").to_pylist()),
        )
    return PreparedData(splits=splits, domains=domains, labels=labels, key=meta["key"], directory=directory)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise MetaKDError(f"config key 'model.teacher': cannot load a tokenizer from {path!r} ({type(exc).__name__})") from None


def _write_split(path: Path, rows: list[dict], tokenizer, cfg: Config) -> None:
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows]
    has_pairs = any(pairs)
    enc = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=cfg.data.max_length)
    token_types = enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]]
    uids = [f"{r['domain']}/{hashlib.sha1((r['text'] + chr(9) + r['text_pair']).encode()).hexdigest()[:16]}" for r in rows]
    table = pa.table({
        "uid": uids,
        "domain": [r["domain"] for r in rows],
        "label": pa.array([r["label"] for r in rows], pa.int64()),
        "text": texts,
        "text_pair": pairs,
        "input_ids": pa.array(enc["input_ids"], pa.list_(pa.int32())),
        "token_type_ids": pa.array(token_types, pa.list_(pa.int8())),
    })
    pq.write_table(table, path)


def _cache_key(cfg: Config, files: list[Path], tokenizer_path: str) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + file_sha256(f).encode())
    if not files:
        h.update(cfg.data.path.encode())
    tok_dir = Path(tokenizer_path)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        if (tok_dir / name).is_file():
            h.update(file_sha256(tok_dir / name).encode())
    if not tok_dir.exists():
        h.update(tokenizer_path.encode())
    d = cfg.data
    settings = [d.format, d.domains, cfg.label_names, d.text_column, d.text_pair_column, d.label_column,
                d.domain_column, d.test_fraction, d.dev_fraction, d.split_seed, d.max_train_per_domain,
                d.max_dev_per_domain, d.max_test_per_domain, d.max_length]
    h.update(json.dumps(settings).encode())
    return h.hexdigest()[:16]


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
    overlap = len(uid_sets[0] & uid_sets[1]) + len(uid_sets[0] & uid_sets[2]) + len(uid_sets[1] & uid_sets[2])
    return {"domains": data.domains, "labels": data.labels, "cache_key": data.key,
            "counts": counts, "texts_in_two_splits": overlap}


def format_counts(summary: dict) -> str:
    labels = summary["labels"]
    header = f"{'domain':<14}{'split':<7}{'total':>7}" + "".join(f"{lab[:12]:>14}" for lab in labels)
    lines = [header, "-" * len(header)]
    for domain, per_split in summary["counts"].items():
        for name, per in per_split.items():
            lines.append(f"{domain:<14}{name:<7}{per['total']:>7}" + "".join(f"{per[lab]:>14}" for lab in labels))
    lines.append(f"texts in two splits: {summary['texts_in_two_splits']}")
    return "\n".join(lines)
