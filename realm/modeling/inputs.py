"""Encoder inputs built from pre-tokenized word pieces (no re-tokenization): blocks as
``[CLS] title [SEP] body [SEP]``, queries as ``[CLS] q [SEP]``, queries joined with their candidate
blocks as ``[CLS] x [SEP] title [SEP] body [SEP]`` (the readers' layout), right-padded, and
length-bucketed batches for embedding many of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch

from realm.data.mlm import pad_ragged


class EncoderInputs(NamedTuple):
    """Padded encoder inputs (right padding); unpacks as ``(input_ids, attention_mask, types)``.

    Attributes:
        input_ids: Word-piece ids with special tokens, ``[n, seq_len]`` int64.
        attention_mask: 1 on real tokens, 0 on padding, ``[n, seq_len]`` int64.
        token_type_ids: Segment ids (0 first segment, 1 second), ``[n, seq_len]`` int64.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor


def as_ids(ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def pack(
    rows: list[list[tuple[np.ndarray, int]]], pad_id: int
) -> EncoderInputs:
    """Right-pad rows of (ids, token type) segments into one batch."""
    if not rows:
        raise ValueError("cannot build inputs for an empty batch")
    lengths = [sum(len(ids) for ids, _ in row) for row in rows]
    n, seq_len = len(rows), max(lengths)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int64)  # [n, seq_len]
    attention_mask = np.zeros((n, seq_len), dtype=np.int64)  # [n, seq_len]
    token_type_ids = np.zeros((n, seq_len), dtype=np.int64)  # [n, seq_len]
    for i, row in enumerate(rows):
        pos = 0
        for ids, token_type in row:
            input_ids[i, pos : pos + len(ids)] = ids
            token_type_ids[i, pos : pos + len(ids)] = token_type
            pos += len(ids)
        attention_mask[i, :pos] = 1
    return EncoderInputs(
        torch.from_numpy(input_ids), torch.from_numpy(attention_mask),
        torch.from_numpy(token_type_ids),
    )


def build_block_inputs(
    title_ids: list[Sequence[int]],
    body_ids: list[Sequence[int]],
    cls_id: int,
    sep_id: int,
    pad_id: int,
    max_length: Optional[int] = None,
) -> EncoderInputs:
    """Lay out pre-tokenized blocks as ``[CLS] title [SEP] body [SEP]``; no re-tokenization.

    Token types are 0 for ``[CLS] title [SEP]`` and 1 for ``body [SEP]`` (BERT's pair layout).
    An empty title still keeps its ``[SEP]``, so every block has the same layout.

    Args:
        title_ids: Word-piece ids of each block's title (lists, arrays or 1-d tensors).
        body_ids: Word-piece ids of each block's body, as many as ``title_ids``.
        cls_id: Id of ``[CLS]``.
        sep_id: Id of ``[SEP]``.
        pad_id: Id written on padding positions.
        max_length: Most tokens per block, special tokens included (>= 3). The body is cut
            first; the title only when it alone does not fit.

    Returns:
        :class:`EncoderInputs`, each ``[num_blocks, seq_len]`` with ``seq_len`` the longest
        block in the batch.
    """
    if len(title_ids) != len(body_ids):
        raise ValueError(f"{len(title_ids)} titles but {len(body_ids)} bodies")
    if max_length is not None and max_length < 3:
        raise ValueError(f"max_length must be >= 3 ([CLS] and two [SEP]), got {max_length}")
    cls, sep = np.array([cls_id], np.int64), np.array([sep_id], np.int64)
    rows = []
    for title, body in zip(title_ids, body_ids):
        title, body = as_ids(title), as_ids(body)
        if max_length is not None:
            room = max_length - 3
            title = title[:room]
            body = body[: room - len(title)]
        rows.append([(cls, 0), (title, 0), (sep, 0), (body, 1), (sep, 1)])
    return pack(rows, pad_id)


