"""``metakd-ray data fetch amazon|mnli``: the public data sets from their original sources, checked,
put where the presets look (the data root: ``--to``, else ``$METAKD_DATA_ROOT``, else ``./data``).

    amazon  Blitzer et al. (2007), the labelled reviews of the paper's four domains, from the
            authors' ``domain_sentiment_data.tar.gz`` (``sorted_data_acl/``, about 30 MB)
            -> <root>/amazon-blitzer2007/{books,dvd,electronics,kitchen}/{positive,negative}.review
    mnli    MultiNLI (Williams et al. 2018) from the Hugging Face hub (``nyu-mll/multi_nli``)
            -> <root>/multinli/{train,validation_matched}.tsv (sentence1, sentence2, label, genre),
            read by the ``mnli`` preset with ``data.path=multinli``

``--url`` takes a mirror (any URL, or a local copy of the archive) or, for mnli, another hub id or
a local directory holding ``train`` and ``validation_matched`` files (.jsonl, .csv or .parquet).
Every file is checked as it lands: each review file must hold 1,000 well-formed reviews, each
MultiNLI row a premise, a hypothesis, a label and a genre. A review file's sha256 is compared with
the copy metakd-ray's committed results were measured on and a difference is named (the 2007
release circulates in copies that differ by a character). Nothing is replaced until everything is
downloaded and checked.
"""

from __future__ import annotations

import csv
import shutil
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from metakd_ray.config import default_data_root
from metakd_ray.errors import MetaKDError
from metakd_ray.io import atomic_dir, file_sha256

AMAZON_URL = "https://www.cs.jhu.edu/~mdredze/datasets/sentiment/domain_sentiment_data.tar.gz"
AMAZON_DIRS = {"books": "books", "dvd": "dvd", "electronics": "electronics", "kitchen": "kitchen_&_housewares"}
AMAZON_REVIEWS = 1000  # per file: the release balances 1,000 positive and 1,000 negative reviews per domain
# sha256 of the copy the committed results were measured on (sorted_data_acl; see docs/fidelity.md)
AMAZON_SHA256 = {
    "books/positive.review": "54197da7a8392c3eb5bbd1c0da78df598b4f9e3ea1bd6a92e81ebadf685a5dcb",
    "books/negative.review": "920c12acf9406150e9e72b84910944749db7445a2ff1768dbb4264cafd63bba7",
    "dvd/positive.review": "a642f1b2a796d981dbaeec617ebb5bb449dc2b28dba80abd89019006ec070448",
    "dvd/negative.review": "16ecee2f4987d747ae7e06d3a58da800c117af6e60e90350bc7a12c1b268e989",
    "electronics/positive.review": "8a78aeb24363b66a9f1474ab5b5c9df540bbf4f0ed997a9b52ed44f439860fc7",
    "electronics/negative.review": "6919edfd6a57b0fd290d5857d375cb79a84eb4e40a2b0b5acb62804559649fcf",
    "kitchen/positive.review": "7c9a13674f4db08a7a61aa8939f905de29af80417751dc7acb78a9d98eecc040",
    "kitchen/negative.review": "1e90b10a72361859b47fec0203cacf89cb6bb6e01432bece326ebaacc246b41e",
}
MNLI_HUB = "nyu-mll/multi_nli"
MNLI_SPLITS = ("train", "validation_matched")


def fetch(dataset: str, to: str | None = None, url: str | None = None) -> Path:
    root = Path(to).expanduser() if to else default_data_root()
    target = amazon(root, url or AMAZON_URL) if dataset == "amazon" else mnli(root, url or MNLI_HUB)
    print(f"[data] {dataset} is in {target}")
    return target


# --------------------------------------------------------------------------- amazon


def amazon(root: Path, source: str) -> Path:
    from metakd_ray.data.amazon import parse_review_file

    target = root / "amazon-blitzer2007"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        archive = download(source, Path(tmp) / "archive.tar.gz")
        with atomic_dir(target) as out:
            try:
                tar = tarfile.open(archive)
            except (tarfile.TarError, OSError) as exc:
                raise MetaKDError(f"data fetch amazon: {source} is not a tar archive ({exc})") from None
            with tar:
                members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
                for domain, original in AMAZON_DIRS.items():
                    for label in ("positive", "negative"):
                        rel = f"{domain}/{label}.review"
                        member = members.get(f"sorted_data_acl/{original}/{label}.review")
                        if member is None:
                            raise MetaKDError(f"data fetch amazon: {source} has no sorted_data_acl/{original}/"
                                              f"{label}.review (expected the authors' domain_sentiment_data.tar.gz)")
                        (out / domain).mkdir(exist_ok=True)
                        with tar.extractfile(member) as fh, open(out / rel, "wb") as dest:
                            shutil.copyfileobj(fh, dest)
                        reviews = len(parse_review_file(out / rel))
                        if reviews != AMAZON_REVIEWS:
                            raise MetaKDError(f"data fetch amazon: {rel} holds {reviews} reviews, expected "
                                              f"{AMAZON_REVIEWS}")
                        digest = file_sha256(out / rel)
                        same = digest == AMAZON_SHA256[rel]
                        print(f"[data] {rel}: {reviews} reviews, sha256 {digest[:12]}"
                              + (" (the copy the committed results used)" if same else
                                 f" (differs from the copy the committed results used, {AMAZON_SHA256[rel][:12]})"),
                              flush=True)
    return target


