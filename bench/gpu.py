"""GPU benchmark: the Ray Train teacher against a plain loop, and the paper-protocol pipeline end to end.

    python bench/gpu.py                  # on a CUDA host (offline once the dependencies are installed)
    python bench/gpu.py --quick          # a smoke run of every path in minutes; also on a CPU-only machine

(a) samples/s of a plain PyTorch loop and of a 1-worker Ray Train teacher on the same device, same
    batch, same precision and the same ``train_step`` (the target is a ratio >= 0.9);
(b) ``run amazon --methods all`` at the paper's protocol (full splits, 128 tokens, teacher 3 epochs,
    stage 1 10 epochs, stage 2 3 epochs), one seed: wall seconds per stage, peak GPU memory
    (``nvidia-smi``, every process) and test accuracy;
(c) how many students trained at once (from their start and finish times).

It prints a table and writes ``bench/results/gpu/gpu.json`` and ``gpu.md`` (``--quick`` writes
``gpu-quick.*``). ``--model DIR`` uses a local model directory instead of the packaged MiniLM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = Path(__file__).parent / "results" / "gpu"
WORK = Path("outputs/bench-gpu").resolve()


class GpuMemory:
    """Peak memory in use on the GPUs (all processes: Ray workers included), sampled by nvidia-smi."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_mib, self._stop = interval, 0, threading.Event()
        self.available = shutil.which("nvidia-smi") is not None
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            self.peak_mib = max([self.peak_mib] + [int(x) for x in out if x.isdigit()])
            time.sleep(self.interval)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()


