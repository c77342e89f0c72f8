"""Stage 2: meta-distillation, one student per target domain (spec §4, decisions 5-10).

    metakd-ray distill quickstart                       # after `metakd-ray teacher quickstart`
    metakd-ray distill quickstart --methods all         # the paper's baseline students too

For each (method, domain) a Ray task trains a student on that domain's training data only:

    stage 1:  L_1 = mean_i[λ_i (hidn_i + attn_i)] + γ2·mean(λ)·tkd      (λ ≡ 1, γ2 = 0 for TinyBERT-KD)
    stage 2:  L_2 = mean_i soft_CE(z^S_i, z^T_i; τ)  (+ hard-label CE if distill.hard_label_weight > 0)

then keeps the student with the best dev accuracy of its domain (never test) and reports test
accuracy, size and latency. The frozen teacher is run once per (teacher, domain): its logits, λ
and, with ``distill.cache_teacher_targets``, its hidden/attention targets (fp16) are saved and
reused by every student and every sweep trial. ``distill_student`` is plain PyTorch; Ray and
MLflow only appear in ``run_students`` (the fan-out) and at the edges of the task.

Methods: ``meta_kd`` (meta-teacher, λ and γ2), ``tinybert_kd(<kind>)`` (teacher kind meta, mix or
single; no λ, no domain term), ``no_kd`` (the student fine-tuned on labels alone).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from metakd_ray import losses
from metakd_ray.config import Config, model_path, resolve_layer_map, teacher_depth
from metakd_ray.data import PreparedData, Split, subsample_fraction
from metakd_ray.io import atomic_dir, atomic_write_json, read_json
from metakd_ray.models import MetaKDModel, build_student, count_parameters, load_model, save_model
from metakd_ray.scores import expertise_weight
from metakd_ray.tracking import RunRef
from metakd_ray.training import (accuracy_by_domain, batch_at, epoch_order, make_optimizer, measure_latency,
                                seed_everything)


@dataclass(frozen=True)
class StudentJob:
    method: str
    domain: str

    @property
    def teacher_kind(self) -> str:
        """Which teacher a method distils from ("" for no_kd)."""
        if self.method == "meta_kd":
            return "meta"
        if self.method.startswith("tinybert_kd("):
            return self.method[len("tinybert_kd("):-1]
        return ""

    @property
    def teacher_name(self) -> str:
        kind = self.teacher_kind
        return f"single-{self.domain}" if kind == "single" else kind


def student_train_split(cfg: Config, data: PreparedData, domain: str) -> Split:
    """The target domain's training data, subsampled by data.target_fraction (decision 11)."""
    split = data.splits["train"].for_domains([data.domain_id(domain)])
    return subsample_fraction(split, cfg.data.target_fraction, cfg.data.split_seed)


# --------------------------------------------------------------------------- teacher targets


def targets_path(cfg: Config, teacher_key: str, teacher_name: str, domain: str) -> Path:
    blob = json.dumps([teacher_key, domain, cfg.data.target_fraction, cfg.model.layer_map,
                       cfg.model.student_layers, cfg.distill.cache_teacher_targets])
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return cfg.out / "teacher_outputs" / teacher_name / f"{domain}-{key}.safetensors"


