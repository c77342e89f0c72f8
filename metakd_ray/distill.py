"""Stage 2: meta-distillation, one student per target domain.

    metakd-ray distill quickstart                       # after `metakd-ray teacher quickstart`
    metakd-ray distill quickstart --methods all         # the paper's baseline students too

For each (method, domain) a Ray task trains a student on that domain's training data only, with
the method's objective (``metakd_ray.methods``: λ, γ2 and the teacher kind come from its row):

    stage 1:  L_1 = mean_i[λ_i (hidn_i + attn_i)] + γ2·mean(λ)·tkd      (λ ≡ 1, γ2 = 0 for TinyBERT-KD)
    stage 2:  L_2 = mean_i soft_CE(z^S_i, z^T_i; τ)  (+ hard-label CE if distill.hard_label_weight > 0)

then keeps the student with the best dev accuracy of its domain (never test) and reports test
accuracy, size and latency. The frozen teacher is run once per (teacher, domain), in eval mode so
that its targets carry no dropout noise: its logits, λ and, with ``distill.cache_teacher_targets``,
its hidden/attention targets (fp16) are saved as "teacher outputs" and reused by every student and
every sweep trial. ``distill_student`` is plain PyTorch on whatever device it is given; Ray and
MLflow only appear in ``run_students`` (the fan-out) and at the edges of the tasks.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from metakd_ray import losses
from metakd_ray.cluster import autocast, init_ray, prepare_device, resolve_precision, task_device
from metakd_ray.config import Config, model_path
from metakd_ray.data.prepare import PreparedData, Split, concatenated, subsample_fraction
from metakd_ray.errors import MetaKDError
from metakd_ray.general import general_path
from metakd_ray.io import atomic_dir, atomic_file, atomic_write_json, content_key, read_json, safetensors_whole
from metakd_ray.methods import Method, method, teacher_name
from metakd_ray.modeling import MetaKDForSequenceClassification
from metakd_ray.models import SAVE_FORMAT, build_student, count_parameters, load_model, save_model, write_model_card
from metakd_ray.outputs import Store, fetch, student_dir, teacher_dir, teacher_outputs_path
from metakd_ray.scores import expertise_weight
from metakd_ray.terminal import start_console
from metakd_ray.tracking import RunRef, flatten, open_run, system_metrics
from metakd_ray.training import (TrainingStage, accuracy_by_domain, eval_batch_size, forward, measure_latency,
                                 model_device, predict, seed_everything, stage_steps)


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


def student_train_split(cfg: Config, data: PreparedData, domain: str, distils: bool = True) -> Split:
    """The target domain's training data, subsampled by ``data.target_fraction`` (data scarcity);
    for a distilling student followed by the domain's unlabelled rows (``distill.unlabelled_per_domain``)."""
    domain_ids = [data.domain_id(domain)]
    split = subsample_fraction(data.splits["train"].for_domains(domain_ids), cfg.data.target_fraction,
                               cfg.data.split_seed)
    if distils and "unlabelled" in data.splits:
        split = concatenated(split, data.splits["unlabelled"].for_domains(domain_ids))
    return split


# --------------------------------------------------------------------------- teacher outputs


