"""The reader interface: REALM's ``p(y|z, x)``, whatever model reads.

A reader scores each masked example's targets ``y`` beside each of its candidates ``z``: the
``k`` blocks the retriever found and the null document (an empty block), always last, so
``C = k + 1`` candidates per example. REALM (:class:`realm.modeling.realm.REALM`) calls its reader
only through this interface, in two steps, so that the inputs can be built ahead on the prefetch
thread (:class:`realm.training.prefetch.RetrievalPrefetch`)::

    inputs = reader.build_inputs(batch, titles, bodies, special, max_length,  # CPU, no weights
                                 block_ids=ids)                    # ids [B, k], -1: none
    out = reader.read(inputs, batch)               # ReaderOutput: out.log_p_y_given_z [B, k + 1]
    predicted, null_predicted = reader.predict(out, log_p_z)          # [B, M] each, no grad

The masked-LM knowledge-augmented encoder (:class:`realm.modeling.readers.mlm.
KnowledgeAugmentedEncoder`) is the first implementation; the causal-LM reader
(:class:`realm.modeling.readers.causal_lm.CausalLMReader`), which reads the blocks' cased text
by their ids, the second.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from realm.data.mlm import MLMBatch


@dataclass
class ReaderOutput:
    """What a reader returns for ``B`` examples and their ``C = k + 1`` candidates (the null
    document last).

    Attributes:
        log_p_y_given_z: ``log p(y|z, x) = Σ_j log p(y_j|z, x)`` over each example's targets,
            per candidate, ``[B, C]`` float32 (with grad): what REALM's marginal needs.
        token_log_probs: ``log p(y_j|z, x)`` of each target, 0 on padding, ``[B, C, M]``
            float32: what the per-token marginal needs (``pretrain.marginal=token``).
        logits: Vocabulary logits at the targets, ``[B, C, M, vocab]``, where the reader built
            them; None where it did not (e.g. the vocabulary-chunked path).
        details: The reader's own output, which its :meth:`Reader.predict` reads (for the
            masked-LM reader: its :class:`~realm.modeling.readers.mlm.KnowledgeAugmentedOutput`).
        target_mask: True on the real targets of ``token_log_probs``, ``[B, M]``, where they are
            not the batch's word pieces (a reader that scores in its own tokens); None: the
            batch's ``target_mask``.
    """

    log_p_y_given_z: torch.Tensor
    token_log_probs: torch.Tensor
    logits: Optional[torch.Tensor] = None
    details: Any = None
    target_mask: Optional[torch.Tensor] = None


class Reader(nn.Module, abc.ABC):
    """REALM's reader: ``log p(y|z, x)`` of masked examples beside their candidate blocks.

    Attributes:
        tokenizer: The reader's tokenizer (checked against the corpus), or None.
        vocab_chunk: Score the targets over the vocabulary in chunks of this many words, never
            building the ``[B, C, M, vocab]`` logits; 0: the logits. REALM sets it
            (``pretrain.vocab_chunk``); a reader without a vocabulary ignores it.
    """

    tokenizer: Any = None
    vocab_chunk: int = 0

    @abc.abstractmethod
    def build_inputs(self, batch: MLMBatch, titles: Sequence[Sequence[np.ndarray]],
                     bodies: Sequence[Sequence[np.ndarray]], special: tuple[int, int, int],
                     max_length: int, block_ids: Optional[np.ndarray] = None) -> Any:
        """The reader's inputs (CPU tensors) for ``B`` examples, each with its ``k`` blocks and
        the null document appended last. Reads no parameters (it runs on the prefetch thread).

        Args:
            batch: The masked examples (``query_ids``, ``mask_positions``, targets).
            titles, bodies: Word pieces of each example's ``k`` retrieved blocks, ``B`` lists of
                ``k`` arrays each (empty arrays where fewer than ``k`` were found).
            special: ``(cls_id, sep_id, pad_id)`` of the corpus's vocabulary.
            max_length: Most tokens per example-and-block input.
            block_ids: The retrieved blocks' ids, ``[B, k]`` int (-1: none), for readers that
                read the blocks from the store themselves (e.g. their cased text); None: not
                known (a reader that needs them raises).
        """

    @abc.abstractmethod
    def read(self, inputs: Any, batch: MLMBatch) -> ReaderOutput:
        """Score ``batch``'s targets beside each candidate of :meth:`build_inputs`'s ``inputs``
        (moved to the reader's device here): ``log_p_y_given_z`` ``[B, k + 1]``."""

    @abc.abstractmethod
    def predict(self, out: ReaderOutput, log_p_z: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``argmax_y Σ_z p(z|x) p(y_j|z, x)`` and the last candidate's (the null document's) own
        argmax at each target position, ``([B, M], [B, M])`` word ids (no gradient), given
        ``log p(z|x)`` ``[B, C]``."""

    @abc.abstractmethod
    def save_pretrained(self, save_directory: str | os.PathLike, *,
                        metadata: Optional[dict[str, Any]] = None,
                        overwrite: bool = False) -> Path:
        """Write a self-describing directory (a manifest whose ``kind`` names the reader)."""

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward (``pretrain.gradient_checkpointing``)."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing")