@torch.no_grad()
def compute_teacher_targets(cfg: Config, data: PreparedData, teacher: MetaKDModel, domain: str,
                            scores: dict[str, float], with_internals: bool, path: Path) -> Path:
    """One eval-mode teacher pass (decision 5) over the domain's student data, saved as safetensors:
    ``logits``, ``t``, ``lambda``, ``domain_vector`` and, with internals, fp16 ``hidden.<j>`` /
    ``attention.<j>`` for the mapped teacher layers (padded to the domain's longest example)."""
    if path.is_file():
        return path
    split = student_train_split(cfg, data, domain)
    teacher.eval()
    layer_map = resolve_layer_map(cfg.model.layer_map, teacher.num_layers, cfg.model.student_layers)
    tensors = split.tensors()
    out = {"logits": [], "domain_vector": []}
    hidden = {j: [] for j in [0] + layer_map}
    attention = {j: [] for j in layer_map}
    for start in range(0, len(split), 32):
        index = torch.arange(start, min(start + 32, len(split)))
        b = {k: v[index] for k, v in tensors.items()}  # full padded width, so rows line up later
        o = teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"], internals=with_internals)
        out["logits"].append(o.logits)
        out["domain_vector"].append(o.domain_vector)
        if with_internals:
            for j in hidden:
                hidden[j].append(o.hidden_states[j].half())
            for j in attention:
                attention[j].append(o.attention_scores[j - 1].half())
    result = {k: torch.cat(v).contiguous() for k, v in out.items()}
    t = torch.tensor([scores[u] for u in split.uids], dtype=torch.float32)
    result["t"] = t
    result["lambda"] = expertise_weight(result["logits"], torch.from_numpy(split.labels), t)
    if with_internals:
        result.update({f"hidden.{j}": torch.cat(v).contiguous() for j, v in hidden.items()})
        result.update({f"attention.{j}": torch.cat(v).contiguous() for j, v in attention.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(result, tmp)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- one student


def distill_student(cfg: Config, data: PreparedData, job: StudentJob, teacher_dir: Path | None,
                    targets: Path | None, run: RunRef | None = None, log=print) -> dict:
    """Train one student for ``job`` and return its metrics plus the trained model (plain PyTorch)."""
    d = cfg.distill
    seed_everything(cfg.student_seed)
    domain_id = data.domain_id(job.domain)
    train = student_train_split(cfg, data, job.domain)
    dev = data.splits["dev"].for_domains([domain_id])
    test = data.splits["test"].for_domains([domain_id])
    depth = teacher_depth(cfg.model.teacher)
    layer_map = resolve_layer_map(cfg.model.layer_map, depth, cfg.model.student_layers)
    student = build_student(cfg.model.teacher, cfg.model.student_init, cfg.model.student_layers,
                            _teacher_width(cfg), len(data.labels), len(data.domains), cfg.model.dropout,
                            trained_teacher=teacher_dir if job.teacher_kind else None)
    tensors = train.tensors()
    history: list[dict] = []
    best = {"acc": -1.0, "state": None, "step": 0}

    def evaluate(step: int, stage: str) -> None:
        acc = accuracy_by_domain(student, dev, data.domains)[job.domain]
        history.append({"step": step, "stage": stage, "dev_acc": acc})
        if run:
            run.log_metrics({"val/acc": acc}, step)
        if acc > best["acc"]:
            best.update(acc=acc, state=copy.deepcopy(student.state_dict()), step=step)

    teacher_data = load_file(targets) if targets else None
    teacher = None
    if job.teacher_kind and teacher_data is not None and "hidden.0" not in teacher_data:
        teacher, _ = load_model(teacher_dir)  # no cached internals: run the teacher in the loop
        teacher.eval()
    use_lambda = job.method == "meta_kd"
    gamma2 = d.domain_weight if job.method == "meta_kd" else 0.0
    step = 0
    start = time.time()

    if not job.teacher_kind:
        # no_kd: the student fine-tuned on the hard labels alone.
        step = _train(student, tensors, d.no_kd_epochs, d.stage2_lr, cfg, step, evaluate, run, "no_kd",
                      lambda b, idx, out: F.cross_entropy(out.logits, b["labels"]), internals=False)
    else:
        lam = teacher_data["lambda"] if use_lambda else torch.ones(len(train))

        def intermediate(b, idx, out):
            width = b["input_ids"].shape[1]
            t_hidden, t_attn, t_vec = _teacher_internals(teacher, teacher_data, b, idx, width, layer_map)
            mask = b["attention_mask"]
            s_attn, t_attn = _attention_target(out.attention_scores, t_attn, mask, d.attention_target)
            hidn = losses.hidden_mse(list(out.hidden_states), t_hidden, student.projection, mask)
            attn = losses.attention_mse(s_attn, t_attn, mask)
            tkd = losses.domain_vector_mse(student.projection(out.domain_vector), t_vec)
            return losses.intermediate_loss(lam[idx], hidn, attn, tkd, gamma2, d.hidden_weight, d.attention_weight)

        def prediction(b, idx, out):
            soft = losses.soft_cross_entropy(out.logits, teacher_data["logits"][idx], d.temperature)
            if d.lambda_in_stage2 and use_lambda:
                soft = soft * lam[idx]
            loss = soft.mean()
            if d.hard_label_weight:
                loss = loss + d.hard_label_weight * F.cross_entropy(out.logits, b["labels"])
            return loss

        if d.schedule == "two_stage":
            step = _train(student, tensors, d.stage1_epochs, d.stage1_lr, cfg, step, None, run, "stage1",
                          intermediate, internals=True)
            step = _train(student, tensors, d.stage2_epochs, d.stage2_lr, cfg, step, evaluate, run, "stage2",
                          prediction, internals=False)
        else:
            step = _train(student, tensors, d.stage2_epochs, d.stage2_lr, cfg, step, evaluate, run, "joint",
                          lambda b, idx, out: intermediate(b, idx, out) + prediction(b, idx, out), internals=True)

    train_seconds = time.time() - start
    if best["state"] is not None:
        student.load_state_dict(best["state"])
    test_acc = accuracy_by_domain(student, test, data.domains)[job.domain]
    result = {
        "method": job.method, "domain": job.domain, "teacher": job.teacher_name or None,
        "dev_acc": best["acc"], "test_acc": test_acc, "best_step": best["step"], "steps": step,
        "train_examples": len(train), "params": count_parameters(student, include_heads=False),
        "latency_ms": measure_latency(student, test), "train_seconds": round(train_seconds, 2),
        "history": history,
    }
    log(f"[distill] {job.method}/{job.domain}: dev {result['dev_acc']:.4f} test {test_acc:.4f} "
        f"({step} steps, {result['train_seconds']:.0f}s)")
    return {"result": result, "model": student}


def _train(model, tensors: dict, epochs: float, lr: float, cfg: Config, step: int, evaluate, run: RunRef | None,
           stage: str, loss_fn, internals: bool) -> int:
    """One stage: shuffled mini-batches, AdamW with warm-up, dev evaluation every eval_every steps."""
    d = cfg.distill
    n = len(tensors["labels"])
    per_epoch = max(1, n // d.batch_size)
    total = int(round(epochs * per_epoch))
    if total == 0:
        return step
    optimizer, scheduler = make_optimizer(model, lr, d.weight_decay, total, d.warmup_fraction)
    model.train()
    for i in range(total):
        epoch, position = divmod(i, per_epoch)
        idx = epoch_order(n, cfg.student_seed + zlib.crc32(stage.encode()) % 997, epoch)[position * d.batch_size:(position + 1) * d.batch_size]
        b = batch_at(tensors, idx)
        out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"], internals=internals)
        loss = loss_fn(b, idx, out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        if run and step % 5 == 0:
            run.log_metrics({f"train/{stage}_loss": loss.item()}, step)
        if evaluate and (step % d.eval_every == 0 or i == total - 1):
            evaluate(step, stage)
    return step


def _teacher_internals(teacher, cached: dict, b: dict, idx, width: int, layer_map: list[int]):
    """Teacher hidden states, attention scores and domain vector for batch rows ``idx``."""
    if teacher is None:  # from the cache, trimmed to this batch's width
        hidden = [cached[f"hidden.{j}"][idx, :width].float() for j in [0] + layer_map]
        attn = [cached[f"attention.{j}"][idx, :, :width, :width].float() for j in layer_map]
        return hidden, attn, cached["domain_vector"][idx]
    with torch.no_grad():
        o = teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"], internals=True)
    return ([o.hidden_states[j] for j in [0] + layer_map], [o.attention_scores[j - 1] for j in layer_map],
            o.domain_vector)


def _attention_target(student_attn, teacher_attn, mask, kind: str):
    if kind == "scores":
        return list(student_attn), teacher_attn
    bias = (1.0 - mask[:, None, None, :].float()) * -1e4

    def probs(xs):
        return [(x + bias).softmax(-1) for x in xs]

    return probs(student_attn), probs(teacher_attn)


def _teacher_width(cfg: Config) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path(cfg.model.teacher)).hidden_size


# --------------------------------------------------------------------------- fan-out on Ray


def student_key(cfg: Config, data: PreparedData, job: StudentJob, teacher_key: str) -> str:
    d = cfg.to_dict()["distill"]
    for k in ("methods", "cpus_per_task", "gpus_per_task", "max_retries", "cache_teacher_targets"):
        d.pop(k)
    blob = json.dumps([data.key, teacher_key, d, cfg.to_dict()["model"], cfg.seed, cfg.data.target_fraction,
                       job.method, job.domain], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def student_dir(cfg: Config, job: StudentJob) -> Path:
    return cfg.out / "students" / job.method / job.domain


def targets_task(cfg: Config, data: PreparedData, teacher_dir: str, domain: str, scores: dict, path: str) -> str:
    torch.set_num_threads(cfg.distill.cpus_per_task)
    if not Path(path).is_file():
        teacher, _ = load_model(Path(teacher_dir))
        compute_teacher_targets(cfg, data, teacher, domain, scores, cfg.distill.cache_teacher_targets, Path(path))
    return path


def _student_task(cfg: Config, data: PreparedData, job: StudentJob, teacher_dir: str | None, targets: str | None,
                  scores: dict, run: RunRef) -> dict:
    """Ray task body: train one student, return its result and its saved files (cluster-safe)."""
    torch.set_num_threads(cfg.distill.cpus_per_task)  # reused workers keep the first import's count
    if targets and not Path(targets).is_file():  # the cache lives on another node: rebuild it here
        targets_task(cfg, data, teacher_dir, job.domain, scores, targets)
    out = distill_student(cfg, data, job, Path(teacher_dir) if teacher_dir else None,
                          Path(targets) if targets else None, run)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_model(out["model"], Path(tmp), {"kind": "student", "method": job.method, "domain": job.domain,
                                             "domains": data.domains, "labels": data.labels,
                                             "dropout": cfg.model.dropout},
                   tokenizer_from=model_path(cfg.model.teacher))
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    return {"result": out["result"], "files": files}


def run_students(cfg: Config, data: PreparedData, jobs: list[StudentJob], teachers: dict[str, dict],
                 scores: dict[str, float], parent: RunRef | None) -> tuple[dict, dict]:
    """Distil every job as a Ray task; returns ({method: {domain: result}}, {job: error}).

    Finished students (same inputs) are skipped; each finished task is written at once, so a killed
    driver loses only the students still running.
    """
    import ray

    from metakd_ray.teacher import init_ray
    from metakd_ray.tracking import open_run

    results: dict = {}
    todo = []
    for job in jobs:
        t_key = teachers[job.teacher_name]["key"] if job.teacher_kind else ""
        key = student_key(cfg, data, job, t_key)
        done = read_json(student_dir(cfg, job) / "result.json")
        if done and done.get("key") == key:
            results.setdefault(job.method, {})[job.domain] = done
            print(f"[distill] {job.method}/{job.domain}: already done (test {done['test_acc']:.4f}); skipping")
        else:
            todo.append((job, key))
    if not todo:
        return results, {}

    init_ray(cfg)
    d = cfg.distill
    options = {"num_cpus": d.cpus_per_task, "num_gpus": d.gpus_per_task, "max_retries": d.max_retries,
               "retry_exceptions": True}
    targets_remote = ray.remote(targets_task).options(**options)
    student_remote = ray.remote(_student_task).options(**options)
    data_ref, scores_ref = ray.put(data), ray.put(scores)
    target_refs, pending = {}, {}
    for job, key in todo:
        teacher_dir, target = None, None
        if job.teacher_kind:
            teacher_dir = str(cfg.out / "teachers" / job.teacher_name / "model")
            path = str(targets_path(cfg, teachers[job.teacher_name]["key"], job.teacher_name, job.domain))
            if (job.teacher_name, job.domain) not in target_refs:  # one teacher pass per (teacher, domain)
                target_refs[(job.teacher_name, job.domain)] = targets_remote.remote(
                    cfg, data_ref, teacher_dir, job.domain, scores_ref, path)
            target = target_refs[(job.teacher_name, job.domain)]
        run = open_run(cfg, f"student/{job.method}/{job.domain}/{key}", f"student-{job.method}-{job.domain}",
                       "student", parent, {"metakd.domain": job.domain, "metakd.method": job.method,
                                           "metakd.teacher": job.teacher_name or "none"})
        ref = student_remote.remote(cfg, data_ref, job, teacher_dir, target, scores_ref, run)
        pending[ref] = (job, key, run)

    total, failures = len(pending), {}
    started = time.time()
    print(f"[distill] {total} student(s) on Ray: {', '.join(f'{j.method}/{j.domain}' for j, _, _ in pending.values())}")
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=30)
        for ref in ready:
            job, key, run = pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as exc:  # RayTaskError wraps the task's exception
                failures[f"{job.method}/{job.domain}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                run.finish("FAILED")
                print(f"[distill] FAILED {job.method}/{job.domain} after retries: {failures[f'{job.method}/{job.domain}']}")
                continue
            result = dict(out["result"], key=key, run_id=run.run_id)
            _save_student(cfg, job, out["files"], result, run)
            results.setdefault(job.method, {})[job.domain] = result
        done = total - len(pending)
        waiting = ", ".join(f"{j.method}/{j.domain}" for j, _, _ in pending.values())
        print(f"[distill] {done}/{total} done, {len(failures)} failed, {time.time() - started:.0f}s"
              + (f"; running or queued: {waiting}" if waiting else ""), flush=True)
    return results, failures


def _save_student(cfg: Config, job: StudentJob, files: dict, result: dict, run: RunRef) -> None:
    directory = student_dir(cfg, job)
    with atomic_dir(directory / "model") as tmp:
        for name, blob in files.items():
            (tmp / name).write_bytes(blob)
    run.log_metrics({"final/dev_acc": result["dev_acc"], "final/test_acc": result["test_acc"],
                     "final/params": result["params"], "final/latency_ms": result["latency_ms"]})
    run.log_params({"method": job.method, "domain": job.domain, "teacher": result["teacher"],
                    "train_examples": result["train_examples"]})
    run.log_artifacts(directory / "model", "model")
    run.finish()
    atomic_write_json(directory / "result.json", result)
