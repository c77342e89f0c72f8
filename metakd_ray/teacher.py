"""Stage 1: the meta-teacher, trained by a Ray Train ``TorchTrainer`` (DDP over gloo/nccl).

    metakd-ray teacher quickstart                      # local Ray, 2 workers
    metakd-ray teacher amazon teacher.kind=mix         # the paper's BERT-mix baseline
    ray job submit --working-dir . -- metakd-ray teacher amazon teacher.num_workers=4 teacher.use_gpu=true

The objective is ``losses.teacher_loss``: t-weighted CE plus γ1 times the domain loss.

Kinds: ``meta`` (t weights + domain loss), ``mix`` (all domains, plain CE), ``mtl`` (all domains,
plain CE, one classifier head per domain: the paper's BERT-mtl), ``single`` (one teacher per domain,
plain CE). ``train_loop_per_worker`` reads top to bottom; Ray appears only at its edges
(context, device, checkpoint restore, report).

The training rows are put in Ray's object store once (int32 tokens, no padding); every worker on a
node reads that one copy in place, without copying it, and only its shard of each step: the rows
rank, rank + W, ... of the global batch. The batches come from one shuffled order per epoch
(8 bytes per text), a pure function of (seed, epoch), so a resumed run replays exactly what an
uninterrupted one does; Ray Data's streaming shards would not resume mid-epoch.
Every ``teacher.eval_every`` steps the workers score a fixed sample of each domain's dev set
(``teacher.eval_max_per_domain``; each worker a shard, counts summed) and rank 0 reports
``val/<domain>/acc`` and their mean ``val/acc`` with a checkpoint (model, optimiser, scheduler,
step, RNG). Of the ``teacher.num_to_keep`` best checkpoints, the one best on the whole dev set
becomes the teacher.
A restarted worker group resumes from the latest checkpoint; re-running the command resumes an
unfinished run (same Ray run name) and does nothing for a finished one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from metakd_ray import losses
from metakd_ray.cluster import (autocast, checkpoint_whole, init_ray, latest_checkpoint, memory_reservation,
                                prepare_device, remove_run, resolve_precision, storage_path, task_device)
from metakd_ray.config import Config, model_path
from metakd_ray.data.prepare import PreparedData, eval_sample
from metakd_ray.data.split import Split
from metakd_ray.errors import MetaKDError, RunFailed, cause_line
from metakd_ray.io import atomic_dir, atomic_write_json, content_key, read_json
from metakd_ray.methods import teacher_name
from metakd_ray.modeling import MetaKDForSequenceClassification
from metakd_ray.models import SAVE_FORMAT, build_teacher, count_parameters, save_model, write_model_card
from metakd_ray.outputs import Store, teacher_dir, teacher_finished
from metakd_ray.terminal import relayed_console, say_to, verbose
from metakd_ray.tracking import RunRef, flatten, open_run, system_metrics
from metakd_ray.training import (LOG_EVERY, EpochOrder, accuracy_by_domain, accuracy_from_counts, batch_at,
                                 correct_counts, forward, make_optimizer, measure_latency, model_device, optimizer_step,
                                 seed_everything)


# --------------------------------------------------------------------------- the training loop


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    # [1] Where am I, what do I compute on, and what do I train on.
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    prepare_device(device)
    train: Split = ray.get(config["train"])  # the node's one copy, read in place
    weights = torch.tensor(ray.get(config["weights"]))
    dev: Split = ray.get(config["dev"])
    run: RunRef | None = config["run"] if rank == 0 else None
    say = say_to(config.get("console"))

    # [2] Model (moved to the device by prepare_model), optimiser, schedule.
    seed_everything(config["seed"])
    model = build_teacher(config["model_name"], config["labels"], config["domains"], config["dropout"],
                          config["pooling"], config["domain_heads"])
    model = ray.train.torch.prepare_model(model)
    core = getattr(model, "module", model)
    global_batch, local_batch = config["batch_size"], config["batch_size"] // world
    steps_per_epoch = max(1, len(train) // global_batch)  # drop the last partial batch
    total_steps = max(1, int(round(config["epochs"] * steps_per_epoch)))
    optimizer, scheduler = make_optimizer(model, config["lr"], config["weight_decay"], total_steps,
                                          config["warmup_fraction"])

    # [3] Resume from the latest checkpoint if Ray restarted us (or the run is being resumed).
    step, best = 0, {"acc": -1.0, "step": 0}
    # Ray's own checkpoint (a restarted worker group) is the newest; else the furthest whole one an
    # earlier run left (the driver checked it), if any. One that cannot be read is passed over.
    candidates = [c for c in (ray.train.get_checkpoint(), config.get("resume_from")) if c]
    for checkpoint in candidates:
        if isinstance(checkpoint, str):
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint)
        with checkpoint.as_directory() as d:
            if not checkpoint_whole(Path(d)):
                say(f"[teacher] rank {rank}: checkpoint {checkpoint.path} is damaged; passing it over")
                continue
            step, best = _load_training_state(Path(d), core, optimizer, scheduler, rank)
        say(f"[teacher] rank {rank} resumed at step {step}/{total_steps}")
        break
    else:
        torch.manual_seed(config["seed"] + rank)
    if rank == 0 and step == 0:
        say(f"[teacher] training on {device} with {resolve_precision(config['precision'], device)} "
            f"over {world} worker(s)")

    with system_metrics(run):  # rank 0 only: the machine that trains and evaluates
        domains = config["domains"]
        model.train()
        window_start, window_samples = time.perf_counter(), 0
        order = EpochOrder(len(train), config["seed"])
        while step < total_steps:
            # [4] The batch of this step is a pure function of (seed, step): resumes replay it exactly.
            epoch, position = divmod(step, steps_per_epoch)
            index = order(epoch)[position * global_batch:(position + 1) * global_batch][rank::world][:local_batch]
            batch = batch_at(train, index, device)
            t = weights[index].to(device, non_blocking=True)
            loss, ce, domain_term = train_step(model, optimizer, scheduler, batch, t, config, step, rank)
            step += 1
            window_samples += len(index) * world

            if run and step % config["log_every"] == 0:
                run.log_metrics({"train/loss": loss.item(), "train/ce": ce.mean().item(),
                                 "train/domain_loss": domain_term.mean().item(),
                                 "train/lr": scheduler.get_last_lr()[0]}, step)

            # [5] Evaluate, checkpoint and report (every worker reports; only rank 0 has a checkpoint).
            if step % config["eval_every"] == 0 or step == total_steps:
                throughput = window_samples / (time.perf_counter() - window_start)
                metrics = {"step": step, "epoch": step / steps_per_epoch, "train/loss": loss.item(),
                           "train/samples_per_s": throughput,
                           "precision": resolve_precision(config["precision"], device)}  # what the workers used
                checkpoint_dir = None
                acc = sharded_accuracy(core, dev, domains, config["precision"], rank, world)
                if rank == 0:
                    metrics.update({f"val/{d}/acc": a for d, a in acc.items()})
                    metrics["val/acc"] = float(np.mean(list(acc.values())))
                    if metrics["val/acc"] > best["acc"]:
                        best = {"acc": metrics["val/acc"], "step": step}
                    metrics.update({"best/acc": best["acc"], "best/step": best["step"]})
                    checkpoint_dir = Path(tempfile.mkdtemp(prefix="metakd-ckpt-"))
                    _save_training_state(checkpoint_dir, core, optimizer, scheduler, step, best)
                    if run:
                        run.log_metrics({k: v for k, v in metrics.items() if k not in ("step", "precision")}, step)
                    say(f"[teacher] step {step}/{total_steps} loss {loss.item():.4f} val/acc "
                        f"{metrics['val/acc']:.4f} ({throughput:.1f} samples/s)")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                                 if checkpoint_dir else None)
                if checkpoint_dir:
                    shutil.rmtree(checkpoint_dir, ignore_errors=True)
                window_start, window_samples = time.perf_counter(), 0


def sharded_accuracy(model, dev: Split, domains: list[str], precision: str, rank: int, world: int) -> dict:
    """Dev accuracy per domain, every worker predicting its shard (every ``world``-th example from
    ``rank``) and the counts summed over workers: each worker waits 1/world of the time one worker
    alone would take, and all of them get the same numbers."""
    counts = correct_counts(model, dev.take(np.arange(rank, len(dev), world)), len(domains), precision)
    if world > 1:
        counts = counts.to(model_device(model))  # NCCL reduces on the GPU
        torch.distributed.all_reduce(counts)
    return accuracy_from_counts(counts.cpu(), domains)


def train_step(model, optimizer, scheduler, batch: dict, t: torch.Tensor, config: dict, step: int, rank: int):
    """One optimisation step of ``losses.teacher_loss``; returns (loss, per-instance CE, domain term).

    The shuffled domain loss draws a fresh permutation each step from a generator seeded by
    (seed, step, rank): distinct per step and worker, and replayed exactly on resume (the
    multipliers are primes so that nearby (step, rank) pairs do not share a seed).
    """
    kind = config["domain_loss"]
    device = batch["input_ids"].device
    generator = torch.Generator().manual_seed(config["seed"] * 7919 + step * 31 + rank)
    with autocast(device, config["precision"]):
        out = forward(model, batch, grl_scale=1.0 if kind == "grl" else 0.0)
        loss, ce, domain_term = losses.teacher_loss(
            out.logits.float(), batch["labels"], t, out.domain_logits.float(), batch["domain_ids"], kind,
            config["gamma1"], config["weight_domain_loss"], generator)
    optimizer_step(model, optimizer, scheduler, loss, config["max_grad_norm"])
    return loss, ce, domain_term


def _save_training_state(directory: Path, model, optimizer, scheduler, step: int, best: dict) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              directory / "model.safetensors")
    rng = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout on a GPU draws from the CUDA generator
        rng["cuda_rng"] = torch.cuda.get_rng_state()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **rng},
               directory / "training_state.pt")
    (directory / "state.json").write_text(json.dumps({"step": step, "best": best}))


def _load_training_state(directory: Path, model, optimizer, scheduler, rank: int):
    model.load_state_dict(load_file(directory / "model.safetensors"))
    # map_location: a GPU run's checkpoint resumes on CPU too; load_state_dict moves the optimiser
    # state to its parameters' device.
    state = torch.load(directory / "training_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    info = json.loads((directory / "state.json").read_text())
    if rank == 0:
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
    else:
        torch.manual_seed(info["step"] * 1000 + rank)
    return info["step"], info["best"]


# --------------------------------------------------------------------------- the driver


def teacher_objective(cfg: Config, kind: str) -> dict:
    """Effective loss settings of a teacher kind (mix, mtl and single are plain CE baselines)."""
    meta = kind == "meta"
    return {"use_weights": meta and cfg.teacher.use_prototype_weights,
            "domain_loss": cfg.teacher.domain_loss,
            "gamma1": cfg.teacher.domain_loss_weight if meta else 0.0,
            "weight_domain_loss": meta and cfg.teacher.weight_domain_loss}


def loop_settings(cfg: Config, data: PreparedData, kind: str) -> dict:
    """Everything ``train_loop_per_worker`` needs besides the data and the MLflow run."""
    tcfg = cfg.teacher
    return {"threads": tcfg.cpus_per_worker, "seed": cfg.seed, "model_name": cfg.model.teacher,
            "labels": data.labels, "domains": data.domains, "dropout": cfg.model.dropout,
            "pooling": cfg.model.pooling, "domain_heads": kind == "mtl",
            "batch_size": tcfg.batch_size, "epochs": tcfg.epochs, "lr": tcfg.lr,
            "weight_decay": tcfg.weight_decay, "warmup_fraction": tcfg.warmup_fraction,
            "max_grad_norm": tcfg.max_grad_norm,
            "eval_every": tcfg.eval_every, "log_every": LOG_EVERY, "precision": cfg.precision,
            **teacher_objective(cfg, kind)}


def loop_config(cfg: Config, data: PreparedData, kind: str, domain_ids: list[int], weights: np.ndarray,
                run: RunRef | None) -> dict:
    """``loop_settings`` plus the data and the run. The data goes to Ray's object store, so workers
    on any node get it: the training rows of ``domain_ids`` with their weights, and the dev sample
    that every ``eval_every`` scores."""
    import ray

    dev = eval_sample(data.splits["dev"].for_domains(domain_ids), cfg.teacher.eval_max_per_domain, cfg.seed)
    return dict(loop_settings(cfg, data, kind), train=ray.put(data.splits["train"].for_domains(domain_ids)),
                weights=ray.put(np.ascontiguousarray(weights, dtype=np.float32)), dev=ray.put(dev), run=run)


def make_trainer(cfg: Config, loop_config: dict, run_name: str, storage: str, callbacks=None, num_to_keep=None):
    """The one ``TorchTrainer`` of the project: workers, device, checkpoints and retries from ``cfg.teacher``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tcfg = cfg.teacher
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                     resources_per_worker={"CPU": tcfg.cpus_per_worker,
                                                           "memory": memory_reservation(cfg, "teacher")},
                                     placement_strategy=tcfg.placement_strategy),
        run_config=RunConfig(
            name=run_name, storage_path=storage, callbacks=callbacks,
            # Ray Train's own INFO lines (worker group, every report and checkpoint) only with --verbose
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep or tcfg.num_to_keep,
                                               checkpoint_score_attribute="val/acc",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
        ),
    )


