"""Stage 2: meta-distillation, one student per target domain.

    metakd-ray distill quickstart                       # after `metakd-ray teacher quickstart`
    metakd-ray distill quickstart --methods all         # the paper's baseline students too

For each (method, domain) a Ray task trains a student on that domain's training data only, with
the method's objective (``metakd_ray.methods``: λ, γ2 and the teacher kind come from its row):

    stage 1:  L_1 = mean_i[λ_i (hidn_i + attn_i)] + γ2·mean(λ)·tkd      (λ ≡ 1, γ2 = 0 for TinyBERT-KD)
    stage 2:  L_2 = mean_i soft_CE(z^S_i, z^T_i; τ)  (+ hard-label CE if distill.hard_label_weight > 0)

then keeps the student best on its domain's dev set (never test) and reports test accuracy, size
and latency. The frozen teacher is run once per (teacher, domain) in eval mode, so that its targets
carry no dropout noise; that pass (``metakd_ray.signals``) keeps its soft labels, λ, t and domain
vector for every student and sweep trial, and its hidden states too when ``distill.teacher_signals``
resolves to ``cache`` (else stage 1 runs the teacher live). Every task is handed its domain's rows
only (``DomainData``). ``distill_student`` is plain PyTorch on whatever device it is given; Ray and
MLflow only appear in ``run_students`` (the fan-out) and at the edges of the tasks.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metakd_ray import losses
from metakd_ray.cluster import init_ray, memory_reservation, prepare_device, resolve_precision, task_device
from metakd_ray.config import Config, model_path
from metakd_ray.data.prepare import PreparedData, eval_sample, subsample_fraction
from metakd_ray.data.split import Split, concat
from metakd_ray.errors import MetaKDError, cause_line
from metakd_ray.general import general_path
from metakd_ray.io import atomic_dir, atomic_write_json, content_key, read_json
from metakd_ray.methods import Method, method, teacher_name
from metakd_ray.models import SAVE_FORMAT, build_student, count_parameters, load_model, save_model, write_model_card
from metakd_ray.outputs import Store, fetch, finished, student_dir, teacher_dir, teacher_outputs_path
from metakd_ray.signals import (CachedTargets, LiveTargets, PassSize, SignalPlan, TeacherSignals, plan, signals_ready,
                                teacher_pass)
from metakd_ray.terminal import start_console
from metakd_ray.tracking import RunRef, flatten, open_run, system_metrics
from metakd_ray.training import (BestStates, TrainingStage, accuracy_by_domain, measure_latency, predict,
                                 seed_everything, stage_steps)


@dataclass(frozen=True)
class StudentJob:
    method: str
    domain: str

    @property
    def spec(self) -> Method:
        return method(self.method)

    @property
    def name(self) -> str:
        return f"{self.method}/{self.domain}"

    @property
    def teacher_name(self) -> str:
        """Which teacher the method distils from ("" for no_kd)."""
        return teacher_name(self.spec.teacher_kind, self.domain) if self.spec.distils else ""


@dataclass
class DomainData:
    """What the tasks of one domain are handed: that domain's rows and nothing else."""

    domain: str
    domain_id: int
    domains: list[str]  # every domain's name (the model's domain embedding has one row each)
    labels: list[str]
    train: Split  # the labelled training rows, after data.target_fraction
    t: np.ndarray  # their prototype scores
    transfer: Split | None  # the distilling students' unlabelled rows (distill.unlabelled_per_domain ...)
    dev: Split
    test: Split
    test_path: str  # the token cache's test split, named in a saved model's config

    def rows(self, distils: bool = True) -> Split:
        """A student's training rows: the labelled ones, then (distilling methods) the transfer set."""
        return concat(self.train, self.transfer) if distils and self.transfer is not None else self.train

    def row_scores(self) -> np.ndarray:
        """t for every row of ``rows()``: an unlabelled row has no prototype score, so the mean
        score of the domain's labelled rows stands in for it."""
        extra = len(self.transfer) if self.transfer is not None else 0
        return np.concatenate([self.t, np.full(extra, self.t.mean() if len(self.t) else 1.0)]).astype(np.float32)


