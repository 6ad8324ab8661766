"""The causal-LM reader's inputs: masked examples and their candidate blocks as rows of LM tokens.

A masked example is word pieces of a window of its block's body (:class:`realm.data.mlm.
MLMExample`); :func:`span_texts` maps it back to the block's cased text through the corpus
tokenizer's character offsets (the re-tokenized text must give the store's word pieces).
:class:`PromptBuilder` lays each example out beside each of its ``k + 1`` candidates ``z``::

    prefix:  [BOS] "{title}\\n{body}" | "\\n\\n{sentence up to the span}" | "{span}" | terminator
    blank:   [BOS] "{title}\\n{body}" | "\\n\\n{sentence, span as ____}\\nThe blank is:" | " {span}" | "\\n"
             └ block part: cut from ┘   └───────── the same in every candidate ─────────────┘
               the right to fit

Each part is tokenized on its own with the LM's tokenizer (no special tokens; a BOS first where
the tokenizer adds one by convention) and the ids are concatenated. Only the span's tokens and
one terminator are scored: under ``prefix`` the LM token that starts the window's text after the
span, or EOS where the span ends the window; under ``blank`` the line's end. The span keeps the
whitespace before it (byte-level BPE tokenizers such as SmolLM2's start a word with its space).
The null document is a neutral template of the block part's shape (``"(no title)\\n(no text)"``),
not an empty prompt: against an empty prompt any text reads as evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from realm.data.blocks import word_piece_encoder
from realm.data.mlm import MLMBatch, pad_ragged
from realm.data.store import BlockStore

LAYOUTS = ("prefix", "blank")
NULL_TITLE = "(no title)"
NULL_BODY = "(no text)"
#: ``blank``: the gap the span leaves in the sentence, and the line that asks for it.
BLANK = "____"
BLANK_CUE = "\nThe blank is:"


@dataclass
class SpanText:
    """A masked example in characters of its block's cased text (``store.text(block_id)``).

    Attributes:
        block_id: The example's block.
        start, end: The masked span's characters (first to last masked word piece).
        before: The query window's text up to the span, without the whitespace before it.
        span: The span's text, with the whitespace before it (``text[len(before) ...: end]``).
        after: The window's text after the span; ``""`` where the span ends the window.
    """

    block_id: int
    start: int
    end: int
    before: str
    span: str
    after: str


@dataclass
class LMInputs:
    """Right-padded LM rows for ``B`` examples and their ``C = k + 1`` candidates (null last).

    Attributes:
        input_ids: ``[B * C, L]`` int64, example-major, padded with the pad (or EOS) id.
        attention_mask: ``[B * C, L]`` int64, 1 on real tokens.
        positions: ``[B * C, M]`` int64: the positions whose hidden states predict the scored
            tokens (each scored token's position - 1); 0 on padding.
        targets: The scored LM tokens, ``[B, M]`` int64 (the same in every candidate), 0 on
            padding.
        target_mask: ``[B, M]`` bool, True on scored tokens (the span's and the terminator).
        span_mask: ``[B, M]`` bool, True on the span's tokens (the terminator excluded).
        spans: Each example's :class:`SpanText`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor
    span_mask: torch.Tensor
    spans: list[SpanText]

    @property
    def num_candidates(self) -> int:
        return len(self.input_ids) // max(1, len(self.spans))


def find_window(body: np.ndarray, window: np.ndarray) -> int:
    """Where the word pieces ``window`` start within ``body`` (first match), -1: nowhere."""
    n = len(window)
    if n == 0 or n > len(body):
        return -1
    views = np.lib.stride_tricks.sliding_window_view(np.asarray(body, np.int64), n)
    hits = np.nonzero((views == np.asarray(window, np.int64)).all(axis=1))[0]
    return int(hits[0]) if len(hits) else -1


def body_offsets(text: str, body: np.ndarray, encoding: Any) -> Optional[np.ndarray]:
    """Character offsets ``[n, 2]`` of the store's word pieces ``body`` in ``text``, from the
    re-tokenized ``encoding`` (ids and offsets); None where they disagree.

    A block cut inside a word starts with continuation pieces (``##orn``), which the text
    re-tokenizes differently (``or ##n``): only that first word may differ, and its pieces then
    all span it. Everywhere else the ids must be the store's.
    """
    ids = np.asarray(encoding.ids, np.int64)
    offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)  # [n_ids, 2]
    if np.array_equal(ids, body):
        return offsets
    shift = len(ids) - len(body)
    k = len(body)  # the first body index from which body and ids agree to the end
    while k > 0 and k - 1 + shift >= 0 and body[k - 1] == ids[k - 1 + shift]:
        k -= 1
    if k == len(body) or k + shift <= 0:
        return None
    head_end = int(offsets[k + shift - 1, 1])  # the text's pieces before the agreement end here
    if any(c.isspace() for c in text[:head_end].strip()):
        return None  # more than the first word differs
    head = np.tile(np.array([[0, head_end]], np.int64), (k, 1))  # [k, 2]
    return np.concatenate([head, offsets[k + shift:]])


def span_texts(batch: MLMBatch, store: BlockStore, encoder: Any, name: str) -> list[SpanText]:
    """Each example's window and masked span in its block's cased text.

    ``store.text(block_id)`` is re-tokenized with ``encoder`` (the corpus tokenizer ``name``'s
    :func:`~realm.data.blocks.word_piece_encoder`; character offsets); its word pieces must be
    the store's ``body_ids(block_id)``. The window starts at
    ``batch.query_starts`` (found by matching its word pieces where the batch does not say);
    the span runs from the first masked word piece to the last.

    Raises:
        ValueError: The re-tokenized text disagrees with the store, or the example's window is
            not in its block (the message names the example's block and both tokenizers).
    """
    out = []
    for i, block_id in enumerate(batch.block_ids.tolist()):
        text = store.text(block_id)
        body = np.asarray(store.body_ids(block_id), np.int64)
        encoding = encoder.encode(text, add_special_tokens=False)
        offsets = body_offsets(text, body, encoding)  # [n_tokens, 2]
        if offsets is None:
            raise ValueError(
                f"masked example {i} (block {block_id} of {store.path}): the corpus tokenizer "
                f"{name!r} cuts the block's text into word pieces that differ from the store's "
                f"(cut by {store.tokenizer_name!r}); the reader maps spans to text through the "
                f"tokenizer the corpus was built with")
        positions = np.asarray(batch.mask_positions[i], np.int64)
        n = int(batch.target_mask[i].sum())
        window = np.asarray(batch.query_ids[i], np.int64).copy()
        window[positions] = batch.target_ids[i, :n].numpy()
        start = (int(batch.query_starts[i]) if batch.query_starts is not None
                 else find_window(body, window))
        if start < 0 or not np.array_equal(body[start: start + len(window)], window):
            raise ValueError(f"masked example {i}: its window is not in block {block_id}'s word "
                             f"pieces (from another store than {store.path}?)")
        first, last = start + int(positions.min()), start + int(positions.max())
        left = int(offsets[first - 1, 1]) if first > start else int(offsets[first, 0])
        end = int(offsets[last, 1])
        w_start, w_end = int(offsets[start, 0]), int(offsets[start + len(window) - 1, 1])
        out.append(SpanText(block_id=block_id, start=int(offsets[first, 0]), end=end,
                            before=text[w_start:left], span=text[left:end],
                            after=text[end:w_end]))
    return out


class PromptBuilder:
    """Lays masked examples out beside their candidate blocks as LM token rows.

    Args:
        tokenizer: The LM's (fast) tokenizer.
        layout: One of :data:`LAYOUTS`.
        null_title, null_body: The null document's template.
        name: The LM's name, for errors.

    Raises:
        ValueError: The tokenizer has no end-of-sequence token, or ``layout`` is unknown.
    """

    def __init__(self, tokenizer: Any, layout: str = "prefix", null_title: str = NULL_TITLE,
                 null_body: str = NULL_BODY, name: Optional[str] = None):
        if layout not in LAYOUTS:
            raise ValueError(f"reader layout must be one of {LAYOUTS}, got {layout!r}")
        name = name or getattr(tokenizer, "name_or_path", "the LM")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{name}: its tokenizer has no end-of-sequence token; the causal-LM "
                             f"reader scores one after a span that ends its sentence")
        self.layout = layout
        self.encoder = word_piece_encoder(tokenizer)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else tokenizer.eos_token_id)
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.bos: list[int] = [int(bos)] if adds_bos else []
        self.null_ids = self.encode([f"{null_title}\n{null_body}"])[0]
        self.newline_id = self.encode(["\n"])[0][-1]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """LM ids of each text, no special tokens."""
        return [e.ids for e in self.encoder.encode_batch(list(texts), add_special_tokens=False)]

    def sentence(self, span: SpanText) -> tuple[str, str]:
        """The example's part after the block, and its span as scored (before the terminator)."""
        if self.layout == "prefix":
            return f"\n\n{span.before}", span.span
        gap = span.span[: len(span.span) - len(span.span.lstrip())] + BLANK
        return f"\n\n{span.before}{gap}{span.after}{BLANK_CUE}", " " + span.span.strip()

    def build(self, spans: Sequence[SpanText], blocks: Sequence[Sequence[Optional[tuple[str, str]]]],
              max_length: int) -> LMInputs:
        """The rows of ``spans`` beside their ``blocks`` (``B`` lists of ``k`` ``(title, body)``
        pairs, None where none was found: the null template) and the null document, last.

        Raises:
            ValueError: An example's sentence and span do not fit ``max_length`` beside the null
                template (the message names the example's block).
        """
        parts = [self.sentence(s) for s in spans]
        sentences = self.encode([p[0] for p in parts])
        scored = self.encode([p[1] for p in parts])
        if self.layout == "prefix":
            after = self.encode([s.after for s in spans])
            terminators = [a[0] if a else self.eos_id for a in after]
        else:
            terminators = [self.newline_id] * len(spans)
        headers = self.encode([f"{z[0]}\n{z[1]}" for row in blocks for z in row if z is not None])
        rows, positions, targets = [], [], []
        h = 0
        for b, span in enumerate(spans):
            cont = scored[b] + [terminators[b]]
            fixed = len(self.bos) + len(sentences[b]) + len(cont)
            budget = max_length - fixed
            if budget < len(self.null_ids):
                raise ValueError(
                    f"masked example {b} (block {span.block_id}): its sentence and span "
                    f"({span.span.strip()!r}) take {fixed} LM tokens; with the null template "
                    f"({len(self.null_ids)}) that is over the reader's limit of {max_length}")
            for z in list(blocks[b]) + [None]:
                if z is None:
                    header = self.null_ids
                else:
                    header, h = headers[h][:budget], h + 1
                row = self.bos + header + sentences[b] + cont
                first = len(row) - len(cont)
                rows.append(row)
                positions.append(list(range(first - 1, len(row) - 1)))
            targets.append(cont)
        input_ids, attention_mask = pad_ragged(rows, self.pad_id)  # [B * C, L]
        position_ids, _ = pad_ragged(positions)  # [B * C, M]
        target_ids, target_mask = pad_ragged(targets)  # [B, M]
        span_mask = target_mask.clone()
        span_mask[torch.arange(len(targets)), target_mask.sum(1) - 1] = False  # the terminator
        return LMInputs(input_ids=input_ids, attention_mask=attention_mask.long(),
                        positions=position_ids, targets=target_ids,
                        target_mask=target_mask, span_mask=span_mask, spans=list(spans))
