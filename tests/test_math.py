"""The Meta-KD math against hand-computed values on small tensors."""

import math

import pytest
import torch

from metakd_ray import losses, scores
from metakd_ray.modeling import grad_reverse, mean_pool


def test_mean_pool_masked_and_unmasked():
    h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool(h, mask), torch.tensor([[2.0, 1.0]]))
    # code-compatible: positions 1..L-1, padding included
    assert torch.allclose(mean_pool(h, mask, masked=False), torch.tensor([[51.5, 51.0]]))


def test_prototype_scores_per_class_hand_computed():
    # two domains, one class; prototypes: d0 = (1,0), d1 = (0,1)
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 0])
    domains = torch.tensor([0, 0, 1, 1])
    t = scores.prototype_scores_per_class(emb, labels, domains, alpha=0.5, zeta=0.5)
    # p_0 = (1,0); p_1 = (0.5, 1.0)
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=0))
    expected0 = 0.5 * 1.0 + 0.5 * cos([1.0, 0.0], [0.5, 1.0])
    expected2 = 0.5 * cos([0.0, 1.0], [0.5, 1.0]) + 0.5 * 0.0
    expected3 = 0.5 * cos([1.0, 1.0], [0.5, 1.0]) + 0.5 * cos([1.0, 1.0], [1.0, 0.0])
    assert t.tolist() == pytest.approx([expected0, expected0, expected2, expected3], abs=1e-6)


def test_prototype_scores_per_class_uses_class_prototypes():
    # same embedding, different class -> different prototype -> different score
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    domains = torch.tensor([0, 0, 1, 1])
    t = scores.prototype_scores_per_class(emb, labels, domains)
    assert t.tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    t_flipped = scores.prototype_scores_per_class(emb, torch.tensor([0, 1, 1, 0]), domains)
    assert t_flipped[0] == pytest.approx(0.5)  # own prototype matches, the other domain's class-0 is orthogonal


def test_prototype_scores_per_domain_cosine_to_mean_of_other_centroids():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    domains = torch.tensor([0, 1, 2])
    t = scores.prototype_scores_per_domain(emb, domains, alpha=0.5, zeta=0.5)
    # other centroids of domain 0: (0,1) and (0,-1) -> mean (0,0) -> cosine 0 (eps-guarded)
    assert t[0].item() == pytest.approx(0.5)
    # domain 1: others (1,0),(0,-1) -> mean (0.5,-0.5); cos((0,1),(0.5,-0.5)) = -1/sqrt(2)
    assert t[1].item() == pytest.approx(0.5 + 0.5 * (-1 / math.sqrt(2)), abs=1e-6)


def test_prototype_scores_unseen_domain():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = scores.prototype_scores_unseen(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), ref, torch.tensor([0, 0]),
                                       torch.tensor([0, 1]), "per_class")
    assert t.item() == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)  # max cos 1, mean cos (1 + 0)/2


def test_expertise_weight_formula_and_range():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0], [-10.0, 10.0]])
    labels = torch.tensor([0, 0, 0])
    t = torch.tensor([1.0, 1.0, 0.0])
    lam = scores.expertise_weight(logits, labels, t)
    # p_gold = 0.5 -> (1+1)/(1+e^0.25); p_gold ~ 1 -> 2 * 0.5; p_gold ~ 0 -> 1/(1+e)
    assert lam.tolist() == pytest.approx([2 / (1 + math.exp(0.25)), 1.0, 1 / (1 + math.e)], abs=1e-5)


def test_soft_cross_entropy_hand_computed():
    s = torch.tensor([[0.0, math.log(3.0)]])  # softmax = (0.25, 0.75)
    t = torch.tensor([[0.0, 0.0]])  # softmax = (0.5, 0.5)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert losses.soft_cross_entropy(s, t, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # at tau = 2 both distributions soften
    s2 = torch.tensor([0.0, math.log(3.0) / 2]).softmax(-1)
    expected2 = -(0.5 * math.log(s2[0]) + 0.5 * math.log(s2[1]))
    assert losses.soft_cross_entropy(s, t, 2.0).item() == pytest.approx(expected2, abs=1e-6)


def test_hidden_mse_masks_padding_and_uses_projection():
    hs = [torch.ones(1, 3, 2), torch.zeros(1, 3, 2)]
    ht = [torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)]
    mask = torch.tensor([[1, 1, 0]])
    identity = torch.nn.Identity()
    # layer 0: squared error 1 on every real element; layer 1: 0
    assert losses.hidden_mse(hs, ht, identity, mask).tolist() == pytest.approx([1.0])
    double = lambda x: 2 * x  # noqa: E731
    assert losses.hidden_mse(hs, ht, double, mask).tolist() == pytest.approx([4.0])
    # changing a padded position changes nothing
    hs[0][0, 2] = 100.0
    assert losses.hidden_mse(hs, ht, identity, mask).tolist() == pytest.approx([1.0])


