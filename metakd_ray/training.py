"""Small PyTorch helpers shared by the teacher and student loops: batches, optimiser, evaluation.

Batches are cut from a ``Split`` on the CPU, padded to their longest row, and moved to the model's
device (pinned, non-blocking on a GPU); evaluation returns CPU arrays whatever the device.
"""

from __future__ import annotations

import copy
import random
import zlib

import numpy as np
import torch

from metakd_ray.cluster import autocast
from metakd_ray.data.split import Split

LOG_EVERY = 5  # steps between training-loss points in MLflow


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_at(split: Split, index, device: torch.device | None = None) -> dict:
    """Rows ``index`` of ``split`` padded to the longest of them (``Split.batch``), on ``device``."""
    batch = split.batch(index)
    return to_device(batch, device) if device is not None else batch


def to_device(tensors: dict, device: torch.device) -> dict:
    """Every tensor of ``tensors`` on ``device``; from pinned memory without blocking on a GPU."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}
    return {k: v.to(device) for k, v in tensors.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def forward(model, batch: dict, **kwargs):
    """The model on one batch (``batch_at`` output)."""
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["domain_ids"], **kwargs)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of epoch ``epoch``: a pure function of (seed, epoch) so resumes replay it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).numpy()


class EpochOrder:
    """``epoch_order`` made once per epoch (not once per step), held for the epoch in progress."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.order = n, seed, -1, None

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch != self.epoch:
            self.epoch, self.order = epoch, epoch_order(self.n, self.seed, epoch)
        return self.order


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int,
                   warmup_fraction: float, constant: bool = False):
    """AdamW (no decay on biases/LayerNorm) with linear warm-up then linear decay to 0 (or, with
    ``constant``, the full rate to the end)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    # fused: one kernel over all parameters instead of a loop over tensors, which a student's large
    # embedding table makes a real share of each step (the meta device has no fused kernel)
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=fused)
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if constant:
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(model, optimizer, scheduler, loss: torch.Tensor, max_grad_norm: float) -> None:
    """Backward, clip the global gradient norm, step the optimiser and the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()