def max_concurrent(intervals: list[tuple[float, float]]) -> int:
    """The largest number of [start, end) intervals that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def throughput(cfg, steps: int) -> dict:
    """(a): the plain loop and the Ray Train loop on the same device, batch and precision."""
    import ray
    from teacher_throughput import plain_loop, plain_loop_inputs, ray_loop

    from metakd_ray.cluster import resolve_precision, task_device
    from metakd_ray.data.prepare import prepare
    from metakd_ray.prototypes import compute_prototype_scores

    data = prepare(cfg, quiet=True)
    settings, train, weights = plain_loop_inputs(cfg, data, compute_prototype_scores(cfg, data, quiet=True), steps)
    dev = data.splits["dev"].take(np.arange(8))
    device = task_device()
    plain_loop(settings, train, weights, min(steps, 10), device)  # warm-up: kernels, allocator
    plain = plain_loop(settings, train, weights, steps, device)
    on_ray = ray_loop(cfg, settings, train, dev, weights, WORK / "ray")
    return {"device": device.type, "precision": resolve_precision(cfg.precision, device),
            "batch_size": cfg.teacher.batch_size, "steps": steps, "plain_samples_per_s": plain,
            "ray_train_samples_per_s": on_ray, "ratio": on_ray / plain, "target_ratio": 0.9,
            "ray": ray.__version__}


def pipeline(cfg, methods: list[str]) -> dict:
    """(b) and (c): `metakd-ray run` itself, which times its stages into results.json."""
    from metakd_ray.errors import MetaKDError
    from metakd_ray.pipeline import run_pipeline

    start = time.perf_counter()
    with GpuMemory() as memory:
        try:
            results = run_pipeline(cfg, methods)
        except MetaKDError as error:  # students that failed after retries: results.json holds the rest
            if not (cfg.out / "results.json").is_file():
                raise
            print(f"[gpu] {error}")
            results = json.loads((cfg.out / "results.json").read_text())
    finished = [r for per in results["students"].values() for r in per.values() if "started_at" in r]
    return {"seconds": results["stage_seconds"], "total_seconds": time.perf_counter() - start,
            "teachers": len({c["run_id"] for per in results["teacher"].values() for c in per.values()}),
            "students": len(finished), "failed": results["failed"],
            "max_students_at_once": max_concurrent([(r["started_at"], r["finished_at"]) for r in finished]),
            "peak_gpu_memory_mib": memory.peak_mib if memory.available else None,
            "test_accuracy": {row: float(np.mean([c["test_acc"] for c in per.values()]))
                              for row, per in [(f"teacher {k}", v) for k, v in results["teacher"].items()]
                              + list(results["students"].items())},
            "precision": results["precision"]}


def markdown(result: dict) -> str:
    a, b = result["throughput"], result["pipeline"]
    lines = [f"# GPU benchmark ({result['machine']['gpu']}, {result['budget']})", "",
             "## (a) Teacher training throughput", "",
             "| loop | samples/s |", "|---|---|",
             f"| plain PyTorch | {a['plain_samples_per_s']:,.0f} |",
             f"| Ray Train, 1 worker | {a['ray_train_samples_per_s']:,.0f} |",
             f"| ratio | {a['ratio']:.3f} (target >= {a['target_ratio']}) |", "",
             f"Device {a['device']}, {a['precision']}, batch {a['batch_size']}, {a['steps']} steps.", "",
             "## (b) The pipeline, `--methods all`, one seed", "",
             "| stage | wall s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in b["seconds"].items()]
    lines += [f"| **total** | **{b['total_seconds']:.1f}** |", "",
              f"{b['teachers']} teachers, {b['students']} students; peak GPU memory "
              f"{b['peak_gpu_memory_mib'] if b['peak_gpu_memory_mib'] is not None else 'n/a'} MiB; "
              f"precision {b['precision']}.", "",
              f"## (c) Students at once: {b['max_students_at_once']}", "",
              "| row | mean test accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in b["test_accuracy"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run at tiny sizes (minutes; runs on CPU too)")
    parser.add_argument("--model", default="minilm", help="model.teacher (a local directory on an offline host)")
    parser.add_argument("--steps", type=int, default=200, help="steps of each throughput loop")
    parser.add_argument("--gpus-per-student", type=float, default=0.2)
    args = parser.parse_args()

    from metakd_ray.terminal import quiet_environment
    quiet_environment()  # the CLI's quiet terminal (no MLflow download bars) here too
    from metakd_ray.cluster import init_ray
    from metakd_ray.config import load_config
    from metakd_ray.io import atomic_write_json, atomic_write_text
    from metakd_ray.methods import METHODS

    cuda = torch.cuda.is_available()
    if not cuda:
        print("[gpu] no CUDA device here: measuring the CPU path (the numbers are not GPU numbers)")
    shutil.rmtree(WORK, ignore_errors=True)  # every stage measured from scratch
    gpu = ["teacher.use_gpu=true", f"distill.gpus_per_task={args.gpus_per_student}"] if cuda else []
    common = [f"model.teacher={args.model}", "teacher.num_workers=1", "teacher.cpus_per_worker=1",
              "distill.cpus_per_task=1", *gpu]
    preset = "quickstart" if args.quick else "amazon"
    # --quick: a smoke run of every code path (64 reviews a domain, one epoch a stage), not a measurement;
    # general distillation as in the paper protocol, which quickstart skips
    quick = ["data.max_train_per_domain=64", "data.max_dev_per_domain=32", "data.max_test_per_domain=32",
             "teacher.epochs=1", "teacher.eval_every=1000", "model.student_init=general", "general.epochs=1",
             "distill.unlabelled_per_domain=64", "distill.stage1_epochs=1", "distill.stage2_epochs=1",
             "distill.no_kd_epochs=1"] if args.quick else []
    bench_cfg = load_config(preset, [f"output_dir={WORK}/throughput", *common,
                                     f"teacher.batch_size={256 if cuda else 16}"])
    run_cfg = load_config(preset, [f"output_dir={WORK}/{preset}", *common, *quick])
    init_ray(run_cfg)
    result = {"budget": "quick" if args.quick else "paper protocol",
              "machine": {"gpu": torch.cuda.get_device_name(0) if cuda else "none (CPU)",
                          "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda},
              "throughput": throughput(bench_cfg, args.steps if cuda else min(args.steps, 20)),
              "pipeline": pipeline(run_cfg, list(METHODS))}
    name = "gpu-quick" if args.quick else "gpu"
    atomic_write_json(RESULTS / f"{name}.json", result)
    atomic_write_text(RESULTS / f"{name}.md", markdown(result))
    print(markdown(result))
    print(f"wrote {RESULTS / name}.json and .md")


if __name__ == "__main__":
    main()
