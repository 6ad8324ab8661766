"""The copy head: the masked-LM reader's ``p(y|z, x)`` may copy a word piece of the block.

A pointer over the block's word pieces, mixed with the masked LM's vocabulary distribution
(pointer-generator): :class:`CopyHead` computes the gate and the attention (:class:`CopyScores`),
:func:`copy_mixture` the mixture's log-probabilities of the targets and
:func:`copy_predictions` its marginal argmax over the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

@dataclass
class CopyScores:
    """What the copy head computed at each masked position of each candidate.

    Attributes:
        gate: ``λ``, the probability of copying, ``[B, k + 1, M]`` float32 (0 on candidates
            with no block tokens: the null document).
        attention: Where it copies from, ``[B, k + 1, M, L]`` float32 (rows sum to 1 over
            the block's tokens, 0 elsewhere).
        source_ids: The word pieces it attends over, ``[B, k + 1, L]`` (the joined inputs).
    """

    gate: torch.Tensor
    attention: torch.Tensor
    source_ids: torch.Tensor


class CopyHead(nn.Module):
    """A pointer over the block's word pieces, mixed with the masked LM (pointer-generator).

    ``p(y_j|z, x) = (1 - λ) p_vocab(y_j) + λ Σ_{t in z: z_t = y_j} a_t``, with ``a`` the
    attention of the masked position's final hidden state (projected) over the final hidden
    states of the block's title and body (token type 1, separators left out), and
    ``λ = σ(w · [h_j; Σ_t a_t s_t; max_t score_t] + b)``: the gate sees what the attention found
    and how well it matched, so it can copy where the block holds the word and not elsewhere
    (retrieved blocks mostly do not). The null document has no tokens, so ``λ = 0`` and its
    score is the masked LM's alone. The attention makes copying a span the block holds cheap for a small reader, which a 2-layer encoder
    adapted for 100 steps does not learn by itself (docs/results.md). It is trained with the
    rest of the reader (MLM adaptation in the reader's layout, then REALM's marginal loss).

    Args:
        hidden_size: The encoder's hidden size.
        gate_bias: Initial gate bias (``σ(-2) ≈ 0.12``: the masked LM first).
    """

    def __init__(self, hidden_size: int, gate_bias: float = -2.0):
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.gate = nn.Linear(2 * hidden_size + 1, 1)  # [h; attended states; best match score]
        nn.init.normal_(self.query.weight, std=0.02)
        nn.init.zeros_(self.query.bias)
        nn.init.normal_(self.gate.weight, std=0.02)
        nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, picked: torch.Tensor, states: torch.Tensor, source_ids: torch.Tensor,
                support: torch.Tensor) -> CopyScores:
        """Gate and attention.

        Args:
            picked: Hidden states at the masked positions, ``[B, C, M, H]``.
            states: Hidden states of every position, ``[B, C, L, H]``.
            source_ids: Word pieces, ``[B, C, L]``.
            support: True on the block's tokens, ``[B, C, L]``.
        """
        with torch.autocast(picked.device.type, enabled=False):
            picked, states = picked.float(), states.float()
            query = self.query(picked)  # [B, C, M, H]
            scores = torch.einsum("bcmh,bclh->bcml", query, states) / picked.shape[-1] ** 0.5
            scores = scores.masked_fill(~support[:, :, None, :], -1e4)
            attention = torch.softmax(scores, dim=-1) * support[:, :, None, :]  # [B, C, M, L]
            has_block = support.any(dim=-1)  # [B, C]
            context = torch.einsum("bcml,bclh->bcmh", attention, states)
            best = scores.max(dim=-1, keepdim=True).values.clamp(min=-10.0)  # [B, C, M, 1]
            gate = torch.sigmoid(self.gate(torch.cat([picked, context, best], dim=-1))
                                 .squeeze(-1)).clamp(max=1 - 1e-6)
            gate = gate * has_block[:, :, None]  # [B, C, M]
        return CopyScores(gate, attention, source_ids)


def copy_mixture(token_log_probs: torch.Tensor, copy: CopyScores, targets: torch.Tensor
                 ) -> torch.Tensor:
    """``log((1 - λ) p_vocab(y) + λ copy(y))`` from the masked LM's ``log p_vocab(y)``
    ``[B, C, M]`` and the targets ``[B, C, M]``; ``log p_vocab(y)`` where ``λ`` is 0."""
    match = copy.source_ids[:, :, None, :] == targets[..., None]  # [B, C, M, L]
    mass = (copy.attention * match).sum(dim=-1)  # [B, C, M]
    gate = copy.gate
    mixed = torch.logaddexp(torch.log1p(-gate) + token_log_probs.float(),
                            torch.log(gate.clamp(min=1e-12)) + torch.log(mass.clamp(min=1e-12)))
    return torch.where(gate > 0, mixed, token_log_probs.float())


@torch.no_grad()
def copy_predictions(log_p_vocab: torch.Tensor, copy: CopyScores, log_p_z: torch.Tensor
                     ) -> torch.Tensor:
    """``argmax_y Σ_z p(z|x) [(1 - λ) p_vocab(y) + λ copy(y)]`` at each masked position,
    ``[B, M]``, from the vocabulary log-probabilities ``[B, C, M, V]``."""
    probs = torch.exp(log_p_vocab.float()) * (1 - copy.gate)[..., None]  # [B, C, M, V]
    index = copy.source_ids[:, :, None, :].expand(*copy.attention.shape)  # [B, C, M, L]
    probs = probs.scatter_add(-1, index, copy.attention * copy.gate[..., None])
    marginal = (torch.exp(log_p_z.float())[:, :, None, None] * probs).sum(dim=1)  # [B, M, V]
    return marginal.argmax(dim=-1)
