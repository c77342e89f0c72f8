"""Derived files that travel between nodes and runs: the copy under ``ray.storage_path`` and what
happens when a cached file is damaged (an interrupted copy, a full disk)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metakd_ray.config import load_config
from metakd_ray.data.prepare import prepare
from metakd_ray.distill import domain_data, teacher_outputs_task
from metakd_ray.io import atomic_write_json
from metakd_ray.models import build_teacher, save_model
from metakd_ray.outputs import COMPLETE, Store, teacher_dir, teacher_outputs_path
from metakd_ray.prototypes import compute_prototype_scores
from metakd_ray.signals import TeacherSignals


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _stored_file(store_root, rel: str, name: str):
    """Where the current version of ``rel`` keeps ``name`` in a local store."""
    complete = json.loads((store_root / rel / COMPLETE).read_text())
    return store_root / rel / complete["version"] / name


def test_store_round_trip_and_a_damaged_copy_is_refused(tmp_path, capsys):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"x" * 1000)
    (src / "sub" / "b.json").write_text("{}")
    root = tmp_path / "storage" / "run"
    store = Store(str(root))
    store.put(src, "teachers/meta")
    files = json.loads((root / "teachers" / "meta" / COMPLETE).read_text())["files"]
    assert {k: v["size"] for k, v in files.items()} == {"a.bin": 1000, "sub/b.json": 2}
    assert files["a.bin"]["sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()
    assert store.get("teachers/meta", tmp_path / "copy")
    assert (tmp_path / "copy" / "a.bin").read_bytes() == b"x" * 1000 and not (tmp_path / "copy" / COMPLETE).exists()

    (src / "a.bin").write_bytes(b"y" * 1000)  # a second upload replaces the first, which is then deleted
    store.put(src, "teachers/meta")
    assert len([p for p in (root / "teachers" / "meta").iterdir() if p.is_dir()]) == 1
    assert store.get("teachers/meta", tmp_path / "copy") and (tmp_path / "copy" / "a.bin").read_bytes() == b"y" * 1000

    (tmp_path / "copy2").mkdir()
    (tmp_path / "copy2" / "keep").write_text("earlier result")
    stored = _stored_file(root, "teachers/meta", "a.bin")
    _truncate(stored)
    assert not store.get("teachers/meta", tmp_path / "copy2")
    assert "a.bin" in capsys.readouterr().out
    stored.write_bytes(b"y" * 999 + b"z")  # the same size, one byte flipped: caught by its sha256
    assert not store.get("teachers/meta", tmp_path / "copy2")
    assert "damaged (a.bin" in capsys.readouterr().out
    assert (tmp_path / "copy2" / "keep").read_text() == "earlier result"  # nothing replaced
    assert not store.get("teachers/missing", tmp_path / "copy3")

    store.put(tmp_path / "copy" / "a.bin", "results.json")  # a single file
    assert store.get("results.json", tmp_path / "r.json") and (tmp_path / "r.json").stat().st_size == 1000


def _slow_upload(root: str, src: str) -> None:
    """Upload ``src`` to ``root``, stalled after the new version's directory is made, before its files."""
    import time

    import pyarrow.fs as pafs

    store = Store(root)
    original = pafs.copy_files

    def crawling(*args, **kwargs):
        time.sleep(60)  # killed here: the new version is half there, _COMPLETE.json not rewritten
        return original(*args, **kwargs)

    pafs.copy_files = crawling
    store.put(Path(src), "students/meta_kd/books")


def test_an_upload_killed_midway_leaves_the_stored_copy_whole(tmp_path):
    """A node lost while it uploads a new copy: storage still holds the old one, whole, and a fresh
    node fetches it."""
    import multiprocessing
    import time

    root = tmp_path / "storage" / "run"
    old, new = tmp_path / "old", tmp_path / "new"
    for directory, fill in ((old, b"o"), (new, b"n")):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(fill * 100_000)
        (directory / "result.json").write_text(json.dumps({"key": fill.decode()}))
    Store(str(root)).put(old, "students/meta_kd/books")
    proc = multiprocessing.get_context("spawn").Process(target=_slow_upload, args=(str(root), str(new)))
    proc.start()
    deadline = time.time() + 120
    while time.time() < deadline and len(list((root / "students" / "meta_kd" / "books").glob("v-*"))) < 2:
        time.sleep(0.1)
    proc.kill()
    proc.join()
    assert len(list((root / "students" / "meta_kd" / "books").glob("v-*"))) == 2  # it had begun
    assert Store(str(root)).get("students/meta_kd/books", tmp_path / "fetched")
    assert json.loads((tmp_path / "fetched" / "result.json").read_text()) == {"key": "o"}
    assert (tmp_path / "fetched" / "model.safetensors").read_bytes() == b"o" * 100_000


