"""Masked-language-model examples for REALM pretraining, drawn from the blocks of the block store.

One example per block: mask a span (or some tokens) of the block's body and take the sentence
around it as the query ``x``; the masked word pieces are the targets ``y``. The block the query
came from is recorded so that retrieval can leave it out (retrieving it would be trivial).

Maskings (REALM's main method and its two ablations):

- ``salient_span`` (default): one salient span of the block (a named entity or a date, found at
  corpus build time, :meth:`BlockStore.spans`), chosen uniformly, all its word pieces masked.
  Blocks with no span fall back to ``random_span``; the example says so (``fallback``) and
  the dataset counts such blocks.
- ``random_span``: a random contiguous run of word pieces whose length is drawn from the
  corpus's salient-span lengths (:func:`span_length_distribution`).
- ``random_token``: BERT-style, ``mask_prob`` (15%) of the query's word pieces.

Every masked position becomes ``[MASK]`` (no 80/10/10 replacement). The query is the sentence
(or sentences) holding the masked span, cut to ``max_query_tokens`` around the span.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import numpy as np
import torch

from realm.data.store import BlockStore

logger = logging.getLogger(__name__)

MASKINGS = ("salient_span", "random_token", "random_span")

#: Span lengths used for ``random_span`` when the corpus has no salient spans: geometric with
#: this success probability (mean about 3 word pieces, like typical entities), truncated.
DEFAULT_SPAN_GEOMETRIC_P = 0.3
MAX_RANDOM_SPAN = 10


@dataclasses.dataclass
class MLMExample:
    """One masked query, as word-piece ids.

    Attributes:
        block_id: The block the query came from (leave it out of retrieval).
        query_ids: The query window with masked positions set to ``[MASK]``, ``[query_len]``.
        target_ids: The original ids at the masked positions, ``[n_masked]``.
        mask_positions: Positions of the masked tokens within ``query_ids``, increasing,
            ``[n_masked]``.
        label: Entity label of the masked salient span (e.g. ``"PERSON"``); None otherwise.
        masking: The masking actually used (``"random_span"`` when salient spans fell back).
        fallback: True when salient-span masking found no span and used a random span.
        query_start: Offset of the query window within the block body.
    """

    block_id: int
    query_ids: np.ndarray
    target_ids: np.ndarray
    mask_positions: np.ndarray
    label: Optional[str]
    masking: str
    fallback: bool = False
    query_start: int = 0


def span_length_distribution(store: BlockStore, max_length: int = MAX_RANDOM_SPAN) -> np.ndarray:
    """Probabilities of span lengths ``1..max_length`` for ``random_span`` masking.

    The corpus's salient-span lengths (longer ones counted as ``max_length``); a truncated
    geometric distribution (:data:`DEFAULT_SPAN_GEOMETRIC_P`) when it has no spans.

    Returns:
        ``[max_length]``, entry ``i`` the probability of length ``i + 1``; sums to 1.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    lengths = np.clip(store.span_lengths(), 1, max_length)  # [n_spans]
    if len(lengths):
        counts = np.bincount(lengths - 1, minlength=max_length).astype(np.float64)  # [max_length]
    else:
        p = DEFAULT_SPAN_GEOMETRIC_P
        counts = p * (1 - p) ** np.arange(max_length)  # [max_length]
    return counts / counts.sum()


def mlm_blocks(store: BlockStore, with_spans: bool = False) -> np.ndarray:
    """Ids of the blocks that can give an example (a non-empty body; with ``with_spans``, only
    those with a salient span)."""
    usable = np.asarray(store.blocks["n_tokens"]) > 0
    if with_spans:
        usable &= np.asarray(store.blocks["n_spans"]) > 0
        if not usable.any():
            raise ValueError(f"{store.path}: no block has a salient span (build the corpus with "
                             "spans enabled, or keep blocks without spans)")
    return np.nonzero(usable)[0].astype(np.int64)