@torch.no_grad()
def compute_teacher_outputs(cfg: Config, data: PreparedData, teacher: MetaKDForSequenceClassification, domain: str,
                            scores: dict[str, float], with_internals: bool, path: Path) -> Path:
    """One eval-mode teacher pass over the domain's student data, on the teacher's device, saved as
    safetensors: ``logits``, ``t``, ``lambda``, ``domain_vector`` and, with internals, fp16
    ``hidden.<j>`` / ``attention.<j>`` for the mapped teacher layers (padded to the domain's longest
    example)."""
    split = student_train_split(cfg, data, domain)
    teacher.eval()
    device = model_device(teacher)
    layer_map = cfg.layer_map
    tensors = split.tensors()
    out = {"logits": [], "domain_vector": []}
    hidden = {j: [] for j in [0] + layer_map}
    attention = {j: [] for j in layer_map}
    batch_size = eval_batch_size(device)
    for start in range(0, len(split), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split)))
        # full padded width (no trimming), so the rows of every batch line up in one tensor
        b = {k: v[index].to(device, non_blocking=True) for k, v in tensors.items()}
        with autocast(device, cfg.precision):
            o = forward(teacher, b, internals=with_internals)
        out["logits"].append(o.logits.float().cpu())
        out["domain_vector"].append(o.domain_vector.float().cpu())
        if with_internals:
            for j in hidden:
                hidden[j].append(o.hidden_states[j].half().cpu())
            for j in attention:
                attention[j].append(o.attention_scores[j - 1].half().cpu())
    result = {k: torch.cat(v).contiguous() for k, v in out.items()}
    # An unlabelled row has no gold label and no prototype score: the teacher's own prediction and
    # the mean score of the domain's labelled rows stand in for them.
    labels = torch.from_numpy(split.labels)
    labelled = labels >= 0
    t = torch.tensor([scores[u] if y >= 0 else 0.0 for u, y in zip(split.uids, split.labels)], dtype=torch.float32)
    t[~labelled] = t[labelled].mean()
    labels = torch.where(labelled, labels, result["logits"].argmax(-1))
    result["t"] = t
    result["lambda"] = expertise_weight(result["logits"], labels, t)
    if with_internals:
        result.update({f"hidden.{j}": torch.cat(v).contiguous() for j, v in hidden.items()})
        result.update({f"attention.{j}": torch.cat(v).contiguous() for j, v in attention.items()})
    with atomic_file(path) as tmp:
        save_file(result, tmp)
    return path


def _teacher_outputs_ready(path: Path) -> bool:
    """The saved teacher outputs are there and whole; a damaged file is reported and removed."""
    if safetensors_whole(path):
        return True
    if path.is_file():
        print(f"[distill] {path} is damaged (truncated or not safetensors); rebuilding it", flush=True)
        path.unlink()
    return False


# --------------------------------------------------------------------------- one student


