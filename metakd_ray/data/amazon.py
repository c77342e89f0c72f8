"""Blitzer et al. (2007) multi-domain Amazon reviews: ``<domain>/{positive,negative}.review``.

The files are pseudo-XML (unescaped ampersands, no root element), so the review texts are taken
with a regular expression and HTML-unescaped.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from metakd_ray.data.formats import DataFormat, read_text
from metakd_ray.errors import MetaKDError

LABELS = ("negative", "positive")
DOMAINS = ("books", "dvd", "electronics", "kitchen")
FILES = {"negative": "negative.review", "positive": "positive.review"}
_REVIEW_TEXT = re.compile(r"<review_text>(.*?)</review_text>", re.S)


def parse_review_file(path: Path) -> list[str]:
    """Texts of the ``<review_text>`` fields of one ``.review`` file."""
    raw = read_text(path)
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


def load(root: Path, data, labels: list[str]) -> tuple[list[dict], list[Path]]:
    if set(labels) != set(FILES):
        raise MetaKDError(f"config key 'data.labels': the amazon format has labels negative/positive, got {labels}")
    rows, files = [], []
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    for domain in data.domains:
        directory = root / domain
        if not directory.is_dir():
            raise MetaKDError(f"data: domain {domain!r} has no directory {directory} (found: {', '.join(available)})")
        for label, filename in FILES.items():
            path = directory / filename
            if not path.is_file():
                raise MetaKDError(f"data: file {path} not found (expected {', '.join(FILES.values())} per domain)")
            files.append(path)
            rows += [{"text": t, "text_pair": "", "label": labels.index(label), "domain": domain}
                     for t in parse_review_file(path)]
    return rows, files


FORMATS = (DataFormat("amazon", load, labels=LABELS, domains=DOMAINS),)
