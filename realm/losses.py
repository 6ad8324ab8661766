"""Losses as pure tensor functions (unit-tested against direct computations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_nce(q_reps: torch.Tensor, p_reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE with in-batch negatives: query ``i`` belongs with block ``i``, all others negatives.

    Args:
        q_reps: ``[B, dim]`` query embeddings.
        p_reps: ``[B + n, dim]`` embeddings of the positive blocks, in the same order, then any
            further negatives (DPR's hard negatives: ``n`` extra columns every query scores).

    Returns:
        ``(loss, scores)``: mean cross-entropy and the ``[B, B + n]`` score matrix.
    """
    scores = q_reps.float() @ p_reps.float().T  # [B, B + n]
    labels = torch.arange(q_reps.shape[0], device=q_reps.device)  # [B]
    return F.cross_entropy(scores, labels), scores


def gather_with_grad(local: torch.Tensor, accelerator) -> torch.Tensor:
    """Every rank's rows of ``local`` (same shape on each rank), gradients kept for this rank's.

    ``accelerator.gather`` returns detached copies; putting the local tensor back in its slot lets
    gradients reach this rank's rows. Each rank then computes the loss over the whole global batch;
    scaling that loss by the number of processes cancels DDP's gradient averaging, so the update
    equals the one a single device would make on the global batch (the Tevatron/DPR recipe).

    Returns:
        ``[world * B, ...]`` with this rank's rows at ``rank * B``.
    """
    if accelerator.num_processes == 1:
        return local
    gathered = accelerator.gather(local.detach().contiguous())  # [world * B, ...]
    start = accelerator.process_index * local.shape[0]
    return torch.cat([gathered[:start], local, gathered[start + local.shape[0]:]], dim=0)


# ---------------------------------------------------------------------------------------------
# REALM: marginal likelihood over retrieved blocks, retrieval utility


def _null_column(num_candidates: int, null_index: int) -> int:
    """``null_index`` as a non-negative column index into ``k + 1`` candidates."""
    if not -num_candidates <= null_index < num_candidates:
        raise ValueError(f"null_index {null_index} out of range for {num_candidates} candidates")
    return null_index % num_candidates


def _drop_column(x: torch.Tensor, column: int) -> torch.Tensor:
    """``x`` ``[B, k + 1]`` without one column -> ``[B, k]`` (the others in order)."""
    keep = [j for j in range(x.shape[1]) if j != column]
    return x[:, keep]  # [B, k]