def _window(sentences: np.ndarray, start: int, end: int, max_tokens: int) -> tuple[int, int]:
    """The sentences covering ``[start, end)``, cut to ``max_tokens`` with the span kept whole
    and as centred as the sentence allows."""
    covering = sentences[(sentences["start"] < end) & (sentences["end"] > start)]
    lo = int(covering["start"].min()) if len(covering) else start
    hi = int(covering["end"].max()) if len(covering) else end
    budget = max_tokens - (end - start)  # context tokens that fit beside the span
    left = min(start - lo, budget // 2)
    right = min(hi - end, budget - left)
    left = min(start - lo, budget - right)  # give what the right side left unused to the left
    return start - left, end + right


def mask_block(
    store: BlockStore,
    block_id: int,
    rng: np.random.Generator,
    mask_id: int,
    *,
    masking: str = "salient_span",
    max_query_tokens: int = 64,
    mask_prob: float = 0.15,
    span_lengths: Optional[np.ndarray] = None,
) -> MLMExample:
    """Mask one example from block ``block_id``; a pure function of the arguments and ``rng``.

    Args:
        store: The block store.
        block_id: Block to draw from (its body must not be empty).
        rng: Source of randomness.
        mask_id: Id of ``[MASK]``.
        masking: One of :data:`MASKINGS`.
        max_query_tokens: Most word pieces in the query.
        mask_prob: Fraction of the query masked by ``random_token`` (at least one token).
        span_lengths: Length probabilities for ``random_span`` (see
            :func:`span_length_distribution`); computed from ``store`` when None.

    Returns:
        An :class:`MLMExample`.
    """
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
    if max_query_tokens < 1:
        raise ValueError(f"max_query_tokens must be >= 1, got {max_query_tokens}")
    body = np.asarray(store.body_ids(block_id), dtype=np.int64)  # [n_tokens]
    n = len(body)
    if n == 0:
        raise ValueError(f"block {block_id} has an empty body; draw from mlm_blocks(store)")
    sentences = store.sentences(block_id)
    label, used, fallback = None, masking, False

    if masking == "random_token":
        if len(sentences):
            s = sentences[int(rng.integers(len(sentences)))]
            lo, hi = int(s["start"]), int(s["end"])
        else:
            lo, hi = 0, n
        lo = int(rng.integers(lo, max(lo, hi - max_query_tokens) + 1))  # a window of the sentence
        hi = min(hi, lo + max_query_tokens)
        n_masked = max(1, int(round(mask_prob * (hi - lo))))
        positions = np.sort(rng.choice(hi - lo, size=n_masked, replace=False)).astype(np.int64)
    else:
        spans = store.spans(block_id) if masking == "salient_span" else ()
        if len(spans):
            span = spans[int(rng.integers(len(spans)))]
            start, end = int(span["start"]), int(span["end"])
            label = store.label_names[int(span["label"])]
        else:
            fallback, used = masking == "salient_span", "random_span"
            if span_lengths is None:
                span_lengths = span_length_distribution(store)
            length = 1 + int(rng.choice(len(span_lengths), p=span_lengths))
            length = min(length, n)
            start = int(rng.integers(0, n - length + 1))
            end = start + length
        end = min(end, start + max_query_tokens)  # a span longer than a query is cut
        lo, hi = _window(sentences, start, end, max_query_tokens)
        positions = np.arange(start - lo, end - lo, dtype=np.int64)

    query = body[lo:hi].copy()  # [query_len]
    targets = query[positions].copy()  # [n_masked]
    query[positions] = mask_id
    return MLMExample(
        block_id=int(block_id), query_ids=query, target_ids=targets, mask_positions=positions,
        label=label, masking=used, fallback=fallback, query_start=lo,
    )


class MLMDataset(torch.utils.data.Dataset):
    """Masked examples over a set of blocks; example ``i`` is a pure function of
    ``(seed, epoch, block_ids[i])``.

    Args:
        store: The block store.
        mask_id: Id of ``[MASK]`` in the store's tokenizer.
        block_ids: Blocks to draw from; default :func:`mlm_blocks`.
        masking: One of :data:`MASKINGS`.
        max_query_tokens: Most word pieces in a query.
        mask_prob: Fraction masked by ``random_token``.
        seed: Base seed; call :meth:`set_epoch` so each epoch draws new masks.

    Attributes:
        n_without_spans: How many of ``block_ids`` have no salient span (they fall back to
            ``random_span`` under ``salient_span`` masking).
    """

    def __init__(
        self,
        store: BlockStore,
        mask_id: int,
        block_ids: Optional[Sequence[int]] = None,
        masking: str = "salient_span",
        max_query_tokens: int = 64,
        mask_prob: float = 0.15,
        seed: int = 0,
    ) -> None:
        if masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
        self.store = store
        self.mask_id = mask_id
        self.block_ids = np.asarray(
            mlm_blocks(store) if block_ids is None else block_ids, dtype=np.int64
        )
        self.masking = masking
        self.max_query_tokens = max_query_tokens
        self.mask_prob = mask_prob
        self.seed = seed
        self.epoch = 0
        self.span_lengths = span_length_distribution(store)
        n_spans = np.asarray(store.blocks["n_spans"])[self.block_ids]
        self.n_without_spans = int((n_spans == 0).sum())
        if masking == "salient_span" and self.n_without_spans:
            logger.warning(
                "%d of %d blocks have no salient span: they are masked with random_span",
                self.n_without_spans, len(self.block_ids),
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.block_ids)

    def __getitem__(self, i: int) -> MLMExample:
        block_id = int(self.block_ids[i])
        rng = np.random.default_rng((self.seed, self.epoch, block_id))
        return mask_block(
            self.store, block_id, rng, self.mask_id, masking=self.masking,
            max_query_tokens=self.max_query_tokens, mask_prob=self.mask_prob,
            span_lengths=self.span_lengths,
        )


def pad_ragged(
    seqs: Sequence[Sequence[int] | np.ndarray], pad_value: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad integer sequences of different lengths.

    Returns:
        ``(values, mask)``: int64 ``[n, longest]`` and bool ``[n, longest]``, True on real
        entries.
    """
    arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs]
    width = max((len(a) for a in arrays), default=0)
    values = torch.full((len(arrays), width), pad_value, dtype=torch.int64)  # [n, width]
    mask = torch.zeros((len(arrays), width), dtype=torch.bool)  # [n, width]
    for i, a in enumerate(arrays):
        values[i, : len(a)] = torch.from_numpy(a)
        mask[i, : len(a)] = True
    return values, mask


@dataclasses.dataclass
class MLMBatch:
    """A collated batch of :class:`MLMExample`.

    Attributes:
        query_ids: The masked queries (ragged; joined with blocks later), ``B`` arrays.
        mask_positions: Masked positions within each query, ``B`` arrays (same order as the
            targets).
        target_ids: Target ids, padded with 0, ``[B, max_masked]``.
        target_mask: True on real targets, ``[B, max_masked]``.
        block_ids: Source blocks, ``[B]``.
        labels: Entity label of each example's span, or None.
        n_fallback: Examples whose salient-span masking fell back to a random span.
        query_starts: Offset of each query window within its block's body, ``[B]`` (readers
            that read the block's text map the window through it); None: not known.
    """

    query_ids: list[np.ndarray]
    mask_positions: list[np.ndarray]
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    block_ids: torch.Tensor
    labels: list[Optional[str]]
    n_fallback: int
    query_starts: Optional[torch.Tensor] = None


def collate_mlm(examples: Sequence[MLMExample]) -> MLMBatch:
    """Collate examples; targets padded into ``[B, max_masked]`` with a mask."""
    target_ids, target_mask = pad_ragged([e.target_ids for e in examples])  # [B, max_masked]
    return MLMBatch(
        query_ids=[e.query_ids for e in examples],
        mask_positions=[e.mask_positions for e in examples],
        target_ids=target_ids,
        target_mask=target_mask,
        block_ids=torch.tensor([e.block_id for e in examples], dtype=torch.int64),  # [B]
        labels=[e.label for e in examples],
        n_fallback=sum(e.fallback for e in examples),
        query_starts=torch.tensor([e.query_start for e in examples], dtype=torch.int64),  # [B]
    )
