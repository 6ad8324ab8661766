"""The Open-QA reader: a BERT-style encoder over ``[CLS] q [SEP] title [SEP] body [SEP]`` and a
span scorer: an MLP over ``[h_start; h_end]`` (``mlp``, REALM, Guu et al. 2020, section 3.4) or
BERT's start and end logits, ``score = start(h_i) + end(h_j)`` (``start_end``, Devlin et al.
2019; DPR's reader)::

    reader = SpanReader.from_checkpoint("runs/pretrain/encoder", max_span_tokens=10)
    joined = build_joined_inputs(questions, titles, bodies, cls_id, sep_id, pad_id,
                                 append_null=False)                  # [B * k, seq_len]
    out = reader(joined.input_ids, joined.attention_mask, joined.token_type_ids,
                 joined.segment_ids)
    out.span_logits                                                  # [B * k, seq_len, width]

Span ``(i, w)`` starts at position ``i`` and ends at ``i + w``; it is valid only when both ends
lie in the same segment of the block (its title or its body), so no span reaches into the
question or across a separator. The encoder comes from a knowledge-augmented encoder directory
(a REALM pretraining run's ``reader/``), a pretraining run directory, or any transformers
checkpoint. A saved reader is a self-describing directory::

    manifest.json        kind "span_reader", base checkpoint, sizes, max span length
    model/               the encoder (transformers format)
    span_scorer.safetensors
    tokenizer/
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from realm.artifacts import (atomic_directory, load_saved_tokenizer, read_manifest,
                             save_tokenizer, write_manifest)
from realm.hub import load_pretrained, load_tokenizer, resolve_model_path, run_part

logger = logging.getLogger(__name__)

MANIFEST_KIND = "span_reader"
FORMAT_VERSION = 1
MODEL_DIR = "model"
SCORER_FILE = "span_scorer.safetensors"


@dataclass
class SpanReaderOutput:
    """What the span reader returns.

    Attributes:
        span_logits: Score of span ``(start, width)``, ``[N, seq_len, max_span_tokens]``
            (float32; invalid spans hold arbitrary values, see ``span_mask``).
        span_mask: True on valid spans, ``[N, seq_len, max_span_tokens]``.
    """

    span_logits: torch.Tensor
    span_mask: torch.Tensor


def span_mask_from_segments(segment_ids: torch.Tensor, max_width: int) -> torch.Tensor:
    """Valid spans: start and end in the same non-zero segment (title 1 or body 2).

    Args:
        segment_ids: ``[N, seq_len]`` (:attr:`JoinedInputs.segment_ids`).
        max_width: Longest span in tokens.

    Returns:
        ``[N, seq_len, max_width]`` bool; entry ``(n, i, w)`` is the span ``i .. i + w``.
    """
    n, seq_len = segment_ids.shape
    padded = torch.cat([segment_ids, segment_ids.new_zeros(n, max_width)], dim=1)  # [N, L + W]
    ends = padded.unfold(1, max_width, 1)[:, :seq_len]  # [N, L, W]: segment of position i + w
    starts = segment_ids[:, :, None]  # [N, L, 1]
    return (starts > 0) & (ends == starts)  # [N, L, W]


def answer_span_mask(
    input_ids: np.ndarray, span_mask: np.ndarray, answers: Sequence[np.ndarray]
) -> np.ndarray:
    """Spans whose word pieces equal one of the answers' (REALM's token-level match).

    Args:
        input_ids: One joined sequence, ``[seq_len]``.
        span_mask: Its valid spans, ``[seq_len, max_width]``.
        answers: Word-piece ids of each answer string (no special tokens).

    Returns:
        ``[seq_len, max_width]`` bool, a subset of ``span_mask``.
    """
    seq_len, max_width = span_mask.shape
    out = np.zeros_like(span_mask, dtype=bool)
    for answer in answers:
        if len(answer) <= max_width:
            out[occurrences(input_ids, answer), len(answer) - 1] = True
    return out & span_mask


def occurrences(ids: np.ndarray, answer: np.ndarray) -> np.ndarray:
    """Start positions of every run of ``ids`` equal to ``answer`` (none for an empty answer)."""
    width = len(answer)
    if width == 0 or width > len(ids):
        return np.zeros(0, np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, width)  # [L - w + 1, w]
    return np.flatnonzero((windows == answer).all(axis=1))


class SpanScorer(nn.Module):
    """``score(i, j) = w · relu(W_s h_i + W_e h_j + b)``: an MLP over ``[h_start; h_end]``.

    Args:
        hidden_size: Encoder hidden size.
        inner_size: Width of the MLP's hidden layer.
    """

    def __init__(self, hidden_size: int, inner_size: int = 256):
        super().__init__()
        self.start = nn.Linear(hidden_size, inner_size)
        self.end = nn.Linear(hidden_size, inner_size, bias=False)
        self.out = nn.Linear(inner_size, 1)

    def forward(self, states: torch.Tensor, max_width: int) -> torch.Tensor:
        """``states`` ``[N, L, hidden]`` -> span scores ``[N, L, max_width]``."""
        n, seq_len, _ = states.shape
        start = self.start(states)  # [N, L, inner]
        end = self.end(states)  # [N, L, inner]
        end = torch.cat([end, end.new_zeros(n, max_width, end.shape[-1])], dim=1)  # [N, L + W, inner]
        scores = [self.out(torch.relu(start + end[:, w: w + seq_len])).squeeze(-1)  # [N, L]
                  for w in range(max_width)]
        return torch.stack(scores, dim=-1)  # [N, L, W]


class StartEndScorer(nn.Module):
    """``score(i, j) = start · h_i + end · h_j``: BERT's span head (one linear layer)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 2)

    def forward(self, states: torch.Tensor, max_width: int) -> torch.Tensor:
        """``states`` ``[N, L, hidden]`` -> span scores ``[N, L, max_width]``."""
        n, seq_len, _ = states.shape
        start, end = self.proj(states).unbind(-1)  # [N, L] each
        end = torch.cat([end, end.new_zeros(n, max_width)], dim=1)  # [N, L + W]
        return start[:, :, None] + end.unfold(1, max_width, 1)[:, :seq_len]  # [N, L, W]


