"""The whole Meta-KD pipeline: prepare -> prototypes -> teacher(s) -> general student -> students -> results.json.

    metakd-ray run quickstart                      # meta_kd and no_kd students
    metakd-ray run amazon --methods all            # the paper's table rows

Every stage is skipped when its output for the same inputs (content hash) already exists, and an
interrupted run continues where it stopped: the teacher from its last Ray Train checkpoint, the
students domain by domain.
"""

from __future__ import annotations

import shutil
import time

import numpy as np

from metakd_ray.config import Config
from metakd_ray.data.prepare import prepare
from metakd_ray.distill import StudentJob, run_students
from metakd_ray.errors import MetaKDError, RunFailed
from metakd_ray.general import ensure_general
from metakd_ray.io import atomic_write_json, text_table
from metakd_ray.methods import METHODS, TEACHER_KINDS, method, teacher_name
from metakd_ray.models import load_model
from metakd_ray.outputs import Store, student_dir, teacher_dir
from metakd_ray.prototypes import compute_prototype_scores, prototype_dir
from metakd_ray.teacher import train_teacher
from metakd_ray.tracking import experiment_id, pipeline_run, register_best
from metakd_ray.training import measure_latency

LATENCY_KEYS = ("latency_ms", "latency_b32_ms")
LATENCY_ROUNDS = 2


def resolve_methods(spec: str | None, cfg: Config) -> list[str]:
    if not spec:
        return list(cfg.distill.methods)
    if spec == "all":
        return list(METHODS)
    return [method(m.strip(), "--methods", also="'all'").name for m in spec.split(",") if m.strip()]


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


class StageClock:
    """Wall seconds of each stage in the order they ran; a stage whose output was cached takes ~0 s."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 3)
        self._last = now


def run_pipeline(cfg: Config, methods: list[str], fresh: bool = False, teachers_only: bool = False,
                 require_teachers: bool = False) -> dict:
    clock = StageClock()
    data = prepare(cfg)
    clock.lap("prepare")
    scores = compute_prototype_scores(cfg, data)
    clock.lap("prototypes")
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
    clock.lap("teachers")
    if teachers_only:
        return {"teachers": teachers}
    general = None
    if cfg.model.student_init == "general":
        general = ensure_general(cfg, data, parent)
        clock.lap("general_student")
    jobs = [StudentJob(m, d) for m in methods for d in cfg.data.domains]
    students, failures = run_students(cfg, data, jobs, teachers, scores, parent, general)
    clock.lap("students")
    latency = time_side_by_side(cfg, data, teachers, students)
    clock.lap("latency")
    results = assemble_results(cfg, data.domains, teachers, students, parent, failures, store, latency)
    results["stage_seconds"] = clock.seconds
    parent.log_metrics(summary_metrics(results) | {f"seconds/{k}": v for k, v in clock.seconds.items()})
    results["registered"] = register_best(cfg, students)
    atomic_write_json(cfg.out / "results.json", results)
    if store:
        store.put(cfg.out / "results.json", "results.json")
    parent.log_artifact(cfg.out / "results.json")
    print(format_table(results))
    print(f"results: {cfg.out / 'results.json'}   MLflow: {results['mlflow']['tracking_uri']} "
          f"(parent run {parent.run_id})\ntables over seeds and plots: metakd-ray report {cfg.out}"
          + "".join(f"\nregistered {name} (alias best), the dev-best student of {domain}"
                    for domain, name in results["registered"].items())
          + (f"\nuse a student: metakd-ray predict {student_dir(cfg, methods[0], cfg.data.domains[0]) / 'model'} "
             f"\"some text\"" if students else "")
          + (f"\na copy of teachers, students and results.json: {store.uri}" if store else ""))
    if failures:
        raise RunFailed(f"{len(failures)} student(s) failed after retries: "
                          + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    parent.finish()
    return results


def _have_teacher(cfg: Config, store: Store | None, name: str) -> bool:
    directory = teacher_dir(cfg, name)
    return (directory / "result.json").is_file() or bool(store and store.get(f"teachers/{name}", directory))


def time_side_by_side(cfg: Config, data, teachers: dict, students: dict) -> dict[str, dict]:
    """Batch-1 and batch-32 CPU latency (``measure_latency``) of one teacher of each kind and one
    student of each method, timed one after another in this process once training is over, on the
    same test example: {"teacher meta" | method: {"latency_ms": ..., "latency_b32_ms": ...}}.

    Each model's own figures were timed when it finished training, a student's with other students
    training beside it, so ratios between them drift with the load. Models of one kind or method share their architecture, so one stands for all; each
    figure is the fastest of ``LATENCY_ROUNDS`` rounds, which interleave the models."""
    paths = {}
    for name, summary in teachers.items():
        paths.setdefault(f"teacher {summary['kind']}", teacher_dir(cfg, name) / "model")
    for name, per in students.items():
        if per:
            paths[name] = student_dir(cfg, name, next(iter(per))) / "model"
    models = {label: load_model(path)[0] for label, path in paths.items() if (path / "config.json").is_file()}
    if models:
        print(f"[latency] timing {', '.join(models)} side by side (one CPU thread)", flush=True)
    split = data.splits["test"]
    best: dict[str, dict] = {}
    for _ in range(LATENCY_ROUNDS):
        for label, model in models.items():
            timed = measure_latency(model, split)
            best[label] = {k: min(timed[k], best.get(label, {}).get(k, float("inf"))) for k in LATENCY_KEYS}
    return best


def assemble_results(cfg: Config, domains: list[str], teachers: dict, students: dict, parent, failures: dict,
                     store: Store | None, latency: dict[str, dict] | None = None) -> dict:
    """results.json. ``latency`` (``time_side_by_side``) replaces the latencies each model got when
    it was trained, and each student's speed-up is recomputed from it."""
    latency = latency or {}
    teacher_table: dict = {}
    for name, summary in teachers.items():
        kind = summary["kind"]
        for domain, acc in summary["per_domain"].items():
            cell = {"dev_acc": acc["dev_acc"], "test_acc": acc["test_acc"], "run_id": summary["run_id"]}
            cell.update({k: summary[k] for k in ("params", "latency_ms") if k in summary})  # older teachers lack them
            cell.update(latency.get(f"teacher {kind}", {}))
            teacher_table.setdefault(kind, {})[domain] = cell
    student_table: dict = {}
    for name, per in students.items():
        timed = latency.get(name, {})
        reference = latency.get(method(name).teacher_row or "teacher meta", {})
        for domain, r in per.items():
            cell = {k: r[k] for k in ("dev_acc", "test_acc", "params", "latency_ms", "latency_b32_ms", "compression",
                                      "speedup", "train_examples", "run_id", "model_id", "test_correct", "started_at",
                                      "finished_at") if k in r}
            cell.update(timed)
            if timed and reference:
                cell["speedup"] = reference["latency_ms"] / timed["latency_ms"]
            student_table.setdefault(name, {})[domain] = cell
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
        "latency": {"measured": "batch 1 and 32, one CPU thread, fp32; every model side by side after training, "
                                f"the fastest of {LATENCY_ROUNDS} rounds", "models": latency} if latency else None,
        "config_hash": cfg.hash(),
        "config": cfg.to_dict(),
    }


