"""Ray Tune + Optuna sweeps: space validation, a real small sweep with ASHA, MLflow, and resume."""

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from conftest import kill_when
import yaml
from mlflow import MlflowClient

from metakd_ray.cli import main
from metakd_ray.config import load_config
from metakd_ray.errors import MetaKDError
from metakd_ray.tune import load_space

REPO = Path(__file__).resolve().parents[1]

SMALL_SPACE = {"target": "distill", "params": {
    "distill.domain_weight": {"type": "uniform", "low": 0.0, "high": 1.0},
    "distill.temperature": {"type": "loguniform", "low": 0.2, "high": 2.0},
    "distill.hard_label_weight": {"type": "choice", "values": [0.0, 1.0]},
}}


def write_space(tmp_path, space, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(space))
    return str(path)


@pytest.mark.parametrize("space_file", sorted((REPO / "tune_spaces").glob("*.yaml")))
def test_shipped_spaces_load(space_file):
    from metakd_ray.config import with_overrides

    base = load_config("quickstart")
    space = load_space(str(space_file), base)
    distributions = space.optuna()
    assert space.params and set(distributions) == set(space.params)
    for key, dist in distributions.items():  # every end of every range is a valid config that takes it
        for value in dist.choices if hasattr(dist, "choices") else (dist.low, dist.high):
            section, name = key.split(".")
            assert getattr(getattr(with_overrides(base, {key: value}), section), name) == pytest.approx(value), key
    assert space_file.read_text().startswith("#")  # the header says what it searches and how to run it


@pytest.mark.parametrize("params, needle", [
    ({"distill.temperature": {"type": "normal", "low": 0, "high": 1}}, "type: uniform"),
    ({"distill.temperature": {"type": "uniform", "low": 2.0, "high": 1.0}}, "must be below"),
    ({"distill.temperature": {"type": "loguniform", "low": 0.0, "high": 1.0}}, "low > 0"),
    ({"distill.temperature": {"type": "uniform", "low": 0.0, "high": 1.0}}, "invalid config"),
    ({"distill.temprature": {"type": "uniform", "low": 0.1, "high": 1.0}}, "unknown"),
    ({"teacher.lr": {"type": "uniform", "low": 0.1, "high": 1.0}}, "a distill sweep searches only"),
    ({"distill.hard_label_weight": {"type": "choice", "values": []}}, "non-empty"),
    ({"model.student_layers": {"type": "int", "low": 1, "high": 2.5}}, "numeric"),
])
def test_bad_spaces_are_rejected_with_the_param_named(tmp_path, params, needle):
    path = write_space(tmp_path, {"target": "distill", "params": params})
    with pytest.raises(MetaKDError) as err:
        load_space(path, load_config("quickstart"))
    assert needle in str(err.value) and "space.yaml" in str(err.value)


def test_bad_space_through_the_cli(tmp_path, capsys):
    path = write_space(tmp_path, {"target": "students", "params": {}})
    assert main(["sweep", "quickstart", "--space", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: search space") and "target must be one of" in err


@pytest.mark.ray
def test_small_sweep_with_asha_writes_best_config_and_mlflow(ray_local, tiny_config, tmp_path):
    from metakd_ray.tune import sweep

    cfg = load_config(str(tiny_config(distill={"cpus_per_task": 1})))
    out = sweep(cfg, write_space(tmp_path, SMALL_SPACE), trials=4, concurrency=2, name="smoke")
    sweep_dir = Path(out["dir"])
    assert len(out["trials"]) == 4
    # the best config is a ready-to-use YAML with the best trial's values
    best = load_config(str(sweep_dir / "best.yaml"))
    assert best.distill.domain_weight == pytest.approx(out["best"]["distill.domain_weight"])
    assert (sweep_dir / "trials.csv").read_text().count("\n") == 5
    assert (sweep_dir / "plots" / "history.png").is_file()
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert len(study.trials) == 4
    # ASHA's time axis is ours: at most 2 domains per trial
    assert all(1 <= t["domains_done"] <= 2 for t in out["trials"])

    client = MlflowClient(f"sqlite:///{cfg.out / 'mlflow.db'}")
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.tags["metakd.stage"] == "sweep"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    assert sum(c.data.tags.get("metakd.best") == "true" for c in children) == 1
    assert all("distill.temperature" in c.data.params for c in children)
    assert any(a.path == "best.yaml" for a in client.list_artifacts(parent.info.run_id))


def test_killed_sweep_resumes_without_rerunning_finished_trials(tiny_config, tmp_path):
    config = tiny_config(distill={"cpus_per_task": 2})  # one trial at a time
    cfg = load_config(str(config))
    space = write_space(tmp_path, SMALL_SPACE)
    cmd = [sys.executable, "-m", "metakd_ray.cli", "sweep", str(config), "--space", space, "--trials", "2",
           "--concurrency", "1", "--name", "resumable", "--no-asha"]
    env = dict(os.environ, RAY_ADDRESS="")
    storage = f"sqlite:///{cfg.out / 'sweeps' / 'resumable' / 'optuna.db'}"

    def finished_trials():
        try:
            study = optuna.load_study(study_name="resumable", storage=storage)
        except Exception:
            return []
        return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    log = tmp_path / "first.log"
    kill_when(cmd, log, lambda: len(finished_trials()) >= 1, timeout=500, poll=1)
    before = finished_trials()
    assert len(before) == 1, log.read_text()[-3000:]  # killed with one trial done and one still to run
    client = MlflowClient(f"sqlite:///{cfg.out / 'mlflow.db'}")
    done_runs = {r.info.run_id: r.info.end_time for r in client.search_runs(
        [client.get_experiment_by_name("metakd-ray").experiment_id],
        "tags.`metakd.stage` = 'trial' and attributes.status = 'FINISHED'")}
    assert len(done_runs) >= 1

    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    trials = list(csv_rows(cfg.out / "sweeps" / "resumable" / "trials.csv"))
    assert len(trials) == 2 and len(finished_trials()) == 2  # the resumed sweep ran the one left
    for run_id, end_time in done_runs.items():
        assert client.get_run(run_id).info.end_time == end_time, "a finished trial was re-run"


def csv_rows(path):
    import csv

    with open(path) as fh:
        yield from csv.DictReader(fh)


@pytest.mark.slow
def test_quickstart_sweep_eight_trials_with_asha(tmp_path):
    """The real thing at small scale: distill.yaml on the quickstart data, 8 trials, ASHA on."""
    import ray

    from metakd_ray.tune import sweep

    # without the quickstart's transfer set: with its 1,000 extra texts per domain, one trial that ASHA stopped
    # after 2 domains took 421 s and the test overran its timeout
    cfg = load_config("quickstart", [f"output_dir={tmp_path}", "distill.stage1_epochs=1", "distill.stage2_epochs=4",
                                     "data.max_length=64", "distill.unlabelled_per_domain=0"])
    try:
        out = sweep(cfg, str(REPO / "tune_spaces" / "distill.yaml"), trials=8, concurrency=2, name="quickstart")
    finally:
        ray.shutdown()
    assert len(out["trials"]) == 8
    assert any(t["domains_done"] < 4 for t in out["trials"]), "ASHA stopped no trial"
    assert out["best"]["domains_done"] == 4 and out["best"]["mean_dev_acc"] > 0.6