def domain_data(cfg: Config, data: PreparedData, domain: str, scores: np.ndarray) -> DomainData:
    """``domain``'s rows of every split (views of the memory-mapped cache until they are sent)."""
    d = data.domain_id(domain)
    train = data.splits["train"]
    rows = np.flatnonzero(train.domain_ids == d)
    rows = rows[subsample_fraction(train.take(rows), cfg.data.target_fraction, cfg.data.split_seed)]
    return DomainData(domain, d, data.domains, data.labels, train.take(rows), np.asarray(scores)[rows],
                      data.transfer.get(domain), data.splits["dev"].for_domains([d]),
                      data.splits["test"].for_domains([d]), str(data.split_path("test")))


# --------------------------------------------------------------------------- teacher outputs


def teacher_outputs_task(cfg: Config, dd: DomainData, name: str, key: str, path: str, internals: bool) -> str:
    """Ray task body: make sure this node has the teacher pass at ``path`` (fetched from storage or
    computed on the GPU Ray gave the task), and that storage has it too."""
    torch.set_num_threads(cfg.distill.cpus_per_task)
    store, target = Store.of(cfg), Path(path)
    rel = target.relative_to(cfg.out).as_posix()
    if signals_ready(target):
        return path
    if store and store.get(rel, target) and signals_ready(target):
        return path
    device = task_device()
    prepare_device(device)
    teacher, _ = load_model(fetch_teacher(cfg, name, key))
    teacher_pass(cfg, dd.rows(), dd.row_scores(), teacher.to(device), internals, target)
    if store:
        store.put(target, rel)
    return path


# --------------------------------------------------------------------------- one student


