"""Sweep efficiency: the same trial budget with and without ASHA, over tune_spaces/distill.yaml.

    .venv/bin/python bench/sweep_efficiency.py [--trials 8] [--concurrency 2] [--quick]

Both sweeps use the same seeded TPE searcher and the same budget on the quickstart data (with
the meta-teacher trained once and shared). It reports each sweep's best dev accuracy and its
total trial-epochs, where one trial-epoch is one domain's student trained to the end. The target
is that ASHA gets within 0.5 points of the no-ASHA best while using at most 50 % of the
trial-epochs; this script reports, never asserts. ``--quick`` shortens the student schedules so
the whole benchmark fits in about 20 minutes on 2 cores. It prints a table and writes
bench/results/sweep_efficiency.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64 tokens, 1 stage-1 and 4 stage-2 epochs per student")
    args = parser.parse_args()

    from metakd_ray.config import load_config
    from metakd_ray.io import atomic_write_json
    from metakd_ray.tune import sweep

    from fidelity import shown  # bench/ is on sys.path when a script in it runs

    overrides = ["output_dir=outputs/bench-sweep"]
    if args.quick:
        overrides += ["distill.stage1_epochs=1", "distill.stage2_epochs=4", "data.max_length=64"]
    cfg = load_config("quickstart", overrides)
    space = str(REPO / "tune_spaces" / "distill.yaml")
    runs = {}
    for label, asha in (("no ASHA", False), ("ASHA", True)):
        name = f"bench-{'asha' if asha else 'full'}-{int(time.time())}"
        start = time.time()
        out = sweep(cfg, space, args.trials, args.concurrency, name=name, asha=asha)
        full = max(t["domains_done"] or 0 for t in out["trials"])
        best_full = max((t["mean_dev_acc"] for t in out["trials"] if (t["domains_done"] or 0) >= full), default=None)
        runs[label] = {"best_dev_acc": best_full, "trial_epochs": out["trial_epochs"],
                       "seconds": round(time.time() - start, 1), "sweep_dir": shown(Path(out["dir"]).resolve())}
    base, asha = runs["no ASHA"], runs["ASHA"]
    gap = (base["best_dev_acc"] - asha["best_dev_acc"]) * 100
    share = asha["trial_epochs"] / base["trial_epochs"]
    print(f"\n{'sweep':<10}{'best dev acc':>14}{'trial-epochs':>14}{'seconds':>10}")
    for label, r in runs.items():
        print(f"{label:<10}{r['best_dev_acc']:>14.4f}{r['trial_epochs']:>14}{r['seconds']:>10.0f}")
    print(f"ASHA: {gap:+.2f} points behind, {share:.0%} of the trial-epochs (target: <= 0.5 points, <= 50 %)")
    result = {"trials": args.trials, "concurrency": args.concurrency, "quick": args.quick, "runs": runs,
              "asha_gap_points": gap, "asha_trial_epoch_share": share}
    atomic_write_json(RESULTS / "sweep_efficiency.json", result)
    print(f"wrote {RESULTS / 'sweep_efficiency.json'}")


if __name__ == "__main__":
    main()
