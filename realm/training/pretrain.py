"""REALM pretraining: the model (retriever + knowledge-augmented encoder) and its training task.

One step, per masked example x (Guu et al. 2020; ``docs/pretraining.md``)::

    q = Embed_input(x)                                   current parameters
    top-k = MIPS(q.detach(), index in use), source block excluded
    candidates = top-k + null document (an empty block), k + 1 of them
    f(x, z) = q . Embed_doc(z)                           re-scored with grad
    log p(y|z, x) = sum_j log p(y_j | [CLS] x [SEP] z [SEP])   one pass over B * (k + 1)
    loss = -logsumexp_z(log_softmax_z f(x, z) + log p(y|z, x))

The whole computation is one ``forward`` so that DDP (through accelerate) sees every parameter
that takes part; the index search runs inside it on detached query embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from realm.data.mlm import MLMBatch, MLMDataset, collate_mlm
from realm.data.store import BlockStore
from realm.index.mips import SearchResult
from realm.losses import (expected_retrieval_utility, null_probability, realm_marginal_loss,
                          retrieval_entropy, retrieval_utility, top1_retrieval_utility)
from realm.modeling.ka_encoder import KnowledgeAugmentedEncoder, build_joined_inputs
from realm.modeling.retriever import Retriever, build_block_inputs, build_query_inputs

logger = logging.getLogger(__name__)

#: ``searcher(query_embeddings [B, dim] float32, k, exclude [B]) -> SearchResult``
Searcher = Callable[[np.ndarray, int, np.ndarray], SearchResult]


@dataclass
class REALMOutput:
    """What one REALM forward returns (``loss`` only when targets are given).

    Attributes:
        loss: ``-log p(y|x)``, batch mean (scalar).
        retrieval_logits: ``f(x, z)`` of the ``k`` retrieved blocks and the null document
            (last), ``[B, k + 1]``.
        log_p_z: ``log p(z|x)``, ``[B, k + 1]``.
        log_p_y_given_z: ``log p(y|z, x)``, ``[B, k + 1]``.
        mlm_logits: Logits at the masked positions, ``[B, k + 1, max_masked, vocab]``.
        block_ids: Retrieved block ids (-1 where fewer than k), ``[B, k]``.
    """

    retrieval_logits: torch.Tensor
    log_p_y_given_z: torch.Tensor
    mlm_logits: torch.Tensor
    block_ids: torch.Tensor
    log_p_z: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None


class REALM(nn.Module):
    """Retriever (query + document encoder) and knowledge-augmented encoder, trained together.

    Args:
        retriever: Query and document encoders.
        encoder: The knowledge-augmented masked LM.
        store: The block store the index covers (blocks are read from it by id).
        special: ``(cls_id, sep_id, pad_id)``.
        k: Retrieved blocks per example (the null document comes on top).
        max_query_tokens, max_block_tokens, max_joined_tokens: Word pieces kept.
    """

    def __init__(self, retriever: Retriever, encoder: KnowledgeAugmentedEncoder,
                 store: BlockStore, special: tuple[int, int, int], k: int = 8,
                 max_query_tokens: int = 64, max_block_tokens: int = 288,
                 max_joined_tokens: int = 352):
        super().__init__()
        self.retriever = retriever
        self.encoder = encoder
        self.store = store
        self.special = special
        self.k = k
        self.max_query_tokens = max_query_tokens
        self.max_block_tokens = max_block_tokens
        self.max_joined_tokens = max_joined_tokens

    def forward(self, batch: MLMBatch, searcher: Searcher) -> REALMOutput:
        device = next(self.parameters()).device
        cls_id, sep_id, pad_id = self.special
        n = len(batch.query_ids)
        # 1. query embeddings with the current parameters; the search uses them detached
        q_in = build_query_inputs(batch.query_ids, cls_id, sep_id, pad_id,
                                  max_length=self.max_query_tokens + 2)
        q_reps = self.retriever.encode_queries(*(t.to(device) for t in q_in)).q_reps  # [B, dim]
        found = searcher(q_reps.detach().float().cpu().numpy(), self.k,
                         batch.block_ids.numpy())  # the source block excluded
        ids = found.block_ids  # [B, k], -1 where the index had fewer
        valid = torch.from_numpy(ids >= 0).to(device)  # [B, k]
        # 2. the k retrieved blocks + the null document, re-scored with grad
        titles = [[self.store.title_ids(int(b)) if b >= 0 else np.zeros(0, np.int64)
                   for b in row] for row in ids]
        bodies = [[self.store.body_ids(int(b)) if b >= 0 else np.zeros(0, np.int64)
                   for b in row] for row in ids]
        empty = np.zeros(0, np.int64)
        flat_t = [t for row in titles for t in row] + [empty]  # the null block last, once
        flat_b = [b for row in bodies for b in row] + [empty]
        p_in = build_block_inputs(flat_t, flat_b, cls_id, sep_id, pad_id,
                                  max_length=self.max_block_tokens + 3)
        p_reps = self.retriever.encode_blocks(*(t.to(device) for t in p_in)).p_reps
        dim = p_reps.shape[-1]
        retrieved = p_reps[:-1].view(n, self.k, dim)  # [B, k, dim]
        null = p_reps[-1]  # [dim]
        scores = torch.einsum("bd,bkd->bk", q_reps, retrieved)  # [B, k]
        scores = scores.masked_fill(~valid, -1e4)
        null_score = (q_reps @ null)[:, None]  # [B, 1]
        retrieval_logits = torch.cat([scores, null_score], dim=1)  # [B, k + 1], null last
        # 3. one encoder pass over all B * (k + 1) joined sequences
        joined = build_joined_inputs(batch.query_ids, titles, bodies, cls_id, sep_id, pad_id,
                                     max_length=self.max_joined_tokens,
                                     mask_positions=batch.mask_positions, append_null=True)
        out = self.encoder(joined.input_ids.to(device), joined.attention_mask.to(device),
                           joined.token_type_ids.to(device), joined.mask_positions.to(device),
                           labels=batch.target_ids.to(device),
                           label_mask=batch.target_mask.to(device))
        log_p_y = out.log_probs_of_targets  # [B, k + 1]
        loss, log_p_z = realm_marginal_loss(retrieval_logits, log_p_y)
        return REALMOutput(retrieval_logits=retrieval_logits, log_p_y_given_z=log_p_y,
                           mlm_logits=out.logits, block_ids=torch.from_numpy(ids),
                           log_p_z=log_p_z, loss=loss)


def marginal_token_accuracy(out: REALMOutput, batch: MLMBatch) -> float:
    """Accuracy of ``argmax_y Σ_z p(z|x) p(y_j|z, x)`` on the masked tokens."""
    log_probs = torch.log_softmax(out.mlm_logits.float(), dim=-1)  # [B, k + 1, M, V]
    marginal = torch.logsumexp(out.log_p_z[:, :, None, None] + log_probs, dim=1)  # [B, M, V]
    predicted = marginal.argmax(dim=-1).cpu()  # [B, M]
    hits = (predicted == batch.target_ids) & batch.target_mask
    return float(hits.sum() / batch.target_mask.sum().clamp(min=1))


def realm_metrics(out: REALMOutput, batch: MLMBatch) -> dict[str, float]:
    """Loss, masked accuracy, retrieval utility (expected, top-1, by label), p(null), entropy."""
    with torch.no_grad():
        ru = retrieval_utility(out.log_p_y_given_z)  # [B, k]
        ru_exp = expected_retrieval_utility(ru, out.log_p_z)  # [B]
        metrics = {
            "loss": float(out.loss),
            "masked_accuracy": marginal_token_accuracy(out, batch),
            "ru_expected": float(ru_exp.mean()),
            "ru_top1": float(top1_retrieval_utility(ru, out.retrieval_logits).mean()),
            "p_null": float(null_probability(out.log_p_z).mean()),
            "retrieval_entropy": float(retrieval_entropy(out.log_p_z).mean()),
            "fallback_examples": float(batch.n_fallback),
        }
        by_label: dict[str, list[float]] = {}
        for label, value in zip(batch.labels, ru_exp.tolist()):
            by_label.setdefault(label or "none", []).append(value)
        for label, values in by_label.items():
            metrics[f"ru_by_label/{label}"] = float(np.mean(values))
    return metrics


class PretrainTask:
    """The training core's task for REALM pretraining.

    Args:
        dataset: Masked examples (:class:`MLMDataset`).
        searcher: Index search over the generation in use (the refresh hook's watcher).
        world_size: Processes (the loss is averaged by DDP over them).
    """

    def __init__(self, dataset: MLMDataset, searcher: Searcher):
        self.dataset = dataset
        self.searcher = searcher

    def train_dataset(self) -> MLMDataset:
        return self.dataset

    def collate(self, examples) -> MLMBatch:
        return collate_mlm(examples)

    def loss(self, model: nn.Module, batch: MLMBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(batch, self.searcher)
        return out.loss, realm_metrics(out, batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}
