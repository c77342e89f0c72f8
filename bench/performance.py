"""Performance ratios in one run: where the time and memory of a Meta-KD pipeline go.

    .venv/bin/python bench/performance.py [--quick]

1. Ray Train vs a plain PyTorch loop: teacher training samples/s (bench/teacher_throughput.py).
2. K parallel student tasks vs the same K run one after another on Ray: speed-up and
   efficiency per core (speed-up / K).
3. Cached teacher hidden states vs the teacher live in every stage-1 step (bench/student_cache.py).
4. The teacher training step's achieved FLOP/s (matmul FLOPs counted by torch's FlopCounterMode,
   over the timed plain loop) vs this machine's measured fp32 matmul peak on the same threads.
5. Peak resident memory per stage, each stage run alone in a fresh process (what one worker needs).

Prints one table and writes bench/results/performance.json and performance.md. Reports, never asserts.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metakd_ray.io import atomic_write_json, atomic_write_text

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = Path(__file__).parent / "results"
WORK = Path("outputs/bench-performance").resolve()


def quickstart(*overrides: str):
    from metakd_ray.config import load_config

    return load_config("quickstart", [f"output_dir={WORK}", *overrides])


# --------------------------------------------------------------------------- 2. student fan-out


def _no_kd_student(cfg, dd, domain: str) -> float:
    from metakd_ray.distill import StudentJob, distill_student

    torch.set_num_threads(1)
    out = distill_student(cfg, dd, StudentJob("no_kd", domain), None, None, log=lambda *_: None)
    return out["result"]["train_seconds"]


def student_fanout(k: int, epochs: float) -> dict:
    """Wall seconds for K students one at a time vs all K at once, as 1-CPU Ray tasks."""
    import ray

    from metakd_ray.data.prepare import prepare
    from metakd_ray.distill import domain_data

    cfg = quickstart(f"distill.no_kd_epochs={epochs}")
    data = prepare(cfg, quiet=True)
    domains = (cfg.data.domains * k)[:k]
    scores = np.ones(len(data.splits["train"]))  # no_kd reads no prototype scores
    ray.init(num_cpus=k, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        task = ray.remote(num_cpus=1)(_no_kd_student)
        refs = {d: ray.put(domain_data(cfg, data, d, scores)) for d in set(domains)}
        ray.get([task.remote(cfg, refs[d], d) for d in domains])  # warm-up: K worker processes, imports
        t0 = time.perf_counter()
        for d in domains:
            ray.get(task.remote(cfg, refs[d], d))
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.get([task.remote(cfg, refs[d], d) for d in domains])
        parallel = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {"k": k, "sequential_s": sequential, "parallel_s": parallel, "speedup": sequential / parallel,
            "efficiency_per_core": sequential / parallel / k}


# --------------------------------------------------------------------------- 4. FLOP/s vs peak


def matmul_peak(threads: int, n: int = 2048, repeats: int = 8) -> float:
    """Best fp32 FLOP/s of an n x n matmul (2 n^3 FLOPs) on ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def training_flops(steps: int, threads: int, batch_size: int) -> dict:
    """Matmul FLOPs of the teacher's training steps and the FLOP/s the timed plain loop achieves."""
    from torch.utils.flop_counter import FlopCounterMode
    from teacher_throughput import plain_loop, plain_loop_inputs

    from metakd_ray.data.prepare import prepare
    from metakd_ray.prototypes import compute_prototype_scores

    cfg = quickstart(f"teacher.batch_size={batch_size}", "teacher.num_workers=1", f"teacher.cpus_per_worker={threads}")
    data = prepare(cfg, quiet=True)
    settings, train, weights = plain_loop_inputs(cfg, data, compute_prototype_scores(cfg, data, quiet=True), steps)
    samples_per_s = plain_loop(settings, train, weights, steps)
    with FlopCounterMode(display=False) as counter:  # same batches again, counted not timed
        plain_loop(settings, train, weights, steps)
    flops = counter.get_total_flops()
    seconds = steps * batch_size / samples_per_s
    return {"steps": steps, "flops_per_step": flops / steps, "achieved_flop_s": flops / seconds,
            "samples_per_s": samples_per_s}


# --------------------------------------------------------------------------- 5. memory per stage


