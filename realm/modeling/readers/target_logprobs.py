"""Vocabulary-chunked masked-LM scoring: the targets' log-probabilities and the marginal
predictions without ever building the ``[rows, vocab]`` logits (``pretrain.vocab_chunk``).

:func:`target_log_probs` keeps only a running logsumexp over the vocabulary in the forward and
recomputes each chunk's logits in the backward; :func:`chunked_predictions` takes the argmax of
the marginal over the candidates chunk by chunk.
"""

from __future__ import annotations

from typing import Optional

import torch

from realm.modeling.readers.copy import CopyScores

class _TargetLogProb(torch.autograd.Function):
    """``log softmax(h W^T + b)[target]`` per row, the vocabulary in chunks of ``chunk`` words:
    forward keeps only a running logsumexp, backward recomputes each chunk's logits. Memory
    is ``rows x chunk`` instead of ``rows x vocab`` (and no saved log-softmax)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # noqa: D102 (autograd API)
        h, w, b = hidden.float(), weight.float(), bias.float()
        lse = torch.full((h.shape[0],), float("-inf"), device=h.device)
        for start in range(0, w.shape[0], chunk):
            logits = torch.addmm(b[start: start + chunk], h, w[start: start + chunk].T)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        target_logit = (h * w[targets]).sum(-1) + b[targets]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(lse)
        return target_logit - lse, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):  # noqa: D102 (autograd API)
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        h, w, b, g = hidden.float(), weight.float(), bias.float(), grad_out.float()
        grad_h = torch.zeros_like(h)
        grad_w = torch.zeros_like(w) if weight.requires_grad else None
        grad_b = torch.zeros_like(b) if bias.requires_grad else None
        for start in range(0, w.shape[0], ctx.chunk):
            end = start + ctx.chunk
            probs = torch.exp(torch.addmm(b[start:end], h, w[start:end].T) - lse[:, None])
            d_logits = -g[:, None] * probs  # [rows, chunk]: d(-lse)/d logits
            grad_h += d_logits @ w[start:end]
            if grad_w is not None:
                grad_w[start:end] += d_logits.T @ h
            if grad_b is not None:
                grad_b[start:end] += d_logits.sum(0)
        grad_h += g[:, None] * w[targets]  # d(target logit)
        if grad_w is not None:
            grad_w.index_add_(0, targets, g[:, None] * h)
        if grad_b is not None:
            grad_b.index_add_(0, targets, g)
        return (grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def target_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     targets: torch.Tensor, chunk: int = 8192,
                     with_normalizer: bool = False):
    """``log softmax(hidden @ weight.T + bias)[..., target]`` without materialising the
    vocabulary logits (float32; gradients to all three tensors).

    Args:
        hidden: ``[..., H]`` decoder inputs (the head's transform applied).
        weight, bias: The decoder, ``[V, H]`` and ``[V]``.
        targets: ``[...]`` word ids.
        chunk: Words per chunk.

    Returns:
        ``[...]`` log-probabilities of the targets; with ``with_normalizer``, also the
        ``[...]`` logsumexp over the vocabulary (no gradient), which :func:`chunked_predictions`
        reuses.
    """
    shape = targets.shape
    with torch.autocast(hidden.device.type, enabled=False):
        out, lse = _TargetLogProb.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                        targets.reshape(-1), chunk)
    return (out.view(shape), lse.view(shape)) if with_normalizer else out.view(shape)


@torch.no_grad()
def chunked_predictions(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        log_p_z: torch.Tensor, chunk: int = 8192,
                        normalizer: Optional[torch.Tensor] = None,
                        copy: Optional[CopyScores] = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The marginal prediction ``argmax_y Σ_z p(z|x) p(y|z,x)`` and the last candidate's own
    prediction (the null document's), vocabulary in chunks.

    Args:
        hidden: ``[B, C, M, H]`` decoder inputs of C candidates.
        weight, bias: The decoder.
        log_p_z: ``[B, C]`` retrieval log-probabilities.
        normalizer: ``[B, C, M]`` logsumexp over the vocabulary, when already known (one pass
            over the vocabulary fewer).
        copy: The copy head's scores, if any: the marginal is then over the mixtures
            ``(1 - λ) p_vocab + λ copy``. A word's mixture exceeds its vocabulary part only if
            some block holds it, so the argmax is the better of the vocabulary part's argmax
            and the exact mixture's best over the words the blocks hold.

    Returns:
        ``([B, M], [B, M])`` word ids.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        h, w, b = hidden.float(), weight.float(), bias.float()
        lse = normalizer
        if lse is None:
            lse = torch.full(h.shape[:-1], float("-inf"), device=h.device)  # [B, C, M]
            for start in range(0, w.shape[0], chunk):
                logits = h @ w[start: start + chunk].T + b[start: start + chunk]
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        log_w = log_p_z.float()[:, :, None].expand(lse.shape)  # [B, C, M]
        if copy is not None:
            log_w = log_w + torch.log1p(-copy.gate)
        best = torch.full(h.shape[:1] + h.shape[2:3], float("-inf"), device=h.device)  # [B, M]
        arg = torch.zeros_like(best, dtype=torch.long)
        null_best, null_arg = best.clone(), arg.clone()
        for start in range(0, w.shape[0], chunk):
            logits = h @ w[start: start + chunk].T + b[start: start + chunk]  # [B, C, M, c]
            marginal = torch.logsumexp(log_w[..., None] + logits
                                       - lse[..., None], dim=1)  # [B, M, c]
            value, index = marginal.max(dim=-1)
            better = value > best
            best, arg = torch.where(better, value, best), torch.where(better, index + start, arg)
            value, index = logits[:, -1].max(dim=-1)
            better = value > null_best
            null_best = torch.where(better, value, null_best)
            null_arg = torch.where(better, index + start, null_arg)
        if copy is not None:  # the exact mixture of every word the batch's blocks hold
            words, where = torch.unique(copy.source_ids, return_inverse=True)  # [U], [B, C, L]
            vocab = torch.exp(torch.einsum("bcmh,uh->bcmu", h, w[words]) + b[words]
                              - lse[..., None])  # [B, C, M, U]
            copied = torch.zeros_like(vocab).scatter_add_(
                -1, where[:, :, None, :].expand(copy.attention.shape), copy.attention)
            p_z = torch.exp(log_p_z.float())[:, :, None, None]
            mixture = (p_z * ((1 - copy.gate)[..., None] * vocab
                              + copy.gate[..., None] * copied)).sum(dim=1)  # [B, M, U]
            value, index = mixture.max(dim=-1)
            better = torch.log(value) > best
            arg = torch.where(better, words[index], arg)
    return arg, null_arg
