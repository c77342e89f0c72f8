"""Where every output lives: the output directory's layout, and its copy under ``ray.storage_path``.

    <output_dir>/general/<key>/{encoder/, fit.safetensors, result.json}   general-distilled student
    <output_dir>/teachers/<name>/{model/, result.json}            name: meta, mix, single-<domain>
    <output_dir>/teacher_outputs/<name>/<domain>-<key>/{soft.npy, hidden.npy, offsets.npy, meta.json}
    <output_dir>/students/<method>/<domain>/{model/, result.json}
    <output_dir>/results.json

The driver writes ``output_dir`` on its own node. With ``ray.storage_path`` set (a directory every
node mounts, or ``s3://``/``gs://`` through pyarrow.fs), the same files are also written to
``<storage_path>/<output_dir name>/`` as soon as they are final: tasks on other nodes read the
teachers and teacher outputs from there, and a job submitted to a cluster leaves its results where
the user can fetch them. A directory in storage is uploaded as a new version beside the current one and counts only once its
``_COMPLETE.json`` (written last, naming the version and every file's size and sha256) points at
it; a download is checked against it, byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from metakd_ray.config import Config
from metakd_ray.io import atomic_dir, atomic_file, content_key, file_sha256, read_json, safetensors_whole

COMPLETE = "_COMPLETE.json"
SIGNALS_FORMAT = "signals-1"  # part of a teacher pass's key: a pass in an older layout is made again


def teacher_dir(cfg: Config, name: str) -> Path:
    return cfg.out / "teachers" / name


def teacher_finished(directory: Path, key: str) -> bool:
    """A teacher directory holds the finished teacher of ``key``: its result names the key and its model is there."""
    return finished(directory, key) and (directory / "model").is_dir()


def finished(directory: Path, key: str) -> bool:
    """``directory`` holds a finished output of ``key``: its ``result.json`` (written last) names the
    key and every weights file in it is whole. A damaged one is reported (and made again)."""
    done = read_json(directory / "result.json")
    if not (done and done.get("key") == key):
        return False
    damaged = [p for p in Path(directory).rglob("*.safetensors") if not safetensors_whole(p)]
    if damaged:
        print(f"[cache] {damaged[0]} is damaged (truncated or not safetensors); rebuilding {directory}", flush=True)
    return not damaged


def fetch(cfg: Config, rel: str, key: str) -> Path | None:
    """The finished output ``<output_dir>/<rel>`` of ``key`` on this node: the driver's copy when
    this node sees it, else a copy fetched from ``ray.storage_path`` into a node-local cache;
    None when neither has it."""
    local = cfg.out / rel
    if finished(local, key):
        return local
    store = Store.of(cfg)
    name = rel.replace("/", "-")
    cache = node_cache(name if name.endswith(key) else f"{name}-{key}")  # one copy per key
    if finished(cache, key) or (store and store.get(rel, cache) and finished(cache, key)):
        return cache
    return None


def student_dir(cfg: Config, method: str, domain: str) -> Path:
    return cfg.out / "students" / method / domain


def teacher_outputs_path(cfg: Config, data, teacher_key: str, teacher_name: str, domain: str,
                         internals: bool) -> Path:
    """The directory of one teacher pass over one domain's student rows (``metakd_ray.signals``);
    ``internals``: with its hidden states."""
    key = content_key(teacher_key, domain, cfg.data.target_fraction, cfg.layer_map, internals, data.transfer_key,
                      SIGNALS_FORMAT)
    return cfg.out / "teacher_outputs" / teacher_name / f"{domain}-{key}"


DERIVED = (("cache", "token cache, transfer set and prototype scores"),
           ("teacher_outputs", "the teachers' passes: soft labels (and hidden states with teacher_signals cache)"),
           ("ray", "Ray Train checkpoints: only an unfinished teacher resumes from them"),
           ("general", "general-distilled students (trained again when missing)"))
MODELS = (("teachers", "the trained teachers (MLflow keeps its copy in mlartifacts/)"),
          ("students", "the trained students (MLflow keeps its copy in mlartifacts/)"))


def derived_outputs(out: Path, models: bool = False) -> list[tuple[Path, int, str]]:
    """What ``metakd-ray clean`` may delete in the output directory ``out``: (path, bytes that
    deleting it frees, what it is). Derived caches, which a later run rebuilds, and with ``models``
    the teachers and students; never results.json, the MLflow store or sweeps."""
    found = []
    for name, what in DERIVED + (MODELS if models else ()):
        path = Path(out) / name
        if path.exists():
            files = [f.lstat() for f in path.rglob("*") if f.is_file()]
            found.append((path, sum(st.st_blocks * 512 for st in files if st.st_nlink == 1), what))
    return found


def remove_outputs(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def node_cache(*parts: str) -> Path:
    """A node-local directory for copies fetched from storage (outside any output directory)."""
    path = Path(tempfile.gettempdir(), "metakd-ray", *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class _Damaged(Exception):
    pass


class Store:
    """The copy of one output directory under ``ray.storage_path``; paths are relative to it."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        self.uri = uri.rstrip("/")
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)

    @classmethod
    def of(cls, cfg: Config) -> "Store | None":
        """The store of ``cfg``'s output directory, or None when ``ray.storage_path`` is unset."""
        if not cfg.ray.storage_path:
            return None
        return cls(f"{cfg.ray.storage_path.rstrip('/')}/{cfg.out.name}")

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def put(self, local: Path, rel: str) -> None:
        """Upload a file or a directory to ``rel``, replacing what was there.

        A directory goes to a new version beside the current one (``rel/v-<id>/``); only then does
        ``rel/_COMPLETE.json`` (one write, atomic on object stores too) name it, with every file's
        size and sha256; the old version is deleted last. Whenever the upload stops, storage still
        holds a whole, current copy."""
        import pyarrow.fs as pafs

        local = Path(local)
        target = self._path(rel)
        if local.is_file():
            self._write(target, local.read_bytes())
            return
        version = f"v-{uuid.uuid4().hex[:12]}"
        files = {path.relative_to(local).as_posix(): {"size": path.stat().st_size, "sha256": file_sha256(path)}
                 for path in sorted(p for p in local.rglob("*") if p.is_file())}
        self.fs.create_dir(f"{target}/{version}", recursive=True)
        pafs.copy_files(str(local), f"{target}/{version}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        self._write(f"{target}/{COMPLETE}", json.dumps({"version": version, "files": files}).encode())
        for old in self.fs.get_file_info(pafs.FileSelector(target)):
            if old.type == pafs.FileType.Directory and old.base_name.startswith("v-") and old.base_name != version:
                self.fs.delete_dir(old.path)

    def get(self, rel: str, local: Path) -> bool:
        """Download ``rel`` to ``local`` (replacing it). False when it is absent, incomplete or
        damaged: a file whose size or sha256 differs from ``_COMPLETE.json`` is named and nothing
        at ``local`` changes."""
        import pyarrow.fs as pafs

        source = self._path(rel)
        info = self.fs.get_file_info(source)
        if info.type == pafs.FileType.File:
            data = self._read(source)
            with atomic_file(local) as tmp:
                tmp.write_bytes(data)
            return True
        if info.type != pafs.FileType.Directory:
            return False
        try:
            complete = json.loads(self._read(f"{source}/{COMPLETE}"))
            version, files = complete["version"], complete["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        try:
            with atomic_dir(local) as tmp:
                pafs.copy_files(f"{source}/{version}", str(tmp), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
                got = {p.relative_to(tmp).as_posix(): p for p in tmp.rglob("*") if p.is_file()}
                bad = sorted(set(got) ^ set(files)) or [name for name, want in files.items()
                                                        if got[name].stat().st_size != want["size"]
                                                        or file_sha256(got[name]) != want["sha256"]]
                if bad:
                    raise _Damaged(bad)
        except (_Damaged, OSError) as exc:  # atomic_dir has left ``local`` as it was
            what = ", ".join(exc.args[0][:3]) if isinstance(exc, _Damaged) else str(exc).splitlines()[0][:120]
            print(f"[storage] {self.uri}/{rel} is damaged ({what} differ from {COMPLETE}); not used", flush=True)
            return False
        return True

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as fh:
            return fh.read()

    def _write(self, path: str, data: bytes) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as fh:
            fh.write(data)
        self.fs.move(tmp, path)  # a rename locally; one copy on object stores (where a PUT is atomic)

    def _delete(self, path: str) -> None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)