def distill_student(cfg: Config, dd: DomainData, job: StudentJob, teacher_path: Path | None,
                    signals: TeacherSignals | None, run: RunRef | None = None, log=print,
                    device: torch.device | None = None, progress=None, general: Path | None = None,
                    peers: tuple[TeacherSignals, ...] = ()) -> dict:
    """Train one student for ``job`` on ``device`` and return its metrics plus the trained model.

    ``signals`` is the teacher's pass over ``dd.rows()``; without cached hidden states the teacher
    itself (from ``teacher_path``) runs in the stage-1 steps. ``peers``: the passes of the other
    teachers whose soft labels a multi-teacher method averages with its own teacher's.
    ``general`` is the general-distilled student it starts from (``model.student_init: general``).
    ``progress(step, total_steps)`` is called every few steps."""
    dcfg, spec = cfg.distill, job.spec
    device = device or torch.device("cpu")
    seed_everything(cfg.student_seed)
    train = dd.rows(spec.distils)
    dev = eval_sample(dd.dev, dcfg.eval_max_per_domain, cfg.student_seed)
    layer_map = cfg.layer_map
    student = build_student(cfg.model.teacher, cfg.model.student_init, cfg.model.student_layers,
                            cfg.teacher_arch.width, dd.labels, dd.domains, cfg.model.dropout,
                            trained_teacher=teacher_path if spec.distils else None, general=general,
                            pooling=cfg.model.pooling).to(device)
    history: list[dict] = []
    kept = BestStates(dcfg.num_to_keep if len(dev) < len(dd.dev) else 1)

    def evaluate(step: int, stage: str) -> None:
        acc = accuracy_by_domain(student, dev, dd.domains, cfg.precision)[dd.domain]
        history.append({"step": step, "stage": stage, "dev_acc": acc})
        if run:
            run.log_metrics({"val/acc": acc}, step)
        kept.offer(acc, student, step)

    gamma2 = dcfg.domain_weight if spec.domain_term else 0.0
    step = 0
    start = time.time()
    total = planned_steps(cfg, spec, len(train))
    train_stage = TrainingStage(student, train, dcfg, cfg.student_seed, cfg.precision, run, device,
                                (lambda s: progress(s, total)) if progress else None)
    scored = {"evaluate": evaluate, "eval_every": dcfg.eval_every, "min_steps": dcfg.min_steps}

    if not spec.distils:
        # no_kd: the student fine-tuned on the hard labels alone.
        step = train_stage(dcfg.no_kd_epochs, dcfg.stage2_lr, step, "no_kd",
                           lambda b, idx, out: F.cross_entropy(out.logits.float(), b["labels"]), False, **scored)
    else:
        targets = None
        if stage1_steps(cfg, len(train)):
            teacher, _ = load_model(teacher_path)
            targets = (CachedTargets(signals, teacher, layer_map, device) if signals.has_internals
                       else LiveTargets(teacher.to(device), layer_map))

        def soft(idx) -> dict:  # this batch's cached teacher outputs on the student's device
            out = signals.soft(idx)
            if peers:
                out["logits"] = losses.averaged_soft_labels([out["logits"]] + [p.soft(idx)["logits"] for p in peers],
                                                            dcfg.temperature)
            return {k: v.to(device, non_blocking=True) for k, v in out.items()}

        def weights(rows: dict) -> torch.Tensor:
            return rows["lambda"] if spec.use_lambda else torch.ones_like(rows["lambda"])

        def intermediate(b, idx, out):
            rows = soft(idx)
            return stage1_loss(cfg, student, b, out, targets(b, idx, rows), weights(rows), gamma2)

        def prediction(b, idx, out):
            rows = soft(idx)
            loss = losses.soft_cross_entropy(out.logits.float(), rows["logits"], dcfg.temperature)
            if dcfg.lambda_in_stage2 and spec.use_lambda:
                loss = loss * rows["lambda"]
            loss = loss.mean()
            if dcfg.hard_label_weight:  # over the labelled rows of the batch (unlabelled ones are -1)
                hard = F.cross_entropy(out.logits.float(), b["labels"], ignore_index=-1, reduction="sum")
                loss = loss + dcfg.hard_label_weight * hard / (b["labels"] >= 0).sum().clamp(min=1)
            return loss

        if dcfg.schedule == "two_stage":
            step = train_stage(dcfg.stage1_epochs, dcfg.stage1_lr, step, "stage1", intermediate, True,
                               min_steps=dcfg.min_steps, constant_lr=dcfg.stage1_schedule == "constant")
            step = train_stage(dcfg.stage2_epochs, dcfg.stage2_lr, step, "stage2", prediction, False, **scored)
        else:
            def joint(b, idx, out):
                loss, terms = intermediate(b, idx, out)
                return loss + prediction(b, idx, out), terms

            step = train_stage(dcfg.stage2_epochs, dcfg.stage2_lr, step, "joint", joint, True, **scored)

    train_seconds = time.time() - start
    # the whole dev set chooses among the states kept by the dev sample (when it was a sample)
    whole = (lambda: accuracy_by_domain(student, dd.dev, dd.domains, cfg.precision)[dd.domain]) \
        if len(dev) < len(dd.dev) else None
    best_step, dev_acc = kept.choose(student, whole)
    test_correct = predict(student, dd.test, cfg.precision) == dd.test.labels
    test_acc = float(test_correct.mean())
    result = {
        "method": job.method, "domain": job.domain, "teacher": job.teacher_name or None,
        "dev_acc": dev_acc, "test_acc": test_acc, "best_step": best_step, "steps": step,
        # per test example (in split order), for the report's paired bootstrap intervals
        "test_correct": "".join("1" if c else "0" for c in test_correct),
        "train_examples": len(train), "unlabelled_examples": int((train.labels < 0).sum()),
        "dev_examples": len(dd.dev), "test_examples": len(dd.test),
        "params": count_parameters(student),
        **measure_latency(student, dd.test), "train_seconds": round(train_seconds, 2),
        "started_at": start, "finished_at": time.time(),
        "device": device.type, "precision": resolve_precision(cfg.precision, device), "history": history,
    }
    log(f"[distill] {job.method}/{job.domain}: dev {result['dev_acc']:.4f} test {test_acc:.4f} "
        f"({step} steps on {device.type}, {result['train_seconds']:.0f}s)")
    return {"result": result, "model": student.cpu()}


def stage1_loss(cfg: Config, student, batch: dict, out, targets: tuple, lam: torch.Tensor, gamma2: float):
    """``losses.intermediate_loss`` of the student's output ``out`` on ``batch`` against the teacher's
    ``targets`` (hidden states, attention scores, domain vector: ``signals.LiveTargets`` or
    ``CachedTargets``); returns (loss, {term: its weighted batch mean})."""
    dcfg = cfg.distill
    scale = dcfg.term_scale == "target"
    t_hidden, t_attn, t_vec = targets
    mask = batch["attention_mask"]
    s_attn, t_attn = losses.attention_pair(out.attention_scores, t_attn, mask, dcfg.attention_target)
    hidn = losses.hidden_mse(list(out.hidden_states), t_hidden, student.projection, mask, scale)
    attn = losses.attention_mse(s_attn, t_attn, mask, scale)
    tkd = losses.domain_vector_mse(student.projection(out.domain_vector), t_vec, scale)
    loss = losses.intermediate_loss(lam, hidn, attn, tkd, gamma2, dcfg.hidden_weight, dcfg.attention_weight)
    # each term's share of the loss, to check that none of them drowns the others (tensors: read
    # only when logged, so a GPU step does not wait for them)
    return loss, {"hidden": dcfg.hidden_weight * hidn.detach().mean(),
                  "attention": dcfg.attention_weight * attn.detach().mean(), "domain": gamma2 * tkd.detach().mean()}


