"""The REALM model: a retriever (query + document encoder) and a reader, trained together.

One step, per masked example x (Guu et al. 2020; ``docs/pretraining.md``)::

    q = Embed_input(x)                                   current parameters
    top-k = MIPS(q.detach(), index in use), source block excluded
    candidates = top-k + null document (an empty block), k + 1 of them
    f(x, z) = q . Embed_doc(z)                           re-scored with grad
    log p(y|z, x) = the reader's, e.g. sum_j log p(y_j | [CLS] x [SEP] z [SEP])   B * (k + 1)
    loss = -logsumexp_z(log_softmax_z f(x, z) + log p(y|z, x))

Candidates in, marginal out: :meth:`REALM.retrieve` finds the candidates and builds their inputs
(inline, or finishing a search the prefetch thread did ahead,
:class:`realm.training.prefetch.RetrievalPrefetch`); the reader is called only through the
:class:`~realm.modeling.readers.base.Reader` interface. The whole computation is one
``forward`` so that DDP (through accelerate) sees every parameter that takes part; the index
search runs inside it on detached query embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from realm.data.mlm import MLMBatch
from realm.data.store import BlockStore
from realm.index.mips import SearchResult
from realm.index.sharded import merge_top_k
from realm.losses import pdist_loss, realm_marginal_loss, realm_token_marginal_loss
from realm.modeling.inputs import EncoderInputs, build_block_inputs, build_query_inputs
from realm.modeling.modes import eval_mode
from realm.modeling.readers.base import Reader
from realm.modeling.retriever import Retriever

#: How the retriever learns from the masked-LM signal (see :class:`REALM`).
RETRIEVER_SIGNALS = ("marginal", "relative", "positive", "pdist")
#: The retriever's target as the reader gives it, or shuffled among the blocks (a control).
SIGNAL_CONTROLS = ("none", "shuffled")

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
    predictions: Optional[torch.Tensor] = None
    null_predictions: Optional[torch.Tensor] = None



@dataclass
class Assembled:
    """A step's inputs for its retrieved blocks (:meth:`REALM.assemble`).

    Attributes:
        blocks: The ``B * k`` blocks and the null document (last) for the document encoder,
            ``[B * k + 1, seq_len]`` each.
        reader_inputs: The reader's inputs for the ``B * (k + 1)`` candidates
            (:meth:`Reader.build_inputs`; the masked-LM reader's ``JoinedInputs``).
    """

    blocks: EncoderInputs
    reader_inputs: Any


@dataclass
class Retrieved:
    """A batch's candidates: the search (``[B, k]`` ids, or ``[B, L]`` before re-ranking) and,
    when known, their inputs (None until re-ranking has chosen the k)."""

    found: SearchResult
    assembled: Optional[Assembled]


class REALM(nn.Module):
    """Retriever (query + document encoder) and reader, trained together.

    Args:
        retriever: Query and document encoders.
        encoder: The reader (:class:`~realm.modeling.readers.base.Reader`; the
            knowledge-augmented masked LM, :class:`~realm.modeling.readers.mlm.
            KnowledgeAugmentedEncoder`), called only through its interface.
        store: The block store the index covers (blocks are read from it by id).
        special: ``(cls_id, sep_id, pad_id)``.
        k: Retrieved blocks per example (the null document comes on top).
        max_query_tokens, max_block_tokens, max_joined_tokens: Word pieces kept.
        exclude_source: Leave each example's source block out of its retrieval (the examples
            come from ``store``); False when they come from another corpus.
        retriever_signal: ``marginal`` (REALM): the retriever's gradient is that of the marginal
            loss over the ``k + 1`` candidates. ``relative``: the reader's gradient is the same,
            but the retriever learns only how the ``k`` retrieved blocks rank against each other
            (the marginal over them alone, ``p(y|z, x)`` held fixed); the null document's score
            gets no gradient. ``positive``: as ``relative``, with ``log p(y|z, x)`` floored at
            the null document's (a block that hurts ranks like one that does nothing; with
            ``min_ru`` > 0, so does one whose retrieval utility is at most ``min_ru``; an example
            none of whose blocks reads better than that gives the retriever no gradient).
            ``pdist`` (Atlas's perplexity distillation): the retriever's distribution over the
            ``k`` blocks is pulled toward the reader's length-normalised posterior
            (:func:`realm.losses.pdist_loss`, temperature ``pdist_temperature``).
            The loss value is REALM's in every case; in every signal but ``marginal`` the
            retriever's target ``p(y|z, x)`` is detached (EMDR2-style), so a reader that trains
            learns from the marginal alone.
        freeze_reader: The reader does not train (no gradient, eval mode):
            the retriever learns from a fixed reader.
        marginal: ``example`` (the paper): ``-log Σ_z p(z|x) p(y|z, x)`` with ``p(y|z, x)`` the
            product over the masked tokens. ``token`` (the released REALM code): the marginal
            per masked token, averaged over the batch's tokens
            (:func:`realm.losses.realm_token_marginal_loss`).
        vocab_chunk: The reader scores the targets over its vocabulary in chunks of this many
            words (:attr:`Reader.vocab_chunk`); 0: the logits.
        rerank_candidates: Retrieve this many blocks (>= k) from the (stale) index, re-embed
            them with the current document encoder (no gradient) and keep the best k by the
            fresh scores (Atlas's ``retrieve_with_rerank``); 0: the index's top k as they are.
        pdist_temperature: ``τ`` of ``pdist``'s reader posterior.
        signal_control: ``none``, or ``shuffled``: the control in which the retriever's target
            ``p(y|z, x)`` is permuted at random among each example's retrieved blocks (the
            same steps and loss, without the reader's information); the reader's loss is not.
        seed: Seeds the control's permutations.
    """

    def __init__(self, retriever: Retriever, encoder: Reader,
                 store: BlockStore, special: tuple[int, int, int], k: int = 8,
                 max_query_tokens: int = 64, max_block_tokens: int = 288,
                 max_joined_tokens: int = 352, exclude_source: bool = True,
                 retriever_signal: str = "marginal", min_ru: float = 0.0,
                 freeze_reader: bool = False, marginal: str = "example", vocab_chunk: int = 0,
                 rerank_candidates: int = 0, pdist_temperature: float = 1.0,
                 signal_control: str = "none", seed: int = 0):
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
        self.retriever_signal = retriever_signal
        self.min_ru = min_ru
        if signal_control not in SIGNAL_CONTROLS:
            raise ValueError(f"signal_control must be one of {SIGNAL_CONTROLS}, got "
                             f"{signal_control!r}")
        self.signal_control = signal_control
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.pdist_temperature = pdist_temperature
        self.freeze_reader = freeze_reader
        if freeze_reader:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @torch.no_grad()
    def _rerank(self, found: SearchResult, q_reps: torch.Tensor, device) -> SearchResult:
        """The best k of the L searched blocks ``[B, L]`` by the current document encoder's
        scores against the detached queries ``[B, dim]``: ``[B, k]``."""
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

    def assemble(self, batch: MLMBatch, ids: np.ndarray) -> Assembled:
        """The step's inputs for the retrieved ``ids`` ``[B, k]`` (-1: none): the k blocks and
        the null document for the document encoder, and the reader's inputs for the
        B * (k + 1) candidates (:meth:`Reader.build_inputs`; no parameters read)."""
        cls_id, sep_id, pad_id = self.special
        empty = np.zeros(0, np.int64)
        titles, bodies = self._texts(ids)
        flat_t = [t for row in titles for t in row] + [empty]  # the null block last, once
        flat_b = [b for row in bodies for b in row] + [empty]
        blocks = build_block_inputs(flat_t, flat_b, cls_id, sep_id, pad_id,
                                    max_length=self.max_block_tokens + 3)
        reader_inputs = self.encoder.build_inputs(batch, titles, bodies, self.special,
                                                  self.max_joined_tokens, block_ids=ids)
        return Assembled(blocks, reader_inputs)

    def retrieve(self, batch: MLMBatch, q_reps: torch.Tensor, searcher: Optional[Searcher],
                 prefetched: Optional[Retrieved] = None, *, rerank: bool = True) -> Retrieved:
        """The batch's candidates and their inputs, for both paths: inline (the step) and ahead
        (the prefetch thread, :class:`realm.training.prefetch.RetrievalPrefetch`).

        Searches the index (:meth:`search`) unless ``prefetched`` holds the search; with
        ``rerank_candidates``, keeps the best k by the current document encoder
        (:meth:`_rerank`); then assembles the inputs unless ``prefetched`` holds them.

        Args:
            batch: The masked examples.
            q_reps: Their query embeddings, ``[B, dim]`` (the search reads them detached).
            searcher: The index search (unused when ``prefetched``).
            prefetched: The search (and, without re-ranking, the inputs) done ahead; None:
                search here.
            rerank: False ahead of the step: re-ranking needs the step's document encoder, so
                a re-ranking model's search is returned as it is, without inputs.

        Returns:
            :class:`Retrieved` with ``[B, k]`` block ids (-1 where the index had fewer) and
            their :class:`Assembled` inputs (``assembled`` None only when ``rerank`` is False
            and re-ranking is on: ``[B, L]`` ids then).
        """
        if prefetched is not None:
            found, assembled = prefetched.found, prefetched.assembled
        else:
            found, assembled = self.search(batch, q_reps, searcher), None
        if self.rerank_candidates > self.k:
            if not rerank:
                return Retrieved(found, None)
            found = self._rerank(found, q_reps.detach(), q_reps.device)
            assembled = None  # (the re-ranked blocks are known only now)
        if assembled is None:
            assembled = self.assemble(batch, found.block_ids)
        return Retrieved(found, assembled)

    def shuffle(self, log_p_y: torch.Tensor, token_log_probs: torch.Tensor, valid: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The shuffled-signal control: ``log p(y|z, x)`` ``[B, k + 1]`` (and its tokens'
        ``[B, k + 1, M]``) permuted at random among each example's found blocks (``valid``
        ``[B, k]``, found ones first); the null document keeps its own."""
        n, k = valid.shape
        keys = torch.rand(n, k, generator=self.shuffle_generator).to(valid.device)
        order = torch.argsort(keys.masked_fill(~valid, 2.0), dim=1)  # found blocks among selves
        order = torch.cat([order, torch.full((n, 1), k, device=valid.device)], dim=1)  # [B, k+1]
        return (log_p_y.gather(1, order),
                token_log_probs.gather(1, order[:, :, None].expand_as(token_log_probs)))

    def forward(self, batch: MLMBatch, searcher: Searcher,
                prefetched: Optional[Retrieved] = None) -> REALMOutput:
        """One step's loss. ``prefetched``: the batch's search (and, without re-ranking, its
        assembled inputs) done ahead by :class:`realm.training.prefetch.RetrievalPrefetch`;
        None searches here."""
        device = next(self.parameters()).device
        cls_id, sep_id, pad_id = self.special
        n = len(batch.query_ids)
        # 1. query embeddings with the current parameters; the search uses them detached
        q_in = build_query_inputs(batch.query_ids, cls_id, sep_id, pad_id,
                                  max_length=self.max_query_tokens + 2)
        q_reps = self.retriever.encode_queries(*(t.to(device) for t in q_in)).q_reps  # [B, dim]
        retrieved = self.retrieve(batch, q_reps, searcher, prefetched)
        assembled = retrieved.assembled
        ids = retrieved.found.block_ids  # [B, k], -1 where the index had fewer
        valid = torch.from_numpy(ids >= 0).to(device)  # [B, k]
        # 2. the k retrieved blocks + the null document, re-scored with grad
        p_reps = self.retriever.encode_blocks(*(t.to(device) for t in assembled.blocks)).p_reps
        dim = p_reps.shape[-1]
        blocks = p_reps[:-1].view(n, self.k, dim)  # [B, k, dim]
        null = p_reps[-1]  # [dim]
        scores = torch.einsum("bd,bkd->bk", q_reps, blocks)  # [B, k]
        scores = scores.masked_fill(~valid, -1e4)
        null_score = (q_reps @ null)[:, None]  # [B, 1]
        retrieval_logits = torch.cat([scores, null_score], dim=1)  # [B, k + 1], null last
        # 3. the reader over all B * (k + 1) candidates (one masked-LM pass for the MLM reader)
        out = self.encoder.read(assembled.reader_inputs, batch)
        log_p_y = out.log_p_y_given_z  # [B, k + 1]

        token_mask = (out.target_mask if out.target_mask is not None
                      else batch.target_mask).to(device)  # [B, M], in the reader's tokens

        def marginal_loss(logits: torch.Tensor, log_p_y: torch.Tensor, token_log_probs: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
            if self.marginal == "token":  # per masked token, averaged (the released code)
                return realm_token_marginal_loss(logits, token_log_probs, token_mask)
            return realm_marginal_loss(logits, log_p_y)  # per example (the paper)

        if self.k == 0 or (self.retriever_signal == "marginal" and self.signal_control == "none"):
            # REALM's joint gradient (k = 0: the null-only control)
            loss, log_p_z = marginal_loss(retrieval_logits, log_p_y, out.token_log_probs)
        else:
            # the reader sees p(z|x) as a constant; the retriever sees p(y|z, x) as one
            loss, log_p_z = marginal_loss(retrieval_logits.detach(), log_p_y, out.token_log_probs)
            target, token_target = log_p_y.detach(), out.token_log_probs.detach()
            if self.signal_control == "shuffled":  # the control: the reader's information gone
                target, token_target = self.shuffle(target, token_target, valid)
            if self.retriever_signal == "marginal":
                rank_loss, _ = marginal_loss(retrieval_logits, target, token_target)
            elif self.retriever_signal == "pdist":
                rank_loss = pdist_loss(scores, target[:, :-1], token_mask.sum(1), valid,
                                       self.pdist_temperature)
            else:  # relative, positive: only the k retrieved blocks rank, null held out
                blocks_target, null = target[:, :-1], target[:, -1:]
                if self.retriever_signal == "positive":  # hurting is nothing
                    blocks_target = torch.where(blocks_target - null > self.min_ru,
                                                blocks_target, null)
                rank_loss, _ = realm_marginal_loss(scores, blocks_target)
            loss = loss + (rank_loss - rank_loss.detach())  # the value stays REALM's
        predictions, null_predictions = self.encoder.predict(out, log_p_z.detach())
        return REALMOutput(retrieval_logits=retrieval_logits, log_p_y_given_z=log_p_y,
                           mlm_logits=out.logits, block_ids=torch.from_numpy(ids),
                           log_p_z=log_p_z, loss=loss, predictions=predictions.cpu(),
                           null_predictions=null_predictions.cpu())
