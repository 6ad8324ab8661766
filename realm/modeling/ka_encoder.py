"""The knowledge-augmented encoder: REALM's ``p(y|z, x)``, a masked LM over ``x`` joined with ``z``.

Each query ``x`` (a passage with masked tokens) is joined with each of its ``k + 1`` candidate
blocks ``z`` (the ``k`` retrieved blocks and the null document) as
``[CLS] x [SEP] title [SEP] body [SEP]``; the null document is the empty block, so its sequence
is ``[CLS] x [SEP] [SEP]``. ``x`` sits at the same offset in every candidate, so the masked
positions are shared by the ``k + 1`` sequences of a query::

    ka = KnowledgeAugmentedEncoder.from_checkpoint("sentence-transformers/all-MiniLM-L6-v2")
    joined = build_joined_inputs(queries, titles, bodies, cls_id, sep_id, pad_id,
                                 mask_positions=positions)           # [B * (k + 1), seq_len]
    out = ka(joined.input_ids, joined.attention_mask, joined.token_type_ids,
             mask_positions=joined.mask_positions, labels=targets, label_mask=target_mask)
    out.log_probs_of_targets                                         # [B, k + 1]
    ka.save_pretrained("run/ka_encoder")                             # atomic directory

The masked-LM head comes from the checkpoint when it has one; otherwise (encoder-only
checkpoints such as MiniLM) a new head is initialised with its decoder tied to the input word
embeddings. A saved encoder is a self-describing directory that is also a plain transformers
masked-LM directory (``AutoModelForMaskedLM.from_pretrained(dir)``,
``AutoTokenizer.from_pretrained(dir)``)::

    manifest.json        kind "knowledge_augmented_encoder", base checkpoint, sizes, version
    config.json, model.safetensors, tokenizer files   (transformers masked-LM format)

Directories of format 1 (``model/`` and ``tokenizer/`` subdirectories) still load.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from realm.data.mlm import pad_ragged
from realm.hub import load_pretrained, load_tokenizer, resolve_model_path
from realm.modeling.retriever import (
    _as_ids,
    _atomic_directory,
    _load_saved_tokenizer,
    _pack,
    _write_manifest,
    read_manifest,
)

logger = logging.getLogger(__name__)

MANIFEST_KIND = "knowledge_augmented_encoder"
FORMAT_VERSION = 2
MODEL_DIR = "."  # format 1: "model"
COPY_HEAD_FILE = "copy_head.safetensors"  # beside the masked LM; transformers ignores it


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass
class JoinedInputs:
    """Queries joined with their candidate blocks, query-major: row ``i * (k + 1) + j`` is query
    ``i`` with candidate ``j``.

    Attributes:
        input_ids: ``[CLS] x [SEP] title [SEP] body [SEP]`` (``[CLS] x [SEP] [SEP]`` for an
            empty block), right-padded, ``[B * (k + 1), seq_len]`` int64.
        attention_mask: 1 on real tokens, ``[B * (k + 1), seq_len]``.
        token_type_ids: 0 on ``[CLS] x [SEP]``, 1 on the block and its separators,
            ``[B * (k + 1), seq_len]``.
        mask_positions: Positions of each query's masked tokens in its joined sequences (the
            same for all ``k + 1`` candidates), padded with 0, ``[B, max_masked]`` int64; None
            when no positions were given.
        position_mask: True on real entries of ``mask_positions``, ``[B, max_masked]``.
        num_candidates: ``k + 1``.
        segment_ids: What each position holds: 0 ``[CLS]``, the query, separators and padding;
            1 the block's title; 2 its body. ``[B * (k + 1), seq_len]`` int64 (readers keep
            answer spans inside one segment of the block).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    mask_positions: Optional[torch.Tensor]
    position_mask: Optional[torch.Tensor]
    num_candidates: int
    segment_ids: Optional[torch.Tensor] = None