def stage1_steps(cfg: Config, rows: int) -> int:
    """Optimiser steps that read the teacher's hidden states (stage 1, or the joint stage)."""
    dcfg = cfg.distill
    epochs = dcfg.stage1_epochs if dcfg.schedule == "two_stage" else dcfg.stage2_epochs
    return stage_steps(epochs, rows, dcfg.batch_size, dcfg.min_steps)


def planned_steps(cfg: Config, spec: Method, examples: int) -> int:
    """All optimiser steps a student of method ``spec`` takes on ``examples`` training examples."""
    dcfg = cfg.distill
    if not spec.distils:
        return stage_steps(dcfg.no_kd_epochs, examples, dcfg.batch_size, dcfg.min_steps)
    stage1 = (stage_steps(dcfg.stage1_epochs, examples, dcfg.batch_size, dcfg.min_steps)
              if dcfg.schedule == "two_stage" else 0)
    return stage1 + stage_steps(dcfg.stage2_epochs, examples, dcfg.batch_size, dcfg.min_steps)


# --------------------------------------------------------------------------- fan-out on Ray


def student_key(cfg: Config, data: PreparedData, job: StudentJob, teacher_key: str, general_key: str = "") -> str:
    training = cfg.to_dict()["distill"]  # the settings that change what a student learns
    for k in ("methods", "cpus_per_task", "gpus_per_task", "max_retries", "teacher_signals", "cache_budget_gb",
              "memory_per_task_gb", "unlabelled_per_domain"):
        training.pop(k)
    transfer = data.transfer_key if job.spec.distils else ""  # no_kd ignores the transfer set
    return content_key(data.key, teacher_key, general_key, training, cfg.to_dict()["model"], cfg.seed, cfg.precision,
                       cfg.data.target_fraction, job.method, job.domain, SAVE_FORMAT, transfer)[:12]


def job_teachers(cfg: Config, job: StudentJob, teachers: dict[str, dict]) -> list[dict]:
    """The teachers a job learns from, each {"name", "key"}: none for no_kd, every domain's
    single-domain teacher for a multi-teacher method, else the method's one teacher."""
    if not job.spec.distils:
        return []
    names = ([teacher_name(job.spec.teacher_kind, d) for d in cfg.data.domains] if job.spec.multi_teacher
             else [job.teacher_name])
    return [{"name": name, "key": teachers[name]["key"]} for name in names]


def fetch_teacher(cfg: Config, name: str, key: str) -> Path:
    """The trained teacher's model directory on this node (``outputs.fetch``)."""
    found = fetch(cfg, f"teachers/{name}", key)
    if found and (found / "model").is_dir():
        return found / "model"
    raise MetaKDError(f"teacher {name} is not on this node ({teacher_dir(cfg, name)}) and not in ray.storage_path "
                      f"({cfg.ray.storage_path or 'unset'}): on a multi-node cluster set ray.storage_path to "
                      "storage every node reaches (s3://... or a shared mount)")


