"""Meta-KD losses as pure tensor functions (no models, Ray or MLflow).

Per-instance functions return a tensor of shape [B] (reduction "none") so that the λ weights of
meta-distillation really weight instances, not only the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- teacher


def teacher_loss(logits: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, domain_logits: torch.Tensor,
                 domain_ids: torch.Tensor, domain_loss: str, gamma1: float, weight_domain_loss: bool = False,
                 generator: torch.Generator | None = None):
    """The meta-teacher's objective over a batch of B instances:

        L_T = (1/B) Σ_i t_i·CE(z_i, y_i) + γ1·(1/B) Σ_i ℓ^dom_i
        L_T = (1/B) Σ_i t_i·(CE(z_i, y_i) + γ1·ℓ^dom_i)          (weight_domain_loss, the authors' code)

    t_i is the prototype (transferability) score, 1 for the plain-CE baselines; ℓ^dom is
    ``domain_loss_per_instance(domain_loss, ...)``. Returns (L_T, per-instance CE, per-instance ℓ^dom).
    """
    ce = F.cross_entropy(logits, labels, reduction="none")
    domain = domain_loss_per_instance(domain_loss, domain_logits, domain_ids, generator)
    if weight_domain_loss:
        return (t * (ce + gamma1 * domain)).mean(), ce, domain
    return (t * ce).mean() + gamma1 * domain.mean(), ce, domain


def domain_loss_per_instance(kind: str, domain_logits: torch.Tensor, domain_ids: torch.Tensor,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """ℓ^dom_i of ``teacher.domain_loss``: shuffled (default), uniform or grl (the model applies the
    gradient reversal; here it is the plain CE to the true domain)."""
    if kind == "shuffled":
        return shuffled_domain_ce(domain_logits, domain_ids, generator)
    if kind == "uniform":
        return uniform_domain_kl(domain_logits)
    return grl_domain_ce(domain_logits, domain_ids)


def shuffled_domain_ce(domain_logits: torch.Tensor, domains: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Corrupted-domain loss of the authors' code (the default ``teacher.domain_loss``), per instance:

        z̃ = domains[π] for a fresh random permutation π of the batch,
        ℓ_i = CE(domain_logits_i, z̃_i)

    Minimised by everything (no gradient reversal); its optimum is the batch's domain marginal.
    """
    perm = torch.randperm(len(domains), generator=generator).to(domains.device)
    return F.cross_entropy(domain_logits, domains[perm], reduction="none")


def uniform_domain_kl(domain_logits: torch.Tensor) -> torch.Tensor:
    """Confusion variant: ℓ_i = KL(U_K ‖ softmax(domain_logits_i)) = -log K - (1/K) Σ_k log p_ik."""
    log_p = domain_logits.log_softmax(-1)
    k = domain_logits.shape[-1]
    return -(log_p.mean(-1)) - torch.log(torch.tensor(float(k)))


def grl_domain_ce(domain_logits: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """DANN variant: ℓ_i = CE(domain_logits_i, k_i) on the true domain. The model applies
    ``grad_reverse`` before the domain branch, so the encoder maximises what the head minimises."""
    return F.cross_entropy(domain_logits, domains, reduction="none")


# --------------------------------------------------------------------------- student


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Prediction distillation per instance, no τ² factor:

        ℓ_i = - Σ_c softmax(z^T_i / τ)_c · log softmax(z^S_i / τ)_c
    """
    target = (teacher_logits.float() / temperature).softmax(-1)
    return -(target * (student_logits / temperature).log_softmax(-1)).sum(-1)


def averaged_soft_labels(teacher_logits: list[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Logits whose soft labels are the mean of several teachers' soft labels (multi-teacher KD):

        z̄ = τ · log( (1/K) Σ_j softmax(z^j / τ) ),   so   softmax(z̄ / τ) = (1/K) Σ_j softmax(z^j / τ)

    and ``soft_cross_entropy(z^S, z̄, τ)`` distils from the averaged distribution.
    """
    probs = torch.stack([(z.float() / temperature).softmax(-1) for z in teacher_logits]).mean(0)
    return temperature * probs.log()


def target_mean_square(target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The scale of a distillation target over its real entries (a constant, no gradient):

        MS(T) = Σ w·T² / Σ w        (w = 1 on real tokens / token pairs, 0 on padding)

    ``weight`` broadcasts against ``target``. Dividing an MSE by MS(T) makes it a relative error:
    1 for a student that outputs 0, whatever the scale of the layer or of attention scores.
    """
    weight = weight.to(target.dtype).expand_as(target)
    return ((target.detach().float() ** 2 * weight).sum() / weight.sum().clamp(min=1.0)).clamp(min=1e-12)


def hidden_mse(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
               projection: torch.nn.Module, attention_mask: torch.Tensor, scale: bool = False) -> torch.Tensor:
    """Hidden-state + embedding distillation per instance:

        ℓ_i = Σ_j mean_{l real, d} ( (H^S_j W_fit)_{i,l,d} - H^T_{map(j)}_{i,l,d} )² / s_j

    s_j = 1, or with ``scale`` s_j = MS(H^T_{map(j)}) over the batch (``target_mean_square``), so a
    layer with small states (MiniLM's last: mean square 0.07) counts as much as the others.
    ``student_hidden[j]`` is already paired with ``teacher_hidden[j]`` by the layer map; j = 0 is
    the embedding output (the embedding loss). One projection W_fit is shared by all layers.
    Padding positions are masked out so the loss does not depend on how a batch is padded.
    """
    mask = attention_mask.to(student_hidden[0].dtype).unsqueeze(-1)  # [B, L, 1]
    denom = mask.sum((1, 2)) * teacher_hidden[0].shape[-1]
    total = 0.0
    for hs, ht in zip(student_hidden, teacher_hidden):
        diff = (projection(hs) - ht.to(hs.dtype)) ** 2 * mask
        layer = diff.sum((1, 2)) / denom
        total = total + (layer / target_mean_square(ht, mask) if scale else layer)
    return total


def attention_mse(student_attn: list[torch.Tensor], teacher_attn: list[torch.Tensor],
                  attention_mask: torch.Tensor, scale: bool = False) -> torch.Tensor:
    """Attention distillation per instance:

        ℓ_i = Σ_j mean_{h, q real, k real} ( A^S_j - A^T_{map(j)} )²_{i,h,q,k} / s_j

    A are pre-softmax scores (or probabilities) of shape [B, heads, L, L]; entries at padded
    positions are left out (TinyBERT sets them to 0 on both sides). s_j = 1, or with ``scale``
    s_j = MS(A^T_{map(j)}) over the batch's real query-key pairs.
    """
    m = attention_mask.to(student_attn[0].dtype)
    pair = (m.unsqueeze(2) * m.unsqueeze(1)).unsqueeze(1)  # [B, 1, L, L]
    denom = pair.sum((1, 2, 3)) * student_attn[0].shape[1]
    total = 0.0
    for a_s, a_t in zip(student_attn, teacher_attn):
        diff = (a_s - a_t.to(a_s.dtype)) ** 2 * pair
        layer = diff.sum((1, 2, 3)) / denom
        total = total + (layer / target_mean_square(a_t, pair) if scale else layer)
    return total


def attention_pair(student_attn: list[torch.Tensor], teacher_attn: list[torch.Tensor], mask: torch.Tensor,
                   target: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What ``attention_mse`` compares (``distill.attention_target``): the pre-softmax scores as
    they are ("scores", TinyBERT), or both turned into probabilities with padded keys masked ("probs").
    A student with fewer heads than its teacher is compared on the maps averaged over heads."""
    if target == "probs":
        bias = (1.0 - mask[:, None, None, :].float()) * -1e4
        student_attn = [(x.float() + bias).softmax(-1) for x in student_attn]
        teacher_attn = [(x.float() + bias).softmax(-1) for x in teacher_attn]
    if student_attn and student_attn[0].shape[1] != teacher_attn[0].shape[1]:
        return [x.mean(1, keepdim=True) for x in student_attn], [x.mean(1, keepdim=True) for x in teacher_attn]
    return list(student_attn), list(teacher_attn)


def domain_vector_mse(student_vec: torch.Tensor, teacher_vec: torch.Tensor, scale: bool = False) -> torch.Tensor:
    """Transferable-knowledge distillation per instance: ℓ_i = mean_d (h_d^S - h_d^T)²_{i,d} / s,
    s = 1 or, with ``scale``, MS(h^T) over the batch."""
    mse = ((student_vec - teacher_vec.to(student_vec.dtype)) ** 2).mean(-1)
    return mse / target_mean_square(teacher_vec, torch.ones_like(teacher_vec)) if scale else mse


def intermediate_loss(lam: torch.Tensor, hidden: torch.Tensor, attention: torch.Tensor, domain: torch.Tensor,
                      gamma2: float, hidden_weight: float = 1.0, attention_weight: float = 1.0) -> torch.Tensor:
    """Stage-1 objective of meta-distillation, from per-instance terms:

        L_1 = mean_i[ λ_i (w_h·hidn_i + w_a·attn_i) ] + γ2 · mean_i(λ_i) · mean_i(tkd_i)

    With λ ≡ 1 and γ2 = 0 this is TinyBERT's intermediate-layer loss.
    """
    per_instance = lam * (hidden_weight * hidden + attention_weight * attention)
    return per_instance.mean() + gamma2 * lam.mean() * domain.mean()
