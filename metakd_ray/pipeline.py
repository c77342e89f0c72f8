"""The whole Meta-KD pipeline: prepare -> prototypes -> teacher(s) -> students -> results.json.

    metakd-ray run quickstart                      # meta_kd and no_kd students
    metakd-ray run amazon --methods all            # the paper's table rows

Every stage is skipped when its output for the same inputs (content hash) already exists, and an
interrupted run continues where it stopped: the teacher from its last Ray Train checkpoint, the
students domain by domain.
"""

from __future__ import annotations

import shutil

import numpy as np

from metakd_ray.config import METHODS, Config
from metakd_ray.data import prepare
from metakd_ray.distill import StudentJob, run_students
from metakd_ray.errors import MetaKDError
from metakd_ray.io import atomic_write_json
from metakd_ray.prototypes import compute_prototype_scores, prototype_dir
from metakd_ray.teacher import train_teacher
from metakd_ray.tracking import experiment_id, pipeline_run


def resolve_methods(spec: str | None, cfg: Config) -> list[str]:
    if not spec:
        return list(cfg.distill.methods)
    if spec == "all":
        return list(METHODS)
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise MetaKDError(f"--methods: unknown method {m!r} (expected 'all' or some of: {', '.join(METHODS)})")
    return methods


def teachers_needed(cfg: Config, methods: list[str]) -> list[tuple[str, str]]:
    """(kind, domain) of every teacher the methods distil from, meta first."""
    jobs = [StudentJob(m, d) for m in methods for d in cfg.data.domains]
    needed = []
    for job in jobs:
        if job.teacher_kind:
            pair = (job.teacher_kind, job.domain if job.teacher_kind == "single" else "")
            if pair not in needed:
                needed.append(pair)
    return sorted(needed, key=lambda p: ("meta", "mix", "single").index(p[0]))


def train_teachers(cfg: Config, data, scores, needed, parent, fresh: bool = False) -> dict[str, dict]:
    out = {}
    for kind, domain in needed:
        summary = train_teacher(cfg, data, scores, kind, domain, parent, fresh=fresh)
        out[f"single-{domain}" if kind == "single" else kind] = summary
    return out


def run_pipeline(cfg: Config, methods: list[str], fresh: bool = False, teachers_only: bool = False,
                 require_teachers: bool = False) -> dict:
    data = prepare(cfg)
    scores = compute_prototype_scores(cfg, data)
    parent = pipeline_run(cfg)
    parent.log_artifact(prototype_dir(cfg, data) / "prototype_scores.png", "prototypes")
    needed = teachers_needed(cfg, methods)
    if require_teachers:
        missing = [k for k, d in needed if not (cfg.out / "teachers" / (f"single-{d}" if d else k) / "result.json").is_file()]
        if missing:
            raise MetaKDError(f"no trained teacher(s) {sorted(set(missing))} in {cfg.out / 'teachers'}: "
                              f"run `metakd-ray teacher` (or `metakd-ray run`) first")
    if fresh and not teachers_only:  # students and cached targets of the old teachers are stale now
        for stale in ("students", "teacher_outputs"):
            shutil.rmtree(cfg.out / stale, ignore_errors=True)
    teachers = train_teachers(cfg, data, scores, needed, parent, fresh)
    if teachers_only:
        return {"teachers": teachers}
    jobs = [StudentJob(m, d) for m in methods for d in cfg.data.domains]
    students, failures = run_students(cfg, data, jobs, teachers, scores, parent)
    results = assemble_results(cfg, data.domains, teachers, students, parent, failures)
    atomic_write_json(cfg.out / "results.json", results)
    parent.log_artifact(cfg.out / "results.json")
    print(format_table(results))
    print(f"results: {cfg.out / 'results.json'}   MLflow: {results['mlflow']['tracking_uri']} "
          f"(parent run {parent.run_id})\ntables over seeds and plots: metakd-ray report {cfg.out}")
    if failures:
        raise MetaKDError(f"{len(failures)} student(s) failed after retries: "
                          + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    parent.finish()
    return results


def assemble_results(cfg: Config, domains: list[str], teachers: dict, students: dict, parent, failures: dict) -> dict:
    teacher_table: dict = {}
    for name, summary in teachers.items():
        kind = summary["kind"]
        for domain, acc in summary["per_domain"].items():
            cell = {"dev_acc": acc["dev_acc"], "test_acc": acc["test_acc"], "run_id": summary["run_id"]}
            cell.update({k: summary[k] for k in ("params", "latency_ms") if k in summary})  # older teachers lack them
            teacher_table.setdefault(kind, {})[domain] = cell
    student_table = {
        method: {domain: {k: r[k] for k in ("dev_acc", "test_acc", "params", "latency_ms", "train_examples", "run_id")}
                 for domain, r in per.items()}
        for method, per in students.items()
    }
    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "student_seed": cfg.student_seed,
        "domains": domains,
        "teacher": teacher_table,
        "students": student_table,
        "failed": failures,
        "mlflow": {"tracking_uri": parent.tracking_uri, "experiment_id": experiment_id(cfg),
                   "parent_run_id": parent.run_id},
        "config_hash": cfg.hash(),
        "config": cfg.to_dict(),
    }


def format_table(results: dict) -> str:
    domains = results["domains"]
    header = f"{'test accuracy':<24}" + "".join(f"{d[:11]:>12}" for d in domains) + f"{'mean':>9}"
    lines = [header, "-" * len(header)]
    rows = [(f"teacher {k}", v) for k, v in results["teacher"].items()] + list(results["students"].items())
    for name, per in rows:
        cells = [per.get(d, {}).get("test_acc") for d in domains]
        mean = np.mean([c for c in cells if c is not None]) if any(c is not None for c in cells) else None
        lines.append(f"{name:<24}" + "".join(f"{c:>12.4f}" if c is not None else f"{'-':>12}" for c in cells)
                     + (f"{mean:>9.4f}" if mean is not None else f"{'-':>9}"))
    return "\n".join(lines)