def stage_steps(epochs: float, examples: int, batch_size: int, min_steps: int = 0) -> int:
    """Optimiser steps of one stage: ``epochs`` passes of full batches, at least ``min_steps``
    (a stage of 0 epochs stays off)."""
    steps = int(round(epochs * max(1, examples // batch_size)))
    return max(steps, min_steps) if epochs > 0 else 0


class TrainingStage:
    """One training stage of a model on the rows of ``split``: shuffled mini-batches, AdamW with
    warm-up, an optional evaluation every ``eval_every`` steps and at the end.

    ``settings`` gives batch_size, weight_decay, warmup_fraction and max_grad_norm (a
    ``DistillConfig`` or ``GeneralConfig``). ``loss_fn(batch, rows, output)`` returns the loss, or
    (loss, {term: per-batch value}) whose terms are logged beside it as ``<stage>/<term>``."""

    def __init__(self, model, split: Split, settings, seed: int, precision: str, run, device: torch.device,
                 progress=None):
        self.model, self.split, self.settings, self.seed = model, split, settings, seed
        self.precision, self.run, self.device, self.progress = precision, run, device, progress

    def __call__(self, epochs: float, lr: float, step: int, stage: str, loss_fn, internals: bool, evaluate=None,
                 eval_every: int = 0, min_steps: int = 0, constant_lr: bool = False) -> int:
        s = self.settings
        n = len(self.split)
        per_epoch = max(1, n // s.batch_size)
        total = stage_steps(epochs, n, s.batch_size, min_steps)
        if total == 0:
            return step
        optimizer, scheduler = make_optimizer(self.model, lr, s.weight_decay, total, s.warmup_fraction, constant_lr)
        # Each stage shuffles with its own stream: the stage name's CRC32 (mod a prime) offsets the
        # seed, so stage 2 does not replay stage 1's batch order.
        order = EpochOrder(n, self.seed + zlib.crc32(stage.encode()) % 997)
        self.model.train()
        for i in range(total):
            epoch, position = divmod(i, per_epoch)
            idx = order(epoch)[position * s.batch_size:(position + 1) * s.batch_size]
            b = batch_at(self.split, idx, self.device)
            with autocast(self.device, self.precision):
                out = forward(self.model, b, internals=internals)
                loss = loss_fn(b, idx, out)
            loss, terms = loss if isinstance(loss, tuple) else (loss, {})
            optimizer_step(self.model, optimizer, scheduler, loss, s.max_grad_norm)
            step += 1
            if step % LOG_EVERY == 0:
                if self.run:
                    self.run.log_metrics({"train/loss": loss.item(),
                                          **{f"{stage}/{k}": float(v) for k, v in terms.items()}}, step)
                if self.progress:
                    self.progress(step)
            if evaluate and (step % eval_every == 0 or i == total - 1):
                evaluate(step, stage)
        return step


class BestStates:
    """The ``k`` best states of a model by dev accuracy while it trains (CPU copies; on a tie the
    earlier state stays)."""

    def __init__(self, k: int = 1):
        self.k, self.kept = k, []  # [(score, step, state)], best first

    def offer(self, score: float, model, step: int) -> None:
        if len(self.kept) == self.k and score <= self.kept[-1][0]:
            return
        state = {name: v.detach().to("cpu", copy=True) for name, v in model.state_dict().items()}
        self.kept = sorted(self.kept + [(score, step, state)], key=lambda item: -item[0])[:self.k]

    def choose(self, model, rescore=None) -> tuple[int, float]:
        """Load the best kept state into ``model``; returns its (step, score). With ``rescore``
        (a function scoring ``model`` as it is, e.g. on the whole dev set) the best by that score."""
        if not self.kept:
            return 0, -1.0
        candidates = self.kept
        if rescore is not None:
            candidates = []
            for _, step, state in self.kept:
                model.load_state_dict(state)
                candidates.append((rescore(), step, state))
            candidates.sort(key=lambda item: -item[0])  # stable: a tie keeps the sample's order
        score, step, state = candidates[0]
        model.load_state_dict(state)
        return step, score


def eval_batch_size(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 64


@torch.no_grad()
def predict(model, split: Split, precision: str = "fp32") -> np.ndarray:
    """Predicted class ids (a CPU array) for every row of ``split``, on the model's device."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    batch_size = eval_batch_size(device)
    preds = []
    for start in range(0, len(split), batch_size):
        b = batch_at(split, np.arange(start, min(start + batch_size, len(split))), device)
        with autocast(device, precision):
            preds.append(forward(model, b).logits.argmax(-1).cpu())
    model.train(was_training)
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def accuracy_by_domain(model, split: Split, domains: list[str], precision: str = "fp32") -> dict[str, float]:
    """{domain: accuracy} over the domains present in ``split``."""
    return accuracy_from_counts(correct_counts(model, split, len(domains), precision), domains)


def correct_counts(model, split: Split, num_domains: int, precision: str = "fp32") -> torch.Tensor:
    """``[2, num_domains]`` float64 (CPU): per domain, the correct predictions and the examples in
    ``split``. Counts of disjoint shards add up, so workers can each score a shard and sum."""
    correct = torch.from_numpy((predict(model, split, precision) == split.labels).astype(np.float64))
    domain_ids = torch.tensor(split.domain_ids)
    counts = torch.zeros(2, num_domains, dtype=torch.float64)
    counts[0].index_add_(0, domain_ids, correct)
    counts[1].index_add_(0, domain_ids, torch.ones_like(correct))
    return counts


def accuracy_from_counts(counts: torch.Tensor, domains: list[str]) -> dict[str, float]:
    """{domain: correct / examples} over the domains with examples (``counts`` from ``correct_counts``)."""
    return {domains[d]: float(counts[0, d] / counts[1, d]) for d in range(len(domains)) if counts[1, d] > 0}


def measure_latency(model, split: Split, min_run_time: float = 0.3) -> dict[str, float]:
    """Median milliseconds per forward pass on one CPU thread, fp32, after warm-up: ``latency_ms``
    at batch size 1 (a typical example of ``split``) and ``latency_b32_ms`` at batch size 32 (the
    deployment figures, comparable whatever process measured them); for a model on a GPU,
    ``gpu_latency_ms`` at batch size 1 there too."""
    device = model_device(model)
    cpu_model = copy.deepcopy(model).cpu().eval() if device.type != "cpu" else model.eval()
    typical = int(np.argsort(split.lengths)[len(split) // 2])  # median length
    batches = {"latency_ms": [typical], "latency_b32_ms": [i % len(split) for i in range(32)]}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out = {}
        for name, rows in batches.items():
            b = batch_at(split, rows, torch.device("cpu"))
            out[name] = time_ms(lambda b=b: forward(cpu_model, b), min_run_time)
    finally:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        b = batch_at(split, batches["latency_ms"], device)

        def on_gpu():
            forward(model, b)
            torch.cuda.synchronize(device)

        out["gpu_latency_ms"] = time_ms(on_gpu, min_run_time)
    return out


@torch.no_grad()
def time_ms(fn, min_run_time: float = 0.5) -> float:
    """Median milliseconds per call of ``fn`` on one thread, after a warm-up call
    (``torch.utils.benchmark``, which repeats ``fn`` in blocks until ``min_run_time`` s)."""
    from torch.utils import benchmark

    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1000
