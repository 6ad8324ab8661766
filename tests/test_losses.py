"""Losses against direct, slow computations on tiny tensors."""

import math

import pytest
import torch

from realm.losses import (
    expected_retrieval_utility,
    in_batch_nce,
    null_probability,
    pdist_loss,
    realm_marginal_loss,
    retrieval_entropy,
    retrieval_utility,
    span_marginal_loss,
    top1_retrieval_utility,
)
from realm.training.core import _lr_lambda


def test_in_batch_nce_equals_direct_computation():
    torch.manual_seed(0)
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    loss, scores = in_batch_nce(q, p)
    direct = 0.0
    for i in range(4):
        s = [float(q[i] @ p[j]) for j in range(4)]
        direct += -(s[i] - math.log(sum(math.exp(x) for x in s)))
    assert torch.allclose(scores, q @ p.T)
    assert abs(float(loss) - direct / 4) < 1e-5


def test_in_batch_nce_gradients_reach_both_sides():
    q = torch.randn(3, 5, requires_grad=True)
    p = torch.randn(3, 5, requires_grad=True)
    in_batch_nce(q, p)[0].backward()
    assert q.grad.abs().sum() > 0 and p.grad.abs().sum() > 0


def test_warmup_then_linear_decay():
    f = _lr_lambda(warmup=4, total=10)
    assert [round(f(s), 3) for s in range(10)] == [0.25, 0.5, 0.75, 1.0, 1.0, 0.833, 0.667, 0.5, 0.333, 0.167]


# -- REALM marginal likelihood and retrieval utility ------------------------------------------


def _realm_inputs(b=3, k1=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k1, generator=g) * 2
    log_py = -torch.rand(b, k1, generator=g) * 10  # log-probabilities: <= 0
    return logits, log_py


def test_realm_marginal_loss_equals_direct_computation():
    logits, log_py = _realm_inputs()
    loss, log_pz = realm_marginal_loss(logits, log_py)
    direct, b, k1 = 0.0, logits.shape[0], logits.shape[1]
    for i in range(b):
        s = [float(logits[i, j]) for j in range(k1)]
        norm = sum(math.exp(x) for x in s)
        p_z = [math.exp(x) / norm for x in s]
        for j in range(k1):
            assert abs(float(log_pz[i, j]) - math.log(p_z[j])) < 1e-5
        p_y = sum(p_z[j] * math.exp(float(log_py[i, j])) for j in range(k1))
        direct += -math.log(p_y)
    assert loss.dim() == 0 and log_pz.shape == (b, k1)
    assert abs(float(loss) - direct / b) < 1e-5


def test_realm_marginal_loss_gradients_reach_both_inputs():
    logits, log_py = _realm_inputs()
    logits.requires_grad_(True)
    log_py.requires_grad_(True)
    realm_marginal_loss(logits, log_py)[0].backward()
    assert logits.grad.abs().sum() > 0 and log_py.grad.abs().sum() > 0
    # d loss / d log p(y|z) is minus the posterior p(z|x, y), averaged over the batch
    posterior = torch.softmax(torch.log_softmax(logits.detach(), -1) + log_py.detach(), -1)
    assert torch.allclose(log_py.grad, -posterior / logits.shape[0], atol=1e-6)


def test_realm_marginal_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        realm_marginal_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_realm_token_marginal_loss_equals_direct_computation():
    from realm.losses import realm_token_marginal_loss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, generator=g)
    tokens = -torch.rand(3, 4, 5, generator=g) * 6  # log p(y_j|z, x) <= 0
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    loss, log_pz = realm_token_marginal_loss(logits, tokens, mask)
    total, count = 0.0, 0
    for i in range(3):
        p_z = [math.exp(float(x)) for x in torch.log_softmax(logits[i], -1)]
        for j in range(5):
            if mask[i, j]:
                total += -math.log(sum(p_z[z] * math.exp(float(tokens[i, z, j])) for z in range(4)))
                count += 1
    assert abs(float(loss) - total / count) < 1e-5
    torch.testing.assert_close(log_pz, torch.log_softmax(logits, -1))
    # one masked token: the per-token and the per-example marginals are the same loss
    single = mask.clone()
    single[:, 1:] = False
    a, _ = realm_token_marginal_loss(logits, tokens, single)
    b, _ = realm_marginal_loss(logits, tokens[:, :, 0])
    assert abs(float(a) - float(b)) < 1e-5
    with pytest.raises(ValueError):
        realm_token_marginal_loss(logits, tokens, mask[:, :3])


