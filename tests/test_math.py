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


def test_averaged_soft_labels_are_the_mean_of_the_teachers_distributions():
    a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    tau = 0.5
    mean = (torch.softmax(a / tau, -1) + torch.softmax(b / tau, -1)) / 2  # by hand: [0.5*0.982+0.5*0.119, ...]
    assert mean[0, 0].item() == pytest.approx(0.5 * (1 / (1 + math.exp(-4))) + 0.5 * (1 / (1 + math.exp(2))))
    z = losses.averaged_soft_labels([a, b], tau)
    assert torch.allclose(torch.softmax(z / tau, -1), mean)
    # the distillation loss against it is the cross-entropy with the averaged distribution
    s = torch.tensor([[0.3, -0.3]])
    expected = -(mean * torch.log_softmax(s / tau, -1)).sum(-1)
    assert torch.allclose(losses.soft_cross_entropy(s, z, tau), expected)
    # one teacher: its own soft labels
    assert torch.allclose(torch.softmax(losses.averaged_soft_labels([a], tau) / tau, -1), torch.softmax(a / tau, -1))


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


def test_term_scale_divides_each_layer_by_its_targets_mean_square():
    mask = torch.tensor([[1, 1, 0]])
    # teacher layer 0: real entries 2, 2, 2, 2 -> MS 4; layer 1: real entries 1, 1, 1, 1 -> MS 1
    t0 = torch.tensor([[[2.0, 2.0], [2.0, 2.0], [9.0, 9.0]]])
    t1 = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [9.0, 9.0]]])
    assert losses.target_mean_square(t0, mask.unsqueeze(-1)).item() == pytest.approx(4.0)
    zeros = [torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)]
    identity = torch.nn.Identity()
    # raw: mean squared error 4 + 1; scaled: each layer's error relative to its target = 1 + 1
    assert losses.hidden_mse(zeros, [t0, t1], identity, mask).item() == pytest.approx(5.0)
    assert losses.hidden_mse(zeros, [t0, t1], identity, mask, scale=True).item() == pytest.approx(2.0)
    # attention scores of 10 against hidden states of 1: scaled, both count 1 for a zero student
    scores_t = torch.full((1, 2, 3, 3), 10.0)
    assert losses.attention_mse([torch.zeros(1, 2, 3, 3)], [scores_t], mask).item() == pytest.approx(100.0)
    assert losses.attention_mse([torch.zeros(1, 2, 3, 3)], [scores_t], mask, scale=True).item() == pytest.approx(1.0)
    vec_t = torch.tensor([[3.0, 1.0], [1.0, 3.0]])  # MS = 5; MSE of zeros per row = 5
    assert losses.domain_vector_mse(torch.zeros(2, 2), vec_t, scale=True).tolist() == pytest.approx([1.0, 1.0])


def test_attention_of_a_student_with_fewer_heads_is_compared_head_averaged():
    mask = torch.tensor([[1, 1]])
    teacher = [torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 3.0)]).unsqueeze(0)]  # 2 heads
    student = [torch.full((1, 1, 2, 2), 2.0)]  # 1 head = the teachers' mean
    s, t = losses.attention_pair(student, teacher, mask, "scores")
    assert t[0].shape == (1, 1, 2, 2) and losses.attention_mse(s, t, mask).item() == pytest.approx(0.0)


def test_head_tail_truncation_keeps_a_quarter_of_the_start_and_the_end():
    from metakd_ray.data.prepare import head_tail

    ids = [101] + list(range(1, 21)) + [102]
    assert head_tail(ids, 10) == [101, 1, 2, 15, 16, 17, 18, 19, 20, 102]  # head 2, tail 6
    assert head_tail(ids, 64) == ids  # short enough: unchanged


def test_uniform_layer_map_rounds_when_depths_do_not_divide():
    from metakd_ray.config import resolve_layer_map

    assert resolve_layer_map("uniform", 6, 2) == [3, 6]  # TinyBERT's map where it divides
    assert resolve_layer_map("uniform", 6, 4) == [2, 3, 5, 6]  # 1.5, 3, 4.5, 6 rounded half up
    assert resolve_layer_map("uniform", 12, 4) == [3, 6, 9, 12]


def test_stage_steps_floor():
    from metakd_ray.training import stage_steps

    assert stage_steps(2, 100, 16) == 12  # 6 batches per epoch
    assert stage_steps(2, 20, 16, min_steps=30) == 30  # 10 % of a domain: extended to the floor
    assert stage_steps(0, 100, 16, min_steps=30) == 0  # a stage that is off stays off


def test_principal_embeddings_map_back_to_the_teachers():
    from metakd_ray.general import principal_embeddings

    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 3, generator=g) @ torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0],
                                                             [0.0, 0.0, 0.0, 1.0]]) + 5.0  # rank 3 in 4 dims
    small, basis, mean = principal_embeddings(table, 3)
    assert small.shape == (50, 3) and basis.shape == (3, 4)
    assert torch.allclose(small @ basis + mean, table, atol=1e-4)  # 3 directions hold it all


def test_layer_norm_fit_recovers_scale_and_shift_by_hand():
    from metakd_ray.general import fit_layer_norm

    # rows [1, 2, 3] and [3, 1, 2] normalise to ±sqrt(3/2) and 0 (mean 2, variance 2/3)
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    r = 1.5 ** 0.5
    normed = torch.tensor([[-r, 0.0, r], [r, -r, 0.0]])
    y = normed * torch.tensor([2.0, 2.0, 2.0]) + torch.tensor([1.0, -1.0, 0.5])
    gamma, beta = fit_layer_norm(x, y, eps=0.0)
    assert torch.allclose(gamma, torch.tensor([2.0, 2.0, 2.0]), atol=1e-5)
    assert torch.allclose(beta, torch.tensor([1.0, -1.0, 0.5]), atol=1e-5)