def build_joined_inputs(
    query_ids: Sequence[Sequence[int] | np.ndarray],
    block_title_ids: Sequence[Sequence[Sequence[int] | np.ndarray]],
    block_body_ids: Sequence[Sequence[Sequence[int] | np.ndarray]],
    cls_id: int,
    sep_id: int,
    pad_id: int,
    max_length: Optional[int] = None,
    *,
    mask_positions: Optional[Sequence[Sequence[int] | np.ndarray]] = None,
    append_null: bool = True,
) -> JoinedInputs:
    """Join ``B`` (already masked) queries with their candidate blocks; no re-tokenization.

    Args:
        query_ids: Word-piece ids of each query, masked tokens already ``[MASK]``; ``B`` arrays.
        block_title_ids: For each query, the title ids of its retrieved blocks (``B`` lists of
            ``k`` arrays, the same ``k`` for every query).
        block_body_ids: Body ids in the same layout as ``block_title_ids``.
        cls_id: Id of ``[CLS]``.
        sep_id: Id of ``[SEP]``.
        pad_id: Id written on padding positions.
        max_length: Most tokens per joined sequence, special tokens included. The query is
            never cut (its masked tokens would be lost): a query longer than
            ``max_length - 3`` raises. The block's body is cut first, then its title.
        mask_positions: Positions of each query's masked tokens within ``query_ids``; returned
            shifted into the joined sequences (past ``[CLS]``) and padded.
        append_null: Append the null document (an empty block) as each query's last
            candidate, so ``k`` retrieved blocks give ``k + 1`` candidates.

    Returns:
        :class:`JoinedInputs` with ``B * (k + 1)`` rows.
    """
    n = len(query_ids)
    if n == 0:
        raise ValueError("cannot join an empty batch")
    if len(block_title_ids) != n or len(block_body_ids) != n:
        raise ValueError(
            f"{n} queries but {len(block_title_ids)} title lists and {len(block_body_ids)} "
            "body lists"
        )
    counts = {len(t) for t in block_title_ids} | {len(b) for b in block_body_ids}
    if len(counts) != 1:
        raise ValueError(f"every query needs the same number of blocks, got counts {counts}")
    num_candidates = counts.pop() + int(append_null)
    if num_candidates < 1:
        raise ValueError("no candidates: give blocks or append_null=True")
    empty = np.zeros(0, np.int64)
    cls, sep = np.array([cls_id], np.int64), np.array([sep_id], np.int64)
    rows, layout = [], []  # layout: (query, title, body) lengths of each row
    for i, query in enumerate(query_ids):
        x = _as_ids(query)
        if max_length is not None and len(x) + 3 > max_length:
            raise ValueError(
                f"query {i} has {len(x)} word pieces; with [CLS] and two [SEP] it does not fit "
                f"in max_length={max_length}"
            )
        titles = list(block_title_ids[i]) + ([empty] if append_null else [])
        bodies = list(block_body_ids[i]) + ([empty] if append_null else [])
        for title, body in zip(titles, bodies):
            title, body = _as_ids(title), _as_ids(body)
            row = [(cls, 0), (x, 0), (sep, 0)]
            if max_length is not None:
                room = max_length - len(x) - 4  # [CLS] x [SEP] title [SEP] body [SEP]
                title = title[: max(room, 0)]
                body = body[: max(room - len(title), 0)]
            if len(title) or len(body):
                row += [(title, 1), (sep, 1), (body, 1)]
            rows.append(row + [(sep, 1)])
            layout.append((len(x), len(title), len(body)))
    packed = _pack(rows, pad_id)
    segments = torch.zeros_like(packed.input_ids)  # [B * (k + 1), seq_len]
    for r, (lq, lt, lb) in enumerate(layout):
        segments[r, lq + 2: lq + 2 + lt] = 1  # after [CLS] x [SEP]
        segments[r, lq + 3 + lt: lq + 3 + lt + lb] = 2  # after title [SEP]
    positions = position_mask = None
    if mask_positions is not None:
        if len(mask_positions) != n:
            raise ValueError(f"{n} queries but {len(mask_positions)} mask position arrays")
        for i, pos in enumerate(mask_positions):
            pos = _as_ids(pos)
            if len(pos) and (pos.min() < 0 or pos.max() >= len(_as_ids(query_ids[i]))):
                raise ValueError(f"query {i}: mask positions {pos.tolist()} outside the query")
        positions, position_mask = pad_ragged(mask_positions, pad_value=0)
        positions = torch.where(position_mask, positions + 1, positions)  # past [CLS]
    return JoinedInputs(
        packed.input_ids, packed.attention_mask, packed.token_type_ids,
        positions, position_mask, num_candidates, segments,
    )


