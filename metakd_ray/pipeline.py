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

from metakd_ray.config import Config
from metakd_ray.data.prepare import prepare
from metakd_ray.distill import StudentJob, run_students
from metakd_ray.errors import MetaKDError
from metakd_ray.io import atomic_write_json, text_table
from metakd_ray.methods import METHODS, TEACHER_KINDS, method, teacher_name
from metakd_ray.outputs import Store, teacher_dir
from metakd_ray.prototypes import compute_prototype_scores, prototype_dir
from metakd_ray.teacher import train_teacher
from metakd_ray.tracking import experiment_id, pipeline_run


def resolve_methods(spec: str | None, cfg: Config) -> list[str]:
    if not spec:
        return list(cfg.distill.methods)
    if spec == "all":
        return list(METHODS)
    names = [m.strip() for m in spec.split(",") if m.strip()]
    for name in names:
        method(name, "--methods", also="'all'")
    return names


def teachers_needed(cfg: Config, methods: list[str]) -> list[tuple[str, str]]:
    """(kind, domain) of every teacher the methods distil from, meta first."""
    needed = []
    for name in methods:
        kind = method(name).teacher_kind
        for domain in cfg.data.domains if kind else ():
            pair = (kind, domain if kind == "single" else "")
            if pair not in needed:
                needed.append(pair)
    return sorted(needed, key=lambda p: TEACHER_KINDS.index(p[0]))


def train_teachers(cfg: Config, data, scores, needed, parent, fresh: bool = False) -> dict[str, dict]:
    return {teacher_name(kind, domain): train_teacher(cfg, data, scores, kind, domain, parent, fresh=fresh)
            for kind, domain in needed}


def run_pipeline(cfg: Config, methods: list[str], fresh: bool = False, teachers_only: bool = False,
                 require_teachers: bool = False) -> dict:
    data = prepare(cfg)
    scores = compute_prototype_scores(cfg, data)
    parent = pipeline_run(cfg)
    parent.log_artifact(prototype_dir(cfg, data) / "prototype_scores.png", "prototypes")
    needed = teachers_needed(cfg, methods)
    store = Store.of(cfg)
    if require_teachers:
        missing = [teacher_name(k, d) for k, d in needed if not _have_teacher(cfg, store, teacher_name(k, d))]
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
    results = assemble_results(cfg, data.domains, teachers, students, parent, failures, store)
    atomic_write_json(cfg.out / "results.json", results)
    if store:
        store.put(cfg.out / "results.json", "results.json")
    parent.log_artifact(cfg.out / "results.json")
    print(format_table(results))
    print(f"results: {cfg.out / 'results.json'}   MLflow: {results['mlflow']['tracking_uri']} "
          f"(parent run {parent.run_id})\ntables over seeds and plots: metakd-ray report {cfg.out}"
          + (f"\na copy of teachers, students and results.json: {store.uri}" if store else ""))
    if failures:
        raise MetaKDError(f"{len(failures)} student(s) failed after retries: "
                          + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    parent.finish()
    return results


def _have_teacher(cfg: Config, store: Store | None, name: str) -> bool:
    directory = teacher_dir(cfg, name)
    return (directory / "result.json").is_file() or bool(store and store.get(f"teachers/{name}", directory))


def assemble_results(cfg: Config, domains: list[str], teachers: dict, students: dict, parent, failures: dict,
                     store: Store | None) -> dict:
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
        "precision": {"config": cfg.precision,
                      "teachers": sorted({t.get("precision", "fp32") for t in teachers.values()}),
                      "students": sorted({r.get("precision", "fp32") for per in students.values()
                                          for r in per.values()})},
        "storage": store.uri if store else None,
        "config_hash": cfg.hash(),
        "config": cfg.to_dict(),
    }


def format_table(results: dict) -> str:
    """The test-accuracy table: one row per teacher and student method, one column per domain."""
    domains = results["domains"]
    rows = []
    for name, per in [(f"teacher {k}", v) for k, v in results["teacher"].items()] + list(results["students"].items()):
        cells = [per.get(d, {}).get("test_acc") for d in domains]
        known = [c for c in cells if c is not None]
        cells.append(np.mean(known) if known else None)
        rows.append([name] + [f"{c:.4f}" if c is not None else "-" for c in cells])
    return text_table(["test accuracy"] + [d[:11] for d in domains] + ["mean"], rows,
                      [24] + [12] * len(domains) + [9])