def build_query_inputs(
    ids_list: list[Sequence[int]],
    cls_id: int,
    sep_id: int,
    pad_id: int,
    max_length: Optional[int] = None,
) -> EncoderInputs:
    """Lay out pre-tokenized queries as ``[CLS] q [SEP]``; no re-tokenization.

    Args:
        ids_list: Word-piece ids of each query.
        cls_id: Id of ``[CLS]``.
        sep_id: Id of ``[SEP]``.
        pad_id: Id written on padding positions.
        max_length: Most tokens per query, special tokens included (>= 2); longer queries
            are cut at the end.

    Returns:
        :class:`EncoderInputs`, each ``[batch, seq_len]``; token types are all 0.
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
    cls, sep = np.array([cls_id], np.int64), np.array([sep_id], np.int64)
    rows = []
    for ids in ids_list:
        ids = as_ids(ids)
        if max_length is not None:
            ids = ids[: max_length - 2]
        rows.append([(cls, 0), (ids, 0), (sep, 0)])
    return pack(rows, pad_id)


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
        x = as_ids(query)
        if max_length is not None and len(x) + 3 > max_length:
            raise ValueError(
                f"query {i} has {len(x)} word pieces; with [CLS] and two [SEP] it does not fit "
                f"in max_length={max_length}"
            )
        titles = list(block_title_ids[i]) + ([empty] if append_null else [])
        bodies = list(block_body_ids[i]) + ([empty] if append_null else [])
        for title, body in zip(titles, bodies):
            title, body = as_ids(title), as_ids(body)
            row = [(cls, 0), (x, 0), (sep, 0)]
            if max_length is not None:
                room = max_length - len(x) - 4  # [CLS] x [SEP] title [SEP] body [SEP]
                title = title[: max(room, 0)]
                body = body[: max(room - len(title), 0)]
            if len(title) or len(body):
                row += [(title, 1), (sep, 1), (body, 1)]
            rows.append(row + [(sep, 1)])
            layout.append((len(x), len(title), len(body)))
    packed = pack(rows, pad_id)
    segments = torch.zeros_like(packed.input_ids)  # [B * (k + 1), seq_len]
    for r, (lq, lt, lb) in enumerate(layout):
        segments[r, lq + 2: lq + 2 + lt] = 1  # after [CLS] x [SEP]
        segments[r, lq + 3 + lt: lq + 3 + lt + lb] = 2  # after title [SEP]
    positions = position_mask = None
    if mask_positions is not None:
        if len(mask_positions) != n:
            raise ValueError(f"{n} queries but {len(mask_positions)} mask position arrays")
        for i, pos in enumerate(mask_positions):
            pos = as_ids(pos)
            if len(pos) and (pos.min() < 0 or pos.max() >= len(as_ids(query_ids[i]))):
                raise ValueError(f"query {i}: mask positions {pos.tolist()} outside the query")
        positions, position_mask = pad_ragged(mask_positions, pad_value=0)
        positions = torch.where(position_mask, positions + 1, positions)  # past [CLS]
    return JoinedInputs(
        packed.input_ids, packed.attention_mask, packed.token_type_ids,
        positions, position_mask, num_candidates, segments,
    )



def length_bucketed_batches(
    lengths: np.ndarray | Sequence[int],
    batch_size: Optional[int] = None,
    *,
    max_tokens: Optional[int] = None,
) -> Iterator[np.ndarray]:
    """Batches of indices whose items have similar lengths, to embed a corpus with little padding.

    Items are sorted by length, longest first (ties in index order), and cut into consecutive
    batches, so the order is deterministic and the first batch is the most memory-hungry one
    (an out-of-memory error shows at once, not at the end of a long pass).

    Args:
        lengths: Length of each item as it will be padded (special tokens included), ``[n]``.
        batch_size: Most items per batch.
        max_tokens: Most padded tokens per batch (``items * longest``); an item longer than
            this still gets a batch of its own. At least one of the two limits is required.

    Yields:
        Int64 index arrays into ``lengths``, ``[<= batch_size]``; together they hold every index
        exactly once, and within each batch lengths do not increase.
    """
    if batch_size is None and max_tokens is None:
        raise ValueError("give batch_size, max_tokens, or both")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    lengths = np.asarray(lengths).astype(np.int64).reshape(-1)  # [n]
    order = np.argsort(-lengths, kind="stable")  # [n], longest first
    sorted_lengths = lengths[order]  # [n], non-increasing
    start, n = 0, len(order)
    while start < n:
        size = n - start
        if batch_size is not None:
            size = min(size, batch_size)
        if max_tokens is not None:
            # The first item is the longest of its batch: it sets the padded length.
            size = min(size, max(1, max_tokens // max(int(sorted_lengths[start]), 1)))
        yield order[start : start + size]
        start += size
