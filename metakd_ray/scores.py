"""Instance weights of Meta-KD as pure tensor functions: prototype scores t and expertise λ.

Nothing here knows about models, Ray or MLflow; inputs are embeddings, labels and logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prototype_scores_per_class(emb: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor,
                               alpha: float = 0.5, zeta: float = 0.5) -> torch.Tensor:
    """Paper variant (the default ``prototypes.variant``), for instance i of domain k and class m:

        p_m^(k) = mean{ e(x_j) : domain_j = k, y_j = m }
        t_i = α·cos(e_i, p_m^(k)) + ζ·(1/(K'-1))·Σ_{k'≠k} cos(e_i, p_m^(k'))

    where the sum runs over the other domains that have class m (K' of them in all). With a
    single domain the second term is 0.
    """
    protos, present = _prototypes(emb, labels, domains)
    unit = F.normalize(protos, dim=-1)  # [K, C, D]
    t = torch.empty(len(emb), dtype=emb.dtype)
    for start in range(0, len(emb), 8192):  # a block of rows at a time: [K, rows, D] stays small
        rows = slice(start, start + 8192)
        m, k = labels[rows].long(), domains[rows].long()
        # cos(e_i, p_m^(k')) for every domain k': [rows, K]
        sims = torch.einsum("nd,knd->nk", F.normalize(emb[rows], dim=-1), unit[:, m])
        others = present[:, m].T.clone()  # the other domains that have class m
        others[torch.arange(len(m)), k] = False
        count = others.sum(1)
        other = torch.where(count > 0, (sims * others).sum(1) / count.clamp(min=1), torch.zeros(len(m)))
        t[rows] = (alpha * sims.gather(1, k.view(-1, 1)).squeeze(1) + zeta * other).to(emb.dtype)
    return t


def prototype_scores_per_domain(emb: torch.Tensor, domains: torch.Tensor,
                                alpha: float = 0.5, zeta: float = 0.5) -> torch.Tensor:
    """Authors'-code variant (``prototypes.variant: per_domain``), labels ignored, for instance i of domain k:

        μ_k = mean{ e(x_j) : domain_j = k },   ν_k = (1/(K-1)) Σ_{k'≠k} μ_k'
        t_i = α·cos(e_i, μ_k) + ζ·cos(e_i, ν_k)

    (the cosine to the mean of the other centroids, not the mean of cosines).
    """
    ids = sorted(int(d) for d in domains.unique())
    centroids = {k: emb[domains == k].mean(0) for k in ids}
    t = torch.empty(len(emb), dtype=emb.dtype)
    for k in ids:
        rows = domains == k
        own = F.cosine_similarity(emb[rows], centroids[k].unsqueeze(0), dim=-1)
        others = [centroids[kk] for kk in ids if kk != k]
        other = (F.cosine_similarity(emb[rows], torch.stack(others).mean(0).unsqueeze(0), dim=-1)
                 if others else torch.zeros_like(own))
        t[rows] = alpha * own + zeta * other
    return t


def prototype_scores_unseen(emb: torch.Tensor, labels: torch.Tensor, ref_emb: torch.Tensor,
                            ref_labels: torch.Tensor, ref_domains: torch.Tensor, variant: str,
                            alpha: float = 0.5, zeta: float = 0.5) -> torch.Tensor:
    """Scores for a held-out domain's instances against the seen domains (the unseen-domain setting).

    The instance has no own-domain prototype, so both terms use the seen domains: the own term is
    the nearest seen prototype (max cosine), the other term the mean over seen prototypes
    (per_class: of its class; per_domain: the cosine to the mean centroid).
    """
    if variant == "per_domain":
        centroids = torch.stack([ref_emb[ref_domains == k].mean(0) for k in ref_domains.unique()])
        sims = F.cosine_similarity(emb.unsqueeze(1), centroids.unsqueeze(0), dim=-1)  # [N, K]
        mean_c = F.cosine_similarity(emb, centroids.mean(0, keepdim=True), dim=-1)
        return alpha * sims.max(1).values + zeta * mean_c
    protos, present = _prototypes(ref_emb, ref_labels, ref_domains)
    t = torch.empty(len(emb), dtype=emb.dtype)
    for i in range(len(emb)):
        m = int(labels[i])
        keep = present[:, m]
        sims = F.cosine_similarity(emb[i].unsqueeze(0), protos[keep, m], dim=-1)
        t[i] = alpha * sims.max() + zeta * sims.mean()
    return t


def _prototypes(emb, labels, domains):
    n_dom, n_cls = int(domains.max()) + 1, int(labels.max()) + 1
    protos = emb.new_zeros(n_dom, n_cls, emb.shape[-1])
    present = torch.zeros(n_dom, n_cls, dtype=torch.bool)
    for k in range(n_dom):
        for m in range(n_cls):
            rows = (domains == k) & (labels == m)
            if rows.any():
                protos[k, m] = emb[rows].mean(0)
                present[k, m] = True
    return protos, present


def expertise_weight(teacher_logits: torch.Tensor, labels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Domain-expertise weight λ per instance, computed once from the frozen teacher's outputs:

        p_i = softmax(z_i^T)[y_i]        (teacher probability of the gold label)
        λ_i = (1 + t_i) · sigmoid(-(1 - p_i)²) = (1 + t_i) / (1 + exp((1 - p_i)²))
    """
    p_gold = teacher_logits.float().softmax(-1).gather(1, labels.view(-1, 1)).squeeze(1)
    return (1.0 + t) * torch.sigmoid(-((1.0 - p_gold) ** 2))