def _peak_rss_bytes() -> int:
    """This process's own high-water RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak
    across fork+exec into it, so every spawned stage would report the benchmark's own peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _stage(name: str, queue) -> None:
    """Run one stage alone in this (fresh) process; report its peak RSS and the import baseline."""
    torch.set_num_threads(2)
    from metakd_ray.data.prepare import prepare
    from metakd_ray.distill import StudentJob, distill_student, domain_data
    from metakd_ray.models import build_teacher, save_model
    from metakd_ray.prototypes import compute_prototype_scores
    from metakd_ray.signals import TeacherSignals, teacher_pass

    baseline = _peak_rss_bytes()
    out = WORK / "memory" / name
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's caches would hide the stage's real work
    cfg = quickstart("distill.stage1_epochs=1", "distill.stage2_epochs=1", "data.max_train_per_domain=64",
                     "teacher.cpus_per_worker=2", f"output_dir={out}")
    data = prepare(cfg, quiet=True)
    if name != "prepare":
        scores = compute_prototype_scores(cfg, data, quiet=True)
    if name == "teacher":
        from teacher_throughput import plain_loop, plain_loop_inputs

        plain_loop(*plain_loop_inputs(cfg, data, scores, 8), 8)
    if name == "student":
        teacher = build_teacher(cfg.model.teacher, data.labels, data.domains)
        save_model(teacher, cfg.out / "teacher", {"kind": "meta"})
        dd = domain_data(cfg, data, "books", scores)
        teacher_pass(cfg, dd.rows(), dd.row_scores(), teacher, True, cfg.out / "signals")
        del teacher
        distill_student(cfg, dd, StudentJob("meta_kd", "books"), cfg.out / "teacher", TeacherSignals(cfg.out / "signals"),
                        log=lambda *_: None)
    queue.put((baseline, _peak_rss_bytes()))


def stage_memory() -> dict:
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for name in ("prepare", "prototypes", "teacher", "student"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_stage, args=(name, queue))
        proc.start()
        baseline, peak = queue.get(timeout=1800)
        proc.join()
        out[name] = {"peak_rss_bytes": peak, "after_imports_bytes": baseline}
    return out


# --------------------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (~5 min instead of ~10)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    steps = 16 if args.quick else 40

    from student_cache import cache_timings
    from teacher_throughput import measure_throughput

    started = time.time()
    print("[performance] 1/5 Ray Train vs plain loop", flush=True)
    throughput = measure_throughput(steps, args.threads, 16)
    print("[performance] 2/5 parallel student tasks", flush=True)
    fanout = student_fanout(args.threads, 0.5 if args.quick else 1.0)
    print("[performance] 3/5 teacher cache vs recompute", flush=True)
    torch.set_num_threads(1)
    cache = cache_timings(out=WORK / "cache")
    print("[performance] 4/5 FLOP/s vs matmul peak", flush=True)
    peak = matmul_peak(args.threads)
    flops = training_flops(steps, args.threads, 16)
    print("[performance] 5/5 memory per stage", flush=True)
    memory = stage_memory()

    from teacher_throughput import machine_info

    result = {"quick": args.quick, "threads": args.threads, "seconds": round(time.time() - started, 1),
              "teacher_throughput": throughput, "student_fanout": fanout, "teacher_cache": cache,
              "cache_speedup": cache["live"]["epoch_seconds"] / cache["cached"]["epoch_seconds"],
              "matmul_peak_flop_s": peak, "training_flops": flops, "memory": memory,
              "machine": machine_info()}
    result["ratios"] = {name.strip(): value for name, value, _ in ratio_rows(result)}
    print("\n" + text_table(result))
    atomic_write_json(RESULTS / "performance.json", result)
    atomic_write_text(RESULTS / "performance.md", markdown(result))
    print(f"\nwrote {RESULTS / 'performance.json'} and performance.md ({result['seconds']:.0f}s)")


def ratio_rows(result: dict) -> list[tuple[str, float, str]]:
    """(measure, ratio, detail) for each ratio, from a result dict (fresh or loaded from the JSON)."""
    throughput, fanout, cache = result["teacher_throughput"], result["student_fanout"], result["teacher_cache"]
    flops, peak, threads = result["training_flops"], result["matmul_peak_flop_s"], result["threads"]
    return [
        ("Ray Train / plain loop (teacher samples/s)", throughput["ratio_ray_over_plain"],
         f"{throughput['ray_train_samples_per_s']:.1f} vs {throughput['plain_samples_per_s']:.1f} samples/s; "
         "target >= 0.95"),
        ("  same, vs plain loop beside idle Ray", throughput["ratio_ray_over_plain_beside_ray"],
         f"plain beside Ray {throughput['plain_beside_idle_ray_samples_per_s']:.1f} samples/s"),
        (f"{fanout['k']} parallel / sequential student tasks (speed-up)", fanout["speedup"],
         f"{fanout['sequential_s']:.1f}s vs {fanout['parallel_s']:.1f}s"),
        ("  efficiency per core", fanout["efficiency_per_core"], "speed-up / K"),
        ("cached / live teacher (stage-1 speed-up)", result["cache_speedup"],
         f"{cache['live']['epoch_seconds']:.1f}s vs {cache['cached']['epoch_seconds']:.1f}s per epoch"),
        ("teacher step FLOP/s / matmul peak", flops["achieved_flop_s"] / peak,
         f"{flops['achieved_flop_s'] / 1e9:.1f} vs {peak / 1e9:.1f} GFLOP/s on {threads} threads"),
    ]


def text_table(result: dict) -> str:
    lines = [f"{'measure':<50}{'ratio':>8}   detail", "-" * 110]
    lines += [f"{name:<50}{value:>8.3f}   {detail}" for name, value, detail in ratio_rows(result)]
    lines += ["", f"{'stage (fresh process)':<24}{'peak RSS MB':>12}{'after imports MB':>18}"]
    lines += [f"{name:<24}{m['peak_rss_bytes'] / 1e6:>12.0f}{m['after_imports_bytes'] / 1e6:>18.0f}"
              for name, m in result["memory"].items()]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = ["# metakd-ray performance", "",
             f"{machine['cpus']} CPUs, torch {machine['torch']}, ray {machine['ray']}, "
             f"{result['threads']} threads{', --quick' if result['quick'] else ''}; {result['seconds']:.0f} s in all.",
             "", "| measure | ratio | detail |", "|---|---|---|"]
    lines += [f"| {name.strip()} | {value:.3f} | {detail} |" for name, value, detail in ratio_rows(result)]
    lines += ["", "Peak resident memory of each stage, run alone in a fresh process with its caches wiped:", "",
              "| stage | peak RSS MB | after imports MB |", "|---|---|---|"]
    lines += [f"| {name} | {m['peak_rss_bytes'] / 1e6:.0f} | {m['after_imports_bytes'] / 1e6:.0f} |"
              for name, m in result["memory"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
