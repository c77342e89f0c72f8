"""Fidelity: does Meta-KD beat the baseline students on the real Amazon reviews and MNLI genres, over seeds?

    .venv/bin/python bench/fidelity.py --budget small     # 2 cores, under 20 min: 1 seed, the decisive rows
    .venv/bin/python bench/fidelity.py --budget table     # 2 cores: 1 seed of every row and setting
    .venv/bin/python bench/fidelity.py                    # --budget full (2 cores): 3 seeds, ~90 min
    .venv/bin/python bench/fidelity.py --budget full-transfer   # amazon-3seeds with a transfer set, ~71 min
    .venv/bin/python bench/fidelity.py --budget narrow    # the narrow student with a transfer set, 3 seeds
    python bench/fidelity.py --budget paper --set teacher.use_gpu=true --set distill.gpus_per_task=0.5
                                                          # the `amazon` preset's protocol, on a GPU host

The `amazon` preset (MiniLM-L6 teacher -> a 2-layer student general-distilled from it). The CPU
budgets share one size (200 reviews per domain, 64 tokens) and differ in what they spend it on:

- small, 1 seed (15 min on 2 cores): `amazon-core`, the quick check: one meta-teacher, one general
  student, and `no_kd`, `tinybert_kd(meta)` and `meta_kd` at full-transfer's settings but half its
  stage 2 (1.5 epochs, which keeps it under 20 minutes);
- table, 1 seed (about 100 min on 2 cores): `amazon` with every row of the paper's table
  (`--methods all`: `no_kd`, `tinybert_kd` from the single / mix / mtl / meta teachers, `mtn_kd`
  (the single-domain teachers' soft labels averaged) and `meta_kd`), and one seed of each further
  setting below;
- full, 3 seeds (fits 90 min on 2 cores): `amazon-3seeds`, the decisive rows (`no_kd`, the two
  strongest single-teacher KD rows of the table budget, `meta_kd`), and `amazon-scarce10`;
- full-transfer, 3 seeds: `amazon-3seeds` again, with every distilling student also learning its
  teacher's soft labels on 1,000 unlabelled reviews of its domain (`distill.unlabelled_per_domain`,
  as the quickstart does), stage 2 over 3 epochs of that set: 510 steps instead of the full
  budget's 160 (no_kd is unchanged: it needs gold labels), at the paper's tau = 1 (tau and stage 2's
  length chosen on dev) instead of 0.2;
- narrow, 3 seeds (about 21 min on 2 cores): `amazon-narrow` with the same transfer set and tau;
- paper, 3 seeds: every setting at the preset's own sizes, for a GPU host.

Further settings, each its own section of the report:

- `amazon-scarce10`: 10 % of the target domain's training data (the teacher still sees all of it),
  every stage at least `distill.min_steps` optimiser steps;
- `amazon-unseen-<domain>`: the meta-teacher never sees that domain (`data.held_out_domain`); read
  that domain's column (books in the table budget, each domain in turn in the paper budget);
- `amazon-narrow`: a narrower general-distilled student (4 layers x 128 wide, 4 heads), for its size,
  latency and accuracy gap;
- `mnli` (table budget: four rows) and `mnli-all` (paper budget: every row): the `mnli`
  preset, the paper's second table, on the 5-genre subset in ../shared/data.

To fit 2 cores, the budgets shrink the paper's protocol (the report lists every reduction), and the
teachers and general students are trained once and shared by every student seed (so the ± is the
students' seed spread, not the teachers'). Students are selected on the full dev sets, never test.
The report's Meta-KD-minus-baseline intervals are paired bootstraps over seeds and test examples.
Everything logs to one MLflow store, bench/out/fidelity-<budget>/mlflow.db.

Writes bench/results/fidelity-<budget>/ (report.md, report.json, PNGs) and
bench/results/fidelity-<budget>.json (timings and the headline numbers).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from metakd_ray.config import load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"

# Chosen for 2 cores, each on the dev sets (docs/fidelity.md has what was tried and what it gave):
# a short, faster-learning teacher, tau 0.2 for its unconfident soft labels, the full dev sets for selection.
COMMON = ["model.teacher=minilm", "model.student_layers=2", "model.student_init=general",
          "data.truncation=head_tail", "data.max_dev_per_domain=0", "teacher.num_workers=2",
          "teacher.batch_size=16", "teacher.lr=1e-4", "teacher.eval_every=25", "distill.stage1_lr=1e-4",
          "distill.stage1_schedule=linear", "distill.stage2_lr=2e-4", "distill.temperature=0.2"]
# Per-run sizes that fit 2 cores; the table and full budgets differ in seeds and rows, not sizes.
CPU_SIZES = ["data.max_train_per_domain=200", "data.max_length=64", "teacher.epochs=2", "general.epochs=2",
             "distill.batch_size=8", "distill.eval_every=25", "distill.stage1_epochs=1", "distill.stage2_epochs=4",
             "distill.no_kd_epochs=5", "distill.min_steps=60"]
# 1,200 texts per domain: stage 1 a quarter epoch (the budget's floor of 60 steps), stage 2 1.5 epochs.
TRANSFER_SET = ["distill.unlabelled_per_domain=1000", "distill.stage1_epochs=0.25", "distill.stage2_epochs=1.5"]
# The 2-epoch teachers are confident, so the paper's tau = 1 suits them.
PAPER_TEMPERATURE = ["distill.temperature=1.0"]
# Dev accuracy still rose at the end of a 1.5-epoch stage 2 (small keeps 1.5 to stay under 20 minutes).
LONGER_STAGE2 = ["distill.stage2_epochs=3"]
# Post-softmax attention maps as stage 1's and general distillation's targets (the authors' EasyNLP code).
PROBS = ["distill.attention_target=probs"]
# what small, full-transfer and narrow share: the CPU sizes with a transfer set
WITH_TRANSFER = COMMON + CPU_SIZES + TRANSFER_SET + PAPER_TEMPERATURE + PROBS
BUDGETS = {
    "small": WITH_TRANSFER,
    "table": COMMON + CPU_SIZES,
    "full": COMMON + CPU_SIZES,
    "full-transfer": WITH_TRANSFER + LONGER_STAGE2,
    "narrow": WITH_TRANSFER,
    "paper": [],  # the amazon preset as it is
}
# A narrow student starts as the teacher's layers compressed (general.narrow_init) and imitates the
# pretrained teacher on 1,000 more reviews per domain from the training partitions, labels unused.
NARROW = ["model.student_layers=4", "model.student_hidden=128", "model.student_heads=4", "general.lr=3e-4",
          "general.epochs=3", "general.unlabelled_per_domain=1000"]
# setting -> (preset, overrides, methods, seeds for this budget)
SETTINGS = {
    "amazon": ("amazon", [], "all", {"table": 1, "paper": 3}),
    # the rows that need only the meta-teacher: Meta-KD against the label-trained student and
    # single-teacher KD from the same teacher
    "amazon-core": ("amazon", [], "no_kd,tinybert_kd(meta),meta_kd", {"small": 1}),
    # the decisive rows over 3 seeds: Meta-KD against the label-trained student and the two strongest
    # single-teacher KD rows of the table budget
    "amazon-3seeds": ("amazon", [], "no_kd,tinybert_kd(mix),tinybert_kd(meta),meta_kd",
                      {"full": 3, "full-transfer": 3}),
    "amazon-scarce10": ("amazon", ["data.target_fraction=0.1"], "no_kd,tinybert_kd(single),meta_kd",
                        {"table": 1, "full": 3, "paper": 3}),
    # each domain in turn unseen by its meta-teacher on a GPU host; books alone on 2 cores
    **{f"amazon-unseen-{domain}": ("amazon", [f"data.held_out_domain={domain}"], "meta_kd,no_kd",
                                   {"table": 1, "paper": 3} if domain == "books" else {"paper": 3})
       for domain in load_config("amazon").data.domains},
    "amazon-narrow": ("amazon", NARROW, "meta_kd,no_kd,tinybert_kd(meta)", {"table": 1, "narrow": 3, "paper": 3}),
    # the paper's second table: premise/hypothesis pairs (head truncation), 5 genres
    "mnli": ("mnli", ["data.truncation=head"], "meta_kd,no_kd,tinybert_kd(mix),tinybert_kd(meta)", {"table": 1}),
    "mnli-all": ("mnli", [], "all", {"paper": 3}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--seeds", type=int, help="student seeds of every setting (default: per setting)")
    parser.add_argument("--only", help="comma-separated settings to run (default: all of the budget)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run, e.g. teacher.use_gpu=true")
    parser.add_argument("--out", help="work directory (default bench/out/fidelity-<budget>)")
    args = parser.parse_args()

    import ray

    from metakd_ray.io import atomic_write_json, read_json
    from metakd_ray.pipeline import resolve_methods, run_pipeline
    from metakd_ray.report import build_report, load_results
    from metakd_ray.terminal import quiet_environment

    quiet_environment()  # the CLI's quiet terminal (no MLflow download bars) here too
    work = Path(args.out or REPO / "bench" / "out" / f"fidelity-{args.budget}").resolve()
    mlflow_db = work / "mlflow.db"
    started = time.time()
    # seconds below exclude training that an earlier invocation already did (teachers, general students)
    reused = sorted(str(p.parent.relative_to(work)) for p in work.glob("shared-*/*/*/result.json"))
    wanted = args.only.split(",") if args.only else [name for name, (*_, seeds) in SETTINGS.items()
                                                     if seeds.get(args.budget)]
    report_dir, summary_path = RESULTS / f"fidelity-{args.budget}", RESULTS / f"fidelity-{args.budget}.json"
    # an --only invocation adds its settings and timings to those of the invocations before it
    earlier = (read_json(summary_path) or {}) if args.only else {}
    settings_run, seconds_per_run = earlier.get("settings_run", {}), earlier.get("seconds_per_run", {})

    def record(headline: dict | None = None) -> None:
        """Write the summary JSON: after every run (a later failure keeps what was measured), then
        with the report's headline numbers."""
        atomic_write_json(summary_path, {
            "budget": args.budget, "overrides": BUDGETS[args.budget] + args.set, "settings_run": settings_run,
            "seconds_this_invocation": round(time.time() - started, 1), "seconds_per_run": seconds_per_run,
            "seconds_all_runs": round(sum(seconds_per_run.values()), 1),
            "trained_by_an_earlier_invocation": reused, "mlflow": f"sqlite:///{shown(mlflow_db)}",
            "report": shown(report_dir), "settings": headline or earlier.get("settings", {})})

    try:
        for name in wanted:
            preset, overrides, methods, seeds = SETTINGS[name]
            settings_run[name] = list(SETTINGS[name][:3])
            for seed in range(args.seeds or seeds.get(args.budget, 0)):
                out = work / f"{name}-seed{seed}"
                cfg = load_config(preset, BUDGETS[args.budget] + overrides + args.set + [
                    f"name={name}", f"output_dir={out}", f"distill.seed={seed}",
                    f"tracking.tracking_uri=sqlite:///{mlflow_db}", "tracking.experiment=fidelity"])
                rows = resolve_methods(methods, cfg)
                done = read_json(out / "results.json")
                if (done and done.get("config_hash") == cfg.hash() and not done.get("failed")
                        and set(rows) <= set(done["students"])):
                    print(f"\n=== {name} seed {seed}: finished by an earlier invocation, same config "
                          f"({out / 'results.json'}; delete it to rerun) ===", flush=True)
                    continue
                share_teachers(work / f"shared-{preset}-{cfg.data.held_out_domain or 'all'}", out)
                t0 = time.time()
                print(f"\n=== {name} seed {seed} ({time.time() - started:.0f}s so far) ===", flush=True)
                run_pipeline(cfg, rows)
                seconds_per_run[f"{name}-seed{seed}"] = round(time.time() - t0, 1)
                record()
    finally:
        ray.shutdown()

    results = [dict(r, source=shown(Path(r["source"]))) for r in load_results([str(work)])]
    summary = build_report(results, report_dir)
    record({name: {"avg_test_acc": {row: cell["avg"] for row, cell in info["rows"].items()},
                   "meta_kd_margins": info["meta_kd_margins"]}
            for name, info in summary.items()})
    print(f"\nfidelity ({args.budget}): {time.time() - started:.0f}s; report {report_dir / 'report.md'}; "
          f"json {summary_path}")


def share_teachers(shared: Path, out: Path) -> None:
    """Point every run's teachers, teacher outputs and general students at one shared directory:
    their keys ignore the student seed, so the pipeline trains each once and reuses it. A teacher
    directory holds one teacher per name, so settings whose teachers differ (a held-out domain)
    get their own shared directory."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("teachers", "teacher_outputs", "general"):
        (shared / name).mkdir(parents=True, exist_ok=True)
        link = out / name
        if not link.is_symlink():
            link.symlink_to(shared / name, target_is_directory=True)


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it, so the committed summary and report name the
    run outputs (``sqlite:///`` URIs included) relative to whichever checkout ran them, not one machine's paths."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


if __name__ == "__main__":
    main()
