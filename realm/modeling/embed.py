"""Embed blocks and queries with a retriever: length-bucketed batches, no re-tokenization."""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from realm.data.store import BlockStore
from realm.precision import autocast
from realm.modeling.modes import eval_mode
from realm.modeling.retriever import Retriever
from realm.modeling.inputs import build_block_inputs, build_query_inputs, length_bucketed_batches

logger = logging.getLogger(__name__)


def special_ids(tokenizer) -> tuple[int, int, int]:
    """``(cls_id, sep_id, pad_id)`` of a BERT-style tokenizer. A decoder-only LM's tokenizer
    (no [CLS]/[SEP]) reads ``bos title eos body eos``: its begin-of-text token (else its
    end-of-text token) opens a sequence, its end-of-text token separates and closes it (last-token
    pooling reads that closing token, as DRAMA's), padding is its pad (else end-of-text) token."""
    ids = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    if ids[0] is None and ids[1] is None and eos is not None:
        bos = tokenizer.bos_token_id
        ids = (bos if bos is not None else eos, eos, ids[2] if ids[2] is not None else eos)
    if any(i is None for i in ids):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} lacks [CLS], [SEP] or [PAD]")
    return ids  # type: ignore[return-value]


@torch.no_grad()
def embed_blocks(
    retriever: Retriever,
    store: BlockStore,
    special: tuple[int, int, int],
    block_ids: Optional[Sequence[int]] = None,
    max_block_tokens: int = 288,
    max_tokens_per_batch: int = 16384,
    bf16: bool = False,
    progress: bool = True,
    log_every_s: float = 0.0,
) -> tuple[np.ndarray, dict[str, float]]:
    """Document-encoder embeddings of blocks, in the order of ``block_ids``.

    Batches hold blocks of similar length (sorted by length, capped at ``max_tokens_per_batch``
    padded tokens), so little compute is spent on padding.

    Args:
        log_every_s: Also log progress (blocks done, blocks/s) this often; 0: never.

    Returns:
        ``(embeddings [n, dim] float32, stats)`` with ``blocks_per_s`` and ``seconds``.
    """
    ids = np.arange(len(store)) if block_ids is None else np.asarray(block_ids, np.int64)
    lengths = np.minimum(store.lengths()[ids], max_block_tokens) + 3  # [CLS] [SEP] [SEP]
    device = next(retriever.parameters()).device
    out = np.zeros((len(ids), retriever.dim), dtype=np.float32)
    cls_id, sep_id, pad_id = special
    t0 = time.perf_counter()
    bar = tqdm(total=len(ids), desc="embed blocks", unit=" blocks", disable=not progress,
               mininterval=1.0)
    done, last_log = 0, t0
    with eval_mode(retriever):
        for batch in length_bucketed_batches(lengths, max_tokens=max_tokens_per_batch):
            rows = ids[batch]
            inputs = build_block_inputs([store.title_ids(int(i)) for i in rows],
                                        [store.body_ids(int(i)) for i in rows],
                                        cls_id, sep_id, pad_id, max_length=max_block_tokens + 3)
            with autocast(bf16, device):
                reps = retriever.encode_blocks(*(t.to(device) for t in inputs)).p_reps  # [b, d]
            out[batch] = reps.float().cpu().numpy()
            bar.update(len(batch))
            done += len(batch)
            if log_every_s and time.perf_counter() - last_log >= log_every_s:
                last_log = time.perf_counter()
                logger.info("embedded %d/%d blocks (%.1f blocks/s)", done, len(ids),
                            done / (last_log - t0))
    bar.close()
    seconds = time.perf_counter() - t0
    return out, {"blocks_per_s": len(ids) / max(seconds, 1e-9), "seconds": seconds}


@torch.no_grad()
def embed_queries(
    retriever: Retriever,
    queries: Sequence[Sequence[int]],
    special: tuple[int, int, int],
    max_query_tokens: int = 64,
    batch_size: int = 128,
    bf16: bool = False,
) -> np.ndarray:
    """Query-encoder embeddings of pre-tokenized queries, ``[n, dim]`` float32."""
    device = next(retriever.parameters()).device
    cls_id, sep_id, pad_id = special
    lengths = np.array([min(len(q), max_query_tokens) + 2 for q in queries])
    out = np.zeros((len(queries), retriever.dim), dtype=np.float32)
    with eval_mode(retriever):
        for batch in length_bucketed_batches(lengths, batch_size):
            inputs = build_query_inputs([queries[i] for i in batch], cls_id, sep_id, pad_id,
                                        max_length=max_query_tokens + 2)
            with autocast(bf16, device):
                reps = retriever.encode_queries(*(t.to(device) for t in inputs)).q_reps
            out[batch] = reps.float().cpu().numpy()  # [b, dim]
    return out
