"""RAG's training objectives as pure tensor functions (Lewis et al. 2020).

For ``B`` questions, ``k`` retrieved blocks ``z`` with retrieval logits (``p(z|x)`` is their
softmax over the ``k``) and the generator's per-token ``log p(a_t | z, x, a_<t)`` of each gold
answer ``a``::

    RAG-Sequence   log p(a|x) = log Σ_z p(z|x) Π_t p(a_t | z, x, a_<t)
    RAG-Token      log p(a|x) = Σ_t log Σ_z p(z|x) p(a_t | z, x, a_<t)
    several golds  log p(answers|x) = log Σ_a p(a|x)

The losses are ``-mean_b log p(answers_b|x_b)``. Token log-probabilities are 0 on padding, which
adds nothing to either objective.
"""

from __future__ import annotations

from typing import Optional

import torch


def _answers(token_log_probs: torch.Tensor, answer_mask: Optional[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_log_probs`` as ``[B, A, k, T]`` and its answer mask ``[B, A]`` (all True for
    ``[B, k, T]``, one answer each)."""
    if token_log_probs.dim() == 3:
        token_log_probs = token_log_probs[:, None]  # [B, 1, k, T]
    if token_log_probs.dim() != 4:
        raise ValueError(f"token_log_probs must be [B, k, T] or [B, A, k, T], got "
                         f"{tuple(token_log_probs.shape)}")
    if answer_mask is None:
        answer_mask = torch.ones(token_log_probs.shape[:2], dtype=torch.bool,
                                 device=token_log_probs.device)  # [B, A]
    if tuple(answer_mask.shape) != tuple(token_log_probs.shape[:2]):
        raise ValueError(f"answer_mask {tuple(answer_mask.shape)} does not match "
                         f"token_log_probs {tuple(token_log_probs.shape)}")
    if not bool(answer_mask.any(dim=1).all()):
        raise ValueError("every question needs at least one answer in answer_mask")
    return token_log_probs.float(), answer_mask.bool()


def _over_answers(per_answer: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """``log Σ_a p(a|x)`` ``[B]`` of ``log p(a|x)`` ``[B, A]`` over the real answers."""
    return torch.logsumexp(per_answer.masked_fill(~answer_mask, float("-inf")), dim=1)


def rag_sequence_log_likelihood(retrieval_logits: torch.Tensor, token_log_probs: torch.Tensor,
                                answer_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RAG-Sequence's ``log Σ_a Σ_z p(z|x) Π_t p(a_t|z, x, a_<t)`` per question.

    Args:
        retrieval_logits: ``[B, k]`` scores of the retrieved blocks (softmaxed here).
        token_log_probs: ``[B, k, T]`` (one answer) or ``[B, A, k, T]``, 0 on padding.
        answer_mask: ``[B, A]`` bool, True on real answers; default all.

    Returns:
        ``[B]`` log-likelihoods (float32).
    """
    token_log_probs, answer_mask = _answers(token_log_probs, answer_mask)
    log_p_z = torch.log_softmax(retrieval_logits.float(), dim=-1)  # [B, k]
    log_p_a_given_z = token_log_probs.sum(-1)  # [B, A, k]
    per_answer = torch.logsumexp(log_p_z[:, None, :] + log_p_a_given_z, dim=-1)  # [B, A]
    return _over_answers(per_answer, answer_mask)


def rag_token_log_likelihood(retrieval_logits: torch.Tensor, token_log_probs: torch.Tensor,
                             answer_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RAG-Token's ``log Σ_a Π_t Σ_z p(z|x) p(a_t|z, x, a_<t)`` per question (arguments as
    :func:`rag_sequence_log_likelihood`): ``[B]``."""
    token_log_probs, answer_mask = _answers(token_log_probs, answer_mask)
    log_p_z = torch.log_softmax(retrieval_logits.float(), dim=-1)  # [B, k]
    per_token = torch.logsumexp(log_p_z[:, None, :, None] + token_log_probs, dim=2)  # [B, A, T]
    return _over_answers(per_token.sum(-1), answer_mask)


def rag_sequence_loss(retrieval_logits: torch.Tensor, token_log_probs: torch.Tensor,
                      answer_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RAG-Sequence's loss: the mean over questions of ``-log Σ_a p(a|x)`` (a scalar)."""
    return -rag_sequence_log_likelihood(retrieval_logits, token_log_probs, answer_mask).mean()


def rag_token_loss(retrieval_logits: torch.Tensor, token_log_probs: torch.Tensor,
                   answer_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RAG-Token's loss: the mean over questions of ``-log Σ_a p(a|x)`` (a scalar)."""
    return -rag_token_log_likelihood(retrieval_logits, token_log_probs, answer_mask).mean()


#: The objectives by name (``sequence``, ``token``), for a config's choice.
LOSSES = {"sequence": rag_sequence_loss, "token": rag_token_loss}