def test_store_of_config_names_the_output_directory(tiny_config, tmp_path):
    cfg = load_config(str(tiny_config(ray={"storage_path": str(tmp_path / "st")})))
    assert Store.of(cfg).uri == f"{tmp_path / 'st'}/{cfg.out.name}"
    assert Store.of(load_config(str(tiny_config()))) is None


@pytest.mark.parametrize("damaged", ["test.arrow", "meta.json"])
def test_damaged_token_cache_is_rebuilt(tiny_config, capsys, damaged):
    cfg = load_config(str(tiny_config()))
    first = prepare(cfg, quiet=True)
    _truncate(first.directory / damaged)
    second = prepare(cfg)
    out = capsys.readouterr().out
    assert "damaged" in out and "rebuilding" in out and "[prepare] tokenized" in out
    assert (second.splits["test"].uids == first.splits["test"].uids).all()


def test_damaged_prototype_scores_are_rebuilt(tiny_config, capsys):
    from metakd_ray.prototypes import prototype_dir

    cfg = load_config(str(tiny_config()))
    data = prepare(cfg, quiet=True)
    first = compute_prototype_scores(cfg, data, quiet=True)
    _truncate(prototype_dir(cfg, data) / "scores.parquet")
    assert compute_prototype_scores(cfg, data, quiet=True) == pytest.approx(first)
    assert "damaged" in capsys.readouterr().out


def test_damaged_teacher_outputs_are_rebuilt_and_a_node_without_them_fetches_them(tiny_config, tmp_path, capsys):
    cfg = load_config(str(tiny_config(ray={"storage_path": str(tmp_path / "storage")})))
    data = prepare(cfg, quiet=True)
    scores = compute_prototype_scores(cfg, data, quiet=True)
    directory = teacher_dir(cfg, "meta")
    save_model(build_teacher(cfg.model.teacher, data.labels, data.domains), directory / "model", {"kind": "meta"})
    atomic_write_json(directory / "result.json", {"key": "k1"})
    dd = domain_data(cfg, data, "books", scores)
    path = teacher_outputs_path(cfg, data, "k1", "meta", "books", True)

    def logits():
        signals = TeacherSignals(path)
        try:
            return signals.soft(np.arange(len(signals)))["logits"]
        finally:
            signals.close()

    teacher_outputs_task(cfg, dd, "meta", "k1", str(path), True)
    good = logits()
    store_root = tmp_path / "storage" / cfg.out.name
    rel = path.relative_to(cfg.out).as_posix()
    assert (store_root / rel / COMPLETE).is_file()  # written to storage for the other nodes

    _truncate(path / "hidden.npy")
    teacher_outputs_task(cfg, dd, "meta", "k1", str(path), True)
    assert "damaged" in capsys.readouterr().out
    assert logits().equal(good)  # fetched back from storage

    shutil.rmtree(path)
    _truncate(_stored_file(store_root, rel, "soft.npy"))
    teacher_outputs_task(cfg, dd, "meta", "k1", str(path), True)  # storage copy damaged too
    assert "damaged" in capsys.readouterr().out
    assert logits().allclose(good)  # recomputed from the teacher