@dataclass
class KnowledgeAugmentedOutput:
    """What the knowledge-augmented encoder returns; fields it did not compute stay None.

    Attributes:
        logits: Masked-LM logits. With ``mask_positions``: at the masked positions only,
            ``[B, k + 1, max_masked, vocab]``; without: every position,
            ``[B * (k + 1), seq_len, vocab]``.
        token_log_probs: ``log p(y_j|z, x)`` of each target token, 0 on padding,
            ``[B, k + 1, max_masked]`` (float32).
        log_probs_of_targets: ``log p(y|z, x) = Σ_j log p(y_j|z, x)`` over each query's masked
            tokens, per candidate, ``[B, k + 1]`` (float32).
        hidden: On the vocabulary-chunked path (``vocab_chunk``): the decoder inputs at the
            masked positions, ``[B, k + 1, M, hidden]``, and ``logits`` is None;
            ``normalizer``: the logsumexp over the vocabulary, ``[B, k + 1, M]``.
        copy: With a copy head: its gate and attention (:class:`CopyScores`); ``logits`` are
            then the vocabulary part only, and ``token_log_probs`` the mixture's.
    """

    logits: Optional[torch.Tensor]
    token_log_probs: Optional[torch.Tensor] = None
    log_probs_of_targets: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    normalizer: Optional[torch.Tensor] = None
    copy: Optional["CopyScores"] = None


# ---------------------------------------------------------------------------------------------
# Vocabulary-chunked masked-LM scoring: never the [rows, vocab] logits


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
                        copy: Optional["CopyScores"] = None,
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


# ---------------------------------------------------------------------------------------------
# The copy head: p(y|z, x) may copy a word piece of the block


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
    (retrieved blocks mostly do not). The null document has no tokens, so ``λ = 0`` and its score is the masked LM's alone. The attention
    makes copying a span the block holds cheap for a small reader, which a 2-layer encoder
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


# ---------------------------------------------------------------------------------------------
# The encoder


def tie_output_embeddings(mlm: PreTrainedModel) -> None:
    """Tie a masked-LM's decoder weight to its input word embeddings (the same Parameter)."""
    output, inputs = mlm.get_output_embeddings(), mlm.get_input_embeddings()
    if output is None:
        raise ValueError(f"{type(mlm).__name__} has no output embeddings to tie")
    mlm.config.tie_word_embeddings = True  # saved with the config: re-tied on load
    mlm.tie_weights()
    if output.weight is not inputs.weight:
        output.weight = inputs.weight


