"""Ray plumbing and devices: connecting to a cluster, where Ray Train keeps its runs, which device
and precision a worker or task computes on.

The device rule: a Ray Train worker trains on ``ray.train.torch.get_device()``; a Ray task (or the
driver) uses the GPU Ray assigned to it (Ray sets ``CUDA_VISIBLE_DEVICES``), else the CPU. Weights
stay fp32; ``precision`` picks the autocast dtype.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from metakd_ray.config import Config
from metakd_ray.io import read_json, safetensors_whole
from metakd_ray.terminal import verbose, worker_env


def _token_auth_kept(record) -> bool:
    """Logging filter: drop Ray's note that it kept its default (token auth on), which it repeats at
    every local start; one function, so a second ``init_ray`` in a process adds no second filter."""
    return not record.getMessage().startswith("Token authentication is enabled")


def init_ray(cfg: Config) -> None:
    """Connect to ``ray.address`` / ``$RAY_ADDRESS``, or start a local Ray on 127.0.0.1."""
    import logging

    import ray

    if ray.is_initialized():
        return
    level = logging.INFO if verbose() else logging.WARNING
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address:  # a cluster (or a `ray job submit` driver): its runtime env is the job's
        ray.init(address=address, logging_level=level, log_to_driver=verbose())
        return
    env = dict(worker_env(), HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "0"))
    if not verbose():
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_token_auth_kept)
    # The dashboard hosts the state API that Ray Train's cleanup polls; keep it on loopback.
    ray.init(runtime_env={"env_vars": env}, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", logging_level=level, log_to_driver=verbose())


def is_remote(uri: str) -> bool:
    return "://" in uri


def storage_path(cfg: Config) -> str:
    """Where Ray Train keeps checkpoints: ``ray.storage_path``, else ``<output_dir>/ray``."""
    if cfg.ray.storage_path:
        return cfg.ray.storage_path
    path = cfg.out / "ray"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def remove_run(storage: str, run_name: str) -> None:
    """Delete a Ray Train run's directory (its checkpoints) from local or remote storage."""
    if not is_remote(storage):
        shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
        return
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(f"{storage.rstrip('/')}/{run_name}")
    if fs.get_file_info(root).type == pafs.FileType.Directory:
        fs.delete_dir(root)


def latest_checkpoint(storage: str, run_name: str) -> Path | None:
    """The furthest complete checkpoint a killed earlier run left in local storage, if any.

    Ray restores a run of the same name from its own snapshot when that snapshot was written; this
    also covers a driver killed before it was (remote storage relies on Ray's snapshot alone).
    A checkpoint whose files are missing or whose state cannot be read is passed over.
    """
    if is_remote(storage):
        return None
    found = []
    for directory in Path(storage, run_name).glob("checkpoint_*"):
        if not directory.is_dir():  # Ray's checkpoint_manager_snapshot.json lives beside them
            continue
        info = read_json(directory / "state.json")
        if not info:
            continue
        if checkpoint_whole(directory):
            found.append((info["step"], directory))
        else:
            print(f"[teacher] checkpoint {directory} is incomplete or damaged; passing it over", flush=True)
    return max(found)[1] if found else None


def checkpoint_whole(directory: Path) -> bool:
    """A teacher checkpoint's files are there and whole: the safetensors header matches the file,
    the training state is a whole zip, the step is readable."""
    import zipfile

    return (safetensors_whole(directory / "model.safetensors") and zipfile.is_zipfile(directory / "training_state.pt")
            and bool(read_json(directory / "state.json")))


# --------------------------------------------------------------------------- memory

PROCESS_BYTES = 1.0e9  # a Ray worker with torch, transformers and the tokenizer loaded


def memory_reservation(cfg: Config, kind: str) -> int:
    """Bytes Ray reserves for one ``kind`` ("teacher" worker, "student" task, "general" task), so that
    it never packs more of them on a node than its RAM holds: the configured GB, else an estimate
    from the teacher's size (P fp32 bytes of weights) and one batch's activations (A bytes):

        teacher worker   1 GB + 6P + A_teacher      (weights, gradients, two Adam moments, a checkpoint,
                                                    DDP's buckets)
        student / general task   1 GB + 12P + A_student  (the teacher, the student with gradients, Adam, its
                                                    kept best states and the files it sends back)

    (the factors cover the peaks ``bench/scale.py`` measures, with the student no larger than its teacher)

    A = batch · max_length · layers · (68·H + 10·heads·max_length) bytes, the activations a
    training step keeps for its backward pass (fp32)."""
    configured = {"teacher": cfg.teacher.memory_per_worker_gb, "student": cfg.distill.memory_per_task_gb,
                  "general": cfg.general.memory_gb}[kind]
    if configured:
        return int(configured * 1e9)
    arch = cfg.teacher_arch
    weights = _weight_bytes(cfg.model.teacher, arch)
    length = cfg.data.max_length
    if kind == "teacher":
        batch, layers, width, factor = cfg.teacher.batch_size // cfg.teacher.num_workers, arch.layers, arch.width, 6
    else:
        batch = cfg.distill.batch_size if kind == "student" else cfg.general.batch_size
        layers, width, factor = cfg.model.student_layers, cfg.student_width, 12
    activations = batch * length * layers * (68 * width + 10 * arch.heads * length)
    return int(PROCESS_BYTES + factor * weights + activations)


def _weight_bytes(name: str, arch) -> int:
    """fp32 bytes of a checkpoint's weights: its weight files' size, or from its shape (BERT's vocabulary)."""
    from metakd_ray.config import model_path

    path = Path(model_path(name)).expanduser()
    files = [f for f in path.glob("*") if f.suffix in (".safetensors", ".bin")] if path.is_dir() else []
    if files:
        return sum(f.stat().st_size for f in files) * (2 if _half_precision(path) else 1)
    return 4 * (30522 * arch.width + arch.layers * 12 * arch.width ** 2)


def _half_precision(path: Path) -> bool:
    config = read_json(path / "config.json") or {}
    return str(config.get("torch_dtype") or config.get("dtype") or "") in ("float16", "bfloat16")


# --------------------------------------------------------------------------- devices and precision


def task_device() -> torch.device:
    """The GPU Ray gave this task (it is the only visible one), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def prepare_device(device: torch.device) -> None:
    """TF32 matmuls on GPU: fp32 accuracy is not needed for fine-tuning and TF32 is ~3× faster."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on a GPU that supports it and fp32 everywhere else."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str):
    """The forward-pass context of ``precision`` on ``device`` (a no-op for fp32)."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_report() -> dict:
    """What this process sees: torch, CUDA and NCCL versions and the visible GPUs."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda or "none", "gpus": torch.cuda.device_count()}
    if torch.cuda.is_available():
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        info["gpu_names"] = sorted({torch.cuda.get_device_name(i) for i in range(info["gpus"])})
    return info
