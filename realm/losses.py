"""Losses as pure tensor functions (unit-tested against direct computations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_nce(q_reps: torch.Tensor, p_reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE with in-batch negatives: query ``i`` belongs with block ``i``, all others negatives.

    Args:
        q_reps: ``[B, dim]`` query embeddings.
        p_reps: ``[B, dim]`` embeddings of the positive blocks, in the same order.

    Returns:
        ``(loss, scores)``: mean cross-entropy and the ``[B, B]`` score matrix.
    """
    scores = q_reps.float() @ p_reps.float().T  # [B, B]
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
