"""MultiNLI with its genres as domains: local TSV files (``mnli_tsv``) or the hub (``mnli_hub``).

Rows sharing a premise are kept in one split (``group_by_text``): MNLI pairs one premise with
several hypotheses, and a premise in two splits would leak.
"""

from __future__ import annotations

import csv
from pathlib import Path

from metakd_ray.data.formats import DataFormat, labelled_row, read_text, select_domains
from metakd_ray.errors import MetaKDError

LABELS = ("entailment", "neutral", "contradiction")
GENRES = ("fiction", "government", "slate", "telephone", "travel")
HUB_DEFAULT = "nyu-mll/multi_nli"


def load_tsv(root: Path, data, labels: list[str]) -> tuple[list[dict], list[Path]]:
    files = sorted(root.glob("*.tsv")) if root.is_dir() else [root]
    if not files:
        raise MetaKDError(f"data: no .tsv files in {root} (expected sentence1/sentence2/label/genre TSVs)")
    rows = []
    for path in files:
        lines = read_text(path).splitlines()
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        needed = ("sentence1", "sentence2", "label", "genre")
        if not header or any(c not in header for c in needed):
            raise MetaKDError(f"file {path}: missing column(s) {[c for c in needed if c not in (header or [])]} "
                              f"(expected header {' '.join(needed)})")
        col = {c: header.index(c) for c in needed}
        for number, fields in enumerate(reader, start=2):
            if len(fields) != len(header):
                raise MetaKDError(f"file {path} line {number}: expected {len(header)} tab-separated fields, "
                                  f"got {len(fields)}")
            rows.append(labelled_row(fields[col["sentence1"]], fields[col["sentence2"]], fields[col["label"]],
                                     fields[col["genre"]], labels, f"file {path} line {number}"))
    return select_domains(rows, data.domains, root), files


def load_hub(root: Path, data, labels: list[str]) -> tuple[list[dict], list[Path]]:
    """MNLI from the Hugging Face hub (``data.path`` = dataset id, default nyu-mll/multi_nli)."""
    import datasets

    name = data.path or HUB_DEFAULT
    try:
        ds = datasets.load_dataset(name)
    except Exception as exc:  # network, auth and format errors all surface here
        raise MetaKDError(f"data: cannot load {name!r} from the hub ({type(exc).__name__}: {exc}); "
                          "use data.format=mnli_tsv with a local copy when offline") from None
    rows = []
    for split in ("train", "validation_matched"):
        for ex in ds[split]:
            if ex["label"] < 0:
                continue  # no gold label
            rows.append(labelled_row(ex["premise"], ex["hypothesis"], LABELS[ex["label"]], ex["genre"],
                                     labels, f"hub {name}/{split}"))
    return select_domains(rows, data.domains, Path(name)), []


FORMATS = (DataFormat("mnli_tsv", load_tsv, labels=LABELS, domains=GENRES, group_by_text=True),
           DataFormat("mnli_hub", load_hub, labels=LABELS, domains=GENRES, group_by_text=True, local=False))
