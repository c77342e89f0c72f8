"""Shared fixtures: slices of the real data in ../shared/data and a tiny real encoder.

The tiny teacher is the first 2 layers of the real MiniLM-L6 checkpoint saved to a temp dir, so
the Ray tests train a real pretrained model in seconds; the student is its first layer.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("METAKD_DATA_ROOT", REPO.parent / "shared" / "data"))
AMAZON = SHARED_DATA / "amazon-blitzer2007"
MNLI = SHARED_DATA / "mnli-5genre-subset"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    assert AMAZON.is_dir(), f"real Amazon data not found at {AMAZON} (set METAKD_DATA_ROOT)"


def slice_reviews(src: Path, dst: Path, n: int) -> None:
    """Copy the first ``n`` <review> blocks of a real .review file."""
    text = src.read_text(encoding="utf-8")
    blocks = text.split("</review>")[:n]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("</review>".join(blocks) + "</review>\n", encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_amazon(tmp_path_factory) -> Path:
    """40 real reviews per label for each domain."""
    root = tmp_path_factory.mktemp("amazon")
    for domain in ("books", "dvd", "electronics", "kitchen"):
        for label in ("positive", "negative"):
            slice_reviews(AMAZON / domain / f"{label}.review", root / domain / f"{label}.review", 40)
    return root


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from metakd_ray.config import model_path
    from metakd_ray.models import load_encoder

    path = tmp_path_factory.mktemp("tiny-teacher")
    load_encoder(model_path("minilm"), 2).save_pretrained(path)
    AutoTokenizer.from_pretrained(model_path("minilm")).save_pretrained(path)
    return path


def write_config(path: Path, data_root: Path, teacher_path: Path, out: Path, **sections) -> Path:
    """A small but real experiment config: 2 domains, short sequences, tiny teacher, 1-layer student."""
    cfg = {
        "name": "test",
        "output_dir": str(out),
        "data": {"format": "amazon", "root": str(data_root), "path": "", "domains": ["books", "kitchen"],
                 "max_length": 32, "max_train_per_domain": 48, "max_dev_per_domain": 12, "max_test_per_domain": 12},
        "model": {"teacher": str(teacher_path), "student_layers": 1},
        "prototypes": {"batch_size": 32},
        "teacher": {"epochs": 1, "lr": 1e-4, "batch_size": 8, "eval_every": 4, "num_workers": 2},
        "distill": {"stage1_epochs": 1, "stage2_epochs": 1, "no_kd_epochs": 1, "stage1_lr": 1e-4,
                    "stage2_lr": 1e-4, "batch_size": 8, "eval_every": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def tiny_config(tmp_path, tiny_amazon, tiny_teacher):
    def make(**sections) -> Path:
        return write_config(tmp_path / "config.yaml", tiny_amazon, tiny_teacher, tmp_path / "out", **sections)

    return make


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for the module, shut down whatever happens."""
    import ray

    if ray.is_initialized():  # started by an in-process `metakd-ray` command of an earlier module
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        yield ray
    finally:
        ray.shutdown()


def registered_checkpoint(run_dirs: str, root: Path) -> bool:
    """True once Ray's controller has recorded a checkpoint of a run matching ``root/run_dirs``
    (a directory on disk is not enough: its report may still be in flight)."""
    for snapshot in root.glob(f"{run_dirs}/checkpoint_manager_snapshot.json"):
        if '"checkpoint_dir_name"' in snapshot.read_text():
            return True
    return False


def kill_when(cmd: list[str], log: Path, ready, timeout: float, poll: float = 0.5) -> None:
    """Run ``cmd`` in its own session; once ``ready()`` is true (or after ``timeout`` s), kill the
    whole session: the driver and the local Ray it started, as a crash or a lost machine would."""
    import subprocess
    import time

    env = dict(os.environ, RAY_ADDRESS="")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and not ready():
            time.sleep(poll)
    finally:
        kill_session(proc.pid)
        proc.wait()


def kill_session(pid: int) -> None:
    """SIGKILL every process of the session led by ``pid`` (a driver and the local Ray it started)."""
    import signal

    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == pid:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# What the terminal must not show at default verbosity: progress bars, Ray / Ray Train / MLflow
# bookkeeping, Python warnings and tracebacks.
NOISE = re.compile(r"it/s\]|\d+%\||TrainingReport|Checkpoint successfully|core_worker|PreemptionWatcher|"
                   r"\((TrainController|RayTrainWorker|raylet|_student_task|PlacementGroupCleaner)|INFO mlflow|"
                   r"Warning:| WARNING |Traceback|Loading weights|Writing model shards")


def noise_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if NOISE.search(line)]