# --------------------------------------------------------------------------- mnli


def mnli(root: Path, source: str) -> Path:
    import datasets

    target = root / "multinli"
    local = Path(source).expanduser()
    try:
        if local.is_dir():
            files = {split: next(iter(sorted(local.glob(f"{split}.*"))), None) for split in MNLI_SPLITS}
            missing = [s for s, f in files.items() if f is None]
            if missing:
                raise MetaKDError(f"data fetch mnli: {local} has no {', '.join(missing)} file "
                                  "(expected train.* and validation_matched.*, .jsonl/.csv/.parquet)")
            kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
            suffix = files["train"].suffix
            if suffix not in kind:
                raise MetaKDError(f"data fetch mnli: {files['train']} has unknown type {suffix!r}")
            loaded = datasets.load_dataset(kind[suffix], data_files={s: str(f) for s, f in files.items()})
        else:
            loaded = datasets.load_dataset(source)
    except MetaKDError:
        raise
    except Exception as exc:  # network, hub and format errors come in many types
        raise MetaKDError(f"data fetch mnli: cannot load {source!r} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None
    from metakd_ray.data.mnli import LABELS

    root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as out:
        for split in MNLI_SPLITS:
            if split not in loaded:
                raise MetaKDError(f"data fetch mnli: {source!r} has no {split!r} split (found: {', '.join(loaded)})")
            rows = 0
            with open(out / f"{split}.tsv", "w", encoding="utf-8", newline="") as fh:
                writer = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None, quotechar=None)
                writer.writerow(["sentence1", "sentence2", "label", "genre"])
                for number, ex in enumerate(loaded[split], start=1):
                    try:
                        premise, hypothesis, label, genre = (ex["premise"], ex["hypothesis"], ex["label"], ex["genre"])
                    except KeyError as exc:
                        raise MetaKDError(f"data fetch mnli: {split} row {number} has no {exc} field") from None
                    if label is None or not 0 <= int(label) < len(LABELS):
                        continue  # no gold label (-1 in the release)
                    if not (premise or "").strip() or not (hypothesis or "").strip():
                        raise MetaKDError(f"data fetch mnli: {split} row {number}: empty premise or hypothesis")
                    writer.writerow([_one_line(premise), _one_line(hypothesis), LABELS[int(label)], genre])
                    rows += 1
            print(f"[data] {split}.tsv: {rows} labelled pairs", flush=True)
    return target


def _one_line(text: str) -> str:
    """A TSV cell: tabs and line breaks become spaces (the loader reads with QUOTE_NONE)."""
    return " ".join(text.replace("\t", " ").split())


# --------------------------------------------------------------------------- download


def download(source: str, path: Path) -> Path:
    """``source`` (a URL, ``file://`` URL or local path) to ``path``, with a progress line every 10 %."""
    local = Path(source).expanduser()
    if "://" not in source:
        if not local.is_file():
            raise MetaKDError(f"data fetch: {source} not found (give a URL or a local copy of the archive)")
        shutil.copyfile(local, path)
        return path
    try:
        with urllib.request.urlopen(source, timeout=60) as response, open(path, "wb") as fh:
            total = int(response.headers.get("Content-Length") or 0)
            done, shown, started = 0, 0, time.time()
            while chunk := response.read(1 << 20):
                fh.write(chunk)
                done += len(chunk)
                if total and done * 10 // total > shown:
                    shown = done * 10 // total
                    print(f"[data] {done / 1e6:.1f} of {total / 1e6:.1f} MB ({time.time() - started:.0f}s)", flush=True)
    except OSError as exc:  # URLError, HTTPError and timeouts are OSErrors
        raise MetaKDError(f"data fetch: cannot download {source} ({exc}); pass --url with a mirror or a local "
                          "copy") from None
    return path