def realm_marginal_loss(
    retrieval_logits: torch.Tensor, log_p_y_given_z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """REALM's loss: the negative log marginal likelihood of the masked tokens over blocks.

    ``p(y|x) = Σ_z p(y|z, x) p(z|x)`` with ``p(z|x) = softmax_z f(x, z)`` over the ``k + 1``
    candidates (retrieved blocks and the null document). Gradients reach the retriever through
    ``log p(z|x)`` and the knowledge-augmented encoder through ``log p(y|z, x)``.

    Args:
        retrieval_logits: Scores ``f(x, z)`` of each query's candidates, ``[B, k + 1]``.
        log_p_y_given_z: ``log p(y|z, x)`` summed over the masked tokens, ``[B, k + 1]``.

    Returns:
        ``(loss, log_p_z)``: the batch mean of ``-log p(y|x)`` (a scalar, float32) and
        ``log p(z|x)`` ``[B, k + 1]``.
    """
    if retrieval_logits.shape != log_p_y_given_z.shape or retrieval_logits.dim() != 2:
        raise ValueError(
            f"expected two [B, k + 1] tensors, got {tuple(retrieval_logits.shape)} and "
            f"{tuple(log_p_y_given_z.shape)}"
        )
    log_p_z = torch.log_softmax(retrieval_logits.float(), dim=-1)  # [B, k + 1]
    log_joint = log_p_z + log_p_y_given_z.float()  # [B, k + 1], log p(y, z | x)
    log_marginal = torch.logsumexp(log_joint, dim=-1)  # [B], log p(y|x)
    return -log_marginal.mean(), log_p_z


def realm_token_marginal_loss(
    retrieval_logits: torch.Tensor, token_log_probs: torch.Tensor, token_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released REALM code's loss: the marginal over blocks taken per masked token, then
    averaged over the tokens: ``-mean_j log Σ_z p(z|x) p(y_j|z, x)``.

    Unlike :func:`realm_marginal_loss`, each token chooses its own mixture of blocks, and a span
    of many tokens weighs no more than one of few tokens.

    Args:
        retrieval_logits: ``f(x, z)``, ``[B, k + 1]``.
        token_log_probs: ``log p(y_j|z, x)`` of each target token, ``[B, k + 1, M]``.
        token_mask: True on real targets, ``[B, M]``.

    Returns:
        ``(loss, log_p_z)``: the mean over every real target token of the batch of
        ``-log p(y_j|x)`` (float32), and ``log p(z|x)`` ``[B, k + 1]``.
    """
    if (retrieval_logits.dim() != 2 or token_log_probs.dim() != 3
            or token_log_probs.shape[:2] != retrieval_logits.shape
            or token_mask.shape != (token_log_probs.shape[0], token_log_probs.shape[2])):
        raise ValueError(
            f"expected [B, k + 1], [B, k + 1, M] and [B, M], got {tuple(retrieval_logits.shape)}, "
            f"{tuple(token_log_probs.shape)} and {tuple(token_mask.shape)}")
    log_p_z = torch.log_softmax(retrieval_logits.float(), dim=-1)  # [B, k + 1]
    log_joint = log_p_z[:, :, None] + token_log_probs.float()  # [B, k + 1, M]
    per_token = torch.logsumexp(log_joint, dim=1)  # [B, M], log p(y_j|x)
    mask = token_mask.to(per_token.dtype)
    return -(per_token * mask).sum() / mask.sum().clamp(min=1), log_p_z


def pdist_loss(scores: torch.Tensor, log_p_y_given_z: torch.Tensor, num_targets: torch.Tensor,
               valid: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Atlas's perplexity distillation (PDist): ``KL(p_reader || p_retriever)`` over each
    example's retrieved blocks.

    The reader's posterior over the ``k`` blocks is ``softmax_z(log p(y|z, x) / |y| / τ)`` (the
    mean log-probability of a target token, so long spans weigh no more than short ones; no
    gradient), the retriever's ``softmax_z f(x, z)``; blocks that are not ``valid`` (fewer found)
    take part in neither.

    Args:
        scores: ``f(x, z)`` of the retrieved blocks, ``[B, k]``.
        log_p_y_given_z: ``log p(y|z, x)`` of the same blocks, ``[B, k]`` (detached here).
        num_targets: Target tokens each example's ``log p(y|z, x)`` sums over, ``[B]``.
        valid: True where a block was found, ``[B, k]`` bool.
        temperature: ``τ`` of the reader's posterior (smaller: sharper).

    Returns:
        The batch mean of the KL divergence (float32); 0 for a batch with no valid block.
    """
    if scores.shape != log_p_y_given_z.shape or scores.shape != valid.shape or scores.dim() != 2:
        raise ValueError(f"expected three [B, k] tensors, got {tuple(scores.shape)}, "
                         f"{tuple(log_p_y_given_z.shape)} and {tuple(valid.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    per_token = log_p_y_given_z.detach().float() / num_targets.float().clamp(min=1)[:, None]
    target_logits = (per_token / temperature).masked_fill(~valid, float("-inf"))  # [B, k]
    rows = valid.any(dim=1)  # [B]: examples with at least one block
    if not rows.any():
        return scores.sum() * 0.0
    log_target = torch.log_softmax(target_logits[rows], dim=-1)  # [R, k]
    log_retriever = torch.log_softmax(scores[rows].float().masked_fill(~valid[rows], -1e4), -1)
    kl = torch.where(valid[rows], log_target.exp() * (log_target - log_retriever),
                     torch.zeros_like(log_retriever))  # [R, k]
    return kl.sum(dim=1).mean()


def retrieval_utility(log_p_y_given_z: torch.Tensor, null_index: int = -1) -> torch.Tensor:
    """Retrieval utility ``RU(z, x) = log p(y|z, x) - log p(y|∅, x)`` of each retrieved block.

    Positive when a block helps predict the masked tokens more than no block at all.

    Args:
        log_p_y_given_z: ``log p(y|z, x)``, ``[B, k + 1]``, the null document among them.
        null_index: Column of the null document (last by default).

    Returns:
        ``[B, k]``: the non-null candidates in their original order.
    """
    column = _null_column(log_p_y_given_z.shape[1], null_index)
    null = log_p_y_given_z[:, column : column + 1]  # [B, 1]
    return _drop_column(log_p_y_given_z - null, column)  # [B, k]


def expected_retrieval_utility(
    ru: torch.Tensor, log_p_z: torch.Tensor, null_index: int = -1
) -> torch.Tensor:
    """``E[RU(z, x)]`` under ``p(z|x)`` renormalised over the retrieved (non-null) blocks.

    The null document is left out because its utility is 0 by definition: the expectation
    under the full ``p(z|x)`` (null included) equals this value times ``1 - p(null|x)``.

    Args:
        ru: Retrieval utility of the non-null candidates, ``[B, k]`` (:func:`retrieval_utility`).
        log_p_z: ``log p(z|x)`` over all candidates, ``[B, k + 1]``.
        null_index: Column of the null document in ``log_p_z``.

    Returns:
        ``[B]``.
    """
    column = _null_column(log_p_z.shape[1], null_index)
    weights = torch.softmax(_drop_column(log_p_z, column), dim=-1)  # [B, k], sums to 1
    return (weights * ru).sum(dim=-1)  # [B]


def top1_retrieval_utility(
    ru: torch.Tensor, retrieval_logits: torch.Tensor, null_index: int = -1
) -> torch.Tensor:
    """RU of the highest-scoring retrieved (non-null) block of each query, ``[B]``.

    Args:
        ru: ``[B, k]`` from :func:`retrieval_utility`.
        retrieval_logits: ``[B, k + 1]`` scores (or ``log p(z|x)``; the argmax is the same).
        null_index: Column of the null document in ``retrieval_logits``.
    """
    column = _null_column(retrieval_logits.shape[1], null_index)
    top = _drop_column(retrieval_logits, column).argmax(dim=-1, keepdim=True)  # [B, 1]
    return ru.gather(1, top).squeeze(1)  # [B]


def null_probability(log_p_z: torch.Tensor, null_index: int = -1) -> torch.Tensor:
    """``p(null|x)``, the retriever's probability of the null document, ``[B]``."""
    column = _null_column(log_p_z.shape[1], null_index)
    return log_p_z[:, column].exp()  # [B]


def retrieval_entropy(log_p_z: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``p(z|x)`` over all ``k + 1`` candidates, null included, ``[B]``."""
    return torch.special.entr(log_p_z.exp()).sum(dim=-1)  # [B]; 0 log 0 counts as 0


# ---------------------------------------------------------------------------------------------
# Open-QA: marginal likelihood over retrieved blocks and over every span matching an answer

#: Score given to impossible spans / blocks: finite, so that gradients stay finite.
_NEG = -1e9


def span_log_probs(
    retrieval_logits: torch.Tensor,
    span_logits: torch.Tensor,
    span_mask: torch.Tensor,
    normalization: str = "block",
) -> torch.Tensor:
    """``log p(z, s|x)`` of every span of every block, ``[B, k, S]`` (``-1e9`` on invalid spans).

    ``block`` (REALM): ``log p(z|x) + log p(s|z, x)``, the span softmax taken within each block.
    ``shared`` (Clark & Gardner 2018's shared normalisation): one softmax over the spans of all
    ``k`` blocks with ``log p(z|x)`` as a prior, ``p(z, s|x) ∝ p(z|x) exp(score(s))``, so span
    scores of different blocks are comparable and blocks without the answer are trained too.
    """
    if normalization not in ("block", "shared"):
        raise ValueError(f"normalization must be 'block' or 'shared', got {normalization!r}")
    logits = span_logits.float().masked_fill(~span_mask, _NEG)
    log_p_z = torch.log_softmax(retrieval_logits.float(), dim=-1)  # [B, k]
    if normalization == "block":
        log_s = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # log p(s|z, x)
        joint = log_p_z[:, :, None] + log_s
    else:
        joint = log_p_z[:, :, None] + logits
        joint = joint - torch.logsumexp(joint.flatten(1), dim=-1)[:, None, None]
    return joint.masked_fill(~span_mask, _NEG)


def span_marginal_loss(
    retrieval_logits: torch.Tensor,
    span_logits: torch.Tensor,
    span_mask: torch.Tensor,
    answer_mask: torch.Tensor,
    normalization: str = "block",
) -> tuple[torch.Tensor, torch.Tensor]:
    """REALM's Open-QA loss: ``-log Σ_z Σ_{s ∈ S(z, y)} p(z, s|x)``.

    ``p(z|x)`` is the softmax of ``retrieval_logits`` over the ``k`` retrieved blocks;
    ``S(z, y)`` the spans of ``z`` whose text matches an answer; ``p(z, s|x)`` as
    :func:`span_log_probs` makes it: REALM's ``p(z|x) p(s|z, x)`` with ``block``, one softmax
    over all blocks' spans with ``shared``. Questions with no matching span in any of their
    blocks cannot be learned from and are left out of the mean.

    Args:
        retrieval_logits: ``f(x, z)``, ``[B, k]`` (constants for a fixed retriever such as BM25).
        span_logits: Score of every span, ``[B, k, S]`` (any flattening of start x width).
        span_mask: True on spans the reader may predict, ``[B, k, S]``.
        answer_mask: True on spans matching an answer (a subset of ``span_mask``), ``[B, k, S]``.

    Returns:
        ``(loss, has_answer)``: the mean over questions with an answer span (a scalar, 0 with a
        graph when there are none) and which questions had one, ``[B]`` bool.
    """
    if span_logits.shape != span_mask.shape or span_logits.shape != answer_mask.shape:
        raise ValueError(f"span tensors differ in shape: {tuple(span_logits.shape)}, "
                         f"{tuple(span_mask.shape)}, {tuple(answer_mask.shape)}")
    if retrieval_logits.shape != span_logits.shape[:2]:
        raise ValueError(f"retrieval_logits {tuple(retrieval_logits.shape)} do not match span "
                         f"logits {tuple(span_logits.shape)}")
    answer_mask = answer_mask & span_mask
    joint = span_log_probs(retrieval_logits, span_logits, span_mask, normalization)
    log_p_y = torch.logsumexp(joint.masked_fill(~answer_mask, _NEG).flatten(1), dim=-1)  # [B]
    has_answer = answer_mask.flatten(1).any(dim=-1)  # [B]
    if not bool(has_answer.any()):
        return span_logits.float().sum() * 0.0 + retrieval_logits.float().sum() * 0.0, has_answer
    return -log_p_y[has_answer].mean(), has_answer
