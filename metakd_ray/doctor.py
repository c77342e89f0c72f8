"""`metakd-ray doctor`: check a cluster and a config before a long run, one PASS, WARN or FAIL line per check.

    metakd-ray doctor quickstart                          # local Ray
    metakd-ray doctor amazon --address auto ray.storage_path=s3://bucket/metakd

On a cluster of several nodes it also checks what a single machine never shows: that every node
sees ``ray.storage_path`` (a node-local directory does not work there) and that the MLflow store
is a server, not a file on the driver's disk.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from metakd_ray.cluster import device_report, is_remote, storage_path
from metakd_ray.config import Config, model_path
from metakd_ray.data import FORMATS
from metakd_ray.tracking import tracking_uri


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def check_ray(cfg: Config, address: str | None) -> tuple[bool, str]:
    import ray

    try:
        if not ray.is_initialized():
            kwargs = {"address": address} if address else {"include_dashboard": False,
                                                           "_node_ip_address": "127.0.0.1"}
            ray.init(log_to_driver=False, **kwargs)
        nodes = _alive_nodes()
        total = ray.cluster_resources()
    except Exception as exc:
        return False, f"cannot connect to Ray at {address or 'a new local instance'}: {type(exc).__name__}: {exc}"
    tcfg, dcfg = cfg.teacher, cfg.distill
    need_cpu = max(tcfg.num_workers * tcfg.cpus_per_worker, dcfg.cpus_per_task)
    have_cpu = total.get("CPU", 0)
    detail = (f"{len(nodes)} node(s), {have_cpu:g} CPU; the config needs {need_cpu:g} CPU at once "
              "(teacher.num_workers x cpus_per_worker, distill.cpus_per_task)")
    return have_cpu >= need_cpu, detail


def check_gpus(cfg: Config) -> tuple[bool, str]:
    """GPUs per node against what the config asks for, and this process's CUDA / NCCL."""
    tcfg, dcfg = cfg.teacher, cfg.distill
    per_node = [n["Resources"].get("GPU", 0) for n in _alive_nodes()]
    need = max(tcfg.num_workers if tcfg.use_gpu else 0, dcfg.gpus_per_task)
    local = device_report()
    versions = f"torch {local['torch']}, CUDA {local['cuda']}" + (f", NCCL {local['nccl']}" if "nccl" in local else "")
    detail = (f"GPUs per node: {', '.join(f'{g:g}' for g in per_node) or 'none'} ({versions} here); the config "
              f"needs {need:g} GPU at once (teacher.use_gpu x num_workers, distill.gpus_per_task)")
    if dcfg.gpus_per_task and dcfg.gpus_per_task > max(per_node, default=0):
        return False, detail + "; no node has distill.gpus_per_task GPUs"
    return sum(per_node) >= need, detail


def check_shared_storage(cfg: Config) -> tuple[bool, str]:
    """On several nodes, every node must reach ``ray.storage_path``: a task on each node looks for a
    file the driver just wrote there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _alive_nodes()
    if len(nodes) < 2:
        return True, "one node: outputs stay on it (set ray.storage_path for a cluster)"
    if not cfg.ray.storage_path:
        return False, (f"{len(nodes)} nodes but no ray.storage_path: students on other nodes cannot read the "
                       "teacher; set ray.storage_path=s3://... or a directory every node mounts")
    path = storage_path(cfg)
    if is_remote(path):
        return True, f"{len(nodes)} nodes; storage {path} is remote, reachable by URI"
    probe = Path(path) / f".metakd-doctor-{uuid.uuid4().hex[:8]}"
    probe.write_text("ok")
    try:
        seen = ray.get([ray.remote(num_cpus=0)(os.path.exists).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(probe))
            for n in nodes])
    finally:
        probe.unlink()
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        return False, (f"storage {path} is node-local: {len(blind)} of {len(nodes)} nodes do not see it "
                       f"({', '.join(blind)}); use s3://... or a directory every node mounts")
    return True, f"{len(nodes)} nodes all see storage {path}"


def check_storage(cfg: Config) -> tuple[bool, str]:
    path = storage_path(cfg)
    probe = f".metakd-doctor-{uuid.uuid4().hex[:8]}"
    try:
        if "://" in path:
            import pyarrow.fs as pafs

            fs, root = pafs.FileSystem.from_uri(path)
            fs.create_dir(root, recursive=True)
            with fs.open_output_stream(f"{root}/{probe}") as fh:
                fh.write(b"ok")
            fs.delete_file(f"{root}/{probe}")
        else:
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / probe).write_text("ok")
            (Path(path) / probe).unlink()
    except Exception as exc:
        return False, f"storage {path} is not writable: {type(exc).__name__}: {exc}"
    return True, f"storage {path} is writable"


WARN = "warn"  # a check that passes with something to fix


def check_mlflow(cfg: Config) -> tuple[bool | str, str]:
    from mlflow import MlflowClient

    import ray

    uri = tracking_uri(cfg)
    nodes = _alive_nodes() if ray.is_initialized() else []
    if len(nodes) > 1 and uri.startswith(("sqlite:", "file:", "/")):
        return False, (f"MLflow store {uri} is a file on the driver's node, which workers on the other "
                       f"{len(nodes) - 1} node(s) cannot write; start an MLflow server and set MLFLOW_TRACKING_URI")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        return False, f"MLflow at {uri} is not reachable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if uri.startswith(("http://", "https://")) and _answers_anyone(uri):
        return WARN, (f"MLflow at {uri} answers without credentials: whoever reaches it can read and change "
                      "every run; on a cluster network serve it with `mlflow server --app-name basic-auth` "
                      "(clusters/aws.yaml does)")
    return True, f"MLflow at {uri} answers"


def _answers_anyone(uri: str) -> bool:
    """The tracking server lists experiments to a request that carries no credentials."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1",
                                    timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):  # 401/403 (HTTPError is a URLError) or not reachable
        return False


def check_model(cfg: Config) -> tuple[bool, str]:
    from metakd_ray.config import teacher_shape
    from metakd_ray.errors import MetaKDError

    try:
        shape = teacher_shape(cfg.model.teacher)
    except MetaKDError as exc:
        return False, str(exc)
    return True, (f"teacher {model_path(cfg.model.teacher)} ({shape.layers} layers) -> student of "
                  f"{cfg.model.student_layers}")


def check_data(cfg: Config) -> tuple[bool, str]:
    if not FORMATS[cfg.data.format].local:
        return True, f"data from the hub ({cfg.data.path or 'its default dataset'}); not checked offline"
    path = cfg.data_path
    if not path.exists():
        return False, f"data path {path} not found (set data.root / $METAKD_DATA_ROOT and data.path)"
    return True, f"data path {path} exists"


def run_doctor(cfg: Config, address: str | None) -> bool:
    checks = [("ray", lambda: check_ray(cfg, address)), ("gpu", lambda: check_gpus(cfg)),
              ("storage", lambda: check_storage(cfg)), ("shared", lambda: check_shared_storage(cfg)),
              ("mlflow", lambda: check_mlflow(cfg)), ("model", lambda: check_model(cfg)),
              ("data", lambda: check_data(cfg))]
    ok_all = True
    for name, check in checks:
        try:
            ok, detail = check()
        except Exception as exc:  # e.g. no Ray to ask: the check fails, the others still run
            ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ok_all &= ok is not False
        print(f"{'WARN' if ok is WARN else 'PASS' if ok else 'FAIL'}  {name:<8} {detail}", flush=True)
    return ok_all
