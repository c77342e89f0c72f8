"""Fidelity: does Meta-KD beat the baseline students on the real Amazon reviews, over seeds?

    .venv/bin/python bench/fidelity.py --budget small     # ~25 min on 2 cores (6 of them teachers)
    .venv/bin/python bench/fidelity.py                    # --budget full, ~60 min on 2 cores (measured 58)

The `amazon` preset (MiniLM-L6 teacher -> its first 2 layers) with the paper's rows: `no_kd`,
`tinybert_kd` from the single / mix / meta teachers, and `meta_kd`, over 3 student seeds; plus the
data-scarcity setting (target_fraction 0.1) for `no_kd`, `tinybert_kd(single)` and `meta_kd`.

To fit 2 cores, the budgets shrink the paper's protocol (the report lists every reduction):
fewer training reviews, 64 tokens, fewer epochs; and the 6 teachers are trained once and shared
by every student seed and both settings (so the ± is the students' seed spread, not the
teachers'). Everything logs to one MLflow store, bench/out/fidelity-<budget>/mlflow.db.

Writes bench/results/fidelity-<budget>/ (report.md, report.json, PNGs) and
bench/results/fidelity-<budget>.json (timings and the headline numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"

COMMON = ["model.teacher=minilm", "model.student_layers=2", "data.max_length=64", "teacher.num_workers=2",
          "teacher.batch_size=16", "teacher.lr=1e-4", "distill.stage1_lr=1e-4", "distill.stage2_lr=2e-4",
          "distill.temperature=0.2", "teacher.eval_every=25"]
# no_kd trains for as many steps as meta_kd's stage 1 + stage 2 together. The small budget's students
# take batches of 8: the same compute as 16 buys twice the steps, and 60 steps of 16 left them at chance.
BUDGETS = {
    "small": COMMON + ["data.max_train_per_domain=200", "data.max_dev_per_domain=60", "teacher.epochs=2",
                       "distill.batch_size=8", "distill.eval_every=25", "distill.stage1_epochs=1",
                       "distill.stage2_epochs=4", "distill.no_kd_epochs=5"],
    # 500 reviews per domain: at ~60 student examples/s on 2 cores, 800 would overrun 90 minutes.
    "full": COMMON + ["data.max_train_per_domain=500", "data.max_dev_per_domain=80", "teacher.epochs=2",
                      "distill.batch_size=16", "distill.eval_every=40", "distill.stage1_epochs=2",
                      "distill.stage2_epochs=4", "distill.no_kd_epochs=6"],
}
SETTINGS = {  # name -> (target_fraction, methods)
    "amazon": (1.0, "all"),
    "amazon-scarce10": (0.1, "no_kd,tinybert_kd(single),meta_kd"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds (default 3)")
    parser.add_argument("--out", help="work directory (default bench/out/fidelity-<budget>)")
    args = parser.parse_args()

    import ray

    from metakd_ray.config import load_config
    from metakd_ray.pipeline import resolve_methods, run_pipeline
    from metakd_ray.report import build_report, load_results

    work = Path(args.out or REPO / "bench" / "out" / f"fidelity-{args.budget}").resolve()
    store = f"sqlite:///{work / 'mlflow.db'}"
    anchor = work / "amazon-seed0"  # trains the teachers every other run shares
    timings, started = {}, time.time()
    # Seconds below exclude teacher training when an earlier invocation already trained them.
    teachers_reused = any((anchor / "teachers").glob("*/result.json"))
    try:
        for name, (fraction, methods) in SETTINGS.items():
            for seed in range(args.seeds):
                out = work / f"{name}-seed{seed}"
                overrides = BUDGETS[args.budget] + [
                    f"name={name}", f"output_dir={out}", f"distill.seed={seed}", f"data.target_fraction={fraction}",
                    f"tracking.tracking_uri={store}", "tracking.experiment=fidelity"]
                cfg = load_config("amazon", overrides)
                if out != anchor:
                    share_teachers(anchor, out)
                t0 = time.time()
                print(f"\n=== {name} seed {seed} ({time.time() - started:.0f}s so far) ===", flush=True)
                run_pipeline(cfg, resolve_methods(methods, cfg))
                timings[f"{name}-seed{seed}"] = round(time.time() - t0, 1)
    finally:
        ray.shutdown()

    report_dir = RESULTS / f"fidelity-{args.budget}"
    summary = build_report(load_results([str(work)]), report_dir)
    headline = {name: {"avg_test_acc": {row: cell["avg"] for row, cell in info["rows"].items()},
                       "meta_kd_margins": info["meta_kd_margins"]}
                for name, info in summary.items()}
    payload = {"budget": args.budget, "seeds": args.seeds, "overrides": BUDGETS[args.budget],
               "seconds_total": round(time.time() - started, 1), "seconds_per_run": timings,
               "teachers_trained_by_an_earlier_invocation": teachers_reused,
               "mlflow": store, "report": str(report_dir.relative_to(REPO)), "settings": headline}
    (RESULTS / f"fidelity-{args.budget}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nfidelity ({args.budget}): {payload['seconds_total']:.0f}s; report {report_dir / 'report.md'}; "
          f"json {RESULTS / f'fidelity-{args.budget}.json'}")


def share_teachers(anchor: Path, out: Path) -> None:
    """Point ``out`` at the anchor run's teachers and cached teacher outputs (their keys ignore the
    student seed and target_fraction, so the pipeline reuses them instead of retraining)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("teachers", "teacher_outputs"):
        (anchor / name).mkdir(parents=True, exist_ok=True)
        link = out / name
        if not link.is_symlink():
            link.symlink_to(anchor / name, target_is_directory=True)


if __name__ == "__main__":
    main()