def distill_student(cfg: Config, data: PreparedData, job: StudentJob, teacher_path: Path | None,
                    teacher_outputs: dict | None, run: RunRef | None = None, log=print,
                    device: torch.device | None = None, progress=None, general: Path | None = None) -> dict:
    """Train one student for ``job`` on ``device`` and return its metrics plus the trained model.

    ``teacher_outputs`` holds the cached teacher pass (CPU tensors, moved per batch); without
    cached internals the teacher itself (from ``teacher_path``) runs beside the student.
    ``general`` is the general-distilled student it starts from (``model.student_init: general``).
    ``progress(step, total_steps)`` is called every few steps."""
    dcfg, spec = cfg.distill, job.spec
    device = device or torch.device("cpu")
    seed_everything(cfg.student_seed)
    domain_id = data.domain_id(job.domain)
    train = student_train_split(cfg, data, job.domain, spec.distils)
    dev = data.splits["dev"].for_domains([domain_id])
    test = data.splits["test"].for_domains([domain_id])
    layer_map = cfg.layer_map
    student = build_student(cfg.model.teacher, cfg.model.student_init, cfg.model.student_layers,
                            cfg.teacher_arch.width, data.labels, data.domains, cfg.model.dropout,
                            trained_teacher=teacher_path if spec.distils else None, general=general,
                            pooling=cfg.model.pooling).to(device)
    tensors = train.tensors()
    history: list[dict] = []
    best = {"acc": -1.0, "state": None, "step": 0}

    def evaluate(step: int, stage: str) -> None:
        acc = accuracy_by_domain(student, dev, data.domains, cfg.precision)[job.domain]
        history.append({"step": step, "stage": stage, "dev_acc": acc})
        if run:
            run.log_metrics({"val/acc": acc}, step)
        if acc > best["acc"]:
            best.update(acc=acc, state=copy.deepcopy(student.state_dict()), step=step)

    teacher = None
    if spec.distils and teacher_outputs is not None and "hidden.0" not in teacher_outputs:
        teacher, _ = load_model(teacher_path)  # no cached internals: run the teacher in the loop
        teacher.to(device).eval()
    gamma2 = dcfg.domain_weight if spec.domain_term else 0.0
    step = 0
    start = time.time()
    total = planned_steps(cfg, spec, len(train))
    train_stage = TrainingStage(student, tensors, dcfg, cfg.student_seed, cfg.precision, run, device,
                                (lambda s: progress(s, total)) if progress else None)
    scored = {"evaluate": evaluate, "eval_every": dcfg.eval_every, "min_steps": dcfg.min_steps}
    scale = dcfg.term_scale == "target"

    if not spec.distils:
        # no_kd: the student fine-tuned on the hard labels alone.
        step = train_stage(dcfg.no_kd_epochs, dcfg.stage2_lr, step, "no_kd",
                           lambda b, idx, out: F.cross_entropy(out.logits.float(), b["labels"]), False, **scored)
    else:
        lam = teacher_outputs["lambda"] if spec.use_lambda else torch.ones(len(train))

        def rows(name, idx):  # cached teacher outputs of this batch (CPU) on the student's device
            return teacher_outputs[name][idx].to(device, non_blocking=True)

        def intermediate(b, idx, out):
            width = b["input_ids"].shape[1]
            t_hidden, t_attn, t_vec = _teacher_internals(teacher, teacher_outputs, b, idx, width, layer_map, device)
            mask = b["attention_mask"]
            s_attn, t_attn = losses.attention_pair(out.attention_scores, t_attn, mask, dcfg.attention_target)
            hidn = losses.hidden_mse(list(out.hidden_states), t_hidden, student.projection, mask, scale)
            attn = losses.attention_mse(s_attn, t_attn, mask, scale)
            tkd = losses.domain_vector_mse(student.projection(out.domain_vector), t_vec, scale)
            loss = losses.intermediate_loss(lam[idx].to(device), hidn, attn, tkd, gamma2, dcfg.hidden_weight,
                                            dcfg.attention_weight)
            # each term's share of the loss, to check that none of them drowns the others (tensors:
            # read only when logged, so a GPU step does not wait for them)
            return loss, {"hidden": dcfg.hidden_weight * hidn.detach().mean(),
                          "attention": dcfg.attention_weight * attn.detach().mean(),
                          "domain": gamma2 * tkd.detach().mean()}

        def prediction(b, idx, out):
            soft = losses.soft_cross_entropy(out.logits.float(), rows("logits", idx), dcfg.temperature)
            if dcfg.lambda_in_stage2 and spec.use_lambda:
                soft = soft * lam[idx].to(device)
            loss = soft.mean()
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
    if best["state"] is not None:
        student.load_state_dict(best["state"])
    test_correct = predict(student, test, cfg.precision) == test.labels
    test_acc = float(test_correct.mean())
    result = {
        "method": job.method, "domain": job.domain, "teacher": job.teacher_name or None,
        "dev_acc": best["acc"], "test_acc": test_acc, "best_step": best["step"], "steps": step,
        # per test example (in split order), for the report's paired bootstrap intervals
        "test_correct": "".join("1" if c else "0" for c in test_correct),
        "train_examples": len(train), "unlabelled_examples": int((train.labels < 0).sum()),
        "params": count_parameters(student),
        **measure_latency(student, test), "train_seconds": round(train_seconds, 2),
        "started_at": start, "finished_at": time.time(),
        "device": device.type, "precision": resolve_precision(cfg.precision, device), "history": history,
    }
    log(f"[distill] {job.method}/{job.domain}: dev {result['dev_acc']:.4f} test {test_acc:.4f} "
        f"({step} steps on {device.type}, {result['train_seconds']:.0f}s)")
    return {"result": result, "model": student.cpu()}


def planned_steps(cfg: Config, spec: Method, examples: int) -> int:
    """All optimiser steps a student of method ``spec`` takes on ``examples`` training examples."""
    dcfg = cfg.distill
    if not spec.distils:
        return stage_steps(dcfg.no_kd_epochs, examples, dcfg.batch_size, dcfg.min_steps)
    stage1 = (stage_steps(dcfg.stage1_epochs, examples, dcfg.batch_size, dcfg.min_steps)
              if dcfg.schedule == "two_stage" else 0)
    return stage1 + stage_steps(dcfg.stage2_epochs, examples, dcfg.batch_size, dcfg.min_steps)


