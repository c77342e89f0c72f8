"""Small PyTorch helpers shared by the teacher and student loops: batches, optimiser, evaluation."""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from metakd_ray.data import Split

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_at(tensors: dict, index) -> dict:
    """Rows ``index`` of every tensor, trimmed to the longest real sequence in the batch."""
    index = torch.as_tensor(index, dtype=torch.long)
    batch = {k: v[index] for k, v in tensors.items()}
    width = int(batch["attention_mask"].sum(1).max())
    for key in MODEL_INPUTS:
        batch[key] = batch[key][:, :width]
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch``: a pure function of (seed, epoch) so resumes replay it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int,
                   warmup_fraction: float):
    """AdamW (no decay on biases/LayerNorm) with linear warm-up then linear decay to 0."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def predict(model, split: Split, batch_size: int = 64) -> np.ndarray:
    """Predicted class ids for every row of ``split`` (model in eval mode)."""
    was_training = model.training
    model.eval()
    tensors = split.tensors()
    preds = []
    for start in range(0, len(split), batch_size):
        b = batch_at(tensors, range(start, min(start + batch_size, len(split))))
        out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"])
        preds.append(out.logits.argmax(-1))
    model.train(was_training)
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def accuracy_by_domain(model, split: Split, domains: list[str], batch_size: int = 64) -> dict[str, float]:
    """{domain: accuracy} over the domains present in ``split``."""
    correct = predict(model, split, batch_size) == split.labels
    return {domains[d]: float(correct[split.domain_ids == d].mean())
            for d in sorted(set(split.domain_ids.tolist()))}


@torch.no_grad()
def measure_latency(model, split: Split, samples: int = 20) -> float:
    """Median milliseconds to classify one example: batch size 1 on one thread, so teacher and
    student latencies compare whatever process measured them."""
    model.eval()
    tensors = split.tensors()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        for i in range(min(samples, len(split))):
            b = batch_at(tensors, [i])
            t0 = time.perf_counter()
            model(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"])
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times)) if times else 0.0
