"""Cluster operation: launcher YAMLs against Ray's schema, the job upload's excludes, and real
`ray job submit` runs on local multi-node clusters: one losing a node mid-training, one whose workers
share nothing with the driver but Ray and the storage path."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, kill_session, noise_lines, registered_checkpoint

sys.path.insert(0, str(REPO / "bench"))
from mlflow_ui import free_port, mlflow_server  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def test_aws_launcher_config_is_valid_and_a_broken_key_fails():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "clusters" / "aws.yaml").read_text())
    validate_config(prepare_config(cfg))
    import ray

    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311")
    text = (REPO / "clusters" / "aws.yaml").read_text()
    assert "aws_access_key_id" not in text.lower()
    # every node requires Ray's token, and the MLflow server on the VPC requires credentials, which
    # come from SSM, never from this file
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    server = next(c for c in cfg["head_start_ray_commands"] if "mlflow server" in c)
    assert "--app-name basic-auth" in server and "127.0.0.1" not in server
    assert "aws ssm get-parameter" in text and not re.search(r"password\s*=\s*\w", text)
    broken = yaml.safe_load((REPO / "clusters" / "aws.yaml").read_text())
    broken["available_node_types"]["gpu_spot"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def test_kuberay_rayjob_matches_the_pins():
    import ray

    job = yaml.safe_load((REPO / "clusters" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert job["spec"]["entrypoint"].startswith("metakd-ray run")
    images = [c["image"] for g in [job["spec"]["rayClusterSpec"]["headGroupSpec"]]
              + job["spec"]["rayClusterSpec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert all(i.startswith(f"rayproject/ray:{ray.__version__}-py311") for i in images)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    # the submitter reaches the dashboard through the head service, so it is not loopback-only and
    # requires Ray's token (KubeRay generates it into a Secret)
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    # what is installed is pinned: a release tag or a commit, never a branch
    install = next(line for line in job["spec"]["runtimeEnvYAML"].splitlines() if "metakd-ray @" in line)
    assert re.search(r"@(v\d+\.\d+\.\d+|[0-9a-f]{40})$", install.strip()), install
    # `prepare` runs in the driver on the head: the data must be mounted there too
    mounts = {m["mountPath"] for c in head["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
    assert "/data" in mounts and "METAKD_DATA_ROOT: /data" in job["spec"]["runtimeEnvYAML"]
    assert "ray.storage_path=s3://" in job["spec"]["entrypoint"]


def test_job_upload_sends_code_only(tmp_path):
    """Package the repo the way `ray job submit --working-dir .` does, with our excludes."""
    from ray._private.runtime_env.packaging import create_package

    excludes = yaml.safe_load((REPO / "clusters" / "job-runtime-env.yaml").read_text())["excludes"]
    # data, checkpoints and stores that a user may have lying around in the repo
    planted = [REPO / "outputs" / "planted" / "model.safetensors", REPO / "outputs" / "planted" / "mlflow.db",
               REPO / "planted.review"]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 1024)
    try:
        target = tmp_path / "pkg.zip"
        create_package(str(REPO), target, include_gitignore=False, excludes=excludes)
        names = zipfile.ZipFile(target).namelist()
    finally:
        for p in planted:
            p.unlink()
        (REPO / "outputs" / "planted").rmdir()
    assert "metakd_ray/cli.py" in names and "pyproject.toml" in names
    for bad in (".git/", ".venv/", "outputs/"):
        assert not any(n.startswith(bad) for n in names), bad
    assert not any(n.endswith((".safetensors", ".db", ".review", ".tsv")) for n in names)
    assert target.stat().st_size < 5 * 2**20


# --------------------------------------------------------------------------- real local cluster


def _raylet_pids(session: int) -> set[int]:
    """The raylets of the session that ``ray start`` led (a node of this cluster, no other Ray's)."""
    out = subprocess.run(["pgrep", "-f", "ray/core/src/ray/raylet/raylet"], capture_output=True, text=True).stdout
    found = set()
    for pid in map(int, out.split()):
        try:
            if os.getsid(pid) == session:
                found.add(pid)
        except ProcessLookupError:
            pass
    return found


class LocalCluster:
    """`ray start` head + extra nodes on 127.0.0.1, always stopped by the fixture."""

    def __init__(self, tmp: Path):
        self.port, self.dashboard = free_port(), free_port()
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{VENV_BIN}:{os.environ['PATH']}",
                        HF_HUB_OFFLINE="1", RAY_ADDRESS="")
        self.env.pop("RAY_ADDRESS")
        self.temp = tmp
        self.sessions: list[int] = []

    def ray(self, *args, check=True, timeout=120):
        return subprocess.run([str(VENV_BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              check=check, timeout=timeout)

    def start(self, *args, hide: Path | None = None):
        """`ray start` in a session of its own: its daemons and workers inherit it, so `stop` can
        end exactly this cluster and no other Ray on the machine. With ``hide``, the node starts in a
        mount namespace of its own with an empty tmpfs over that directory: it sees none of the
        files the driver writes there, as a separate machine would not."""
        log = self.temp / f"ray-start-{len(self.sessions)}.log"
        cmd = [str(VENV_BIN / "ray"), "start", *args]
        if hide is not None:
            hide.mkdir(parents=True, exist_ok=True)
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'mount -t tmpfs tmpfs "{hide}" && exec "$0" "$@"', *cmd]
        with open(log, "w") as fh:  # a file, not a pipe: the daemons outlive `ray start`
            proc = subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            self.sessions.append(proc.pid)
            proc.wait(timeout=120)
        assert proc.returncode == 0, log.read_text()[-3000:]

    def start_head(self, cpus: int):
        # Every fixed default port is taken from the free ones: another Ray on the machine must not clash.
        self.start("--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard), "--num-cpus", str(cpus),
                 "--ray-client-server-port", str(free_port()), *self._agent_ports(),
                 "--disable-usage-stats", "--include-dashboard", "true")

    def add_node(self, cpus: int, name: str, hide: Path | None = None) -> set[int]:
        """Start a node; returns its raylet's pid(s)."""
        self.start("--address", f"127.0.0.1:{self.port}", "--node-ip-address", "127.0.0.1",
                   "--num-cpus", str(cpus), "--resources", json.dumps({name: 1}), *self._agent_ports(),
                   "--disable-usage-stats", hide=hide)
        return _raylet_pids(self.sessions[-1])

    @staticmethod
    def _agent_ports() -> list[str]:
        return ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]

    def submit(self, *entrypoint) -> str:
        """Submit a job (retrying while the job agent starts up) and return its id."""
        address = f"http://127.0.0.1:{self.dashboard}"
        for _ in range(30):
            proc = self.ray("job", "submit", "--address", address, "--working-dir", str(REPO), "--runtime-env",
                            str(REPO / "clusters" / "job-runtime-env.yaml"), "--no-wait", "--", *entrypoint,
                            check=False)
            if proc.returncode == 0:
                return re.search(r"raysubmit_\w+", proc.stdout + proc.stderr).group(0)
            if "No available agent" not in proc.stdout + proc.stderr:
                raise AssertionError((proc.stdout + proc.stderr)[-3000:])
            time.sleep(2)
        raise AssertionError("the job agent never became available")

    def wait(self, job_id: str, timeout: float = 900) -> tuple[str, str]:
        address = f"http://127.0.0.1:{self.dashboard}"
        deadline, status = time.time() + timeout, ""
        while time.time() < deadline:
            proc = self.ray("job", "status", "--address", address, job_id, check=False)
            status = proc.stdout + proc.stderr
            if any(word in status.lower() for word in ("succeeded", "failed", "stopped")):
                break
            time.sleep(3)
        logs = self.ray("job", "logs", "--address", address, job_id, check=False).stdout
        return status, logs

    def stop(self):
        for pid in self.sessions:
            kill_session(pid)
        # `ray stop` would also drop this pointer; a stale one makes later ray.init() calls try to join us.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{self.port}"):
            current.unlink()


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def _tiny_job_config(tiny_config, **teacher):
    return tiny_config(teacher=dict({"epochs": 2, "eval_every": 4}, **teacher), distill={"cpus_per_task": 1})