def _student_task(cfg: Config, dd: DomainData, job: StudentJob, teacher_key: str, outputs_path: str | None,
                  internals: bool, run: RunRef, console, general_key: str = "", peers: tuple = (),
                  *peer_paths: str) -> dict:
    """Ray task body: train one student on the GPU Ray gave it (else the CPU); return its result
    and its saved files, so the driver writes them wherever this task ran. ``peers`` (name, key)
    and ``peer_paths``: the other teachers whose soft labels a multi-teacher method averages with
    its own teacher's, and where their soft-label passes over this domain were written (Ray
    resolves them before the task starts)."""
    torch.set_num_threads(cfg.distill.cpus_per_task)  # reused workers keep the first import's count
    device = task_device()
    prepare_device(device)
    teacher_path, signals, peer_signals = None, None, []
    try:
        if job.spec.distils:
            teacher_path = fetch_teacher(cfg, job.teacher_name, teacher_key)
            # made on another node (or damaged): fetched from storage or rebuilt here
            signals = TeacherSignals(teacher_outputs_task(cfg, dd, job.teacher_name, teacher_key, outputs_path,
                                                          internals))
        peer_signals = [TeacherSignals(teacher_outputs_task(cfg, dd, name, key, path, False))
                        for (name, key), path in zip(peers, peer_paths)]
        with system_metrics(run):
            # the driver prints the result line; steps go to the progress board
            out = distill_student(cfg, dd, job, teacher_path, signals, run, log=lambda line: None, device=device,
                                  progress=lambda step, total: console.update.remote(job.name, step, total),
                                  general=general_path(cfg, general_key) if general_key else None,
                                  peers=tuple(peer_signals))
    finally:
        for s in [signals, *peer_signals]:
            if s is not None:
                s.close()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(out["model"], Path(tmp), {"kind": "student", "method": job.method, "domain": job.domain,
                                             "teacher": job.teacher_name or None, "max_length": cfg.data.max_length,
                                             "test_split": dd.test_path},
                   tokenizer_from=model_path(cfg.model.teacher), max_length=cfg.data.max_length)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    return {"result": out["result"], "files": files}


def run_students(cfg: Config, data: PreparedData, jobs: list[StudentJob], teachers: dict[str, dict],
                 scores: np.ndarray, parent: RunRef | None, general: dict | None = None) -> tuple[dict, dict]:
    """Distil every job as a Ray task; returns ({method: {domain: result}}, {job: error}).
    ``general``: the general-distilled student every job starts from (``model.student_init: general``).

    Finished students (same inputs) are skipped; each finished task is written at once, so a killed
    driver loses only the students still running.
    """
    import ray

    results: dict = {}
    todo = []
    store = Store.of(cfg)
    general_key = general["key"] if general else ""
    for job in jobs:
        key = student_key(cfg, data, job, "+".join(t["key"] for t in job_teachers(cfg, job, teachers)), general_key)
        directory = student_dir(cfg, job.method, job.domain)
        if store and not finished(directory, key):
            store.get(f"students/{job.method}/{job.domain}", directory)
        if finished(directory, key):
            done = read_json(directory / "result.json")
            results.setdefault(job.method, {})[job.domain] = done
            print(f"[distill] {job.method}/{job.domain}: already done (test {done['test_acc']:.4f}); skipping")
        else:
            todo.append((job, key))
    if not todo:
        return results, {}

    init_ray(cfg)
    dcfg = cfg.distill
    per_domain = {job.domain: domain_data(cfg, data, job.domain, scores) for job, _ in todo}
    signal_plan = plan(cfg, teacher_passes(cfg, [job for job, _ in todo], per_domain))
    print(signal_plan.line, flush=True)
    options = {"num_cpus": dcfg.cpus_per_task, "num_gpus": dcfg.gpus_per_task, "max_retries": dcfg.max_retries,
               "retry_exceptions": True, "memory": memory_reservation(cfg, "student")}
    outputs_remote = ray.remote(teacher_outputs_task).options(**options)
    student_remote = ray.remote(_student_task).options(**options)
    domain_refs = {domain: ray.put(dd) for domain, dd in per_domain.items()}  # each task gets its domain's only
    console = start_console()
    output_refs, pending = {}, {}

    def outputs_of(name: str, domain: str, internals: bool):
        """One teacher pass per (teacher, domain, with hidden states or not), shared by every
        student that needs it."""
        if (name, domain, internals) not in output_refs:
            t_key = teachers[name]["key"]
            path = str(teacher_outputs_path(cfg, data, t_key, name, domain, internals))
            output_refs[(name, domain, internals)] = outputs_remote.remote(cfg, domain_refs[domain], name, t_key, path,
                                                                           internals)
        return output_refs[(name, domain, internals)]

    for job, key in todo:
        t_key, outputs, peers = "", None, []
        if job.spec.distils:
            t_key = teachers[job.teacher_name]["key"]
            outputs = outputs_of(job.teacher_name, job.domain, signal_plan.internals)
        if job.spec.multi_teacher:  # the other domains' teachers: their soft labels only
            peers = [(t["name"], t["key"]) for t in job_teachers(cfg, job, teachers) if t["name"] != job.teacher_name]
        run = open_run(cfg, f"student/{job.method}/{job.domain}/{key}", f"student-{job.method}-{job.domain}",
                       "student", parent, {"metakd.domain": job.domain, "metakd.method": job.method,
                                           "metakd.teacher": job.teacher_name or "none"})
        ref = student_remote.remote(cfg, domain_refs[job.domain], job, t_key, outputs, signal_plan.internals, run,
                                    console, general_key, tuple(peers),
                                    *[outputs_of(name, job.domain, False) for name, _ in peers])
        pending[ref] = (job, key, run)

    failures = {}
    board = ProgressBoard([job for job, _, _ in pending.values()])
    print(f"[distill] {len(pending)} student(s) on Ray ({dcfg.cpus_per_task} CPU"
          f"{f', {dcfg.gpus_per_task:g} GPU' if dcfg.gpus_per_task else ''}, "
          f"{options['memory'] / 1e9:.1f} GB each): "
          f"{', '.join(job.name for job, _, _ in pending.values())}", flush=True)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=5)
        for ref in ready:
            job, key, run = pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as exc:  # RayTaskError wraps the task's exception
                failures[job.name] = cause_line(exc)
                run.fail()
                board.finish(job.name)
                print(f"[distill] FAILED {job.name} after retries: {failures[job.name]}", flush=True)
                continue
            reference = teachers.get(job.teacher_name) or teachers.get("meta")
            result = _save_student(cfg, data, job, out["files"], dict(out["result"], key=key, run_id=run.run_id), run,
                                   reference, store)
            results.setdefault(job.method, {})[job.domain] = result
            board.finish(job.name, result["steps"])
            print(f"[distill] {job.name}: dev {result['dev_acc']:.4f} test {result['test_acc']:.4f} "
                  f"({result['steps']} steps on {result['device']}, {result['train_seconds']:.0f}s)", flush=True)
        lines, steps = ray.get(console.drain.remote())
        for line in lines + [board.line(steps, force=bool(ready))]:
            if line:
                print(line, flush=True)
    ray.kill(console)
    return results, failures