def _teacher_internals(teacher, cached: dict, b: dict, idx, width: int, layer_map: list[int], device):
    """Teacher hidden states, attention scores and domain vector for batch rows ``idx``."""
    if teacher is None:  # from the cache (CPU), trimmed to this batch's width
        hidden = [cached[f"hidden.{j}"][idx, :width].to(device, non_blocking=True).float() for j in [0] + layer_map]
        attn = [cached[f"attention.{j}"][idx, :, :width, :width].to(device, non_blocking=True).float()
                for j in layer_map]
        return hidden, attn, cached["domain_vector"][idx].to(device, non_blocking=True)
    with torch.no_grad():
        o = forward(teacher, b, internals=True)
    return ([o.hidden_states[j] for j in [0] + layer_map], [o.attention_scores[j - 1] for j in layer_map],
            o.domain_vector)


# --------------------------------------------------------------------------- fan-out on Ray


def student_key(cfg: Config, data: PreparedData, job: StudentJob, teacher_key: str, general_key: str = "") -> str:
    training = cfg.to_dict()["distill"]  # the settings that change what a student learns
    for k in ("methods", "cpus_per_task", "gpus_per_task", "max_retries", "cache_teacher_targets"):
        training.pop(k)
    if not (training["unlabelled_per_domain"] and job.spec.distils):  # no_kd ignores it; older students keep their keys
        training.pop("unlabelled_per_domain")
    return content_key(data.key, teacher_key, general_key, training, cfg.to_dict()["model"], cfg.seed, cfg.precision,
                       cfg.data.target_fraction, job.method, job.domain, SAVE_FORMAT)[:12]


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


def teacher_outputs_task(cfg: Config, data: PreparedData, name: str, key: str, domain: str, scores: dict,
                         path: str, internals: bool | None = None) -> str:
    """Ray task body: make sure this node has the teacher outputs at ``path`` (fetched from storage or
    computed on the GPU Ray gave the task), and that storage has them too."""
    torch.set_num_threads(cfg.distill.cpus_per_task)
    store, target = Store.of(cfg), Path(path)
    rel = target.relative_to(cfg.out).as_posix()
    if _teacher_outputs_ready(target):
        return path
    if store and store.get(rel, target) and _teacher_outputs_ready(target):
        return path
    device = task_device()
    prepare_device(device)
    teacher, _ = load_model(fetch_teacher(cfg, name, key))
    internals = cfg.distill.cache_teacher_targets if internals is None else internals
    compute_teacher_outputs(cfg, data, teacher.to(device), domain, scores, internals, target)
    if store:
        store.put(target, rel)
    return path


def _student_task(cfg: Config, data: PreparedData, job: StudentJob, teacher_key: str, outputs_path: str | None,
                  scores: dict, run: RunRef, console, general_key: str = "", peers: tuple = (),
                  *peer_paths: str) -> dict:
    """Ray task body: train one student on the GPU Ray gave it (else the CPU); return its result
    and its saved files, so the driver writes them wherever this task ran. ``peers`` (name, key)
    and ``peer_paths``: the other teachers whose soft labels a multi-teacher method averages with
    its own teacher's, and where their logits-only passes over this domain were written (Ray
    resolves them before the task starts)."""
    torch.set_num_threads(cfg.distill.cpus_per_task)  # reused workers keep the first import's count
    device = task_device()
    prepare_device(device)
    teacher_path, outputs = None, None
    if job.spec.distils:
        teacher_path = fetch_teacher(cfg, job.teacher_name, teacher_key)
        # made on another node (or damaged): fetched from storage or rebuilt here
        outputs = load_file(teacher_outputs_task(cfg, data, job.teacher_name, teacher_key, job.domain, scores,
                                                 outputs_path))
    if peers:
        logits = [load_file(teacher_outputs_task(cfg, data, name, key, job.domain, scores, path, False))["logits"]
                  for (name, key), path in zip(peers, peer_paths)]
        outputs["logits"] = losses.averaged_soft_labels([outputs["logits"]] + logits, cfg.distill.temperature)
    with system_metrics(run):
        # the driver prints the result line; steps go to the progress board
        out = distill_student(cfg, data, job, teacher_path, outputs, run, log=lambda line: None, device=device,
                              progress=lambda step, total: console.update.remote(job.name, step, total),
                              general=general_path(cfg, general_key) if general_key else None)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(out["model"], Path(tmp), {"kind": "student", "method": job.method, "domain": job.domain,
                                             "teacher": job.teacher_name or None, "max_length": cfg.data.max_length,
                                             "test_split": str(data.directory / "test.parquet")},
                   tokenizer_from=model_path(cfg.model.teacher), max_length=cfg.data.max_length)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    return {"result": out["result"], "files": files}