@pytest.mark.cluster
def test_job_survives_losing_a_node_during_teacher_training(cluster, tiny_config):
    from mlflow import MlflowClient

    from metakd_ray.config import load_config
    from metakd_ray.tracking import tracking_uri

    cluster.start_head(cpus=2)
    node_raylets = cluster.add_node(cpus=2, name="wnode")
    assert node_raylets
    # SPREAD puts one of the two DDP workers on the second node
    config = _tiny_job_config(tiny_config, epochs=5, placement_strategy="SPREAD", max_failures=3)
    cfg = load_config(str(config))
    job_id = cluster.submit("metakd-ray", "teacher", str(config))
    deadline = time.time() + 400
    while time.time() < deadline and not registered_checkpoint("teacher-meta-*", cfg.out / "ray"):
        time.sleep(0.5)
    assert registered_checkpoint("teacher-meta-*", cfg.out / "ray"), "no checkpoint before the kill"
    for pid in node_raylets:
        os.kill(pid, 9)
    status, logs = cluster.wait(job_id)
    assert "succeeded" in status.lower(), logs[-4000:]
    assert "health check failed" in logs or "resumed at step" in logs  # the loss was seen and survived
    teacher_run = json.loads((cfg.out / "teachers" / "meta" / "result.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri(cfg))
    steps = [m.step for m in sorted(client.get_metric_history(teacher_run, "val/acc"), key=lambda m: m.timestamp)]
    assert steps[-1] == 5 * 12 and steps.count(4) == 1, steps


@pytest.mark.cluster
def test_students_run_on_a_node_that_shares_nothing_but_ray_and_storage(cluster, tiny_config, tmp_path):
    """The head runs only the driver (0 CPUs); every worker, the teacher's DDP workers and every
    student and teacher-pass task, runs on a node in its own mount namespace that cannot see the
    output directory. Inputs (data, the pretrained model) are readable there, as they are on a real
    cluster through the hub or a data volume; outputs travel only through ``ray.storage_path`` and
    the object store, and MLflow through its server. The students start from a general-distilled
    student, which reaches the island the same way."""
    from mlflow import MlflowClient

    from metakd_ray.config import load_config

    storage = tmp_path / "storage"
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlflow.log", tmp_path / "mlartifacts") as uri:
        config = tiny_config(ray={"storage_path": str(storage)}, tracking={"tracking_uri": uri},
                             distill={"cpus_per_task": 1},
                             model={"student_init": "general", "student_hidden": 96, "student_heads": 4},
                             general={"epochs": 1, "batch_size": 16, "num_cpus": 1})
        cfg = load_config(str(config))
        cluster.start_head(cpus=0)
        cluster.add_node(cpus=2, name="island", hide=cfg.out)
        # doctor sees what would break: storage the island cannot see, and GPUs the cluster lacks
        status, logs = cluster.wait(cluster.submit("metakd-ray", "doctor", str(config), "teacher.use_gpu=true",
                                                   f"ray.storage_path={cfg.out / 'node-local'}"))
        assert "failed" in status.lower(), logs[-3000:]
        assert re.search(r"FAIL\s+gpu .*needs 2 GPU", logs) and re.search(r"FAIL\s+shared .*node-local", logs), logs
        status, logs = cluster.wait(cluster.submit("metakd-ray", "doctor", str(config)))
        assert "succeeded" in status.lower() and re.search(r"PASS\s+shared .*2 nodes all see", logs), logs
        # a tracking server that answers anyone passes, with a warning
        assert re.search(r"WARN\s+mlflow .*without credentials", logs), logs

        status, logs = cluster.wait(cluster.submit("metakd-ray", "run", str(config), "--methods", "meta_kd,no_kd"))
        assert "succeeded" in status.lower(), logs[-4000:]
        # the job's log: every remote teacher line once, the students' progress, no Ray/MLflow bookkeeping
        assert noise_lines(logs) == [], logs
        assert logs.count("[teacher] step 4/") == 1 and "[distill] 4/4 done" in logs, logs

        stored = storage / cfg.out.name
        results = json.loads((cfg.out / "results.json").read_text())
        assert json.loads((stored / "results.json").read_text()) == results
        assert results["storage"] == str(stored)
        assert list(results["stage_seconds"])[2:4] == ["teachers", "general_student"]
        for method in ("meta_kd", "no_kd"):
            for domain in ("books", "kitchen"):
                assert (stored / "students" / method / domain / "_COMPLETE.json").is_file()
                assert 0 <= results["students"][method][domain]["test_acc"] <= 1
        assert (stored / "teachers" / "meta" / "_COMPLETE.json").is_file()
        assert len(list(stored.glob("general/*/_COMPLETE.json"))) == 1
        # The teacher passes ran on the island: their files reached storage, never the driver's disk.
        assert len(list((stored / "teacher_outputs" / "meta").glob("*/_COMPLETE.json"))) == 2
        assert not (cfg.out / "teacher_outputs").exists()
        assert "not on this node" not in logs

        client = MlflowClient(uri)
        runs = client.search_runs([results["mlflow"]["experiment_id"]],
                                  f"tags.`mlflow.parentRunId` = '{results['mlflow']['parent_run_id']}'")
        assert sorted(r.data.tags["metakd.stage"] for r in runs) == ["general"] + ["student"] * 4 + ["teacher"]
        assert all(r.info.status == "FINISHED" and "val/acc" in r.data.metrics for r in runs
                   if r.data.tags["metakd.stage"] == "student")
    # the island fetched the teacher and the general student from storage
    teacher_key = json.loads((cfg.out / "teachers" / "meta" / "result.json").read_text())["key"]
    general_key = next((cfg.out / "general").iterdir()).name
    for cache, inside in ((f"teachers-meta-{teacher_key}", "model/config.json"),
                          (f"general-{general_key}", "encoder/config.json")):
        path = Path(tempfile.gettempdir(), "metakd-ray", cache)
        assert (path / inside).is_file(), cache
        shutil.rmtree(path)