def test_retrieval_utility_and_its_summaries_equal_direct_computation():
    logits, log_py = _realm_inputs(b=2, k1=4, seed=1)
    _, log_pz = realm_marginal_loss(logits, log_py)
    ru = retrieval_utility(log_py)  # null is the last column
    assert ru.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert abs(float(ru[i, j]) - float(log_py[i, j] - log_py[i, 3])) < 1e-6
        p = [math.exp(float(log_pz[i, j])) for j in range(4)]
        direct_exp = sum(p[j] * float(ru[i, j]) for j in range(3)) / sum(p[:3])
        assert abs(float(expected_retrieval_utility(ru, log_pz)[i]) - direct_exp) < 1e-5
        # with the null included (its RU is 0) the expectation scales by 1 - p(null)
        assert abs(sum(p[j] * float(ru[i, j]) for j in range(3)) - direct_exp * (1 - p[3])) < 1e-5
        best = max(range(3), key=lambda j: float(logits[i, j]))
        assert float(top1_retrieval_utility(ru, logits)[i]) == float(ru[i, best])
        assert abs(float(null_probability(log_pz)[i]) - p[3]) < 1e-6
        assert abs(float(retrieval_entropy(log_pz)[i]) - -sum(q * math.log(q) for q in p)) < 1e-5


def test_retrieval_utility_with_null_first():
    log_py = torch.tensor([[-1.0, -3.0, -0.5]])
    ru = retrieval_utility(log_py, null_index=0)
    assert ru.tolist() == [[-2.0, 0.5]]
    log_pz = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert abs(float(expected_retrieval_utility(ru, log_pz, null_index=0)) - (-0.75)) < 1e-6
    assert abs(float(null_probability(log_pz, null_index=0)) - 0.5) < 1e-6
    assert float(top1_retrieval_utility(ru, torch.tensor([[9.0, 0.0, 1.0]]), null_index=0)) == 0.5
    with pytest.raises(ValueError):
        retrieval_utility(log_py, null_index=3)


def test_retrieval_entropy_of_a_point_mass_is_zero():
    log_pz = torch.log(torch.tensor([[1.0, 0.0, 0.0]]))
    assert float(retrieval_entropy(log_pz)) == 0.0


# ---------------------------------------------------------------------------------------------
# Open-QA span marginalisation


def _span_loss_brute_force(r, s, valid, answer):
    """-log Σ_z p(z|x) Σ_{s ∈ answer(z)} p(s|z, x), averaged over answerable questions."""
    total, count = 0.0, 0
    for b in range(r.shape[0]):
        z_norm = sum(math.exp(float(x)) for x in r[b])
        p_y = 0.0
        for z in range(r.shape[1]):
            norm = sum(math.exp(float(s[b, z, i])) for i in range(s.shape[2]) if valid[b, z, i])
            hit = sum(math.exp(float(s[b, z, i])) for i in range(s.shape[2])
                      if valid[b, z, i] and answer[b, z, i])
            if norm > 0:
                p_y += math.exp(float(r[b, z])) / z_norm * hit / norm
        if p_y > 0:
            total += -math.log(p_y)
            count += 1
    return total / count, count


def test_span_marginal_loss_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 4, generator=g)
    s = torch.randn(3, 4, 12, generator=g)
    valid = torch.rand(3, 4, 12, generator=g) > 0.3
    answer = (torch.rand(3, 4, 12, generator=g) > 0.7) & valid
    answer[2] = False  # question 2 has no answer span in any block: left out
    answer[0, 1] = False  # a block without an answer contributes nothing
    loss, has = span_marginal_loss(r, s, valid, answer)
    direct, count = _span_loss_brute_force(r, s, valid, answer)
    assert has.tolist() == [True, True, False] and count == 2
    assert abs(float(loss) - direct) < 1e-5


