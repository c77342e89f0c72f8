"""`metakd-ray doctor`: check a cluster and a config before a long run, one PASS/FAIL line per check.

    metakd-ray doctor quickstart                          # local Ray
    metakd-ray doctor amazon --address auto ray.storage_path=s3://bucket/metakd
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from metakd_ray.config import Config, model_path
from metakd_ray.teacher import storage_path
from metakd_ray.tracking import tracking_uri


def check_ray(cfg: Config, address: str | None) -> tuple[bool, str]:
    import ray

    try:
        if not ray.is_initialized():
            kwargs = {"address": address} if address else {"include_dashboard": False,
                                                           "_node_ip_address": "127.0.0.1"}
            ray.init(log_to_driver=False, **kwargs)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        total = ray.cluster_resources()
    except Exception as exc:
        return False, f"cannot connect to Ray at {address or 'a new local instance'}: {type(exc).__name__}: {exc}"
    t, d = cfg.teacher, cfg.distill
    need_cpu = max(t.num_workers * t.cpus_per_worker, d.cpus_per_task)
    need_gpu = max(t.num_workers if t.use_gpu else 0, d.gpus_per_task)
    have_cpu, have_gpu = total.get("CPU", 0), total.get("GPU", 0)
    detail = (f"{len(nodes)} node(s), {have_cpu:g} CPU / {have_gpu:g} GPU; the config needs "
              f"{need_cpu:g} CPU / {need_gpu:g} GPU at once (teacher.num_workers x cpus_per_worker, distill.*_per_task)")
    return have_cpu >= need_cpu and have_gpu >= need_gpu, detail


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


def check_mlflow(cfg: Config) -> tuple[bool, str]:
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        return False, f"MLflow at {uri} is not reachable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return True, f"MLflow at {uri} answers"


def check_model(cfg: Config) -> tuple[bool, str]:
    from metakd_ray.config import teacher_depth
    from metakd_ray.errors import MetaKDError

    try:
        depth = teacher_depth(cfg.model.teacher)
    except MetaKDError as exc:
        return False, str(exc)
    return True, f"teacher {model_path(cfg.model.teacher)} ({depth} layers) -> student of {cfg.model.student_layers}"


def check_data(cfg: Config) -> tuple[bool, str]:
    if cfg.data.format == "mnli_hub":
        return True, f"data from the hub ({cfg.data.path or 'nyu-mll/multi_nli'}); not checked offline"
    path = cfg.data_path
    if not path.exists():
        return False, f"data path {path} not found (set data.root / $METAKD_DATA_ROOT and data.path)"
    return True, f"data path {path} exists"


def run_doctor(cfg: Config, address: str | None) -> bool:
    checks = [("ray", lambda: check_ray(cfg, address)), ("storage", lambda: check_storage(cfg)),
              ("mlflow", lambda: check_mlflow(cfg)), ("model", lambda: check_model(cfg)),
              ("data", lambda: check_data(cfg))]
    ok_all = True
    for name, check in checks:
        ok, detail = check()
        ok_all &= ok
        print(f"{'PASS' if ok else 'FAIL'}  {name:<8} {detail}", flush=True)
    return ok_all
