"""Losses against direct, slow computations on tiny tensors."""

import math

import torch

from realm.losses import in_batch_nce
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