def planned_signals(cfg: Config, data: PreparedData, methods: list[str]) -> SignalPlan:
    """The teacher-signal plan (``signals.plan``) of the students of ``methods`` on ``data``."""
    jobs = [StudentJob(m, d) for m in methods for d in cfg.data.domains]
    unscored = np.ones(len(data.splits["train"]))  # the plan needs the rows' sizes, not their scores
    return plan(cfg, teacher_passes(cfg, jobs, {d: domain_data(cfg, data, d, unscored) for d in cfg.data.domains}))


def teacher_passes(cfg: Config, jobs: list[StudentJob], per_domain: dict[str, DomainData]) -> dict:
    """{(teacher, domain): PassSize} of every pass the jobs read, for ``signals.plan``."""
    passes: dict = {}
    for job in jobs:
        if not job.spec.distils:
            continue
        rows = per_domain[job.domain].rows()
        reads = stage1_steps(cfg, len(rows)) * cfg.distill.batch_size
        peers = ([teacher_name("single", d) for d in cfg.data.domains if d != job.domain]
                 if job.spec.multi_teacher else [])  # their soft labels only
        for name, row_reads in [(job.teacher_name, reads)] + [(p, 0) for p in peers]:
            size = passes.get((name, job.domain)) or PassSize(len(rows), int(rows.lengths.sum()), 0)
            passes[(name, job.domain)] = PassSize(size.texts, size.tokens, size.reads + row_reads)
    return passes


