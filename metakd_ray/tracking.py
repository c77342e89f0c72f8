"""A thin layer over the plain MLflow client: explicit run ids, one pipeline parent, no globals.

Ray workers do not inherit ``mlflow.set_tracking_uri``, so every place that logs receives the
tracking URI and the run id explicitly (``RunRef``). Runs are found again by a ``metakd.key`` tag,
so resuming a pipeline reuses its runs instead of creating new ones.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from metakd_ray.config import Config

STAGE = "metakd.stage"
KEY = "metakd.key"


@dataclass(frozen=True)
class RunRef:
    """What a worker needs to log into one run: picklable and self-contained."""

    tracking_uri: str
    run_id: str

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client().log_batch(self.run_id, metrics=items[i:i + 500])

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client().log_batch(self.run_id, params=items[i:i + 100])

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client().log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: Path, artifact_path: str | None = None) -> None:
        self.client().log_artifact(self.run_id, str(local_file), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client().set_terminated(self.run_id, status)


def tracking_uri(cfg: Config) -> str:
    """``$MLFLOW_TRACKING_URI`` > ``tracking.tracking_uri`` > sqlite file under the output dir."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    return uri or f"sqlite:///{cfg.out / 'mlflow.db'}"


def experiment_id(cfg: Config) -> str:
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    # A local store keeps artifacts beside it, not in ./mlruns of whatever directory we run from.
    location = (cfg.out / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except Exception:  # created concurrently by another process
        return client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def open_run(cfg: Config, key: str, name: str, stage: str, parent: RunRef | None = None,
             tags: dict | None = None) -> RunRef:
    """The run tagged ``metakd.key=key`` in the experiment, created if it does not exist yet."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    exp_id = experiment_id(cfg)
    found = client.search_runs([exp_id], filter_string=f"tags.`{KEY}` = '{key}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    if found:
        ref = RunRef(uri, found[0].info.run_id)
        if found[0].info.status != "RUNNING":
            client.update_run(ref.run_id, status="RUNNING")
        return ref
    all_tags = {KEY: key, STAGE: stage, "metakd.config_hash": cfg.hash(), "metakd.git_commit": git_commit(),
                "metakd.name": cfg.name}
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent.run_id
    all_tags.update(tags or {})
    run = client.create_run(exp_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()})
    return RunRef(uri, run.info.run_id)


def pipeline_run(cfg: Config) -> RunRef:
    """The parent run of everything this output directory does."""
    # Keyed by the config too: MLflow params are immutable, so a changed config gets its own parent.
    # Named after the output directory: several runs of one config (seeds, settings) stay apart in the UI.
    ref = open_run(cfg, f"pipeline/{cfg.out}/{cfg.hash()}", f"pipeline-{cfg.out.name}", "pipeline")
    ref.log_params(flatten(cfg.to_dict()))
    return ref


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