def load_best_teacher(cfg: Config, data: PreparedData, result, kind: str = "meta", domain_ids=None
                      ) -> tuple[MetaKDForSequenceClassification, dict]:
    """The best of a finished fit's kept checkpoints as a model, with its metrics: by ``val/acc``
    (the dev sample) when the sample was the whole dev set of ``domain_ids``, else by the mean
    accuracy over the whole dev set."""
    model = build_teacher(cfg.model.teacher, data.labels, data.domains, cfg.model.dropout, cfg.model.pooling,
                          domain_heads=kind == "mtl")
    kept = sorted(result.best_checkpoints, key=lambda cm: -cm[1]["val/acc"])
    dev = data.splits["dev"].for_domains(domain_ids if domain_ids is not None else range(len(data.domains)))
    if len(eval_sample(dev, cfg.teacher.eval_max_per_domain, cfg.seed)) < len(dev) and len(kept) > 1:
        model.to(task_device())
        scored = []
        for checkpoint, metrics in kept:
            _load_checkpoint_weights(model, checkpoint)
            scored.append((float(np.mean(list(accuracy_by_domain(model, dev, data.domains).values()))), metrics))
        best = max(range(len(kept)), key=lambda i: scored[i][0])
        kept = [kept[best]]
        print(f"[teacher] the whole dev set chose step {kept[0][1]['step']} ({scored[best][0]:.4f}) among the "
              f"{len(scored)} kept checkpoints", flush=True)
    _load_checkpoint_weights(model, kept[0][0])
    return model.cpu(), kept[0][1]


