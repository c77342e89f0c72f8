"""Derived files that travel between nodes and runs: the copy under ``ray.storage_path`` and what
happens when a cached file is damaged (an interrupted copy, a full disk)."""

import json
import shutil

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


def test_store_round_trip_and_a_damaged_copy_is_refused(tmp_path, capsys):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"x" * 1000)
    (src / "sub" / "b.json").write_text("{}")
    store = Store(str(tmp_path / "storage" / "run"))
    store.put(src, "teachers/meta")
    assert json.loads((tmp_path / "storage" / "run" / "teachers" / "meta" / COMPLETE).read_text()) == {
        "a.bin": 1000, "sub/b.json": 2}
    assert store.get("teachers/meta", tmp_path / "copy")
    assert (tmp_path / "copy" / "a.bin").read_bytes() == b"x" * 1000 and not (tmp_path / "copy" / COMPLETE).exists()

    _truncate(tmp_path / "storage" / "run" / "teachers" / "meta" / "a.bin")
    (tmp_path / "copy2").mkdir()
    (tmp_path / "copy2" / "keep").write_text("earlier result")
    assert not store.get("teachers/meta", tmp_path / "copy2")
    assert (tmp_path / "copy2" / "keep").read_text() == "earlier result"  # nothing replaced
    assert "damaged" in capsys.readouterr().out
    assert not store.get("teachers/missing", tmp_path / "copy3")

    store.put(tmp_path / "copy" / "a.bin", "results.json")  # a single file
    assert store.get("results.json", tmp_path / "r.json") and (tmp_path / "r.json").stat().st_size == 1000


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
    stored = tmp_path / "storage" / cfg.out.name / path.relative_to(cfg.out)
    assert (stored / COMPLETE).is_file()  # written to storage for the other nodes

    _truncate(path / "hidden.npy")
    teacher_outputs_task(cfg, dd, "meta", "k1", str(path), True)
    assert "damaged" in capsys.readouterr().out
    assert logits().equal(good)  # fetched back from storage

    shutil.rmtree(path)
    _truncate(stored / "soft.npy")
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
    stored = tmp_path / "storage" / "run" / "report"
    assert (stored / "report.md").read_text() == (tmp_path / "report" / "report.md").read_text()
    assert (stored / COMPLETE).is_file()