def test_span_marginal_loss_ignores_answer_marks_outside_valid_spans():
    r, s = torch.zeros(1, 2), torch.randn(1, 2, 5)
    valid = torch.tensor([[[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]], dtype=torch.bool)
    answer = torch.tensor([[[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]]], dtype=torch.bool)
    loss, _ = span_marginal_loss(r, s, valid, answer)
    direct, _ = _span_loss_brute_force(r, s, valid, answer & valid)
    assert abs(float(loss) - direct) < 1e-5


def test_span_marginal_loss_gradients_and_no_answer_batch():
    r = torch.randn(2, 3, requires_grad=True)
    s = torch.randn(2, 3, 6, requires_grad=True)
    valid = torch.ones(2, 3, 6, dtype=torch.bool)
    answer = torch.zeros(2, 3, 6, dtype=torch.bool)
    answer[0, 2, 1] = True
    loss, _ = span_marginal_loss(r, s, valid, answer)
    loss.backward()
    assert torch.isfinite(r.grad).all() and torch.isfinite(s.grad).all()
    assert r.grad[0].abs().sum() > 0 and s.grad[0, 2].abs().sum() > 0
    assert r.grad[1].abs().sum() == 0  # question 1 has no answer: no gradient from it
    none, has = span_marginal_loss(r, s, valid, torch.zeros_like(answer))
    assert float(none.detach()) == 0.0 and not has.any() and none.requires_grad
    with pytest.raises(ValueError, match="differ in shape"):
        span_marginal_loss(r, s, valid[:, :, :3], answer)


def test_span_marginal_loss_shared_normalization_equals_brute_force():
    """One softmax over the spans of all blocks with p(z|x) as a prior."""
    g = torch.Generator().manual_seed(1)
    r = torch.randn(2, 3, generator=g)
    s = torch.randn(2, 3, 7, generator=g)
    valid = torch.rand(2, 3, 7, generator=g) > 0.2
    answer = (torch.rand(2, 3, 7, generator=g) > 0.6) & valid
    loss, has = span_marginal_loss(r, s, valid, answer, normalization="shared")
    total = 0.0
    for b in range(2):
        z_norm = sum(math.exp(float(r[b, z])) for z in range(3))
        weights = {(z, j): math.exp(float(r[b, z])) / z_norm * math.exp(float(s[b, z, j]))
                   for z in range(3) for j in range(7) if valid[b, z, j]}
        norm = sum(weights.values())
        total += -math.log(sum(w for (z, j), w in weights.items() if answer[b, z, j]) / norm)
    assert has.all() and abs(float(loss) - total / 2) < 1e-5
    # a span of a block without the answer now gets a gradient (it competes with the answer)
    s = s.clone().requires_grad_(True)
    only = torch.zeros_like(answer)
    only[:, 0, int(valid[0, 0].nonzero()[0])] = True
    only &= valid
    span_marginal_loss(r, s, valid, only, normalization="shared")[0].backward()
    assert s.grad[:, 1:][valid[:, 1:]].abs().sum() > 0
    with pytest.raises(ValueError, match="normalization"):
        span_marginal_loss(r, s, valid, answer, normalization="global")


def test_pdist_loss_equals_direct_computation():
    """KL(softmax(log p(y|z, x) / |y| / τ) || softmax(f)) over the found blocks, batch mean;
    gradients reach the scores only."""
    torch.manual_seed(0)
    scores = torch.randn(3, 4, requires_grad=True)
    log_p_y = -torch.rand(3, 4, requires_grad=True) * 10
    counts = torch.tensor([2, 5, 1])
    valid = torch.tensor([[True] * 4, [True, True, True, False], [False] * 4])
    loss = pdist_loss(scores, log_p_y, counts, valid, temperature=0.5)
    total = 0.0
    for b in range(2):  # the third example has no block: left out of the mean
        m = valid[b]
        target = torch.softmax(log_p_y[b, m].detach() / counts[b] / 0.5, 0)
        retriever = torch.log_softmax(scores[b, m], 0)
        total = total + (target * (target.log() - retriever)).sum()
    torch.testing.assert_close(loss, total / 2)
    loss.backward()
    assert scores.grad is not None and log_p_y.grad is None
    assert torch.all(scores.grad[2] == 0) and scores.grad[1, 3] == 0
    with pytest.raises(ValueError, match="temperature"):
        pdist_loss(scores, log_p_y, counts, valid, temperature=0)