class ProgressBoard:
    """The distill stage's progress line, fit for a plain log: students done / running (with their
    steps) / queued, elapsed time and an estimate of the time left from the steps taken so far.
    A line is printed when something changed, at most every ``every`` seconds unless forced."""

    def __init__(self, jobs: list[StudentJob], every: float = 20.0):
        self.names = [job.name for job in jobs]
        self.done: dict[str, int] = {}  # name -> total steps it took
        self.started = time.time()
        self.first: tuple[float, int] | None = None  # (time, steps taken) when steps were first seen
        self.every, self.last_time, self.last_state = every, 0.0, None

    def finish(self, name: str, steps: int = 0) -> None:
        self.done[name] = steps

    def line(self, steps: dict[str, tuple[int, int]], force: bool = False, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        running = {n: steps[n] for n in self.names if n in steps and n not in self.done}
        queued = [n for n in self.names if n not in steps and n not in self.done]
        state = (len(self.done), tuple(sorted(running.items())))
        if state == self.last_state or (not force and now - self.last_time < self.every):
            return None
        self.last_state, self.last_time = state, now
        elapsed = now - self.started
        parts = [f"[distill] {len(self.done)}/{len(self.names)} done"]
        if running:
            parts.append(f"running {', '.join(f'{n} {s}/{t}' for n, (s, t) in running.items())}")
        if queued:
            parts.append(f"{len(queued)} waiting to start")
        parts.append(f"{_duration(elapsed)} elapsed" + (f", about {_duration(left)} left"
                                                          if (left := self.time_left(running, queued, now))
                                                          is not None else ""))
        return " · ".join(parts)

    def time_left(self, running: dict, queued: list, now: float) -> float | None:
        """Remaining steps at the rate of the steps taken since steps were first seen (start-up and
        teacher passes are not steps); a student not started yet is assumed to take as many steps
        as the students known so far, on average."""
        known = list(self.done.values()) + [t for _, t in running.values()]
        taken = sum(self.done.values()) + sum(s for s, _ in running.values())
        if taken and self.first is None:
            self.first = (now, taken)
        if not known or not (running or queued) or self.first is None or taken <= self.first[1]:
            return None
        remaining = sum(t - s for s, t in running.values()) + len(queued) * sum(known) / len(known)
        return remaining * (now - self.first[0]) / (taken - self.first[1])


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def student_shape(cfg: Config) -> str:
    """How the student was made, in words, for its model card."""
    made = {"general": f"general-distilled from `{cfg.model.teacher}`",
            "teacher": f"cut from the trained `{cfg.model.teacher}` teacher",
            "": f"the first layers of `{cfg.model.teacher}`", "pretrained": f"the first layers of `{cfg.model.teacher}`"}
    return (f"{cfg.model.student_layers} layers x {cfg.student_width} wide, "
            f"{made.get(cfg.model.student_init, f'from `{cfg.model.student_init}`')}")


def _save_student(cfg: Config, data: PreparedData, job: StudentJob, files: dict, result: dict, run: RunRef,
                  reference: dict | None, store: Store | None) -> dict:
    """Write the student's model directory (with its model card), log it to MLflow as a model
    with its data splits and settings, then write ``result.json`` (last: it marks the student done)."""
    directory = student_dir(cfg, job.method, job.domain)
    metrics = {k: result[k] for k in ("dev_acc", "test_acc", "params", "latency_ms", "latency_b32_ms",
                                      "gpu_latency_ms") if k in result}
    # how much smaller and faster than the teacher it distilled from (the meta-teacher for no_kd)
    if reference and reference.get("params"):
        metrics["compression"] = reference["params"] / result["params"]
        metrics["speedup"] = reference["latency_ms"] / result["latency_ms"]
    with atomic_dir(directory / "model") as tmp:
        for name, blob in files.items():
            (tmp / name).write_bytes(blob)
        write_model_card(tmp, dict(result, **metrics, kind="student", mlflow_run_id=run.run_id, labels=data.labels,
                                   title=f"metakd-ray student: {job.method} / {job.domain}",
                                   summary=f"{job.spec.summary}, for the {job.domain} domain of `{cfg.name}` "
                                           f"({student_shape(cfg)}).",
                                   data=f"{cfg.data.format}: {job.domain}", max_length=cfg.data.max_length,
                                   config_hash=cfg.hash()))
    settings = cfg.to_dict()
    run.log_params(flatten({"method": job.method, "domain": job.domain, "teacher": result["teacher"],
                            "train_examples": result["train_examples"], "device": result["device"],
                            "precision": result["precision"], "seed": cfg.student_seed,
                            "distill": settings["distill"], "model": settings["model"]}))
    run.log_metrics(metrics)
    model_id = run.log_trained_model(directory / "model", f"student-{job.method}-{job.domain}", metrics,
                                     data, cfg.data.format, job.domain)
    result = dict(result, **metrics, model_id=model_id)
    run.finish()
    atomic_write_json(directory / "result.json", result)
    if store:
        store.put(directory, f"students/{job.method}/{job.domain}")
    return result
