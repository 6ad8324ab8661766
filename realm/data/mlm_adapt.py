"""BERT-style masked-LM examples on whole blocks: the data of the MLM adaptation of an encoder
(:mod:`realm.training.adapt_mlm`).

Whole words are masked (:func:`whole_word_mask`: 80% ``[MASK]``, 10% random, 10% kept), or one
salient span of the block; an example is ``[CLS] title [SEP] body [SEP]``, or with a second
segment REALM's joined layout (:class:`BlockMLMDataset`). REALM's own masked examples (a span of
a block masked in a query) are :mod:`realm.data.mlm`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch

from realm.data.mlm import pad_ragged
from realm.data.store import BlockStore


def continuation_pieces(tokenizer) -> np.ndarray:
    """Which ids of a WordPiece vocabulary continue a word (``##ing``), ``[vocab]`` bool."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return np.array([str(t).startswith("##") for t in vocab], dtype=bool)


def whole_word_mask(
    ids: np.ndarray,
    maskable: np.ndarray,
    continuation: np.ndarray,
    rng: np.random.Generator,
    mask_id: int,
    random_ids: np.ndarray,
    mask_prob: float = 0.15,
    span: Optional[tuple[int, int]] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask whole words of ``ids`` BERT-style: ``mask_prob`` of the maskable word pieces, chosen
    a word at a time; each chosen word is ``[MASK]`` (80%), random word pieces (10%) or kept
    (10%), all of its pieces alike.

    Args:
        ids: Word-piece ids of one sequence, special tokens included, ``[L]``.
        maskable: True where a piece may be masked (never ``[CLS]``/``[SEP]``/padding), ``[L]``.
        continuation: :func:`continuation_pieces` of the vocabulary.
        rng: The example's generator.
        mask_id: Id of ``[MASK]``.
        random_ids: Ids that random replacement draws from (no special tokens).
        mask_prob: Share of the maskable pieces masked (at least one word).
        span: ``(start, end)`` positions of a salient span: mask exactly it (as one word)
            instead of random words.

    Returns:
        ``(masked_ids [L], positions [n] increasing, targets [n])``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    positions = np.flatnonzero(maskable)
    if not len(positions):
        raise ValueError("no maskable word pieces in the sequence")
    if span is not None:
        chosen = [np.arange(span[0], span[1])]
    else:
        # words: a maskable piece that is not a continuation starts one (or follows a gap)
        starts = [i for n, i in enumerate(positions)
                  if n == 0 or not continuation[ids[i]] or positions[n - 1] != i - 1]
        words = np.split(positions, np.searchsorted(positions, starts[1:]))
        budget = max(1, int(round(mask_prob * len(positions))))
        chosen, count = [], 0
        for w in rng.permutation(len(words)):
            if count >= budget:
                break
            if count + len(words[w]) > budget and count:  # (a word is never cut)
                continue
            chosen.append(words[w])
            count += len(words[w])
    picked = np.sort(np.concatenate(chosen))
    masked = ids.copy()
    for word in chosen:
        roll = rng.random()
        if roll < 0.8:
            masked[word] = mask_id
        elif roll < 0.9:
            masked[word] = rng.choice(random_ids, size=len(word))
    return masked, picked, ids[picked]


@dataclasses.dataclass
class MaskedSequence:
    """One BERT-style masked sequence of a block: ``[CLS] title [SEP] body [SEP]``, or with a
    second segment ``[CLS] body [SEP] title' [SEP] body' [SEP]`` (REALM's joined layout).

    Attributes:
        block_id: The block it was cut from.
        input_ids: The masked sequence, ``[L]``.
        mask_positions: Positions whose original pieces are the targets, ``[n]``.
        target_ids: The original pieces, ``[n]``.
        token_type_ids: 0 on ``[CLS]`` and the first segment with its ``[SEP]``, 1 after, ``[L]``.
        pair: What the second segment is: ``"none"`` (single segment), ``"neighbour"`` (a block
            next to it in its article), ``"random"`` (another article's block) or ``"null"``
            (empty, as REALM's null document).
    """

    block_id: int
    input_ids: np.ndarray
    mask_positions: np.ndarray
    target_ids: np.ndarray
    token_type_ids: Optional[np.ndarray] = None
    pair: str = "none"


class BlockMLMDataset(torch.utils.data.Dataset):
    """BERT-style masked-LM examples, one per block, whole words masked
    (:func:`whole_word_mask`). Example ``i`` is a pure function of (seed, epoch, i), so resumes
    and evaluations reproduce it.

    Without pairs (``neighbour_prob = random_prob = 0``) an example is ``[CLS] title [SEP] body
    [SEP]`` cut to ``max_tokens``. With pairs it is laid out as REALM's reader reads,
    ``[CLS] body [SEP] title' [SEP] body' [SEP]``: the second segment is, like BERT's sentence
    pairs, the next (or previous) block of the same article with probability ``neighbour_prob``,
    a random block of another article with ``random_prob``, and otherwise empty (``[CLS] body
    [SEP] [SEP]``, the null document). Words of both segments are masked, so the encoder learns
    to read the second segment where it helps and to do without it.

    Args:
        store: The block store.
        block_ids: Blocks to draw from.
        special: ``(cls_id, sep_id, mask_id)``.
        continuation: :func:`continuation_pieces` of the tokenizer.
        random_ids: Ids random replacement draws from: every id but the special tokens; only
            these are ever masked.
        max_tokens: Word pieces per segment, special tokens included.
        mask_prob: Share of the word pieces masked.
        salient_span_prob: Chance that an example masks one salient span of its (first) block
            (all its pieces) instead of random whole words; blocks with no span in the kept
            text use words.
        neighbour_prob: Chance of a neighbouring block as the second segment.
        random_prob: Chance of a random other article's block as the second segment.
        seed: Seed of the masking.
    """

    def __init__(self, store: BlockStore, block_ids: np.ndarray, special: tuple[int, int, int],
                 continuation: np.ndarray, random_ids: np.ndarray, max_tokens: int = 128,
                 mask_prob: float = 0.15, salient_span_prob: float = 0.0,
                 neighbour_prob: float = 0.0, random_prob: float = 0.0, seed: int = 0):
        if len(block_ids) == 0:
            raise ValueError(f"{store.path}: no blocks to draw masked-LM examples from")
        if max_tokens < 8:
            raise ValueError(f"max_tokens must be >= 8, got {max_tokens}")
        if neighbour_prob < 0 or random_prob < 0 or neighbour_prob + random_prob > 1:
            raise ValueError(f"neighbour_prob={neighbour_prob} and random_prob={random_prob} must "
                             "be >= 0 and sum to at most 1")
        self.store, self.block_ids = store, np.asarray(block_ids, dtype=np.int64)
        self.special, self.continuation, self.random_ids = special, continuation, random_ids
        self.max_tokens, self.mask_prob = max_tokens, mask_prob
        self.salient_span_prob, self.seed, self.epoch = salient_span_prob, seed, 0
        self.neighbour_prob, self.random_prob = neighbour_prob, random_prob
        self.pairs = neighbour_prob > 0 or random_prob > 0
        self.article = np.asarray(store.blocks["article"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.block_ids)

    def _second(self, block: int, rng: np.random.Generator) -> tuple[Optional[int], str]:
        roll = rng.random()
        if roll < self.neighbour_prob:
            near = [b for b in (block - 1, block + 1)
                    if 0 <= b < len(self.article) and self.article[b] == self.article[block]]
            if near:
                return int(near[rng.integers(len(near))]), "neighbour"
        elif roll < self.neighbour_prob + self.random_prob and len(self.article) > 1:
            other = int(rng.integers(len(self.article) - 1))
            other += other >= block
            if self.article[other] != self.article[block]:
                return other, "random"
        return None, "null"

    def __getitem__(self, i: int) -> MaskedSequence:
        block = int(self.block_ids[i])
        cls_id, sep_id, mask_id = self.special
        rng = np.random.default_rng([self.seed, self.epoch, block])
        pair = "none"
        if self.pairs:  # [CLS] body [SEP] (title' [SEP] body')? [SEP]
            first = self.store.body_ids(block)[: self.max_tokens - 2]
            other, pair = self._second(block, rng)
            second = [] if other is None else [
                self.store.title_ids(other)[: self.max_tokens // 4], [sep_id]]
            if other is not None:
                room = self.max_tokens - 2 - len(second[0])
                second.append(self.store.body_ids(other)[: max(0, room)])
            parts = [[cls_id], first, [sep_id], *second, [sep_id]]
            offset = 1  # body position 0 in the sequence
        else:  # [CLS] title [SEP] body [SEP]
            title = self.store.title_ids(block)[: self.max_tokens // 4]
            first = self.store.body_ids(block)[: max(0, self.max_tokens - len(title) - 3)]
            parts = [[cls_id], title, [sep_id], first, [sep_id]]
            offset = len(title) + 2
        ids = np.concatenate(parts).astype(np.int64)
        types = np.zeros(len(ids), dtype=np.int64)
        if self.pairs:
            types[len(first) + 2:] = 1
        maskable = np.isin(ids, self.random_ids)  # never a special token ([CLS], [SEP], [UNK])
        span = None
        if self.salient_span_prob and rng.random() < self.salient_span_prob:
            spans = [(int(s["start"]) + offset, int(s["end"]) + offset)
                     for s in self.store.spans(block) if s["end"] <= len(first)]
            if spans:
                span = spans[rng.integers(len(spans))]
        masked, positions, targets = whole_word_mask(
            ids, maskable, self.continuation, rng, mask_id, self.random_ids, self.mask_prob,
            span=span)
        return MaskedSequence(block, masked, positions, targets, types, pair)


def mlm_text_blocks(store: BlockStore) -> np.ndarray:
    """Blocks that hold text to mask (a non-empty body); an error naming the corpus if none."""
    ids = np.flatnonzero(store.blocks["n_tokens"] > 0) if len(store) else np.zeros(0, np.int64)
    if not len(ids):
        raise ValueError(f"{store.path}: the corpus has no block with text to mask")
    return ids


@dataclasses.dataclass
class MaskedSequenceBatch:
    """Collated :class:`MaskedSequence` s.

    Attributes:
        input_ids: ``[B, L]`` right-padded with ``pad_id``.
        attention_mask: ``[B, L]``.
        token_type_ids: ``[B, L]`` (0 on padding).
        mask_positions: ``[B, M]`` padded with 0.
        target_ids: ``[B, M]`` padded with 0.
        target_mask: True on real targets, ``[B, M]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask_positions: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    token_type_ids: Optional[torch.Tensor] = None


def collate_masked_sequences(examples: Sequence[MaskedSequence], pad_id: int = 0
                             ) -> MaskedSequenceBatch:
    input_ids, attention = pad_ragged([e.input_ids for e in examples], pad_value=pad_id)
    positions, _ = pad_ragged([e.mask_positions for e in examples])
    targets, target_mask = pad_ragged([e.target_ids for e in examples])
    types, _ = pad_ragged([e.token_type_ids if e.token_type_ids is not None
                           else np.zeros(len(e.input_ids), np.int64) for e in examples])
    return MaskedSequenceBatch(input_ids, attention.long(), positions, targets, target_mask, types)