def _load_checkpoint_weights(model, checkpoint) -> None:
    with checkpoint.as_directory() as d:
        model.load_state_dict(load_file(Path(d) / "model.safetensors"))


def teacher_key(cfg: Config, data: PreparedData, kind: str, domain: str = "") -> str:
    # the student's settings in `model` do not change the teacher
    settings = cfg.to_dict()
    for k in ("memory_per_worker_gb", "keep_checkpoints"):  # where it runs and what is kept, not what it learns
        settings["teacher"].pop(k)
    return content_key(data.key, cfg.model.teacher, cfg.model.dropout, cfg.model.pooling,
                       content_key({s: settings[s] for s in ("teacher", "prototypes", "seed")})[:12],
                       cfg.precision,
                       cfg.data.held_out_domain, kind, domain, SAVE_FORMAT)[:12]


def train_teacher(cfg: Config, data: PreparedData, scores: np.ndarray, kind: str, domain: str = "",
                  parent: RunRef | None = None, fresh: bool = False) -> dict:
    """Train (or resume, or reuse) one teacher; returns its ``result.json`` content."""
    name = teacher_name(kind, domain)
    key = teacher_key(cfg, data, kind, domain)
    out_dir = teacher_dir(cfg, name)
    run_name = f"teacher-{name}-{key}"
    storage = storage_path(cfg)
    store = Store.of(cfg)
    if fresh:
        shutil.rmtree(out_dir, ignore_errors=True)
        remove_run(storage, run_name)
    elif store and not teacher_finished(out_dir, key):  # finished by an earlier job whose driver ran elsewhere
        store.get(f"teachers/{name}", out_dir)
    if teacher_finished(out_dir, key):
        done = read_json(out_dir / "result.json")
        print(f"[teacher] {name}: already trained (key {key}), dev mean acc {done['dev_mean_acc']:.4f}; skipping")
        return done

    # [1] What this teacher trains on.
    domain_ids = ([data.domain_id(domain)] if kind == "single"
                  else [data.domain_id(d) for d in cfg.teacher_domains])
    train = data.splits["train"].for_domains(domain_ids)
    objective = teacher_objective(cfg, kind)
    rows = np.flatnonzero(np.isin(data.splits["train"].domain_ids, domain_ids))
    weights = scores[rows].astype(np.float32) if objective["use_weights"] else np.ones(len(rows), dtype=np.float32)
    if len(train) < cfg.teacher.batch_size:
        raise MetaKDError(f"teacher {name}: {len(train)} training examples is fewer than "
                          f"teacher.batch_size={cfg.teacher.batch_size}")

    # [2] MLflow: a child run of the pipeline, found again on resume.
    run = open_run(cfg, f"teacher/{name}/{key}", f"teacher-{name}", "teacher", parent,
                   {"metakd.teacher_kind": kind, "metakd.domain": domain or "all"})
    settings = {k: v for k, v in cfg.to_dict().items()
                if k in ("seed", "precision", "data", "model", "prototypes", "teacher")}
    run.log_params(flatten(dict(settings, effective=objective)))

    # [3] Launch the worker group.
    init_ray(cfg)
    config = loop_config(cfg, data, kind, domain_ids, weights, run)
    print(f"[teacher] {name}: {len(train)} examples over {len(domain_ids)} domain(s), "
          f"{cfg.teacher.num_workers} worker(s){' with a GPU each' if cfg.teacher.use_gpu else ''}, "
          f"Ray run {run_name} in {storage}", flush=True)
    resume = latest_checkpoint(storage, run_name)
    if resume:
        print(f"[teacher] {name}: continuing the unfinished run from {resume}", flush=True)
        config["resume_from"] = str(resume)
    try:
        with relayed_console() as console:
            config["console"] = console
            result = make_trainer(cfg, config, run_name, storage).fit()
    except Exception as exc:
        run.fail()
        raise RunFailed(f"teacher {name}: training stopped after {cfg.teacher.max_failures} restart(s): "
                        f"{cause_line(exc)}; its checkpoints in {storage} are kept, so the same command "
                        "continues from the last whole one") from exc

    # [4] The best checkpoint becomes the teacher: evaluate it on every domain, save it atomically.
    model, best_metrics = load_best_teacher(cfg, data, result, kind, domain_ids)
    model.to(task_device())
    eval_ids = domain_ids if kind == "single" else list(range(len(data.domains)))
    dev_acc = accuracy_by_domain(model, data.splits["dev"].for_domains(eval_ids), data.domains)
    test_acc = accuracy_by_domain(model, data.splits["test"].for_domains(eval_ids), data.domains)
    summary = {
        "key": key, "kind": kind, "domain": domain, "run_id": run.run_id, "best_step": best_metrics["step"],
        "dev_mean_acc": float(np.mean([dev_acc[data.domains[i]] for i in domain_ids])),
        "per_domain": {d: {"dev_acc": dev_acc[d], "test_acc": test_acc[d]} for d in dev_acc},
        "samples_per_s": result.metrics.get("train/samples_per_s"),
        "precision": result.metrics.get("precision") or resolve_precision(cfg.precision, torch.device("cpu")),
        "params": count_parameters(model),
        **measure_latency(model, data.splits["test"].for_domains(eval_ids)),
    }
    card = dict(summary, title=f"metakd-ray teacher: {name}", labels=data.labels,
                summary=f"The {kind} teacher of `{cfg.name}`, fine-tuned from `{cfg.model.teacher}` "
                        f"on {', '.join(data.domains[i] for i in domain_ids)}.",
                data=f"{cfg.data.format}: {', '.join(data.domains[i] for i in domain_ids)}", train_examples=len(train),
                test_acc=float(np.mean([test_acc[data.domains[i]] for i in domain_ids])),
                dev_acc=summary["dev_mean_acc"], mlflow_run_id=run.run_id, max_length=cfg.data.max_length,
                config_hash=cfg.hash())
    with atomic_dir(out_dir / "model") as tmp:
        save_model(model, tmp, {"kind": kind, "domain": domain or None, "max_length": cfg.data.max_length,
                                "test_split": str(data.split_path("test"))},
                   tokenizer_from=model_path(cfg.model.teacher), max_length=cfg.data.max_length)
        write_model_card(tmp, card)
    atomic_write_json(out_dir / "result.json", summary)
    if store:
        store.put(out_dir, f"teachers/{name}")
    metrics = {"dev_acc": summary["dev_mean_acc"], "test_acc": card["test_acc"], "params": summary["params"],
               **{k: summary[k] for k in ("latency_ms", "latency_b32_ms", "gpu_latency_ms") if k in summary},
               **{f"{s}/{d}": v for d, r in summary["per_domain"].items() for s, v in r.items()}}
    run.log_metrics(metrics)
    run.log_trained_model(out_dir / "model", f"teacher-{name}", metrics, data, cfg.data.format,
                          domain or None)
    run.finish()
    if not cfg.teacher.keep_checkpoints:  # the teacher is saved; they would only resume a finished run
        remove_run(storage, run_name)
    print(f"[teacher] {name}: best step {summary['best_step']}, dev mean acc {summary['dev_mean_acc']:.4f}")
    return summary