def run_students(cfg: Config, data: PreparedData, jobs: list[StudentJob], teachers: dict[str, dict],
                 scores: dict[str, float], parent: RunRef | None, general: dict | None = None) -> tuple[dict, dict]:
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
        if store and (read_json(directory / "result.json") or {}).get("key") != key:
            store.get(f"students/{job.method}/{job.domain}", directory)
        done = read_json(directory / "result.json")
        if done and done.get("key") == key:
            results.setdefault(job.method, {})[job.domain] = done
            print(f"[distill] {job.method}/{job.domain}: already done (test {done['test_acc']:.4f}); skipping")
        else:
            todo.append((job, key))
    if not todo:
        return results, {}

    init_ray(cfg)
    dcfg = cfg.distill
    options = {"num_cpus": dcfg.cpus_per_task, "num_gpus": dcfg.gpus_per_task, "max_retries": dcfg.max_retries,
               "retry_exceptions": True}
    outputs_remote = ray.remote(teacher_outputs_task).options(**options)
    student_remote = ray.remote(_student_task).options(**options)
    data_ref, scores_ref = ray.put(data), ray.put(scores)
    console = start_console()
    output_refs, pending = {}, {}

    def outputs_of(name: str, domain: str, internals: bool | None = None):
        """One teacher pass per (teacher, domain, with internals or not), shared by every student
        that needs it."""
        if (name, domain, internals) not in output_refs:
            t_key = teachers[name]["key"]
            path = str(teacher_outputs_path(cfg, t_key, name, domain, internals))
            output_refs[(name, domain, internals)] = outputs_remote.remote(cfg, data_ref, name, t_key, domain,
                                                                           scores_ref, path, internals)
        return output_refs[(name, domain, internals)]

    for job, key in todo:
        t_key, outputs, peers = "", None, []
        if job.spec.distils:
            t_key = teachers[job.teacher_name]["key"]
            outputs = outputs_of(job.teacher_name, job.domain)
        if job.spec.multi_teacher:  # the other domains' teachers: their soft labels only
            peers = [(t["name"], t["key"]) for t in job_teachers(cfg, job, teachers) if t["name"] != job.teacher_name]
        run = open_run(cfg, f"student/{job.method}/{job.domain}/{key}", f"student-{job.method}-{job.domain}",
                       "student", parent, {"metakd.domain": job.domain, "metakd.method": job.method,
                                           "metakd.teacher": job.teacher_name or "none"})
        ref = student_remote.remote(cfg, data_ref, job, t_key, outputs, scores_ref, run, console, general_key,
                                    tuple(peers), *[outputs_of(name, job.domain, False) for name, _ in peers])
        pending[ref] = (job, key, run)

    failures = {}
    board = ProgressBoard([job for job, _, _ in pending.values()])
    print(f"[distill] {len(pending)} student(s) on Ray ({dcfg.cpus_per_task} CPU"
          f"{f', {dcfg.gpus_per_task:g} GPU' if dcfg.gpus_per_task else ''} each): "
          f"{', '.join(job.name for job, _, _ in pending.values())}", flush=True)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=5)
        for ref in ready:
            job, key, run = pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as exc:  # RayTaskError wraps the task's exception
                failures[job.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                run.finish("FAILED")
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
                                     data.directory, cfg.data.format, job.domain)
    result = dict(result, **metrics, model_id=model_id)
    run.finish()
    atomic_write_json(directory / "result.json", result)
    if store:
        store.put(directory, f"students/{job.method}/{job.domain}")
    return result