class KnowledgeAugmentedEncoder(nn.Module):
    """A transformers masked LM that reads ``[CLS] x [SEP] z [SEP]`` and scores the masked tokens.

    Build it with :meth:`from_checkpoint`, :meth:`from_config`, :meth:`from_pretrained` or
    :func:`build_ka_encoder`.

    Args:
        mlm: Any ``AutoModelForMaskedLM`` model.
        tokenizer: The checkpoint's tokenizer, saved with the model; None for tiny models.
        base_checkpoint: Name the model was initialised from (recorded in the manifest).
        head_initialised: Whether the masked-LM head was newly initialised (not in the
            checkpoint); recorded in the manifest.
    """

    def __init__(
        self,
        mlm: PreTrainedModel,
        *,
        tokenizer: Any = None,
        base_checkpoint: Optional[str] = None,
        head_initialised: bool = False,
    ):
        super().__init__()
        self.mlm = mlm
        self.tokenizer = tokenizer
        self.base_checkpoint = base_checkpoint
        self.head_initialised = head_initialised
        #: With labels: score the targets over the vocabulary in chunks of this many words
        #: (:func:`target_log_probs`), never building the ``[B, k + 1, M, vocab]`` logits
        #: (``logits`` is then None and ``hidden`` holds the decoder inputs). 0: the logits.
        self.vocab_chunk = 0
        #: A pointer over the block's word pieces (:class:`CopyHead`), or None.
        self.copy_head: Optional[CopyHead] = None

    def add_copy_head(self) -> CopyHead:
        """Give the reader a new :class:`CopyHead` (kept if it has one)."""
        if self.copy_head is None:
            self.copy_head = CopyHead(self.config.hidden_size).to(
                next(self.mlm.parameters()).device)
        return self.copy_head

    def decoder_parts(self) -> Optional[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
        """``(transform, weight, bias)`` of a BERT-style head (transform, then a linear decoder),
        or None for heads of another shape (which then always build the logits)."""
        head = self._head()
        predictions = getattr(head, "predictions", None)
        transform = getattr(predictions, "transform", None)
        decoder = getattr(predictions, "decoder", None)
        if transform is None or not isinstance(decoder, nn.Linear) or decoder.bias is None:
            return None
        return transform, decoder.weight, decoder.bias

    def predictions(self, out: "KnowledgeAugmentedOutput", log_p_z: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``argmax_y Σ_z p(z|x) p(y_j|z, x)`` and the last candidate's own argmax at each masked
        position, ``([B, M], [B, M])``, from the logits or (chunked) from ``hidden``."""
        with torch.no_grad():
            if out.logits is not None:
                log_probs = torch.log_softmax(out.logits.float(), dim=-1)  # [B, k + 1, M, V]
                if out.copy is not None:  # the last candidate's own: λ is 0 on the null one
                    return (copy_predictions(log_probs, out.copy, log_p_z),
                            out.logits[:, -1].argmax(dim=-1))
                marginal = torch.logsumexp(log_p_z[:, :, None, None].float() + log_probs, dim=1)
                return marginal.argmax(dim=-1), out.logits[:, -1].argmax(dim=-1)
            _, weight, bias = self.decoder_parts()
            return chunked_predictions(out.hidden, weight, bias, log_p_z, self.vocab_chunk,
                                       normalizer=out.normalizer, copy=out.copy)

    @property
    def config(self) -> PretrainedConfig:
        return self.mlm.config

    @property
    def input_embeddings(self) -> nn.Module:
        """The word-embedding table, ``[vocab, hidden]``."""
        return self.mlm.get_input_embeddings()

    @property
    def output_embeddings(self) -> nn.Module:
        """The head's decoder (hidden -> vocab); tied to :attr:`input_embeddings` when new."""
        return self.mlm.get_output_embeddings()

    def _head(self) -> Optional[nn.Module]:
        """The head module when the model is exactly ``backbone`` + ``head`` (BERT, RoBERTa)."""
        children = [
            module for name, module in self.mlm.named_children()
            if name != self.mlm.base_model_prefix
        ]
        return children[0] if len(children) == 1 else None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        name_or_path: str,
        *,
        with_tokenizer: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> "KnowledgeAugmentedEncoder":
        """A masked LM from a transformers checkpoint; a tied new head when it has none.

        Args:
            name_or_path: Local directory, hub name, or packaged alias (see
                :func:`realm.hub.resolve_model_path`).
            with_tokenizer: Also load the checkpoint's (fast) tokenizer, saved with the model.
            dtype: Parameter dtype.
        """
        path = resolve_model_path(name_or_path)
        mlm, info = load_pretrained(AutoModelForMaskedLM.from_pretrained, path,
                                    "masked LM", dtype=dtype)
        prefix = mlm.base_model_prefix + "."
        missing_head = sorted(k for k in info["missing_keys"] if not k.startswith(prefix))
        if missing_head:
            tie_output_embeddings(mlm)
            logger.info(
                "%s has no masked-LM head: initialised a new one (%d tensors, e.g. %s), decoder "
                "tied to the input word embeddings", name_or_path, len(missing_head),
                missing_head[0],
            )
        tokenizer = load_tokenizer(name_or_path) if with_tokenizer else None
        return cls(
            mlm, tokenizer=tokenizer, base_checkpoint=name_or_path,
            head_initialised=bool(missing_head),
        )

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> "KnowledgeAugmentedEncoder":
        """Randomly initialised masked LM from a config (tiny test models), decoder tied."""
        mlm = AutoModelForMaskedLM.from_config(config)
        tie_output_embeddings(mlm)
        logger.info("initialised a %s masked LM from a config", type(mlm).__name__)
        return cls(mlm, head_initialised=True)

    # -- forward --------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        mask_positions: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        label_mask: Optional[torch.Tensor] = None,
    ) -> KnowledgeAugmentedOutput:
        """Score the masked tokens of each query against each of its candidates.

        Args:
            input_ids: Joined sequences, query-major, ``[B * (k + 1), seq_len]``
                (:func:`build_joined_inputs`).
            attention_mask: ``[B * (k + 1), seq_len]``.
            token_type_ids: ``[B * (k + 1), seq_len]`` or None (all zeros).
            mask_positions: Masked positions in the joined sequences, ``[B, max_masked]``; the
                logits are then computed at these positions only.
            labels: Target ids of the masked tokens, ``[B, max_masked]``; needs
                ``mask_positions``.
            label_mask: True on real targets, ``[B, max_masked]``; None means all are real.

        Returns:
            :class:`KnowledgeAugmentedOutput`; ``token_log_probs`` and
            ``log_probs_of_targets`` only when ``labels`` are given.
        """
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if mask_positions is None:
            if labels is not None:
                raise ValueError("labels need mask_positions")
            logits = self.mlm(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            ).logits  # [N, seq_len, vocab]
            return KnowledgeAugmentedOutput(logits=logits)
        n, seq_len = input_ids.shape
        batch, max_masked = mask_positions.shape
        if n % batch:
            raise ValueError(f"{n} sequences are not a whole number of candidates for {batch}")
        num_candidates = n // batch
        head = self._head()
        if head is not None:
            # Run the head on the masked positions only: [B, k + 1, M, vocab], not [N, L, vocab].
            states = self.mlm.base_model(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            ).last_hidden_state  # [N, seq_len, hidden]
        else:  # no separable head: full logits, then pick the masked positions
            states = self.mlm(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            ).logits  # [N, seq_len, vocab]
        states = states.view(batch, num_candidates, seq_len, -1)  # [B, k + 1, L, hidden|vocab]
        index = mask_positions[:, None, :, None].expand(
            batch, num_candidates, max_masked, states.shape[-1]
        )  # [B, k + 1, M, hidden|vocab]
        picked = states.gather(2, index)  # [B, k + 1, M, hidden|vocab]
        copy = None
        if self.copy_head is not None and token_type_ids is not None:
            if head is None:
                raise ValueError(f"a copy head needs a separable masked-LM head; "
                                 f"{type(self.mlm).__name__} has none")
            shape = (batch, num_candidates, seq_len)
            # the block's word pieces: the second segment without its separators (each row,
            # right-padded, ends in [SEP]); none in the null document's [CLS] x [SEP] [SEP]
            last = input_ids.gather(1, (attention_mask.sum(1, keepdim=True) - 1).clamp(min=0))
            support = ((token_type_ids == 1) & attention_mask.bool() & (input_ids != last)
                       ).view(shape)
            copy = self.copy_head(picked, states, input_ids.view(shape), support)
        parts = self.decoder_parts() if labels is not None and self.vocab_chunk else None
        if parts is not None:  # the lean path: never the [B, k + 1, M, vocab] logits
            transform, weight, bias = parts
            hidden = transform(picked)  # [B, k + 1, M, hidden]
            targets = labels[:, None, :].expand(batch, num_candidates, max_masked)
            token_log_probs, normalizer = target_log_probs(
                hidden, weight, bias, targets, self.vocab_chunk, with_normalizer=True)
            if copy is not None:
                token_log_probs = copy_mixture(token_log_probs, copy, targets)
            if label_mask is not None:
                token_log_probs = token_log_probs.masked_fill(~label_mask.bool()[:, None, :], 0.0)
            return KnowledgeAugmentedOutput(logits=None, token_log_probs=token_log_probs,
                                            log_probs_of_targets=token_log_probs.sum(dim=-1),
                                            hidden=hidden, normalizer=normalizer, copy=copy)
        logits = head(picked) if head is not None else picked  # [B, k + 1, M, vocab]
        if labels is None:
            return KnowledgeAugmentedOutput(logits=logits, copy=copy)
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [B, k + 1, M, vocab]
        targets = labels[:, None, :, None].expand(batch, num_candidates, max_masked, 1)
        token_log_probs = log_probs.gather(-1, targets).squeeze(-1)  # [B, k + 1, M]
        if copy is not None:
            token_log_probs = copy_mixture(token_log_probs, copy, targets.squeeze(-1))
        if label_mask is not None:
            token_log_probs = token_log_probs.masked_fill(~label_mask.bool()[:, None, :], 0.0)
        return KnowledgeAugmentedOutput(
            logits=logits,
            token_log_probs=token_log_probs,
            log_probs_of_targets=token_log_probs.sum(dim=-1),  # [B, k + 1]
            copy=copy,
        )

    # -- persistence ----------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        tokenizer: Any = None,
        metadata: Optional[dict[str, Any]] = None,
        overwrite: bool = False,
    ) -> Path:
        """Write a self-describing directory, atomically (as :meth:`Retriever.save_pretrained`).

        Args:
            save_directory: Target directory; must not exist unless ``overwrite``.
            tokenizer: Tokenizer to save; defaults to the one the encoder was built with.
            metadata: Extra JSON-able fields for the manifest (e.g. the training step).
            overwrite: Replace an existing directory.

        Returns:
            The target directory.
        """
        target = Path(save_directory)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        with _atomic_directory(target, overwrite=overwrite) as tmp:
            self.mlm.save_pretrained(tmp / MODEL_DIR)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / MODEL_DIR))
            if self.copy_head is not None:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous()
                           for k, v in self.copy_head.state_dict().items()}, tmp / COPY_HEAD_FILE)
            fields = {
                "base_checkpoint": self.base_checkpoint,
                "model_type": getattr(self.config, "model_type", None),
                "architecture": type(self.mlm).__name__,
                "hidden_size": self.config.hidden_size,
                "vocab_size": self.config.vocab_size,
                "head_initialised": self.head_initialised,
                "tied_embeddings": self.output_embeddings.weight is self.input_embeddings.weight,
                "model": MODEL_DIR,
                "tokenizer": MODEL_DIR if tokenizer is not None else None,
                "copy_head": COPY_HEAD_FILE if self.copy_head is not None else None,
            }
            _write_manifest(tmp, MANIFEST_KIND, FORMAT_VERSION, fields, metadata)
        logger.info("saved knowledge-augmented encoder to %s", target)
        return target

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: Optional[str | torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ) -> "KnowledgeAugmentedEncoder":
        """Load a directory written by :meth:`save_pretrained`.

        Raises:
            FileNotFoundError: No ``manifest.json``.
            ValueError: The manifest is of another kind, or a listed file is missing or has
                the wrong size.
        """
        directory = Path(directory)
        manifest = read_manifest(directory, kind=MANIFEST_KIND)
        mlm = AutoModelForMaskedLM.from_pretrained(directory / manifest["model"], dtype=dtype)
        if manifest.get("tied_embeddings"):
            tie_output_embeddings(mlm)
        tokenizer = _load_saved_tokenizer(directory, manifest)
        encoder = cls(
            mlm, tokenizer=tokenizer, base_checkpoint=manifest.get("base_checkpoint"),
            head_initialised=bool(manifest.get("head_initialised")),
        )
        if manifest.get("copy_head"):
            from safetensors.torch import load_file

            encoder.add_copy_head().load_state_dict(load_file(directory / manifest["copy_head"]))
        if device is not None:
            encoder.to(device)
        logger.info("loaded knowledge-augmented encoder from %s", directory)
        return encoder


