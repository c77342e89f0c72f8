"""Multi-domain text-classification data: one module per file format, and ``prepare``.

Each format module (``amazon``, ``mnli``, ``table``) owns its parser, its label set and its
known domains, and registers a ``DataFormat`` here; ``prepare`` (dedupe, split, tokenize, cache)
works on the rows they produce. Adding a format is adding a module and one line below.
"""

from metakd_ray.data import amazon, mnli, table
from metakd_ray.data.formats import DataFormat

FORMATS: dict[str, DataFormat] = {f.name: f for f in (*amazon.FORMATS, *mnli.FORMATS, *table.FORMATS)}

__all__ = ["FORMATS", "DataFormat"]
