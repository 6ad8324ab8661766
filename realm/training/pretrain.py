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

import contextlib
import dataclasses
import logging
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from realm.data.mlm import MLMBatch, MLMDataset, collate_mlm, mlm_blocks
from realm.data.store import BlockStore
from realm.index.mips import SearchResult
from realm.losses import (expected_retrieval_utility, null_probability, realm_marginal_loss,
                          realm_token_marginal_loss, retrieval_entropy, retrieval_utility,
                          top1_retrieval_utility)
from realm.modeling.ka_encoder import (KnowledgeAugmentedEncoder, build_joined_inputs,
                                       load_ka_encoder)
from realm.modeling.modes import eval_mode
from realm.modeling.retriever import Retriever, build_block_inputs, build_query_inputs
from realm.prepare import (_digest, prepare_adapted_encoder, prepare_corpus, prepare_encoder,
                           prepare_reader, prepare_retriever)

logger = logging.getLogger(__name__)

#: How the retriever learns from the masked-LM signal (see :class:`REALM`).
RETRIEVER_SIGNALS = ("marginal", "relative", "positive", "centered", "in_batch", "bank")

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
        mlm_logits: Logits at the masked positions, ``[B, k + 1, max_masked, vocab]``; None on
            the vocabulary-chunked path (``pretrain.vocab_chunk``).
        block_ids: Retrieved block ids (-1 where fewer than k), ``[B, k]``.
        predictions: ``argmax_y Σ_z p(z|x) p(y_j|z, x)`` at each masked position, ``[B, M]``.
        null_predictions: The reader's prediction beside the null document alone, ``[B, M]``.
    """

    retrieval_logits: torch.Tensor
    log_p_y_given_z: torch.Tensor
    mlm_logits: Optional[torch.Tensor]
    block_ids: torch.Tensor
    log_p_z: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    reading_warmup: bool = False  # the source_only forward: own block (, other block), null
    predictions: Optional[torch.Tensor] = None
    null_predictions: Optional[torch.Tensor] = None


class REALM(nn.Module):
    """Retriever (query + document encoder) and knowledge-augmented encoder, trained together.

    Args:
        retriever: Query and document encoders.
        encoder: The knowledge-augmented masked LM.
        store: The block store the index covers (blocks are read from it by id).
        special: ``(cls_id, sep_id, pad_id)``.
        k: Retrieved blocks per example (the null document comes on top).
        max_query_tokens, max_block_tokens, max_joined_tokens: Word pieces kept.
        exclude_source: Leave each example's source block out of its retrieval (the examples
            come from ``store``); False when they come from another corpus.
        source_only: The reading warm-up: no retriever, no search, no null document; each
            example is read beside its own source block of ``store`` (unmasked) and beside a
            random other block (:meth:`_read_own_blocks`). ``k`` must be 1.
        other_weight: Weight of the read beside the other block in the warm-up's loss; 0 reads
            the own block alone.
        retriever_signal: ``marginal`` (REALM): the retriever's gradient is that of the marginal
            loss over the ``k + 1`` candidates. ``relative``: the reader's gradient is the same,
            but the retriever learns only how the ``k`` retrieved blocks rank against each other
            (the marginal over them alone, ``p(y|z, x)`` held fixed); the null document's score
            gets no gradient. ``positive``: as ``relative``, with ``log p(y|z, x)`` floored at
            the null document's (a block that hurts ranks like one that does nothing; with
            ``min_ru`` > 0, so does one whose retrieval utility is at most ``min_ru``; an example
            none of whose blocks reads better than that gives the retriever no gradient).
            ``centered``: as ``relative``, each block's score less its mean score for the
            batch's other queries (:meth:`_block_popularity`). ``in_batch``: as ``positive``,
            ranked against the batch's other retrieved blocks too
            (:meth:`_with_batch_negatives`). ``bank``: as ``positive``, ranked against the null
            document and the whole rest of the corpus too, every block not read counted as
            the null document, scored from the searched generation's embeddings
            (:meth:`_corpus_rest`). The loss value is REALM's in every case.
        freeze_reader: The knowledge-augmented encoder does not train (no gradient, eval mode):
            the retriever learns from a fixed reader.
        marginal: ``example`` (the paper): ``-log Σ_z p(z|x) p(y|z, x)`` with ``p(y|z, x)`` the
            product over the masked tokens. ``token`` (the released REALM code): the marginal
            per masked token, averaged over the batch's tokens
            (:func:`realm.losses.realm_token_marginal_loss`).
        rerank_candidates: Retrieve this many blocks (>= k) from the (stale) index, re-embed
            them with the current document encoder (no gradient) and keep the best k by the
            fresh scores (Atlas's ``retrieve_with_rerank``); 0: the index's top k as they are.
    """

    def __init__(self, retriever: Retriever, encoder: KnowledgeAugmentedEncoder,
                 store: BlockStore, special: tuple[int, int, int], k: int = 8,
                 max_query_tokens: int = 64, max_block_tokens: int = 288,
                 max_joined_tokens: int = 352, exclude_source: bool = True,
                 source_only: bool = False, other_weight: float = 1.0,
                 retriever_signal: str = "marginal", min_ru: float = 0.0,
                 freeze_reader: bool = False, marginal: str = "example", vocab_chunk: int = 0,
                 rerank_candidates: int = 0):
        super().__init__()
        if rerank_candidates and rerank_candidates < k:
            raise ValueError(f"rerank_candidates ({rerank_candidates}) must be 0 or >= k ({k})")
        self.rerank_candidates = rerank_candidates
        self.rerank_changed: Optional[float] = None  # share of the top k re-ranking replaced
        encoder.vocab_chunk = vocab_chunk
        if marginal not in ("example", "token"):
            raise ValueError(f"marginal must be 'example' or 'token', got {marginal!r}")
        self.marginal = marginal
        if retriever_signal not in RETRIEVER_SIGNALS:
            raise ValueError(f"retriever_signal must be one of {RETRIEVER_SIGNALS}, got "
                             f"{retriever_signal!r}")
        self.retriever = retriever
        self.encoder = encoder
        self.store = store
        self.special = special
        self.k = k
        self.max_query_tokens = max_query_tokens
        self.max_block_tokens = max_block_tokens
        self.max_joined_tokens = max_joined_tokens
        self.exclude_source = exclude_source
        self.source_only = source_only
        self.other_weight = other_weight
        self.retriever_signal = retriever_signal
        self.min_ru = min_ru
        self._bank: Optional[tuple] = None  # (searched embeddings, as a tensor): `bank` only
        if source_only and (k != 1 or exclude_source):
            raise ValueError("source_only reads each example's own block: k=1, nothing excluded")
        self.freeze_reader = freeze_reader
        if freeze_reader:
            if source_only:
                raise ValueError("source_only trains the reader: it cannot be frozen")
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @torch.no_grad()
    def _rerank(self, found: SearchResult, q_reps: torch.Tensor, device) -> SearchResult:
        """The best k of the L searched blocks by the current document encoder's scores."""
        from realm.index.sharded import merge_top_k

        cls_id, sep_id, pad_id = self.special
        ids = found.block_ids  # [B, L]
        titles, bodies = self._texts(ids.reshape(1, -1))
        p_in = build_block_inputs(titles[0], bodies[0], cls_id, sep_id, pad_id,
                                  max_length=self.max_block_tokens + 3)
        with eval_mode(self.retriever):
            p_reps = self.retriever.encode_blocks(*(t.to(device) for t in p_in)).p_reps
        with torch.autocast(device.type, enabled=False):  # (under bf16 autocast: fp32 scores)
            fresh = torch.einsum("bd,bld->bl", q_reps.float(),
                                 p_reps.float().view(*ids.shape, -1)).cpu().numpy()  # [B, L]
        fresh[ids < 0] = -np.inf
        scores, top = merge_top_k(fresh.astype(np.float32), ids, self.k)
        stale = ids[:, : self.k]
        kept = [len(set(a[a >= 0]) & set(b[b >= 0])) for a, b in zip(top, stale)]
        self.rerank_changed = 1.0 - float(np.sum(kept)) / max(1, int((stale >= 0).sum()))
        return SearchResult(scores=scores, block_ids=top)

    def train(self, mode: bool = True) -> "REALM":
        """As nn.Module's; a frozen reader stays in eval mode (no dropout in its signal)."""
        super().train(mode)
        if self.freeze_reader:
            self.encoder.eval()
        return self

    def search(self, batch: MLMBatch, q_reps: torch.Tensor, searcher: Searcher) -> SearchResult:
        """The index's top ``max(k, rerank_candidates)`` for detached query embeddings, each
        example's source block excluded where it comes from the indexed corpus."""
        exclude = batch.block_ids.numpy() if self.exclude_source else None
        return searcher(q_reps.detach().float().cpu().numpy(),
                        max(self.k, self.rerank_candidates), exclude)

    def _texts(self, ids: np.ndarray) -> tuple[list, list]:
        """Title and body word pieces of each block id ``[B, n]`` (-1: empty), as nested lists."""
        empty = np.zeros(0, np.int64)
        titles = [[self.store.title_ids(int(b)) if b >= 0 else empty for b in row] for row in ids]
        bodies = [[self.store.body_ids(int(b)) if b >= 0 else empty for b in row] for row in ids]
        return titles, bodies

    def assemble(self, batch: MLMBatch, ids: np.ndarray) -> "Assembled":
        """The step's inputs for the retrieved ``ids`` ``[B, k]`` (-1: none): the k blocks and
        the null document for the document encoder, and the B * (k + 1) joined sequences."""
        cls_id, sep_id, pad_id = self.special
        empty = np.zeros(0, np.int64)
        titles, bodies = self._texts(ids)
        flat_t = [t for row in titles for t in row] + [empty]  # the null block last, once
        flat_b = [b for row in bodies for b in row] + [empty]
        blocks = build_block_inputs(flat_t, flat_b, cls_id, sep_id, pad_id,
                                    max_length=self.max_block_tokens + 3)
        joined = build_joined_inputs(batch.query_ids, titles, bodies, cls_id, sep_id, pad_id,
                                     max_length=self.max_joined_tokens,
                                     mask_positions=batch.mask_positions, append_null=True)
        return Assembled(blocks, joined)

    def forward(self, batch: MLMBatch, searcher: Searcher,
                prefetched: Optional["Prefetched"] = None) -> REALMOutput:
        """One step's loss. ``prefetched``: the batch's search (and, without re-ranking, its
        assembled inputs) done ahead by :class:`RetrievalPrefetch`; None searches here."""
        if self.source_only:
            return self._read_own_blocks(batch)
        device = next(self.parameters()).device
        cls_id, sep_id, pad_id = self.special
        n = len(batch.query_ids)
        # 1. query embeddings with the current parameters; the search uses them detached
        q_in = build_query_inputs(batch.query_ids, cls_id, sep_id, pad_id,
                                  max_length=self.max_query_tokens + 2)
        q_reps = self.retriever.encode_queries(*(t.to(device) for t in q_in)).q_reps  # [B, dim]
        exclude = batch.block_ids.numpy() if self.exclude_source else None
        found = prefetched.found if prefetched else self.search(batch, q_reps, searcher)
        assembled = prefetched.assembled if prefetched else None
        if self.rerank_candidates > self.k:
            found = self._rerank(found, q_reps.detach(), device)
            assembled = None  # (the re-ranked blocks are known only now)
        ids = found.block_ids  # [B, k], -1 where the index had fewer
        if assembled is None:
            assembled = self.assemble(batch, ids)
        valid = torch.from_numpy(ids >= 0).to(device)  # [B, k]
        # 2. the k retrieved blocks + the null document, re-scored with grad
        p_reps = self.retriever.encode_blocks(*(t.to(device) for t in assembled.blocks)).p_reps
        dim = p_reps.shape[-1]
        retrieved = p_reps[:-1].view(n, self.k, dim)  # [B, k, dim]
        null = p_reps[-1]  # [dim]
        scores = torch.einsum("bd,bkd->bk", q_reps, retrieved)  # [B, k]
        scores = scores.masked_fill(~valid, -1e4)
        null_score = (q_reps @ null)[:, None]  # [B, 1]
        retrieval_logits = torch.cat([scores, null_score], dim=1)  # [B, k + 1], null last
        # 3. one encoder pass over all B * (k + 1) joined sequences
        joined = assembled.joined
        out = self.encoder(joined.input_ids.to(device), joined.attention_mask.to(device),
                           joined.token_type_ids.to(device), joined.mask_positions.to(device),
                           labels=batch.target_ids.to(device),
                           label_mask=batch.target_mask.to(device))
        log_p_y = out.log_probs_of_targets  # [B, k + 1]

        def marginal_loss(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.marginal == "token":  # per masked token, averaged (the released code)
                return realm_token_marginal_loss(logits, out.token_log_probs,
                                                 batch.target_mask.to(device))
            return realm_marginal_loss(logits, log_p_y)  # per example (the paper)

        if self.retriever_signal != "marginal" and self.k > 0:  # (k = 0: the null-only control)
            # the reader sees p(z|x) as a constant; the retriever sees p(y|z, x) as one and
            # only the k retrieved blocks, so no step moves every query toward the null document
            loss, log_p_z = marginal_loss(retrieval_logits.detach())
            target, null = log_p_y[:, :-1].detach(), log_p_y[:, -1:].detach()
            if self.retriever_signal in ("positive", "in_batch", "bank"):  # hurting is nothing
                target = torch.where(target - null > self.min_ru, target, null)
            rank_scores = scores
            if self.retriever_signal == "centered":
                rank_scores = scores - self._block_popularity(q_reps, retrieved, scores, valid)
            elif self.retriever_signal == "in_batch":
                rank_scores, target = self._with_batch_negatives(q_reps, retrieved, valid,
                                                                 target, null)
            elif self.retriever_signal == "bank":  # the null document and the unread rest too
                rank_scores = torch.cat([retrieval_logits,
                                         self._corpus_rest(q_reps, found, ids, exclude)], dim=1)
                target = torch.cat([target, null, null], dim=1)
            rank_loss, _ = realm_marginal_loss(rank_scores, target)
            loss = loss + (rank_loss - rank_loss.detach())
        else:
            loss, log_p_z = marginal_loss(retrieval_logits)
        predictions, null_predictions = self.encoder.predictions(out, log_p_z.detach())
        return REALMOutput(retrieval_logits=retrieval_logits, log_p_y_given_z=log_p_y,
                           mlm_logits=out.logits, block_ids=torch.from_numpy(ids),
                           log_p_z=log_p_z, loss=loss, predictions=predictions.cpu(),
                           null_predictions=null_predictions.cpu())

    def _corpus_rest(self, q_reps: torch.Tensor, found: SearchResult, ids: np.ndarray,
                     exclude: Optional[np.ndarray]) -> torch.Tensor:
        """``log Σ_{z not read} exp f(x, z)``: the score mass of every block not retrieved
        (``bank``), from the embeddings the search ran over; the query encoder's gradient only.

        In REALM's loss over the top k alone, raising every retrieved block's score costs
        nothing, so a block that scores high for every query (a hub) is held in place by no one.
        Here the rest of the corpus stands beside the candidates, read as the null document
        (``log p(y|null, x)``): a block that reads better is pulled up against all of it, as
        ICT pulls its positive up against in-batch negatives.

        Returns:
            ``[B, 1]`` float32 (the source block, where excluded, left out too).
        """
        if found.bank is None:
            raise ValueError("retriever_signal='bank' needs the searched embeddings; this "
                             "searcher returned none (an index generation returns them)")
        bank = self._bank
        if bank is None or bank[0] is not found.bank:  # once per generation
            self._bank = bank = (found.bank, torch.from_numpy(
                np.asarray(found.bank, dtype=np.float32)).to(q_reps.device))
        with torch.autocast(q_reps.device.type, enabled=False):
            scores = q_reps.float() @ bank[1].T  # [B, n_blocks]
        read = torch.from_numpy(ids).to(q_reps.device)
        if exclude is not None:
            read = torch.cat([read, torch.from_numpy(exclude.reshape(len(ids), -1)).to(read)], 1)
        was_read = torch.zeros_like(scores).scatter_add_(  # missing (-1) blocks add nothing
            1, read.clamp(min=0), (read >= 0).to(scores.dtype)) > 0
        return torch.logsumexp(scores.masked_fill(was_read, float("-inf")), dim=1, keepdim=True)

    @staticmethod
    def _block_popularity(q_reps: torch.Tensor, retrieved: torch.Tensor, own: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
        """``mean_{x' != x} f(x', z)``: each retrieved block's score for the batch's other queries.

        Subtracted from ``f(x, z)`` in the retriever's ranking (``centered``), it ranks with the
        other queries' mean taken out of ``x``'s query: a block gains nothing by pointing where
        every query points (a hub), and raising a block for its own query lowers it a little for
        the others.

        Args:
            own: ``f(x, z)`` of each query's own blocks, ``[B, k]`` (the step's scores).

        Returns:
            ``[B, k]``; 0 where a block is missing, or with a single query.
        """
        n, k, dim = retrieved.shape
        if n < 2:
            return torch.zeros(n, k, dtype=q_reps.dtype, device=q_reps.device)
        cross = q_reps @ retrieved.reshape(n * k, dim).T  # [B, B * k]
        others = (cross.sum(0).view(n, k) - own) / (n - 1)
        return others.masked_fill(~valid, 0.0)

    @staticmethod
    def _with_batch_negatives(q_reps: torch.Tensor, retrieved: torch.Tensor, valid: torch.Tensor,
                              target: torch.Tensor, null_target: torch.Tensor,
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query ranks its own k blocks and the batch's other ``(B - 1) k`` retrieved blocks
        (``in_batch``): those were not read for it, so they count as the null document
        (``log p(y|null, x)``). The blocks that read better than nothing are pulled up against
        all the rest, as in-batch negatives do for ICT; no block gains by scoring high for every
        query.

        Returns:
            ``(scores, target)``, both ``[B, B * k]``: query ``b``'s own blocks at columns
            ``b * k .. b * k + k - 1``; missing blocks at -1e4.
        """
        n, k, dim = retrieved.shape
        scores = q_reps @ retrieved.reshape(n * k, dim).T  # [B, B * k]
        scores = scores.masked_fill(~valid.reshape(1, n * k), -1e4)
        own = torch.block_diag(*[torch.ones(1, k, dtype=torch.bool, device=scores.device)] * n)
        full_target = null_target.expand(n, n * k).clone()  # [B, B * k]
        full_target[own] = target.reshape(-1)
        return scores, full_target

    def _read_own_blocks(self, batch: MLMBatch) -> REALMOutput:
        """The reading warm-up's forward (``source_only``).

        Each example is read three times: beside its own (unmasked) source block, where the
        masked span can be found and copied; beside another block drawn at random, where it
        cannot; and beside the null document (an empty block), as in every pretraining batch.
        The loss, ``-log p(y|own, x) - w log p(y|other, x) - log p(y|null, x)`` (batch mean,
        ``w`` = ``other_weight``; at 0 the other read is skipped), teaches the reader to copy
        from a block that matches the query and to fall back on the query alone otherwise; a
        reader taught only to copy trusts every block, and wrong retrieved blocks then cost it
        more than the null document. Reading the null document here too makes the retrieval
        utility of pretraining a comparison with a reader that knows what "no document" means.
        The other block is a function of the batch (resumes reproduce it).
        """
        device = next(self.parameters()).device
        cls_id, sep_id, pad_id = self.special
        own = batch.block_ids.numpy()
        n_blocks = len(self.store)
        other = np.random.default_rng([int(b) for b in own]).integers(0, n_blocks - 1, len(own))
        other = other + (other >= own)  # never the own block
        ids = np.stack([own, other], axis=1) if self.other_weight else own[:, None]  # [B, 1|2]
        joined = build_joined_inputs(
            batch.query_ids, [[self.store.title_ids(int(b)) for b in row] for row in ids],
            [[self.store.body_ids(int(b)) for b in row] for row in ids], cls_id, sep_id, pad_id,
            max_length=self.max_joined_tokens, mask_positions=batch.mask_positions,
            append_null=True)
        out = self.encoder(joined.input_ids.to(device), joined.attention_mask.to(device),
                           joined.token_type_ids.to(device), joined.mask_positions.to(device),
                           labels=batch.target_ids.to(device),
                           label_mask=batch.target_mask.to(device))
        log_p_y = out.log_probs_of_targets  # [B, 2|3]: own block (, other block), null
        # p(z|x) puts everything on the own block: accuracy is the reading accuracy
        log_p_z = torch.tensor([0.0] + [-1e4] * ids.shape[1], device=device).expand_as(log_p_y)
        weights = torch.tensor([1.0] + [self.other_weight] * (ids.shape[1] - 1) + [1.0],
                               device=device)  # own (, other), null
        predictions, null_predictions = self.encoder.predictions(out, log_p_z)
        return REALMOutput(retrieval_logits=log_p_z, log_p_y_given_z=log_p_y,
                           mlm_logits=out.logits, block_ids=torch.from_numpy(ids),
                           log_p_z=log_p_z, loss=-(log_p_y * weights).sum(dim=1).mean(),
                           reading_warmup=True, predictions=predictions.cpu(),
                           null_predictions=null_predictions.cpu())


@dataclass
class Assembled:
    """A step's inputs for its retrieved blocks (:meth:`REALM.assemble`)."""

    blocks: Any  # EncoderInputs of the B * k blocks + the null document (last)
    joined: Any  # JoinedInputs: B * (k + 1) query-block sequences


@dataclass
class Prefetched:
    """A batch's retrieval done ahead of its step (:class:`RetrievalPrefetch`)."""

    found: SearchResult
    assembled: Optional[Assembled]  # None with re-ranking (it needs the step's encoder)
    seconds: float  # on the prefetch thread


class RetrievalPrefetch:
    """Search and input assembly for the next batch on a background thread, during this step.

    The training core calls ``submit(model, next_batch)`` after the step's swap and before its
    forward. One worker thread then (1) copies the query encoder's weights into a private copy,
    while the step's forward reads the same weights; the step waits for that copy
    (:meth:`wait_for_copy`, called after its forward) before its backward and optimizer update
    change them; (2) embeds the next batch's queries with the copy (eval mode: no dropout; the
    step's autocast), searches the generation in use, and assembles the block and joined inputs
    (not with re-ranking, which needs the next step's document encoder). The next step's
    ``take(batch)`` waits for the result.

    Which weights search: batch t + 1 is searched with the query encoder of step t, one
    optimizer step older than the weights that embed its queries for the scores that get the
    gradient (inline, without prefetch, the search uses those same-step weights, with dropout).
    REALM's index is already many steps stale, so one step more is small beside it. A batch with
    nothing prefetched (the first of a run, of an epoch, of a resumed run) is searched inline.
    The searcher must be local to the process: a sharded search is a collective and is refused.
    """

    def __init__(self, searcher: Searcher, autocast: Optional[Callable[[], Any]] = None):
        if getattr(searcher, "collective", False):
            raise ValueError("pretrain.prefetch searches on a background thread; a sharded search "
                             "(index.sharding=ranks) is a collective every process calls in "
                             "step: use one or the other")
        self.searcher = searcher
        self.autocast = autocast
        self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix="realm-prefetch")
        self._copy: Optional[nn.Module] = None  # used by one job at a time (one worker)
        # (batch, future, weights copied), oldest first: the batch about to be read, the next
        self._pending: list[tuple[MLMBatch, Any, threading.Event]] = []
        self.waited_s = self.last_wait_s = 0.0  # training-thread time waiting for the thread
        self.work_s = 0.0  # prefetch-thread time
        self.hits = self.misses = 0

    def _snapshot(self, live: nn.Module) -> nn.Module:
        import copy

        if self._copy is None:
            self._copy = copy.deepcopy(live).eval().requires_grad_(False)
        else:
            with torch.no_grad():
                for mine, theirs in zip(self._copy.state_dict().values(),
                                        live.state_dict().values()):
                    mine.copy_(theirs)
        return self._copy

    def submit(self, model: "REALM", batch: MLMBatch) -> None:
        """Start the batch's retrieval (after the current batch's, which the step takes next;
        older unclaimed ones are dropped)."""
        model = getattr(model, "module", model)
        while len(self._pending) > 1:
            self._drop(self._pending.pop(0))
        copied = threading.Event()
        job = self._pool.submit(self._work, model, batch, copied)
        self._pending.append((batch, job, copied))

    def wait_for_copy(self) -> None:
        """Block until every submitted job holds its copy of the weights (before they change)."""
        t0 = time.perf_counter()
        for _, _, copied in self._pending:
            copied.wait()
        self.waited_s += time.perf_counter() - t0

    def _work(self, model: "REALM", batch: MLMBatch, copied: threading.Event) -> Prefetched:
        t0 = time.perf_counter()
        try:
            query_encoder = self._snapshot(model.retriever.query_encoder)
        finally:
            copied.set()
        cls_id, sep_id, pad_id = model.special
        device = next(query_encoder.parameters()).device
        q_in = build_query_inputs(batch.query_ids, cls_id, sep_id, pad_id,
                                  max_length=model.max_query_tokens + 2)
        with torch.no_grad(), (self.autocast() if self.autocast else contextlib.nullcontext()):
            q_reps = query_encoder(*(t.to(device) for t in q_in))
        found = model.search(batch, q_reps, self.searcher)
        assembled = (None if model.rerank_candidates > model.k
                     else model.assemble(batch, found.block_ids))
        return Prefetched(found, assembled, time.perf_counter() - t0)

    def take(self, batch: MLMBatch) -> Optional[Prefetched]:
        """The prefetched retrieval of ``batch`` (waiting for it), or None if it was not."""
        mine = next((i for i, entry in enumerate(self._pending) if entry[0] is batch), None)
        if mine is None:
            self.misses += 1
            self.last_wait_s = 0.0
            return None
        for entry in self._pending[:mine]:  # submitted before it and never claimed
            self._drop(entry)
        job = self._pending[mine][1]
        del self._pending[: mine + 1]
        t0 = time.perf_counter()
        result = job.result()
        self.last_wait_s = time.perf_counter() - t0
        self.waited_s += self.last_wait_s
        self.work_s += result.seconds
        self.hits += 1
        return result

    def summary(self) -> dict[str, Any]:
        """Batches prefetched / searched inline, and seconds per prefetched batch: the
        training thread's wait and the prefetch thread's work (what the overlap hid)."""
        n = max(1, self.hits)
        return {"hits": self.hits, "misses": self.misses,
                "wait_s_per_batch": round(self.waited_s / n, 5),
                "work_s_per_batch": round(self.work_s / n, 5)}

    @staticmethod
    def _drop(entry: tuple[MLMBatch, Any, threading.Event]) -> None:
        entry[1].cancel()
        try:
            entry[1].result()
        except futures.CancelledError:
            entry[2].set()  # (never started: nothing to copy)
        except Exception:  # noqa: BLE001 (an unclaimed batch's failure is nobody's)
            pass

    def close(self) -> None:
        for entry in self._pending:
            self._drop(entry)
        self._pending = []
        self._pool.shutdown(wait=True)


def marginal_predictions(out: REALMOutput) -> torch.Tensor:
    """``argmax_y Σ_z p(z|x) p(y_j|z, x)`` at each masked position, ``[B, max_masked]`` (CPU):
    computed in the forward (:meth:`KnowledgeAugmentedEncoder.predictions`)."""
    return out.predictions.cpu()


def _token_accuracy(predicted: torch.Tensor, batch: MLMBatch) -> float:
    hits = (predicted == batch.target_ids) & batch.target_mask
    return float(hits.sum() / batch.target_mask.sum().clamp(min=1))


def marginal_token_accuracy(out: REALMOutput, batch: MLMBatch) -> float:
    """Accuracy of :func:`marginal_predictions` on the masked tokens."""
    return _token_accuracy(marginal_predictions(out), batch)


def realm_metrics(out: REALMOutput, batch: MLMBatch) -> dict[str, float]:
    """Loss, masked accuracy, retrieval utility (expected, top-1, by label), p(null), entropy,
    and the loss and masked accuracy of the same reader beside the null document alone.

    With nothing retrieved (the null-only control, k = 0) only loss and accuracy are reported;
    the reading warm-up (no null document) adds how much better its own block reads than another.
    """
    with torch.no_grad():
        metrics = {"loss": float(out.loss), "masked_accuracy": marginal_token_accuracy(out, batch),
                   "fallback_examples": float(batch.n_fallback)}
        if out.block_ids.shape[1] == 0:
            return metrics
        if out.reading_warmup:  # nats the own block (and another) gives over the null document
            read = out.log_p_y_given_z.float()  # [B, 2|3]: own (, other), null
            metrics["own_over_null"] = float((read[:, 0] - read[:, -1]).mean())
            metrics["loss_null"] = float(-read[:, -1].mean())
            if read.shape[1] == 3:
                metrics["own_over_other"] = float((read[:, 0] - read[:, 1]).mean())
                metrics["other_over_null"] = float((read[:, 1] - read[:, -1]).mean())
            return metrics
        ru = retrieval_utility(out.log_p_y_given_z)  # [B, k]
        ru_exp = expected_retrieval_utility(ru, out.log_p_z)  # [B]
        metrics.update({
            # the same reader on the same examples beside the null document alone: what the
            # null-only control would score here (paired, so the gap is retrieval's alone)
            "loss_null": float(-out.log_p_y_given_z[:, -1].float().mean()),
            "masked_accuracy_null": _token_accuracy(out.null_predictions, batch),
            "ru_expected": float(ru_exp.mean()),
            "ru_top1": float(top1_retrieval_utility(ru, out.retrieval_logits).mean()),
            "p_null": float(null_probability(out.log_p_z).mean()),
            "retrieval_entropy": float(retrieval_entropy(out.log_p_z).mean()),
        })
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
    """

    def __init__(self, dataset: MLMDataset, searcher: Searcher,
                 prefetcher: Optional[RetrievalPrefetch] = None):
        self.dataset = dataset
        self.searcher = searcher
        self.prefetcher = prefetcher
        # the training core calls it with the next batch before each step (None: no lookahead)
        self.prefetch = prefetcher.submit if prefetcher is not None else None
        self.last: Optional[tuple[REALMOutput, MLMBatch]] = None  # for the examples table

    def train_dataset(self) -> MLMDataset:
        return self.dataset

    def collate(self, examples) -> MLMBatch:
        return collate_mlm(examples)

    def loss(self, model: nn.Module, batch: MLMBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        prefetched = self.prefetcher.take(batch) if self.prefetcher is not None else None
        out = model(batch, self.searcher, prefetched)
        if self.prefetcher is not None:  # the next batch's copy of the weights is taken
            self.prefetcher.wait_for_copy()  # before backward and the optimizer change them
        self.last = (dataclasses.replace(  # (the logits are not kept: the predictions are)
            out, mlm_logits=None, log_p_z=out.log_p_z.detach(), loss=None,
            log_p_y_given_z=out.log_p_y_given_z.detach(),
            retrieval_logits=out.retrieval_logits.detach()), batch)
        metrics = realm_metrics(out, batch)
        changed = getattr(model, "module", model).rerank_changed
        if changed is not None:  # how much of the stale index's top k re-ranking replaced
            metrics["rerank_changed"] = changed
        if self.prefetcher is not None:  # the training thread's wait for the prefetch thread
            metrics["prefetch/hit"] = float(prefetched is not None)
            metrics["prefetch/wait_s"] = self.prefetcher.last_wait_s
        return out.loss, metrics

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}


# ---------------------------------------------------------------------------------------------
# Examples table (wandb when enabled, the metrics JSONL always)


class ExampleTable:
    """A training-core hook that logs a few examples every ``every`` steps (main process).

    Columns: the masked query, the gold span, the retrieved titles with ``p(z|x)`` (the null
    document as ``∅``), and the marginal prediction at the masked positions.
    """

    COLUMNS = ["step", "masked_text", "gold", "retrieved", "prediction", "p_null"]

    def __init__(self, task: "PretrainTask", tracker, tokenizer, store: BlockStore, every: int,
                 n: int = 4):
        self.task, self.tracker, self.tokenizer, self.store = task, tracker, tokenizer, store
        self.every, self.n = every, n

    def after_step(self, step: int, model: nn.Module) -> None:
        if not self.every or step % self.every or self.task.last is None:
            return
        self.tracker.log_table("examples", self.COLUMNS, self.rows(step), step=step)

    def rows(self, step: int) -> list[list[Any]]:
        out, batch = self.task.last
        decode = self.tokenizer.decode
        predicted = marginal_predictions(out)  # [B, M]
        p_z = out.log_p_z.exp().cpu()  # [B, k + 1]
        rows = []
        for i in range(min(self.n, len(batch.query_ids))):
            keep = batch.target_mask[i]
            retrieved = [f"{self.store.title(int(b))} ({float(p):.3f})"
                         for b, p in zip(out.block_ids[i].tolist(), p_z[i, :-1].tolist()) if b >= 0]
            retrieved.append(f"∅ ({float(p_z[i, -1]):.3f})")
            rows.append([step, decode(batch.query_ids[i].tolist()),
                         decode(batch.target_ids[i][keep].tolist()), " | ".join(retrieved),
                         decode(predicted[i][keep].tolist()),
                         round(float(p_z[i, -1]), 4)])
        return rows


# ---------------------------------------------------------------------------------------------
# The stage: prepare (corpus, small encoder, MLM adaptation, ICT warm start; realm.prepare), then
# train beside the refresher


class FirstGenerationCache:
    """Generation 0 of a fresh run, reused across runs that start from the same retriever.

    Every run that starts from one warm-started retriever on one corpus would otherwise wait for
    the refresher to embed the whole corpus before its first step. The first such run saves the
    embeddings of its generation 0 (encoder step 0) under ``path``; later fresh runs commit them as
    their own generation 0 before the refresher starts (exact indexes only: others would need
    their trained index too). A training-core hook (main process).

    Args:
        path: The cache file (``.npy``, float16 ``[n_blocks, dim]``).
        watcher: The trainer's index watcher (its generation in use).
    """

    def __init__(self, path: str, watcher):
        self.path, self.watcher = path, watcher

    @staticmethod
    def key_path(cache_dir: str, retriever_dir: str, corpus_fingerprint: str, config) -> str:
        from realm.fsutil import sha256_file

        key = _digest([sha256_file(os.path.join(retriever_dir, "manifest.json")),
                       corpus_fingerprint, config.retriever.max_block_tokens,
                       config.refresh.precision, config.refresh.device])
        return os.path.join(cache_dir, f"gen0-{key}.npy")

    def seed(self, store, corpus_fingerprint: str, factory: str) -> bool:
        """Commit the cached embeddings as generation 0 of a run that has no index yet."""
        if factory != "Flat" or not os.path.exists(self.path) or store.read_latest() is not None:
            return False
        embeddings = np.load(self.path)
        store.commit_generation(embeddings, encoder_step=0, corpus_fingerprint=corpus_fingerprint,
                                factory=factory, extra={"seeded_from": self.path})
        logger.info("generation 0 from the cache %s (no wait for the refresher)", self.path)
        return True

    def after_step(self, step: int, model: nn.Module) -> None:
        current = self.watcher.current
        if (os.path.exists(self.path) or current is None or current.encoder_step != 0
                or current.embeddings is None or current.shard is not None):
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}.npy"
        np.save(tmp, current.embeddings)
        os.replace(tmp, self.path)  # complete or absent
        logger.info("cached generation 0 in %s", self.path)


def _null_searcher(queries: np.ndarray, k: int, exclude) -> SearchResult:
    """The control run's "index": nothing retrieved, so the null document is the only candidate."""
    empty = np.zeros((len(queries), 0))
    return SearchResult(scores=empty.astype(np.float32), block_ids=empty.astype(np.int64))


def run_pretrain(config, progress: bool = True) -> dict[str, Any]:
    """REALM pretraining beside an index refresher (see the module docstring).

    Prepares what is not given (the corpus, a truncated encoder, an ICT warm start; all cached),
    then trains with the shared core: the refresh hook publishes document-encoder snapshots every
    ``refresh.every_steps``, supervises the refresher and swaps in its generations between steps.

    Returns:
        The run's summary (steps, final loss, RU, generations swapped, staleness, seconds).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from realm.config import save_config
    from realm.index.embed import special_ids
    from realm.index.store import RunStore
    from realm.refresh.hook import RefreshHook
    from realm.tracking import Tracker, read_metrics
    from realm.training.core import (TrainSettings, checkpoints, cpu_threads, train,
                                     training_precision)
    from realm.training.ict import _shutdown, check_tokenizer

    from realm.refresh.supervisor import check_devices

    t0 = time.time()
    p, t, r = config.pretrain, config.train, config.retriever
    check_devices(config.refresh.devices)  # (before minutes of preparation)
    corpus_dir = prepare_corpus(config, progress)
    for path in (corpus_dir, p.examples):  # a bad corpus is named now, not after the warm starts
        if path:
            BlockStore(path)
    encoder_name = prepare_encoder(config)
    retriever_dir = prepare_retriever(config, corpus_dir, encoder_name)
    reader_start = prepare_adapted_encoder(config, corpus_dir, p.reader or encoder_name)
    reader_name = prepare_reader(config, p.reader_warmup_examples or p.examples or corpus_dir,
                                 reader_start, retriever_dir)
    config = dataclasses.replace(
        # the resolved config starts from the warmed-up reader, warm-up done (relaunchable as is)
        config, pretrain=dataclasses.replace(p, corpus=corpus_dir, retriever=retriever_dir,
                                             reader=reader_name, reader_warmup_steps=0,
                                             mlm_steps=0),
        refresh=dataclasses.replace(config.refresh, corpus=corpus_dir))
    p = config.pretrain
    prepare_s = time.time() - t0

    use_cpu = not torch.cuda.is_available()
    precision = training_precision(t.precision, torch.device("cpu" if use_cpu else "cuda"))
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision or "no",
                              gradient_accumulation_steps=t.grad_accum)
    is_main = accelerator.is_main_process
    set_seed(config.seed)
    store = BlockStore(corpus_dir)
    examples_store = BlockStore(p.examples) if p.examples else store
    retriever = Retriever.from_pretrained(retriever_dir)
    check_tokenizer(retriever.tokenizer, store)
    check_tokenizer(retriever.tokenizer, examples_store)
    encoder = load_ka_encoder(reader_name)
    if encoder.tokenizer is not None:  # (a reader of another vocabulary reads nonsense)
        check_tokenizer(encoder.tokenizer, store, what=f"reader {reader_name!r}")
    if p.source_only:
        retriever.requires_grad_(False)  # the reading warm-up reads without it
    model = REALM(retriever, encoder, store, special_ids(retriever.tokenizer),
                  k=0 if p.null_only else p.k, max_query_tokens=r.max_query_tokens,
                  max_block_tokens=r.max_block_tokens, max_joined_tokens=p.max_joined_tokens,
                  exclude_source=examples_store is store and not p.source_only,
                  source_only=p.source_only, other_weight=p.reader_warmup_other_weight,
                  retriever_signal=p.retriever_signal, min_ru=p.retriever_min_ru,
                  freeze_reader=p.reader_lr_scale == 0 and not p.source_only,
                  marginal=p.marginal, vocab_chunk=p.vocab_chunk,
                  rerank_candidates=p.rerank_candidates)
    if p.gradient_checkpointing:
        encoder.mlm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    dataset = MLMDataset(examples_store, retriever.tokenizer.mask_token_id, masking=p.masking,
                         block_ids=mlm_blocks(examples_store, p.spanless_blocks == "skip"),
                         max_query_tokens=r.max_query_tokens, seed=config.seed)
    if accelerator.is_main_process:
        save_config(config, t.run_dir)
    accelerator.wait_for_everyone()
    hook = None
    searcher: Searcher = _null_searcher
    if not (p.null_only or p.source_only):
        hook = RefreshHook.from_config(
            config, accelerator, model, lambda m: accelerator.unwrap_model(m).retriever,
            corpus_fingerprint=store.fingerprint, dim=retriever.dim,
            cpu_threads=cpu_threads(t.threads), publish_after=p.retriever_hold_steps)
        searcher = hook.searcher(accelerator)
        first = FirstGenerationCache(
            FirstGenerationCache.key_path(p.cache_dir, retriever_dir, store.fingerprint, config),
            hook.watcher)
        if accelerator.is_main_process and not checkpoints(t.run_dir):
            first.seed(RunStore(t.run_dir), store.fingerprint, config.index.factory)
        accelerator.wait_for_everyone()
    prefetcher = (RetrievalPrefetch(searcher, accelerator.autocast)
                  if p.prefetch and not (p.null_only or p.source_only) else None)
    task = PretrainTask(dataset, searcher, prefetcher)
    tracker = Tracker.from_config(config, enabled=accelerator.is_main_process)
    hooks: list[Any] = [hook] if hook else []
    if hook is not None and accelerator.is_main_process:
        hooks.append(first)
    if accelerator.is_main_process and p.table_every:
        hooks.append(ExampleTable(task, tracker, retriever.tokenizer, store, p.table_every))
    if accelerator.is_main_process and config.logging.report_every:
        from realm.report import ReportHook

        hooks.append(ReportHook(t.run_dir, config.logging.report_every))
    settings = TrainSettings.from_config(
        config, progress, eval_every=0,
        lr_scales={"retriever.": p.retriever_lr_scale, "encoder.": p.reader_lr_scale},
        lr_holds={"retriever.": p.retriever_hold_steps},
        betas={"retriever.": (p.retriever_momentum, 0.999)} if p.retriever_momentum != 0.9 else None)
    world_size = accelerator.num_processes
    finished = False
    prefetch_stats = None
    try:
        result = train(model, task, settings, accelerator, tracker, hooks=hooks,
                       config_dict=config.to_dict())
        finished = True
        if accelerator.is_main_process:
            meta = {"stage": "pretrain", "steps": result["steps"]}
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.retriever.save_pretrained(os.path.join(t.run_dir, "retriever"),
                                                overwrite=True, metadata=meta)
            unwrapped.encoder.save_pretrained(os.path.join(t.run_dir, "encoder"),
                                              overwrite=True, metadata=meta)
        accelerator.wait_for_everyone()
    finally:
        if prefetcher is not None:
            prefetcher.close()
            prefetch_stats = prefetcher.summary()
        if hook is not None:
            hook.close(finished=finished)
        tracker.close()
        del model, task, hooks, prefetcher
        _shutdown(accelerator)
    # (not accelerator.is_main_process: after _shutdown that would start a new process group)
    if is_main and config.logging.report_every:  # the dashboard, with the last steps too
        from realm.report import ReportHook

        ReportHook(t.run_dir, config.logging.report_every).draw()
    records = read_metrics(t.run_dir) if is_main else []
    ru = [x["ru_expected"] for x in records if "ru_expected" in x]
    quarters = quarter_means(records, t.steps, {
        "ru": "ru_expected", "masked_accuracy": "masked_accuracy",
        "masked_accuracy_null": "masked_accuracy_null", "loss": "loss", "loss_null": "loss_null",
        "p_null": "p_null"})
    return {
        "stage": "pretrain", "run_dir": t.run_dir, "steps": result["steps"],
        # what the run read and started from, so both can be evaluated (launch/evaluate.py)
        "corpus": os.path.abspath(corpus_dir),
        "warm_start_retriever": os.path.abspath(retriever_dir),
        # a run resumed at its last step trains nothing: no loss (None, not NaN, in the JSON)
        "final_loss": round(result["final_loss"], 5) if np.isfinite(result["final_loss"]) else None,
        "final_masked_accuracy": next((round(x["masked_accuracy"], 4) for x in reversed(records)
                                       if "masked_accuracy" in x), None),
        "mean_ru": round(float(np.mean(ru)), 5) if ru else None,
        "final_ru": round(ru[-1], 5) if ru else None,
        **quarters,
        "generations_swapped": len(hook.generations_used) if hook else 0,
        "index_shards": hook.shards if hook else 0,
        **({"prefetch": prefetch_stats} if prefetch_stats else {}),
        "max_staleness_steps": hook.max_staleness_steps if hook else 0,
        "world_size": world_size, "precision": precision or "fp32",
        "examples_per_s": result["examples_per_s"], "resumed_from": result["resumed_from"],
        "prepare_s": round(prepare_s, 1), "seconds": round(time.time() - t0, 1),
    }


def quarter_means(records: list[dict[str, Any]], steps: int, keys: dict[str, str]
                  ) -> dict[str, Optional[float]]:
    """Means of logged metrics over the first and the last quarter of a run's steps.

    A record logged at step ``s`` summarises the steps since the one before, so it belongs to
    the first quarter when ``s <= steps / 4`` and to the last when ``s > 3 steps / 4``.

    Args:
        records: The run's metric records (each with ``step``).
        steps: The run's total steps.
        keys: Summary name -> metric name, e.g. ``{"ru": "ru_expected"}``.

    Returns:
        ``{NAME_first_quarter, NAME_last_quarter}`` for every key (None where nothing was
        logged), rounded to 5 digits.
    """
    out: dict[str, Optional[float]] = {}
    parts = {"first_quarter": lambda s: s <= steps / 4, "last_quarter": lambda s: s > 3 * steps / 4}
    for name, metric in keys.items():
        for part, inside in parts.items():
            values = [r[metric] for r in records if metric in r and inside(r["step"])]
            out[f"{name}_{part}"] = round(float(np.mean(values)), 5) if values else None
    return out


def main(argv=None, default_config: Optional[str] = None) -> int:
    """``launch/pretrain.py`` (default_config: the built-in tiny default) and the reading
    warm-up's process; see :data:`realm.cli.STAGES`."""
    from realm.cli import stage_main

    return stage_main("pretrain", argv, default_config)


if __name__ == "__main__":  # the reading warm-up's process (prepare_reader)
    raise SystemExit(main())
