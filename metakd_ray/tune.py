"""Hyper-parameter search over the Meta-KD weights: Ray Tune + Optuna (seeded TPE) + ASHA.

    metakd-ray sweep quickstart --space tune_spaces/distill.yaml --trials 16 --concurrency 2
    metakd-ray sweep quickstart --space tune_spaces/distill.yaml --resume        # after a crash
    metakd-ray sweep quickstart --space tune_spaces/distill.yaml --objective accuracy,latency

A search space is a YAML file (see ``tune_spaces/``): a ``target`` (teacher | distill | joint) and
``params`` mapping dotted config keys to distributions (uniform, loguniform, int, choice).

- distill trials reuse the frozen meta-teacher and its cached outputs. They train the meta_kd
  student of each domain in turn and report the running mean dev accuracy after every domain
  (``domains_done`` is ASHA's time axis).
- teacher trials follow the Train V2 pattern: the trial function fits a ``TorchTrainer`` whose
  rank-0 reports reach Tune through ``TuneReportCallback``. ASHA's time axis is the step.
- joint trials train a teacher, then its students.

The objective is always dev accuracy, never test. The Optuna study lives in an RDB file beside
the sweep (``optuna.db``), so it outlives the driver; ``--resume`` restores the Tuner and re-runs
no finished trial. Outputs:

- ``best.yaml``, the full config with the best parameters;
- ``trials.csv``;
- history and importance plots.

The sweep is one MLflow parent run, with one child run per trial; the best trial is tagged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import yaml
from ray.tune.search.optuna import OptunaSearch

from metakd_ray.cluster import memory_reservation
from metakd_ray.config import Config, dump_yaml, with_overrides
from metakd_ray.distill import (StudentJob, distill_student, domain_data, fetch_teacher, planned_signals,
                                teacher_outputs_task, teacher_passes)
from metakd_ray.errors import MetaKDError
from metakd_ray.general import ensure_general, general_key, general_path
from metakd_ray.io import atomic_write_text
from metakd_ray.methods import META_KD
from metakd_ray.models import load_model, save_model
from metakd_ray.outputs import Store, teacher_outputs_path
from metakd_ray.plots import save_figure
from metakd_ray.signals import TeacherSignals, plan, teacher_pass
from metakd_ray.tracking import RunRef, open_run

TARGETS = ("teacher", "distill", "joint")
SECTIONS = {"teacher": ("teacher", "prototypes"), "distill": ("distill", "model"),
            "joint": ("teacher", "prototypes", "distill", "model")}
TIME_ATTR = {"teacher": "step", "distill": "domains_done", "joint": "domains_done"}
METRIC = {"teacher": "val/acc", "distill": "mean_dev_acc", "joint": "mean_dev_acc"}


class PersistentOptunaSearch(OptunaSearch):
    """OptunaSearch over an RDB study that outlives the driver. A trial that the study finished
    just before the driver died is started again by the restored Tuner (and replays its stored
    reports, see ``TrialLog``); the study keeps its first result instead of failing on the update."""

    def on_trial_result(self, trial_id, result):
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    def on_trial_complete(self, trial_id, result=None, error=False):
        try:
            super().on_trial_complete(trial_id, result, error)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


@dataclass
class SearchSpace:
    path: Path
    target: str
    params: dict[str, dict]

    def optuna(self) -> dict:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out = {}
        for key, spec in self.params.items():
            kind = spec["type"]
            if kind == "choice":
                out[key] = CategoricalDistribution(spec["values"])
            elif kind == "int":
                out[key] = IntDistribution(spec["low"], spec["high"])
            else:
                out[key] = FloatDistribution(float(spec["low"]), float(spec["high"]), log=kind == "loguniform")
        return out


def load_space(path: str, cfg: Config) -> SearchSpace:
    """Read and validate a search-space YAML; every bound and choice must make a valid config."""
    p = Path(path)
    if not p.is_file():
        raise MetaKDError(f"search space {path} not found (see tune_spaces/)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise MetaKDError(f"search space {path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or set(raw) - {"target", "params"}:
        raise MetaKDError(f"search space {path}: expected the keys 'target' and 'params'")
    target = raw.get("target")
    if target not in TARGETS:
        raise MetaKDError(f"search space {path}: target must be one of {', '.join(TARGETS)}, got {target!r}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise MetaKDError(f"search space {path}: 'params' must map config keys to distributions")
    for key, spec in params.items():
        where = f"search space {path} param '{key}'"
        if key.split(".")[0] not in SECTIONS[target]:
            raise MetaKDError(f"{where}: a {target} sweep searches only {', '.join(SECTIONS[target])}.* keys")
        if not isinstance(spec, dict) or spec.get("type") not in ("uniform", "loguniform", "int", "choice"):
            raise MetaKDError(f"{where}: expected {{type: uniform|loguniform|int|choice, ...}}, got {spec!r}")
        if spec["type"] == "choice":
            if not isinstance(spec.get("values"), list) or not spec["values"] or set(spec) != {"type", "values"}:
                raise MetaKDError(f"{where}: choice needs a non-empty list 'values' (and nothing else)")
            samples = spec["values"]
        else:
            low, high = spec.get("low"), spec.get("high")
            number = int if spec["type"] == "int" else (int, float)
            if set(spec) != {"type", "low", "high"} or not all(isinstance(v, number) and not isinstance(v, bool)
                                                               for v in (low, high)):
                raise MetaKDError(f"{where}: {spec['type']} needs numeric 'low' and 'high' (and nothing else)")
            if not low < high:
                raise MetaKDError(f"{where}: low ({low}) must be below high ({high})")
            if spec["type"] == "loguniform" and low <= 0:
                raise MetaKDError(f"{where}: loguniform needs low > 0, got {low}")
            samples = [low, high]
        for value in samples:
            try:
                with_overrides(cfg, {key: value})
            except MetaKDError as exc:
                raise MetaKDError(f"{where}: value {value!r} gives an invalid config ({exc})") from None
    return SearchSpace(p, target, params)


# --------------------------------------------------------------------------- trials


class TrialLog:
    """A trial's reports, kept in ``<sweep>/trials/<trial_id>.json`` once it has finished.

    If the driver dies after a trial finished but before Tune's own snapshot recorded it, the
    restored sweep starts that trial again; it then replays the stored reports instead of training.
    """

    def __init__(self, sweep_dir: str, trial_id: str):
        self.path = Path(sweep_dir) / "trials" / f"{trial_id}.json"
        self.reports: list[dict] = []

    def replay(self, report) -> bool:
        if not self.path.is_file():
            return False
        for metrics in json.loads(self.path.read_text()):
            report(metrics)
        return True

    def report(self, metrics: dict) -> None:
        from ray import tune

        self.reports.append(metrics)
        tune.report(metrics)

    def finish(self) -> None:
        atomic_write_text(self.path, json.dumps(self.reports))


def _trial_run(base: Config, sweep_run: RunRef, params: dict) -> RunRef:
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run = open_run(base, f"trial/{sweep_run.run_id}/{trial_id}", f"trial-{trial_id}", "trial", sweep_run,
                   {"metakd.trial_id": trial_id})
    run.log_params(params)
    return run


def distill_trial(params: dict, base: Config, data, per_domain: dict, teacher_key: str, internals: bool,
                  run_ref: RunRef, sweep_dir: str) -> None:
    """Train the Meta-KD student of each domain in turn; report the running mean dev accuracy.
    ``data`` names the token cache (its splits are not sent); ``per_domain`` holds the rows."""
    import torch
    from ray import tune

    log = TrialLog(sweep_dir, tune.get_context().get_trial_id())
    if log.replay(tune.report):
        return
    cfg = with_overrides(base, params)
    torch.set_num_threads(cfg.distill.cpus_per_task)
    run = _trial_run(base, run_ref, params)
    # The driver made the passes for the sweep's layer map; a trial with another student depth makes
    # its own. On a node that does not see the driver's files, they come from storage (or are rebuilt).
    outputs = {d: teacher_outputs_task(cfg, dd, "meta", teacher_key,
                                       str(teacher_outputs_path(cfg, data, teacher_key, "meta", d, internals)), internals)
               for d, dd in per_domain.items()}
    _distill_domains(cfg, data, per_domain, fetch_teacher(cfg, "meta", teacher_key), outputs, run, log.report)
    log.finish()
    run.finish()


def _distill_domains(cfg, data, per_domain: dict, teacher_dir: Path, outputs: dict, run: RunRef, report) -> None:
    """``outputs``: {domain: directory of the teacher pass}, readable where this trial runs."""
    from metakd_ray.cluster import prepare_device, task_device

    device = task_device()
    prepare_device(device)
    general = general_path(cfg, general_key(cfg, data)) if cfg.model.student_init == "general" else None
    accs, latency = [], []
    for i, (domain, dd) in enumerate(per_domain.items(), start=1):
        signals = TeacherSignals(outputs[domain])
        try:
            r = distill_student(cfg, dd, StudentJob(META_KD.name, domain), teacher_dir, signals, device=device,
                                general=general)["result"]
        finally:
            signals.close()
        accs.append(r["dev_acc"])
        latency.append(r["latency_ms"])
        metrics = {"mean_dev_acc": float(np.mean(accs)), f"dev_acc/{domain}": r["dev_acc"], "domains_done": i,
                   "latency_ms": float(np.mean(latency)), "params": r["params"]}
        run.log_metrics({k: v for k, v in metrics.items() if k != "domains_done"}, i)
        report(metrics)


def teacher_trial(params: dict, base: Config, data, embeddings, run_ref: RunRef, storage: str) -> None:
    """Ray Train V2's pattern: this trial function fits a TorchTrainer; rank 0's reports reach Tune."""
    _fit_teacher_for_trial(params, base, data, embeddings, run_ref, storage, report_to_tune=True)


def joint_trial(params: dict, base: Config, data, embeddings, run_ref: RunRef, storage: str,
                internals: bool = False) -> None:
    """A teacher with the trial's parameters, then its meta_kd students (reported per domain);
    ``internals``: its passes keep the hidden states (``signals.plan`` for one trial)."""
    import tempfile

    import torch
    from ray import tune

    log = TrialLog(str(Path(storage).parent), tune.get_context().get_trial_id())
    if log.replay(tune.report):
        return
    cfg, run, model, scores = _fit_teacher_for_trial(params, base, data, embeddings, run_ref, storage,
                                                     report_to_tune=False)
    torch.set_num_threads(cfg.distill.cpus_per_task)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = Path(tmp) / "teacher"
        save_model(model, teacher_dir, {"kind": "meta"})
        teacher, _ = load_model(teacher_dir)
        per_domain = {d: domain_data(cfg, data, d, scores) for d in cfg.data.domains}
        outputs = {}
        for d, dd in per_domain.items():
            outputs[d] = Path(tmp) / d
            teacher_pass(cfg, dd.rows(), dd.row_scores(), teacher, internals, outputs[d])
        _distill_domains(cfg, data, per_domain, teacher_dir, outputs, run, log.report)
    log.finish()
    run.finish()


def _fit_teacher_for_trial(params, base, data, embeddings, run_ref, storage, report_to_tune: bool):
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from metakd_ray.prototypes import scores_for
    from metakd_ray.teacher import load_best_teacher, loop_config, make_trainer, teacher_objective

    cfg = with_overrides(base, params)
    run = _trial_run(base, run_ref, params)
    scores = scores_for(cfg, data, embeddings).numpy().astype(np.float32)
    ids = [data.domain_id(d) for d in cfg.teacher_domains]
    rows = np.isin(data.splits["train"].domain_ids, ids)
    weights = scores[rows] if teacher_objective(cfg, "meta")["use_weights"] else np.ones(int(rows.sum()), np.float32)
    trainer = make_trainer(cfg, loop_config(cfg, data, "meta", ids, weights, run),
                           f"sweep-teacher-{tune.get_context().get_trial_id()}", storage,
                           callbacks=[TuneReportCallback()] if report_to_tune else None, num_to_keep=1)
    result = trainer.fit()
    if report_to_tune:
        run.finish()
        return None
    model, _ = load_best_teacher(cfg, data, result, "meta", ids)
    return cfg, run, model, scores


# --------------------------------------------------------------------------- the sweep driver


def sweep(cfg: Config, space_path: str, trials: int, concurrency: int, resume: bool = False, name: str = "",
          objective: str = "accuracy", asha: bool = True) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from metakd_ray.cluster import init_ray
    from metakd_ray.data.prepare import prepare
    from metakd_ray.pipeline import train_teachers
    from metakd_ray.prototypes import compute_prototype_scores, embed

    space = load_space(space_path, cfg)
    multi = objective == "accuracy,latency"
    if objective not in ("accuracy", "accuracy,latency"):
        raise MetaKDError(f"--objective: expected 'accuracy' or 'accuracy,latency', got {objective!r}")
    if multi and space.target == "teacher":
        raise MetaKDError("--objective accuracy,latency needs a distill or joint space (teachers have no student)")
    if trials < 1 or concurrency < 1:
        raise MetaKDError("--trials and --concurrency must be at least 1")
    name = name or f"{space.path.stem}-{cfg.hash()[:6]}"
    sweep_dir = cfg.out / "sweeps" / name
    # Tune's and the trial teachers' storage: ray.storage_path when set, so trials on any node reach it.
    store = Store.of(cfg)
    remote_root = f"{store.uri}/sweeps/{name}" if store else str(sweep_dir)
    tune_dir = f"{remote_root}/tune"
    if sweep_dir.exists() and not resume:
        raise MetaKDError(f"sweep {sweep_dir} already exists: pass --resume to continue it or --name for a new one")
    if resume and not tune.Tuner.can_restore(f"{tune_dir}/tuner"):
        raise MetaKDError(f"--resume: no restorable sweep in {tune_dir}/tuner")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "space.yaml", space.path.read_text(encoding="utf-8"))
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{sweep_dir / 'optuna.db'}")
    except Exception as exc:  # a damaged study file
        from metakd_ray.errors import cause_line

        raise MetaKDError(f"sweep {name}: the Optuna study {sweep_dir / 'optuna.db'} cannot be opened "
                          f"({cause_line(exc)[:160]}); start a new sweep with --name") from None

    # [1] Everything trials share is computed once, here.
    data = prepare(cfg, quiet=True)
    parent = open_run(cfg, f"sweep/{sweep_dir}", f"sweep-{name}", "sweep", None, {"metakd.space": space.path.name})
    metric = METRIC[space.target]
    init_ray(cfg)
    if cfg.model.student_init == "general" and space.target != "teacher":
        ensure_general(cfg, data, parent)  # one general student for every trial
    jobs = [StudentJob(META_KD.name, d) for d in cfg.data.domains]
    if space.target == "distill":
        scores = compute_prototype_scores(cfg, data, quiet=True)
        teacher_key = train_teachers(cfg, data, scores, [("meta", "")], None)["meta"]["key"]
        per_domain = {d: domain_data(cfg, data, d, scores) for d in cfg.data.domains}
        signal_plan = plan(cfg, teacher_passes(cfg, jobs, per_domain), trials)  # every trial reads the passes
        print(signal_plan.line, flush=True)
        _shared_teacher_outputs(cfg, data, per_domain, teacher_key, signal_plan.internals)
        trainable = tune.with_parameters(distill_trial, base=cfg, data=dataclasses.replace(data, splits={}, transfer={}),
                                         per_domain=per_domain, teacher_key=teacher_key,
                                         internals=signal_plan.internals, run_ref=parent, sweep_dir=str(sweep_dir))
        trainable = tune.with_resources(trainable, {"CPU": cfg.distill.cpus_per_task, "GPU": cfg.distill.gpus_per_task,
                                                    "memory": memory_reservation(cfg, "student")})
    else:
        embeddings = embed(cfg, data.splits["train"], quiet=True)
        extra = {}
        if space.target == "joint":  # each trial's own teacher, read by its own students
            extra["internals"] = planned_signals(cfg, data, [META_KD.name]).internals
        fn = teacher_trial if space.target == "teacher" else joint_trial
        trainable = tune.with_parameters(fn, base=cfg, data=data, embeddings=embeddings, run_ref=parent,
                                         storage=f"{remote_root}/teachers", **extra)
        trainable = tune.with_resources(trainable, {"CPU": 0.01})  # the workers hold the real resources

    # [2] Searcher (persisted Optuna study) and scheduler.
    metrics, modes = ([metric, "latency_ms"], ["max", "min"]) if multi else (metric, "max")
    searcher = PersistentOptunaSearch(space=space.optuna(), metric=metrics, mode=modes, study_name=name,
                                      storage=storage, seed=cfg.seed,
                            sampler=optuna.samplers.NSGAIISampler(seed=cfg.seed) if multi else None)
    scheduler = None
    if asha and not multi:
        max_t = len(cfg.data.domains) if space.target != "teacher" else 10**9
        scheduler = ASHAScheduler(time_attr=TIME_ATTR[space.target], max_t=max_t, grace_period=1, reduction_factor=2)
    print(f"[sweep] {name}: {trials} trial(s) of {space.target} over {', '.join(space.params)}; "
          f"concurrency {concurrency}, ASHA {'on' if scheduler else 'off'}; {sweep_dir}", flush=True)

    # [3] Run (or restore) the Tuner.
    if resume:
        tuner = tune.Tuner.restore(f"{tune_dir}/tuner", trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=trials,
                                        max_concurrent_trials=concurrency,
                                        **({} if multi else {"metric": metric, "mode": "max"})),
            run_config=tune.RunConfig(name="tuner", storage_path=tune_dir, verbose=1),
        )
    grid = tuner.fit()

    # [4] Report: trials table, best config, plots, MLflow.
    return _summarize(cfg, space, name, sweep_dir, grid, metric, multi, parent)


def _shared_teacher_outputs(cfg: Config, data, per_domain: dict, teacher_key: str, internals: bool) -> None:
    """The meta-teacher's pass over each domain, made once for every trial (Ray tasks, as in `distill`)."""
    import ray

    remote = ray.remote(teacher_outputs_task).options(num_cpus=cfg.distill.cpus_per_task,
                                                      num_gpus=cfg.distill.gpus_per_task,
                                                      memory=memory_reservation(cfg, "student"))
    ray.get([remote.remote(cfg, dd, "meta", teacher_key,
                           str(teacher_outputs_path(cfg, data, teacher_key, "meta", d, internals)), internals)
             for d, dd in per_domain.items()])


