"""Stage 0: prototype (transferability) scores t for every training instance, cached with the data.

A frozen pass of the pretrained backbone (on the GPU when this process has one) embeds the training
texts, mean-pooled over real tokens, then the pure functions of ``scores`` turn embeddings into t.
The result is a parquet file of (uid, domain, t), one row per training row in split order, beside
the tokenized splits, keyed by the data cache key and the prototype settings, plus a per-domain
histogram (PNG) that the pipeline logs to MLflow. Callers get t as an array aligned with the
training split's rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from metakd_ray import plots
from metakd_ray.cluster import autocast, prepare_device, task_device
from metakd_ray.config import Config, model_path
from metakd_ray.data.prepare import PreparedData
from metakd_ray.io import atomic_dir, content_key, read_parquet
from metakd_ray.models import load_encoder
from metakd_ray.modeling import mean_pool
from metakd_ray.scores import (prototype_scores_per_class, prototype_scores_per_domain,
                               prototype_scores_unseen)
from metakd_ray.training import batch_at


def prototype_dir(cfg: Config, data: PreparedData) -> Path:
    p = cfg.prototypes
    settings = [data.key, cfg.model.teacher, p.variant, p.alpha, p.zeta, p.pooling, p.normalize,
                cfg.data.held_out_domain, cfg.precision]
    return data.directory.parent / f"prototypes-{content_key(*settings)}"


def compute_prototype_scores(cfg: Config, data: PreparedData, quiet: bool = False) -> np.ndarray:
    """t of every training row, in split order (cached; recomputed only when inputs change)."""
    directory = prototype_dir(cfg, data)
    table = read_parquet(directory / "scores.parquet")
    if table is not None and table.num_rows != len(data.splits["train"]):
        print(f"[cache] {directory / 'scores.parquet'} is damaged (not one score per training row); rebuilding it")
        table = None
    if table is None:
        start = time.time()
        train = data.splits["train"]
        emb = embed(cfg, train, quiet=quiet)
        t = scores_for(cfg, data, emb)
        with atomic_dir(directory) as tmp:
            pq.write_table(pa.table({"uid": train.uids, "domain": [data.domains[d] for d in train.domain_ids],
                                     "t": t.numpy().astype(np.float32)}), tmp / "scores.parquet")
            plots.histogram(tmp / "prototype_scores.png", t.numpy(), train.domain_ids, data.domains)
        if not quiet:
            print(f"[prototypes] scored {len(train)} training instances in {time.time() - start:.0f}s -> {directory}")
        table = pq.read_table(directory / "scores.parquet")
    if not quiet:
        print(summarize(table))
    return table.column("t").to_numpy()


def scores_for(cfg: Config, data: PreparedData, emb: torch.Tensor) -> torch.Tensor:
    """Apply the configured variant; a held-out domain is scored against the seen domains only."""
    p, train = cfg.prototypes, data.splits["train"]
    labels, domains = torch.tensor(train.labels), torch.tensor(train.domain_ids)
    held = data.domain_id(cfg.data.held_out_domain) if cfg.data.held_out_domain else -1
    seen = domains != held
    t = torch.empty(len(train))
    # Domain ids of the seen domains are remapped to 0..K'-1 for the prototype table.
    remap = torch.unique(domains[seen], return_inverse=True)[1]
    if p.variant == "per_class":
        t[seen] = prototype_scores_per_class(emb[seen], labels[seen], remap, p.alpha, p.zeta)
    else:
        t[seen] = prototype_scores_per_domain(emb[seen], remap, p.alpha, p.zeta)
    if held >= 0:
        t[~seen] = prototype_scores_unseen(emb[~seen], labels[~seen], emb[seen], labels[seen], remap,
                                           p.variant, p.alpha, p.zeta)
    if p.normalize == "mean":
        t = t / t.mean()
    return t


@torch.no_grad()
def embed(cfg: Config, split, quiet: bool = False, device: torch.device | None = None) -> torch.Tensor:
    """Mean-pooled last layer of the frozen pretrained backbone for every row of ``split``, computed on
    ``device`` (default: this process's GPU if it has one) and returned on the CPU."""
    device = device or task_device()
    prepare_device(device)
    encoder = load_encoder(model_path(cfg.model.teacher)).to(device).eval()
    bs, out = cfg.prototypes.batch_size, []
    # Sorting by length keeps padding (and so compute) low; the order is restored at the end.
    order = np.argsort(split.lengths)
    for i, start in enumerate(range(0, len(split), bs)):
        b = batch_at(split, order[start:start + bs], device)
        with autocast(device, cfg.precision):
            h = encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        token_type_ids=b["token_type_ids"]).last_hidden_state
        out.append(mean_pool(h.float(), b["attention_mask"], masked=cfg.prototypes.pooling == "masked").cpu())
        if not quiet and i % 20 == 0:
            print(f"[prototypes] embedded {min(start + bs, len(split))}/{len(split)}", flush=True)
    emb = torch.empty(len(split), out[0].shape[-1])
    emb[torch.from_numpy(order)] = torch.cat(out)
    return emb


def summarize(table) -> str:
    frame = table.to_pandas()
    stats = frame.groupby("domain")["t"].describe()[["count", "mean", "std", "min", "max"]]
    return "prototype scores t per domain:\n" + stats.round(4).to_string()