def load_ka_encoder(path: str) -> KnowledgeAugmentedEncoder:
    """A saved knowledge-augmented encoder directory, or any transformers checkpoint (a new
    tied head when it has none)."""
    if os.path.exists(os.path.join(path, "manifest.json")):
        return KnowledgeAugmentedEncoder.from_pretrained(path)
    return KnowledgeAugmentedEncoder.from_checkpoint(path)


def build_ka_encoder(
    name_or_path: Optional[str] = None,
    *,
    config: Optional[PretrainedConfig] = None,
    **kwargs: Any,
) -> KnowledgeAugmentedEncoder:
    """Builder: a knowledge-augmented encoder from a checkpoint name/path or a config.

    Args:
        name_or_path: Checkpoint to initialise from (with or without a masked-LM head).
        config: A transformers config (e.g. ``BertConfig``) for a randomly initialised model.
        **kwargs: Passed to :meth:`KnowledgeAugmentedEncoder.from_checkpoint`
            (``with_tokenizer``, ``dtype``).
    """
    if (name_or_path is None) == (config is None):
        raise ValueError("give exactly one of name_or_path or config")
    if config is not None:
        return KnowledgeAugmentedEncoder.from_config(config)
    return KnowledgeAugmentedEncoder.from_checkpoint(name_or_path, **kwargs)
