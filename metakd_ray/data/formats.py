"""What a data format is, and the row checks every format shares.

Every loader returns the same rows: ``text``, ``text_pair`` ("" for single sentences), ``label``
(class id into the label set) and ``domain``, plus the files they came from (for the cache key).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from metakd_ray.errors import MetaKDError


@dataclass(frozen=True)
class DataFormat:
    name: str
    # load(path, data_config, labels) -> (rows, files); path = data.root / data.path
    load: Callable[..., tuple[list[dict], list[Path]]]
    labels: tuple[str, ...] = ()  # the format's own label set; () = data.labels must be given
    domains: tuple[str, ...] = ()  # the domains the format knows; () = any
    group_by_text: bool = False  # keep rows sharing a text (an MNLI premise) in one split
    local: bool = True  # reads local files (False: downloads from the hub)


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MetaKDError(f"file {path}: not valid UTF-8 at byte {exc.start}") from None


def labelled_row(text: str, pair: str, label: str, domain: str, labels: list[str], where: str) -> dict:
    if label not in labels:
        raise MetaKDError(f"{where}: label {label!r} is not in the label set {labels} (config key data.labels)")
    if not text.strip():
        raise MetaKDError(f"{where}: empty text")
    return {"text": text.strip(), "text_pair": pair.strip(), "label": labels.index(label), "domain": domain}


def select_domains(rows: list[dict], domains: list[str], source: Path) -> list[dict]:
    found = sorted({r["domain"] for r in rows})
    for domain in domains:
        if domain not in found:
            raise MetaKDError(f"data: domain {domain!r} has no rows in {source} (found: {', '.join(found)})")
    wanted = set(domains)
    return [r for r in rows if r["domain"] in wanted]
