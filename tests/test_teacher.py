"""The meta-teacher on a real local Ray: MLflow runs, resume, and a killed worker mid-training."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import kill_when, registered_checkpoint
from mlflow import MlflowClient

from metakd_ray.config import load_config
from metakd_ray.data.prepare import prepare
from metakd_ray.pipeline import run_pipeline
from metakd_ray.prototypes import compute_prototype_scores
from metakd_ray.teacher import teacher_key, train_teacher
from metakd_ray.tracking import pipeline_run, tracking_uri

pytestmark = pytest.mark.ray


def _history(cfg, run_id, metric):
    client = MlflowClient(tracking_uri(cfg))
    return sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.timestamp, m.step))


def test_teacher_trains_logs_to_mlflow_and_skips_when_done(ray_local, tiny_config, capsys):
    cfg = load_config(str(tiny_config()))
    out = run_pipeline(cfg, ["meta_kd"], teachers_only=True)
    summary = out["teachers"]["meta"]
    assert set(summary["per_domain"]) == {"books", "kitchen"}
    assert 0.0 <= summary["dev_mean_acc"] <= 1.0
    assert (cfg.out / "teachers" / "meta" / "model" / "model.safetensors").is_file()

    client = MlflowClient(tracking_uri(cfg))
    run = client.get_run(summary["run_id"])
    assert run.data.tags["metakd.stage"] == "teacher"
    assert run.data.tags["metakd.config_hash"] == cfg.hash()
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["metakd.stage"] == "pipeline"
    assert "teacher.domain_loss_weight" in run.data.params
    val_acc = {m.step: m.value for m in _history(cfg, run.info.run_id, "val/acc")}
    assert sorted(val_acc) == [4, 8, 12]  # 96 examples / batch 8 = 12 steps, eval every 4
    # the 2 workers scored half the dev set each; together that is the kept teacher's whole-dev accuracy
    assert val_acc[summary["best_step"]] == pytest.approx(summary["dev_mean_acc"])
    assert "val/books/acc" in run.data.metrics and "train/samples_per_s" in run.data.metrics
    assert run.outputs.model_outputs  # the teacher is a logged model of its run
    files = [a.path for a in client.list_logged_model_artifacts(run.outputs.model_outputs[0].model_id, "artifacts")]
    assert "artifacts/model" in files, files
    assert (cfg.out / "teachers" / "meta" / "model" / "README.md").is_file()

    # Same command again: nothing to do, the same result, no new MLflow run.
    capsys.readouterr()
    again = run_pipeline(cfg, ["meta_kd"], teachers_only=True)
    assert "already trained" in capsys.readouterr().out
    assert again["teachers"]["meta"] == summary
    runs = client.search_runs([run.info.experiment_id], "tags.`metakd.stage` = 'teacher'")
    assert len(runs) == 1


@pytest.mark.slow  # the default run covers this on two nodes: test_job_survives_losing_a_node_during_teacher_training
def test_killed_worker_resumes_from_checkpoint(ray_local, tiny_config):
    from ray.util.state import list_actors

    cfg = load_config(str(tiny_config(teacher={"epochs": 3, "eval_every": 4, "max_failures": 2})))
    data = prepare(cfg, quiet=True)
    scores = compute_prototype_scores(cfg, data, quiet=True)
    parent = pipeline_run(cfg)
    storage = cfg.out / "ray" / f"teacher-meta-{teacher_key(cfg, data, 'meta')}"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(r=train_teacher(cfg, data, scores, "meta", parent=parent)))
    thread.start()
    try:
        # Wait for a checkpoint at step >= 8, then kill one training worker process.
        deadline = time.time() + 240
        while time.time() < deadline and not registered_checkpoint(storage.name, storage.parent):
            time.sleep(0.2)
        assert registered_checkpoint(storage.name, storage.parent), "no checkpoint was registered"
        workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
        assert len(workers) == 2  # this run's two workers
        killed = workers[-1]
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        thread.join(timeout=600)
    assert "r" in outcome, "training did not finish after the worker was killed"
    total_steps = 3 * 12
    steps = [m.step for m in _history(cfg, outcome["r"]["run_id"], "val/acc")]
    assert steps[-1] == total_steps
    assert steps.count(4) == 1, f"training restarted from scratch: {steps}"
    assert sorted(set(steps)) == list(range(4, total_steps + 1, 4))
    # the worker this test killed died, and a new group finished the run
    assert list_actors(filters=[("actor_id", "=", killed.actor_id)])[0].state == "DEAD"


def test_interrupted_teacher_run_resumes_on_rerun(tiny_config, tmp_path):
    """Kill the whole driver mid-training and damage its latest checkpoint (the kill could have cut it
    short): the same command passes it over and continues from the one before."""
    import json

    config = tiny_config(teacher={"epochs": 2, "eval_every": 4, "num_to_keep": 3})
    cfg = load_config(str(config))
    env = dict(os.environ, RAY_ADDRESS="")
    cmd = [sys.executable, "-m", "metakd_ray.cli", "teacher", str(config)]
    log = tmp_path / "first.log"

    def checkpoints():
        found = []
        for d in (cfg.out / "ray").glob("teacher-meta-*/checkpoint_*"):
            state = d / "state.json"
            if state.is_file() and (d / "training_state.pt").is_file():
                try:
                    found.append((json.loads(state.read_text())["step"], d))
                except ValueError:
                    pass
        return sorted(found)

    kill_when(cmd, log, lambda: len(checkpoints()) >= 2 and registered_checkpoint("teacher-meta-*", cfg.out / "ray"),
              timeout=300)
    found = checkpoints()
    assert len(found) >= 2, log.read_text()[-3000:]
    assert not (cfg.out / "teachers" / "meta" / "result.json").exists()
    (earlier, _), (_, latest) = found[-2], found[-1]
    data = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(data[: len(data) // 2])
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    text = second.stdout + second.stderr
    assert "passing it over" in text and f"resumed at step {earlier}/" in text, text[-3000:]
    assert (cfg.out / "teachers" / "meta" / "result.json").is_file()