def _summarize(cfg, space, name, sweep_dir: Path, grid, metric: str, multi: bool, parent: RunRef) -> dict:
    time_attr = TIME_ATTR[space.target]
    rows = []
    for result in grid:
        m = result.metrics or {}
        params = {k[len("config/"):]: v for k, v in m.items() if k.startswith("config/")} or \
                 {k: (result.config or {}).get(k) for k in space.params}
        rows.append({"trial_id": m.get("trial_id"), "status": "ERROR" if result.error else "DONE",
                     metric: m.get(metric), "latency_ms": m.get("latency_ms"), time_attr: m.get(time_attr),
                     **{k: (result.config or {}).get(k, params.get(k)) for k in space.params}})
    finished = [r for r in rows if r[metric] is not None]
    if not finished:
        raise MetaKDError(f"sweep {name}: no trial reported {metric}; see {sweep_dir / 'tune'}")
    # Early-stopped trials never saw every domain: rank complete trials first.
    full = max(r[time_attr] or 0 for r in finished)
    best = max(finished, key=lambda r: ((r[time_attr] or 0) >= full, r[metric]))
    import pandas as pd

    table = pd.DataFrame(rows).sort_values(metric, ascending=False, na_position="last")
    atomic_write_text(sweep_dir / "trials.csv", table.to_csv(index=False))
    best_cfg = with_overrides(cfg, {k: best[k] for k in space.params})
    atomic_write_text(sweep_dir / "best.yaml",
                      f"# best trial {best['trial_id']} of sweep {name}: {metric} = {best[metric]:.4f}\n"
                      + dump_yaml(best_cfg))
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    plots = _plots(study, sweep_dir / "plots", multi)
    pareto = []
    if multi:
        pareto = [{"params": t.params, "values": t.values} for t in study.best_trials]
        atomic_write_text(sweep_dir / "pareto.json", json.dumps(pareto, indent=2))
    print(table.to_string(index=False, max_colwidth=24))
    print(f"[sweep] best trial {best['trial_id']}: {metric} {best[metric]:.4f} -> {sweep_dir / 'best.yaml'}")
    parent.log_metrics({f"best/{metric}": best[metric], "trials": len(rows)})
    parent.log_artifact(sweep_dir / "trials.csv")
    parent.log_artifact(sweep_dir / "best.yaml")
    for p in plots:
        parent.log_artifact(p, "plots")
    _tag_best(cfg, parent, best["trial_id"])
    store = Store.of(cfg)
    if store:  # beside Tune's own files, which are there already
        store.put(sweep_dir, f"sweeps/{name}/summary")
    parent.finish()
    trial_epochs = sum(r[time_attr] or 0 for r in rows)
    return {"name": name, "dir": str(sweep_dir), "best": best, "trials": rows, "trial_epochs": trial_epochs,
            "pareto": pareto, "parent_run_id": parent.run_id}


