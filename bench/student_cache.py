"""Student stage-1 epoch time with the teacher live and with its cached hidden states.

    .venv/bin/python bench/student_cache.py [--domain books] [--threads 1]

Both runs train the same student (the quickstart: MiniLM-L6 teacher -> 2 layers, its 1,300
texts per domain) for one stage-1 epoch; the time is the training loop alone (model loading and
the final test evaluation excluded). "live" (``distill.teacher_signals: live``) runs the frozen
teacher inside every step; "cached" reads its fp16 hidden states from disk and recomputes the
attention scores from them. It also reports the one-time teacher pass and its bytes on disk. It
prints a table and writes bench/results/student_cache.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from metakd_ray.io import atomic_write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"


def cache_timings(domain: str = "books", out: Path = Path("outputs/bench-cache")) -> dict:
    """{mode: build/epoch seconds, steps, cache bytes} for one stage-1 epoch, recompute vs cached."""
    import shutil

    from metakd_ray.config import load_config
    from metakd_ray.data.prepare import prepare
    from metakd_ray.distill import StudentJob, distill_student, domain_data
    from metakd_ray.models import build_teacher, save_model
    from metakd_ray.prototypes import compute_prototype_scores
    from metakd_ray.signals import TeacherSignals, teacher_pass

    out = out.resolve()
    cfg = load_config("quickstart", [f"output_dir={out}", "distill.stage1_epochs=1", "distill.stage2_epochs=0"])
    data = prepare(cfg, quiet=True)
    scores = compute_prototype_scores(cfg, data, quiet=True)
    # Timing does not depend on the teacher's weights: an untrained meta-teacher suffices.
    teacher = build_teacher(cfg.model.teacher, data.labels, data.domains)
    teacher_dir = out / "teacher"
    save_model(teacher, teacher_dir, {"kind": "meta"})
    job = StudentJob("meta_kd", domain)
    dd = domain_data(cfg, data, domain, scores)

    timings = {}
    for mode, internals in (("live", False), ("cached", True)):
        path = out / f"signals-{mode}"
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        teacher_pass(cfg, dd.rows(), dd.row_scores(), teacher, internals, path)
        build = time.perf_counter() - t0
        signals = TeacherSignals(path)
        r = distill_student(cfg, dd, job, teacher_dir, signals, log=lambda *_: None)["result"]
        signals.close()
        timings[mode] = {"build_seconds": build, "epoch_seconds": r["train_seconds"], "steps": r["steps"],
                         "texts": len(dd.rows()), "cache_bytes": sum(f.stat().st_size for f in path.iterdir())}
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", default="books")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a student task's CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timings = cache_timings(args.domain)

    speedup = timings["live"]["epoch_seconds"] / timings["cached"]["epoch_seconds"]
    print(f"{'mode':<12}{'one-time build s':>18}{'stage-1 epoch s':>18}{'steps':>8}{'cache MB':>10}")
    for mode, t in timings.items():
        print(f"{mode:<12}{t['build_seconds']:>18.1f}{t['epoch_seconds']:>18.1f}{t['steps']:>8}"
              f"{t['cache_bytes'] / 1e6:>10.1f}")
    print(f"stage-1 speed-up with the cache: {speedup:.2f}x")
    result = {"domain": args.domain, "threads": args.threads, "timings": timings, "speedup": speedup,
              "cpus": os.cpu_count()}
    atomic_write_json(RESULTS / "student_cache.json", result)
    print(f"wrote {RESULTS / 'student_cache.json'}")


if __name__ == "__main__":
    main()