SCORERS = ("mlp", "start_end")


class SpanReader(nn.Module):
    """Encoder + :class:`SpanScorer`; build with :meth:`from_checkpoint`, :meth:`from_config`
    or :meth:`from_pretrained`.

    Args:
        encoder: A transformers encoder (``AutoModel``) returning ``last_hidden_state``.
        max_span_tokens: Longest answer span, in word pieces.
        span_hidden: Width of the span MLP.
        scorer: ``mlp`` (:class:`SpanScorer`) or ``start_end`` (:class:`StartEndScorer`).
        tokenizer: Saved with the reader; None for tiny models.
        base_checkpoint: What the encoder was initialised from (recorded in the manifest).
    """

    def __init__(self, encoder: PreTrainedModel, max_span_tokens: int = 10,
                 span_hidden: int = 256, *, scorer: str = "mlp", tokenizer: Any = None,
                 base_checkpoint: Optional[str] = None):
        super().__init__()
        if max_span_tokens < 1:
            raise ValueError(f"max_span_tokens must be >= 1, got {max_span_tokens}")
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        self.encoder = encoder
        self.scorer_kind = scorer
        self.scorer = (SpanScorer(encoder.config.hidden_size, span_hidden) if scorer == "mlp"
                       else StartEndScorer(encoder.config.hidden_size))
        self.max_span_tokens = max_span_tokens
        self.span_hidden = span_hidden
        self.tokenizer = tokenizer
        self.base_checkpoint = base_checkpoint

    @property
    def config(self) -> PretrainedConfig:
        return self.encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: Optional[torch.Tensor], segment_ids: torch.Tensor
                ) -> SpanReaderOutput:
        """Score every span of every joined sequence.

        Args:
            input_ids: ``[N, seq_len]`` (:func:`build_joined_inputs` with ``append_null=False``).
            attention_mask: ``[N, seq_len]``.
            token_type_ids: ``[N, seq_len]`` or None.
            segment_ids: ``[N, seq_len]``: 1 title, 2 body, 0 elsewhere.
        """
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              **kwargs).last_hidden_state  # [N, L, hidden]
        logits = self.scorer(states, self.max_span_tokens).float()  # [N, L, W]
        return SpanReaderOutput(span_logits=logits,
                            span_mask=span_mask_from_segments(segment_ids, self.max_span_tokens))

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, name_or_path: str, max_span_tokens: int = 10,
                        span_hidden: int = 256, *, scorer: str = "mlp",
                        seed: int = 0) -> "SpanReader":
        """A reader whose encoder starts from ``name_or_path`` and whose scorer is new.

        ``name_or_path``: a knowledge-augmented encoder directory (the masked LM's encoder is
        taken, its head dropped), a REALM pretraining run directory (its ``reader/``), or any
        transformers checkpoint / packaged alias.
        """
        path = Path(run_part(name_or_path, "reader"))  # a pretraining run: its reader/
        if (path / "manifest.json").is_file():
            manifest = read_manifest(path, kind="knowledge_augmented_encoder")
            mlm = AutoModelForMaskedLM.from_pretrained(path / manifest["model"])
            encoder = mlm.base_model
            tokenizer = load_saved_tokenizer(path, manifest)
        else:
            def quiet(path, **kwargs):  # (no load report for BERT's pooler, dropped on purpose)
                return load_pretrained(AutoModel.from_pretrained, path, "reader encoder",
                                       **kwargs)[0]

            encoder = _encoder(quiet, resolve_model_path(name_or_path))
            tokenizer = load_tokenizer(name_or_path)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            reader = cls(encoder, max_span_tokens, span_hidden, scorer=scorer,
                         tokenizer=tokenizer, base_checkpoint=str(name_or_path))
        logger.info("reader: encoder from %s, new span scorer (max %d tokens)", name_or_path,
                    max_span_tokens)
        return reader

    @classmethod
    def from_config(cls, config: PretrainedConfig, max_span_tokens: int = 10,
                    span_hidden: int = 256, scorer: str = "mlp") -> "SpanReader":
        """A randomly initialised reader (tiny test models)."""
        return cls(_encoder(AutoModel.from_config, config), max_span_tokens, span_hidden,
                   scorer=scorer)

    # -- persistence ----------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False,
                        metadata: Optional[dict[str, Any]] = None) -> Path:
        """Write a self-describing directory atomically (see the module docstring)."""
        target = Path(directory)
        with atomic_directory(target, overwrite=overwrite) as tmp:
            self.encoder.save_pretrained(tmp / MODEL_DIR)
            if self.tokenizer is not None:  # model/ loads with AutoModel and AutoTokenizer alone
                self.tokenizer.save_pretrained(str(tmp / MODEL_DIR))
            save_file({k: v.contiguous() for k, v in self.scorer.state_dict().items()},
                      str(tmp / SCORER_FILE))
            fields = {
                "base_checkpoint": self.base_checkpoint,
                "model_type": getattr(self.config, "model_type", None),
                "hidden_size": self.config.hidden_size,
                "max_span_tokens": self.max_span_tokens,
                "span_hidden": self.span_hidden,
                "span_scorer": self.scorer_kind,
                "model": MODEL_DIR,
                "scorer": SCORER_FILE,
                "tokenizer": save_tokenizer(self.tokenizer, tmp),
            }
            write_manifest(tmp, MANIFEST_KIND, FORMAT_VERSION, fields, metadata)
        logger.info("saved reader to %s", target)
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SpanReader":
        """Load a directory written by :meth:`save_pretrained`."""
        directory = Path(directory)
        manifest = read_manifest(directory, kind=MANIFEST_KIND)
        encoder = _encoder(AutoModel.from_pretrained, directory / manifest["model"])
        reader = cls(encoder, manifest["max_span_tokens"], manifest["span_hidden"],
                     scorer=manifest.get("span_scorer", "mlp"),
                     tokenizer=load_saved_tokenizer(directory, manifest),
                     base_checkpoint=manifest.get("base_checkpoint"))
        reader.scorer.load_state_dict(load_file(str(directory / manifest["scorer"])))
        return reader


def _encoder(load, *args) -> PreTrainedModel:
    """``load(*args)`` without BERT's pooler (unused by the reader) where the model has one."""
    try:
        return load(*args, add_pooling_layer=False)
    except TypeError:  # architectures without the option
        return load(*args)