def _tag_best(cfg: Config, parent: RunRef, trial_id: str) -> None:
    client = parent.client()
    for run in client.search_runs([client.get_run(parent.run_id).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.run_id}'"):
        is_best = run.data.tags.get("metakd.trial_id") == trial_id
        client.set_tag(run.info.run_id, "metakd.best", str(is_best).lower())


def _plots(study, directory: Path, multi: bool) -> list[Path]:
    from optuna.visualization import matplotlib as ovm

    directory.mkdir(parents=True, exist_ok=True)
    made = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    first_value = (lambda trial: trial.values[0]) if multi else None
    jobs = [("history.png", lambda: ovm.plot_optimization_history(study, target=first_value))]
    if len(complete) >= 2 and len({json.dumps(t.params, sort_keys=True, default=str) for t in complete}) >= 2:
        jobs.append(("importance.png", lambda: ovm.plot_param_importances(study, target=first_value)))
    if multi:
        jobs.append(("pareto.png", lambda: ovm.plot_pareto_front(study)))
    for filename, make in jobs:
        try:
            ax = make()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            save_figure(fig, directory / filename)
            made.append(directory / filename)
        except (ValueError, RuntimeError) as exc:  # e.g. importance with a constant objective
            print(f"[sweep] skipped {filename}: {exc}")
    return made