def summary_metrics(results: dict) -> dict:
    """The parent run's metrics: mean dev and test accuracy over domains of every teacher and
    method (``test_acc/meta-kd``, ``test_acc/teacher-meta``, ...), and each method's mean size
    and speed-up against its teacher."""
    rows = {f"teacher-{k}": v for k, v in results["teacher"].items()}
    rows.update({method(m).alias: v for m, v in results["students"].items()})
    out = {}
    for name, per in rows.items():
        for key in ("dev_acc", "test_acc", "compression", "speedup"):
            values = [cell[key] for cell in per.values() if key in cell]
            if values:
                out[f"{key}/{name}"] = float(np.mean(values))
    return out


def format_table(results: dict) -> str:
    """The test-accuracy table: one row per teacher and student method, one column per domain, then
    the model's size (encoder parameters) and batch-1 CPU latency against the meta-teacher's."""
    domains = results["domains"]
    base = next(iter(results["teacher"].values()), {})
    base_params = np.mean([c["params"] for c in base.values() if "params" in c]) if base else None
    base_ms = np.mean([c["latency_ms"] for c in base.values() if "latency_ms" in c]) if base else None
    rows = []
    for name, per in [(f"teacher {k}", v) for k, v in results["teacher"].items()] + list(results["students"].items()):
        cells = [per.get(d, {}).get("test_acc") for d in domains]
        known = [c for c in cells if c is not None]
        cells.append(np.mean(known) if known else None)
        params = [c["params"] for c in per.values() if "params" in c]
        ms = [c["latency_ms"] for c in per.values() if "latency_ms" in c]
        size = f"{np.mean(params) / 1e6:.1f}M" + (f" {base_params / np.mean(params):.1f}x" if params and base_params
                                                   else "") if params else "-"
        speed = f"{np.mean(ms):.1f} {base_ms / np.mean(ms):.1f}x" if ms and base_ms else "-"
        rows.append([name] + [f"{c:.4f}" if c is not None else "-" for c in cells] + [size, speed])
    return text_table(["test accuracy"] + [d[:11] for d in domains] + ["mean", "params", "ms (b1)"], rows,
                      [24] + [12] * len(domains) + [9, 12, 11])