def test_attention_mse_ignores_masked_entries():
    a_s = torch.zeros(1, 2, 2, 2)
    a_t = torch.zeros(1, 2, 2, 2)
    a_t[0, :, 0, 0] = 2.0  # real (q=0, k=0) entry differs by 2 -> squared 4
    a_t[0, :, :, 1] = 50.0  # key 1 is padding: ignored
    mask = torch.tensor([[1, 0]])
    assert losses.attention_mse([a_s], [a_t], mask).tolist() == pytest.approx([4.0])


def test_domain_vector_mse():
    assert losses.domain_vector_mse(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]])).tolist() == [5.0]


def test_domain_losses():
    logits = torch.zeros(4, 4)
    domains = torch.tensor([0, 1, 2, 3])
    ce = losses.shuffled_domain_ce(logits, domains, torch.Generator().manual_seed(0))
    assert ce.tolist() == pytest.approx([math.log(4)] * 4)
    assert losses.uniform_domain_kl(logits).tolist() == pytest.approx([0.0] * 4, abs=1e-6)
    peaked = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    assert losses.uniform_domain_kl(peaked).item() > 1.0
    assert losses.grl_domain_ce(peaked, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-3)


def test_shuffled_labels_are_a_permutation_of_the_batch():
    logits = torch.randn(6, 3, requires_grad=True)
    domains = torch.tensor([0, 0, 1, 1, 2, 2])
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    expected = torch.nn.functional.cross_entropy(logits, domains[perm], reduction="none")
    assert torch.allclose(losses.shuffled_domain_ce(logits, domains, g), expected)


def test_lambda_weights_instances_not_only_the_batch():
    hidden = torch.tensor([1.0, 3.0])
    attention = torch.tensor([0.0, 0.0])
    domain = torch.tensor([0.0, 0.0])
    lam_a = torch.tensor([1.0, 0.0])
    lam_b = torch.tensor([0.0, 1.0])
    # same batch mean of lambda, different per-instance weighting -> different loss
    la = losses.intermediate_loss(lam_a, hidden, attention, domain, gamma2=0.5)
    lb = losses.intermediate_loss(lam_b, hidden, attention, domain, gamma2=0.5)
    assert la.item() == pytest.approx(0.5) and lb.item() == pytest.approx(1.5)


def test_intermediate_loss_hand_computed():
    lam = torch.tensor([0.5, 1.0])
    loss = losses.intermediate_loss(lam, torch.tensor([2.0, 4.0]), torch.tensor([1.0, 0.0]),
                                    torch.tensor([1.0, 3.0]), gamma2=0.5)
    # mean(0.5*3, 1*4) = 2.75 ; gamma2 * mean(lam) * mean(tkd) = 0.5 * 0.75 * 2 = 0.75
    assert loss.item() == pytest.approx(3.5)


def test_teacher_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # CE = log 2 for both instances
    t = torch.tensor([1.0, 3.0])
    domain_logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # uniform: KL(U || p) = 0, domain CE = log 2
    labels, domains = torch.tensor([0, 1]), torch.tensor([0, 1])
    # mean(t·CE) = 2·log 2 ; the uniform term is 0
    loss, ce, dom = losses.teacher_loss(logits, labels, t, domain_logits, domains, "uniform", gamma1=0.5)
    assert loss.item() == pytest.approx(2 * math.log(2)) and dom.abs().max() < 1e-6
    # grl: + γ1·mean(CE_dom) = 2·log 2 + 0.5·log 2
    loss, _, _ = losses.teacher_loss(logits, labels, t, domain_logits, domains, "grl", gamma1=0.5)
    assert loss.item() == pytest.approx(2.5 * math.log(2))
    # the authors' weighting: mean(t·(CE + γ1·CE_dom)) = mean(t)·1.5·log 2 = 3·log 2
    loss, _, _ = losses.teacher_loss(logits, labels, t, domain_logits, domains, "grl", gamma1=0.5,
                                     weight_domain_loss=True)
    assert loss.item() == pytest.approx(3 * math.log(2))


def test_gradient_reversal_flips_the_encoder_gradient():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    (3 * x).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    (3 * grad_reverse(x, 0.5)).sum().backward()
    assert torch.allclose(x.grad, -0.5 * plain)
