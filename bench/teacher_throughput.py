"""Teacher training throughput: the Ray Train loop vs a plain single-process PyTorch loop.

    .venv/bin/python bench/teacher_throughput.py [--steps 40] [--threads 2]

Both loops run the same model (MiniLM-L6 meta-teacher), the same data (quickstart Amazon
slice, 128 tokens), the same batches and the same `train_step`, with the same torch thread count.
The Ray side is a 1-worker TorchTrainer (Ray applies no DDP wrapper at world size 1) and reports samples/s over its
training steps; the plain side is timed the same way. It prints a table and writes
bench/results/teacher_throughput.json. The target is ratio >= 0.95; this script reports, never asserts.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metakd_ray.io import atomic_write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"


def plain_loop(settings: dict, train, weights: np.ndarray, steps: int, device: torch.device | None = None) -> float:
    """Samples/s of ``steps`` teacher steps in one process, with no Ray: the same model, batches and
    ``train_step`` as a Ray Train worker, on ``device`` (default CPU)."""
    from metakd_ray.models import build_teacher
    from metakd_ray.teacher import train_step
    from metakd_ray.training import batch_at, epoch_order, make_optimizer, seed_everything

    device = device or torch.device("cpu")
    torch.set_num_threads(settings["threads"])
    seed_everything(settings["seed"])
    model = build_teacher(settings["model_name"], settings["labels"], settings["domains"], settings["dropout"],
                          settings["pooling"])
    model.to(device).train()
    optimizer, scheduler = make_optimizer(model, settings["lr"], settings["weight_decay"], steps,
                                          settings["warmup_fraction"])
    w = torch.tensor(weights)
    bs = settings["batch_size"]
    per_epoch = len(train) // bs
    start, samples = time.perf_counter(), 0
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        index = epoch_order(len(train), settings["seed"], epoch)[pos * bs:(pos + 1) * bs]
        train_step(model, optimizer, scheduler, batch_at(train, index, device), w[index].to(device), settings,
                   step, 0)
        samples += len(index)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return samples / (time.perf_counter() - start)


def ray_loop(cfg, settings: dict, train, dev, weights: np.ndarray, storage: Path) -> float:
    import ray

    from metakd_ray.teacher import make_trainer

    config = dict(settings, train=ray.put(train), weights=ray.put(weights), dev=ray.put(dev), run=None)
    return make_trainer(cfg, config, f"bench-{int(time.time())}", str(storage)).fit().metrics["train/samples_per_s"]


def plain_loop_inputs(cfg, data, scores: np.ndarray, steps: int) -> tuple[dict, object, np.ndarray]:
    """(loop settings, training split, t weights) for exactly ``steps`` meta-teacher batches: one pass,
    no evaluation, threads and batch size from ``cfg.teacher``."""
    from metakd_ray.teacher import loop_settings

    rows = np.arange(steps * cfg.teacher.batch_size) % len(data.splits["train"])
    train, weights = data.splits["train"].take(rows), scores[rows].astype(np.float32)
    return dict(loop_settings(cfg, data, "meta"), epochs=1.0, eval_every=10**9), train, weights


def machine_info() -> dict:
    import ray

    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "ray": ray.__version__}


def measure_throughput(steps: int = 40, threads: int = 2, batch_size: int = 16) -> dict:
    """Samples/s of the plain loop, the plain loop beside an idle Ray, and the Ray Train loop."""
    import ray

    from metakd_ray.config import load_config
    from metakd_ray.data.prepare import prepare
    from metakd_ray.prototypes import compute_prototype_scores

    out = Path("outputs/bench-throughput").resolve()
    cfg = load_config("quickstart", [f"output_dir={out}", f"teacher.batch_size={batch_size}",
                                     "teacher.num_workers=1", f"teacher.cpus_per_worker={threads}"])
    data = prepare(cfg, quiet=True)
    settings, train, weights = plain_loop_inputs(cfg, data, compute_prototype_scores(cfg, data, quiet=True), steps)
    dev = data.splits["dev"].take(np.arange(8))  # one tiny evaluation at the end, outside the timed window

    plain = plain_loop(settings, train, weights, steps)
    ray.init(num_cpus=threads, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    try:
        # The same plain loop again while Ray's daemons (GCS, raylet, dashboard) idle beside it:
        # separates the cost of sharing 2 cores with them from the cost of the Train loop itself.
        plain_beside_ray = plain_loop(settings, train, weights, steps)
        on_ray = ray_loop(cfg, settings, train, dev, weights, out / "ray")
    finally:
        ray.shutdown()
    return {"steps": steps, "batch_size": batch_size, "threads": threads,
            "max_length": cfg.data.max_length, "plain_samples_per_s": plain,
            "plain_beside_idle_ray_samples_per_s": plain_beside_ray, "ray_train_samples_per_s": on_ray,
            "ratio_ray_over_plain": on_ray / plain, "ratio_ray_over_plain_beside_ray": on_ray / plain_beside_ray,
            "target_ratio": 0.95}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    result = measure_throughput(args.steps, args.threads, args.batch_size)
    result["machine"] = machine_info()
    plain, plain_beside_ray, on_ray = (result[k] for k in ("plain_samples_per_s", "plain_beside_idle_ray_samples_per_s",
                                                            "ray_train_samples_per_s"))
    print(f"{'loop':<34}{'samples/s':>12}")
    print(f"{'plain PyTorch (1 process)':<34}{plain:>12.2f}")
    print(f"{'plain PyTorch, Ray idle beside':<34}{plain_beside_ray:>12.2f}")
    print(f"{'Ray Train (1 worker)':<34}{on_ray:>12.2f}")
    print(f"{'ratio Ray Train / plain':<34}{on_ray / plain:>12.3f}   (target >= 0.95)")
    print(f"{'ratio Ray Train / plain beside Ray':<34}{on_ray / plain_beside_ray:>12.3f}")
    atomic_write_json(RESULTS / "teacher_throughput.json", result)
    print(f"wrote {RESULTS / 'teacher_throughput.json'}")


if __name__ == "__main__":
    main()
