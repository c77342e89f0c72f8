"""A thin layer over the plain MLflow client: explicit run ids, one pipeline parent, no globals.

Ray workers do not inherit ``mlflow.set_tracking_uri``, so every place that logs receives the
tracking URI and the run id explicitly (``RunRef``). Runs are found again by a ``metakd.key`` tag,
so resuming a pipeline reuses its runs instead of creating new ones.

MLflow conventions kept: MLflow's own source tags (``mlflow.source.git.commit``, ...); teachers
and students are logged models (pyfunc: ``text`` in, ``label`` and ``score`` out, with signature
and input example); the data splits are run inputs; system metrics are sampled while a model
trains; the dev-best student of each domain is registered as ``metakd-<experiment>-<domain>``
with the alias ``best``. One metric scheme for teachers and students: ``train/loss``, ``val/acc``
(the teacher's is the mean over its domains, ``val/<domain>/acc`` each), and at the end
``dev_acc``, ``test_acc``, ``params``, ``latency_ms``.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from metakd_ray.config import Config
from metakd_ray.io import content_key

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

    def log_metrics(self, metrics: dict, step: int | None = None, model_id: str | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0, model_id=model_id, run_id=self.run_id if model_id else None)
                 for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client().log_batch(self.run_id, metrics=items[i:i + 500])

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client().log_batch(self.run_id, params=items[i:i + 100])

    def log_artifact(self, local_file: Path, artifact_path: str | None = None) -> None:
        self.client().log_artifact(self.run_id, str(local_file), artifact_path)

    def log_trained_model(self, model_dir: Path, name: str, metrics: dict, data, data_name: str,
                          domain: str | None) -> str:
        """A saved teacher or student with the data it saw: the train/dev/test splits of ``data``
        (a ``PreparedData``, filtered to ``domain``) as run inputs, then the model, with two test
        rows as its input example. Returns the model id."""
        from metakd_ray.deploy import read_examples

        self.log_splits(data, data_name, domain)
        example = read_examples(data.split_path("test"), domain, limit=2)
        rows = {"text": example.texts, **({"text_pair": example.pairs} if example.pairs else {})}
        return self.log_model(model_dir, name, rows, metrics)

    def log_model(self, model_dir: Path, name: str, example: dict, metrics: dict) -> str:
        """``model_dir`` (a saved teacher or student) as an MLflow logged model of this run; returns
        its model id. ``example`` holds a few rows of ``text`` (and ``text_pair``) for the input
        example; ``metrics`` are attached to the model too."""
        import mlflow
        import mlflow.pyfunc
        import torch
        import transformers
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model, ModelSignature
        from mlflow.types import ColSpec, Schema

        import metakd_ray

        client = self.client()
        experiment = client.get_run(self.run_id).info.experiment_id
        model = client.create_logged_model(experiment, name=name, source_run_id=self.run_id,
                                           model_type="text-classification")
        client.log_outputs(self.run_id, models=[LoggedModelOutput(model.model_id, step=0)])
        inputs = [ColSpec("string", column) for column in example]
        signature = ModelSignature(Schema(inputs), Schema([ColSpec("string", "label"), ColSpec("double", "score")]))
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
                        f"mlflow=={mlflow.__version__}", "pandas", "pyarrow", "pyyaml", "safetensors"]
        with tempfile.TemporaryDirectory() as tmp, _quiet("mlflow"), _working_directory(tmp):
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                local, python_model=str(Path(metakd_ray.__file__).parent / "mlflow_model.py"),
                artifacts={"model": str(Path(model_dir).absolute())}, signature=signature,
                input_example=example, pip_requirements=requirements,
                code_paths=[str(Path(metakd_ray.__file__).parent)],  # loads where metakd-ray is not installed
                mlflow_model=Model(artifact_path=model.artifact_location, run_id=self.run_id,
                                   model_uuid=model.model_id, model_id=model.model_id))
            client.log_model_artifacts(model.model_id, str(local))
        _share_local_copy(Path(model_dir), model.artifact_location)
        client.finalize_logged_model(model.model_id, "READY")
        self.log_metrics(metrics, model_id=model.model_id)
        return model.model_id

    def log_splits(self, data, name: str, domain: str | None) -> None:
        """Each data split of ``data`` (filtered to ``domain``) as an input of this run, with its
        MLflow context (``training``, ``validation``, ``test``). The datasets carry their source
        file, schema, size and the token cache's content key as digest; nothing is read to log them."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.types import ColSpec, Schema

        contexts = {"train": "training", "dev": "validation", "test": "test"}
        schema = Schema([ColSpec("string", "uid"), ColSpec("string", "domain"), ColSpec("long", "label"),
                         ColSpec("string", "text")])
        inputs = []
        with _quiet("mlflow"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes on how a local path is read
            for split, context in contexts.items():
                rows = data.splits[split]
                if domain:
                    rows = rows.for_domains([data.domain_id(domain)])
                dataset = MetaDataset(resolve_dataset_source(str(data.split_path(split))),
                                      name=f"{name}/{domain or 'all'}/{split}",
                                      digest=content_key(data.key, split, domain)[:8], schema=schema)
                d = dataset.to_dict()
                entity = Dataset(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"),
                                 json.dumps({"num_rows": len(rows)}))
                inputs.append(DatasetInput(entity, [InputTag("mlflow.data.context", context)]))
        self.client().log_inputs(self.run_id, datasets=inputs)

    def finish(self, status: str = "FINISHED") -> None:
        self.client().set_terminated(self.run_id, status)

    def fail(self) -> None:
        """Mark the run FAILED, on the way out of an error: a store that cannot take the write (the
        disk that stopped the stage is full) is reported, never raised over the error itself."""
        try:
            with _quiet("mlflow", logging.CRITICAL):  # its own logged traceback of the same failure
                self.finish("FAILED")
        except Exception as exc:
            from metakd_ray.errors import cause_line

            print(f"[mlflow] run {self.run_id} could not be marked FAILED: {cause_line(exc)[:200]}", flush=True)


def _share_local_copy(model_dir: Path, artifact_location: str) -> None:
    """A local MLflow store keeps a second copy of the model's files (the pyfunc's
    ``artifacts/model/``); make each copy a hard link to the saved model's file: the same bytes,
    stored once. A remote store, another file system or a file that differs keeps its copy."""
    import filecmp
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(artifact_location)
    if parsed.scheme not in ("", "file"):
        return
    packed = Path(url2pathname(parsed.path)) / "artifacts" / "model"
    for source in (p for p in model_dir.rglob("*") if p.is_file()):
        copy = packed / source.relative_to(model_dir)
        if copy.is_file() and copy.stat().st_size == source.stat().st_size and filecmp.cmp(source, copy, shallow=False):
            link = copy.with_name(f".{copy.name}.link")
            try:
                os.link(source, link)
                os.replace(link, copy)
            except OSError:  # another file system, or no hard links there
                link.unlink(missing_ok=True)


def tracking_uri(cfg: Config) -> str:
    """``$MLFLOW_TRACKING_URI`` > ``tracking.tracking_uri`` > sqlite file under the output dir."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    return uri or f"sqlite:///{cfg.out / 'mlflow.db'}"


def experiment_id(cfg: Config) -> str:
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
    except Exception as exc:  # a damaged sqlite file, a server that is down: the store cannot be used
        from metakd_ray.errors import MetaKDError, cause_line

        where = "it is damaged or not an MLflow store; move it aside (its runs are not rebuilt) or" \
            if uri.startswith("sqlite:") else "is the server up? Or"
        raise MetaKDError(f"MLflow store {uri} cannot be opened ({cause_line(exc)[:160]}): {where} set "
                          "tracking.tracking_uri / $MLFLOW_TRACKING_URI to another store") from None
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
    exp_id = experiment_id(cfg)  # first: a store that cannot be opened is one line
    client = MlflowClient(uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`{KEY}` = '{key}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    if found:
        ref = RunRef(uri, found[0].info.run_id)
        if found[0].info.status != "RUNNING":
            client.update_run(ref.run_id, status="RUNNING")
        return ref
    all_tags = {KEY: key, STAGE: stage, "metakd.config_hash": cfg.hash(), "metakd.name": cfg.name,
                "mlflow.source.name": "metakd-ray", "mlflow.source.git.commit": git_commit(),
                "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_ID") else "LOCAL", "mlflow.user": _user()}
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent.run_id
    all_tags.update(tags or {})
    run = client.create_run(exp_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()})
    return RunRef(uri, run.info.run_id)


@contextlib.contextmanager
def system_metrics(run: RunRef | None, node: str = ""):
    """Sample CPU, memory, disk, network (and GPU, with nvidia-ml-py) into ``run`` as
    ``system/...`` metrics while the block runs, on the machine that runs it."""
    if run is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    with _quiet("mlflow"):
        monitor = SystemMetricsMonitor(run.run_id, sampling_interval=5, node_id=node or None,
                                       tracking_uri=run.tracking_uri)
        monitor.start()
    try:
        yield
    finally:
        with _quiet("mlflow"):
            monitor.finish()


@contextlib.contextmanager
def _working_directory(directory: str):
    """Run the block from ``directory``. MLflow's save_model reads the working directory, and in a
    `ray job submit` driver that directory (the job's unpacked working_dir) can be gone by the time
    a model is logged."""
    try:
        previous = os.getcwd()
    except FileNotFoundError:
        previous = None
    os.chdir(directory)
    try:
        yield
    finally:
        if previous:
            os.chdir(previous)


@contextlib.contextmanager
def _quiet(logger: str, below: int = logging.ERROR):
    """MLflow's INFO lines ("Started monitoring system metrics", ...) and its note on how models are
    serialised are for MLflow's own users."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(below)
    try:
        yield
    finally:
        log.setLevel(level)


def register_best(cfg: Config, students: dict) -> dict[str, str]:
    """Register each domain's dev-best student (``students[method][domain]`` results with a
    ``model_id``) as a version of ``metakd-<experiment>-<domain>`` and point the alias ``best`` at
    it; a student already registered is not registered twice. Returns {domain: "name/version"}."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    # MLflow's registry finds a logged model through the process-wide tracking URI, not the client's
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(tracking_uri(cfg))
    try:
        return _register(client, cfg, students)
    finally:
        mlflow.set_tracking_uri(previous)


def _register(client, cfg: Config, students: dict) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    registered = {}
    for domain in cfg.data.domains:
        candidates = [(r["dev_acc"], method, r) for method, per in students.items()
                      for d, r in per.items() if d == domain and r.get("model_id")]
        if not candidates:
            continue
        _, method, best = max(candidates, key=lambda c: c[0])
        name = f"metakd-{cfg.tracking.experiment}-{domain}"
        with _quiet("mlflow"):
            try:
                client.create_registered_model(name, description=f"metakd-ray students for the {domain} domain "
                                                                  f"of experiment {cfg.tracking.experiment}")
            except MlflowException:
                pass  # registered before
            found = client.search_model_versions(f"name = '{name}' and run_id = '{best['run_id']}'")
            version = found[0] if found else client.create_model_version(
                name, f"models:/{best['model_id']}", run_id=best["run_id"], model_id=best["model_id"],
                tags={"method": method, "dev_acc": f"{best['dev_acc']:.4f}", "test_acc": f"{best['test_acc']:.4f}"})
        client.set_registered_model_alias(name, "best", version.version)
        registered[domain] = f"{name}/{version.version}"
    return registered


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


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