def test_a_damaged_checkpoint_is_passed_over_on_resume(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from metakd_ray.cluster import latest_checkpoint

    for step in (4, 8):
        directory = tmp_path / "run" / f"checkpoint_{step}"
        directory.mkdir(parents=True)
        save_file({"w": torch.zeros(100)}, directory / "model.safetensors")
        torch.save({"step": step}, directory / "training_state.pt")
        (directory / "state.json").write_text(json.dumps({"step": step, "best": {}}))
    assert latest_checkpoint(str(tmp_path), "run").name == "checkpoint_8"
    _truncate(tmp_path / "run" / "checkpoint_8" / "model.safetensors")
    assert latest_checkpoint(str(tmp_path), "run").name == "checkpoint_4"
    assert "damaged" in capsys.readouterr().out
    _truncate(tmp_path / "run" / "checkpoint_4" / "training_state.pt")
    assert latest_checkpoint(str(tmp_path), "run") is None


def test_report_is_copied_to_each_runs_storage(tmp_path):
    from test_report import fake_results

    from metakd_ray.report import build_report

    runs = [dict(fake_results("s", seed, {"meta_kd": [0.8, 0.9], "no_kd": [0.7, 0.8]}),
                 storage=str(tmp_path / "storage" / "run"), config=load_config("quickstart").to_dict())
            for seed in (0, 1)]
    build_report(runs, tmp_path / "report", log_to_mlflow=True)
    assert Store(str(tmp_path / "storage" / "run")).get("report", tmp_path / "fetched")
    assert (tmp_path / "fetched" / "report.md").read_text() == (tmp_path / "report" / "report.md").read_text()


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MB mounted for the test (root only; skipped where mounting is not allowed)."""
    import subprocess

    mounted = []

    def mount(megabytes: float) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(where)],
                              capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_during_a_teacher_pass_leaves_what_was_there(tiny_config, small_disk):
    """The pass with hidden states does not fit: it stops with ENOSPC, its half-written directory is
    gone and the soft-label pass written before it is whole."""
    import errno

    from metakd_ray.signals import signals_ready, teacher_pass

    cfg = load_config(str(tiny_config()))
    data = prepare(cfg, quiet=True)
    scores = compute_prototype_scores(cfg, data, quiet=True)
    teacher = build_teacher(cfg.model.teacher, data.labels, data.domains)
    dd = domain_data(cfg, data, "books", scores)
    disk = small_disk(1)
    teacher_pass(cfg, dd.rows(), dd.row_scores(), teacher, False, disk / "soft")
    with pytest.raises(OSError) as full:
        teacher_pass(cfg, dd.rows(), dd.row_scores(), teacher, True, disk / "hidden")
    assert full.value.errno == errno.ENOSPC
    assert sorted(p.name for p in disk.iterdir()) == ["soft"] and signals_ready(disk / "soft")


def test_a_full_disk_is_one_error_line_and_keeps_what_was_finished(tiny_config, small_disk, capsys):
    from metakd_ray.cli import main

    out = small_disk(0.06)
    (out / "results.json").write_text('{"earlier": true}')
    code = main(["prepare", str(tiny_config()), f"output_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: no space left on the device"), err
    assert (out / "results.json").read_text() == '{"earlier": true}'
    assert not [p for p in out.rglob("*.tmp")]  # no half-written file left behind


@pytest.mark.ray
def test_a_full_disk_during_a_checkpoint_stops_the_teacher_with_one_line(tiny_config, small_disk):
    """Ray Train's checkpoints (and the MLflow store) go to a disk too small for one: the teacher
    stops after its retries with one error line naming the cause, and what the run had written
    before is intact. A command of its own, as a user runs it."""
    from metakd_ray.cli import main

    out = small_disk(40)
    config = str(tiny_config(teacher={"max_failures": 0}))
    assert main(["prepare", config, f"output_dir={out}"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*.arrow")}
    teacher = subprocess.run([sys.executable, "-m", "metakd_ray.cli", "teacher", config, f"output_dir={out}"],
                             capture_output=True, text=True, env=dict(os.environ, RAY_ADDRESS=""), timeout=600)
    code, err = teacher.returncode, teacher.stderr.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: teacher meta: training stopped") and "No space left" in err[0], err
    assert all(p.read_bytes() == data for p, data in before.items())
    assert not (out / "teachers" / "meta" / "result.json").exists()


def test_a_damaged_general_student_or_teacher_directory_is_made_again(tmp_path, capsys):
    """A finished output whose weights are truncated (its result.json intact) no longer counts as
    finished: the stage that made it runs again instead of failing on the files later."""
    import torch
    from safetensors.torch import save_file

    from metakd_ray.outputs import finished

    directory = tmp_path / "general" / "k1"
    (directory / "encoder").mkdir(parents=True)
    save_file({"w": torch.zeros(1000)}, directory / "encoder" / "model.safetensors")
    atomic_write_json(directory / "result.json", {"key": "k1"})
    assert finished(directory, "k1") and not finished(directory, "k2")
    _truncate(directory / "encoder" / "model.safetensors")
    assert not finished(directory, "k1")
    assert "model.safetensors is damaged" in capsys.readouterr().out
