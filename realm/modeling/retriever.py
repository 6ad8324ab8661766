"""The REALM retriever: ``f(x, z) = Embed_input(x)ᵀ Embed_doc(z)``.

Two :class:`Embedder` s (a transformers encoder, [CLS] or mean pooling, a linear projection to
``dim``) with separate weights, both initialised from the same checkpoint. Blocks are encoded as
``[CLS] title [SEP] body [SEP]`` from pre-tokenized word-piece ids, queries as ``[CLS] q [SEP]``::

    retriever = Retriever.from_checkpoint("sentence-transformers/all-MiniLM-L6-v2", dim=128)
    blocks = build_block_inputs(titles, bodies, cls_id, sep_id, pad_id)
    out = retriever.encode_blocks(blocks.input_ids, blocks.attention_mask)   # out.p_reps [N, 128]
    retriever.save_pretrained("run/retriever")                               # atomic directory
    retriever = Retriever.from_pretrained("run/retriever")

A saved retriever is a self-describing directory::

    manifest.json        kind "retriever", dim, pooling, trained lengths, base checkpoint, sizes
    query_encoder/       config.json, model.safetensors, projection.safetensors, embedder.json,
                         and a sentence-transformers model cut at the trained query length
    doc_encoder/         the same, for blocks
    tokenizer/           the checkpoint's tokenizer (when there is one)
    modules.json, router_config.json   the directory as one sentence-transformers model
                         (``encode_query`` / ``encode_document``; :func:`write_router`)
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import PretrainedConfig

from realm.artifacts import (atomic_directory, load_saved_tokenizer, read_manifest, save_tokenizer,
                             write_manifest)
from realm.hub import load_tokenizer, truncated_encoder
from realm.modeling.embedder import Embedder, Pooling, write_router

logger = logging.getLogger(__name__)


MANIFEST_KIND = "retriever"
FORMAT_VERSION = 1
QUERY_ENCODER_DIR = "query_encoder"
DOC_ENCODER_DIR = "doc_encoder"


@dataclass
class RetrieverOutput:
    """What the retriever returns; fields it did not compute stay None.

    Attributes:
        q_reps: Query embeddings, ``[batch, dim]``.
        p_reps: Block (passage) embeddings, ``[num_blocks, dim]``.
        scores: Inner products ``q_reps @ p_reps.T``, ``[batch, num_blocks]``.
    """

    q_reps: Optional[torch.Tensor] = None
    p_reps: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------
# The retriever


class Retriever(nn.Module):
    """Query encoder and document encoder; ``scores = q_reps @ p_reps.T``.

    Build it with :meth:`from_checkpoint`, :meth:`from_config`, :meth:`from_pretrained` or
    :func:`build_retriever`. Passing the same :class:`Embedder` twice shares the weights.

    Args:
        query_encoder: Embeds queries (masked sentences, questions).
        doc_encoder: Embeds blocks; must have the same ``dim``.
        tokenizer: The checkpoint's tokenizer, saved with the retriever; None for tiny models.
        base_checkpoint: Name the encoders were initialised from (recorded in the manifest).
        max_query_tokens, max_block_tokens: The word pieces (special tokens excluded) the
            encoders were trained at, recorded in the manifest; the sentence-transformers
            export cuts texts there. A training stage sets them (None: not trained yet).
    """

    def __init__(
        self,
        query_encoder: Embedder,
        doc_encoder: Embedder,
        *,
        tokenizer: Any = None,
        base_checkpoint: Optional[str] = None,
        max_query_tokens: Optional[int] = None,
        max_block_tokens: Optional[int] = None,
    ):
        super().__init__()
        if query_encoder.dim != doc_encoder.dim:
            raise ValueError(
                f"query encoder dim {query_encoder.dim} != doc encoder dim {doc_encoder.dim}"
            )
        self.query_encoder = query_encoder
        self.doc_encoder = doc_encoder
        self.tokenizer = tokenizer
        self.base_checkpoint = base_checkpoint
        self.max_query_tokens, self.max_block_tokens = max_query_tokens, max_block_tokens

    @property
    def dim(self) -> int:
        return self.query_encoder.dim

    @property
    def pooling(self) -> str:
        return self.query_encoder.pooling

    @property
    def share_weights(self) -> bool:
        return self.doc_encoder is self.query_encoder

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def _from_query_encoder(
        cls, query_encoder: Embedder, share_weights: bool, **kwargs: Any
    ) -> "Retriever":
        # Same starting point for both towers; deepcopy gives the doc encoder its own weights.
        doc_encoder = query_encoder if share_weights else copy.deepcopy(query_encoder)
        return cls(query_encoder, doc_encoder, **kwargs)

    @classmethod
    def from_checkpoint(
        cls,
        name_or_path: str,
        dim: int = 128,
        pooling: Pooling = "cls",
        *,
        share_weights: bool = False,
        with_tokenizer: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> "Retriever":
        """Both encoders from one transformers checkpoint, with identical new projections.

        Args:
            name_or_path: Local directory, hub name, or packaged alias (see
                :func:`realm.hub.resolve_model_path`).
            dim: Embedding size.
            pooling: ``"cls"`` or ``"mean"``.
            share_weights: One encoder for queries and blocks.
            with_tokenizer: Also load the checkpoint's (fast) tokenizer, saved with the model.
            dtype: Parameter dtype.
        """
        query_encoder = Embedder.from_checkpoint(name_or_path, dim, pooling, dtype=dtype)
        tokenizer = load_tokenizer(name_or_path) if with_tokenizer else None
        return cls._from_query_encoder(
            query_encoder, share_weights, tokenizer=tokenizer, base_checkpoint=name_or_path
        )

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        dim: int = 128,
        pooling: Pooling = "cls",
        *,
        share_weights: bool = False,
    ) -> "Retriever":
        """Randomly initialised encoders from a transformers config (tiny test models)."""
        query_encoder = Embedder.from_config(config, dim, pooling)
        return cls._from_query_encoder(query_encoder, share_weights, base_checkpoint=None)

    # -- encoding -------------------------------------------------------------------------

    def encode_queries(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> RetrieverOutput:
        """Embed queries: ``input_ids`` ``[batch, seq_len]`` -> ``q_reps`` ``[batch, dim]``."""
        q_reps = self.query_encoder(input_ids, attention_mask, token_type_ids)  # [batch, dim]
        return RetrieverOutput(q_reps=q_reps)

    def encode_blocks(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> RetrieverOutput:
        """Embed blocks: ``[num_blocks, seq_len]`` ids -> ``p_reps`` ``[num_blocks, dim]``.

        ``token_type_ids`` (``[num_blocks, seq_len]``, from :func:`build_block_inputs`) mark the
        body as segment 1; leave them out for encoders with a single token type.
        """
        p_reps = self.doc_encoder(input_ids, attention_mask, token_type_ids)  # [num_blocks, dim]
        return RetrieverOutput(p_reps=p_reps)

    def forward(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        block_ids: torch.Tensor,
        block_mask: torch.Tensor,
        block_type_ids: Optional[torch.Tensor] = None,
    ) -> RetrieverOutput:
        """Score every query against every block.

        Args:
            query_ids: ``[batch, query_len]``.
            query_mask: ``[batch, query_len]``.
            block_ids: ``[num_blocks, block_len]``.
            block_mask: ``[num_blocks, block_len]``.
            block_type_ids: ``[num_blocks, block_len]`` or None.

        Returns:
            :class:`RetrieverOutput` with ``q_reps`` ``[batch, dim]``, ``p_reps``
            ``[num_blocks, dim]`` and ``scores`` ``[batch, num_blocks]``.
        """
        q_reps = self.encode_queries(query_ids, query_mask).q_reps  # [batch, dim]
        p_reps = self.encode_blocks(block_ids, block_mask, block_type_ids).p_reps  # [blocks, dim]
        scores = q_reps @ p_reps.transpose(0, 1)  # [batch, num_blocks]
        return RetrieverOutput(q_reps=q_reps, p_reps=p_reps, scores=scores)

    # -- persistence ----------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        tokenizer: Any = None,
        metadata: Optional[dict[str, Any]] = None,
        overwrite: bool = False,
    ) -> Path:
        """Write a self-describing retriever directory, atomically.

        Everything is written into a hidden temp directory beside the target, fsynced, and
        renamed into place; ``manifest.json`` is written last. A crash leaves at most a
        ``.NAME.tmp-*`` directory behind, never a partial ``NAME``.

        Args:
            save_directory: Target directory; must not exist unless ``overwrite``.
            tokenizer: Tokenizer to save; defaults to the one the retriever was built with.
            metadata: Extra JSON-able fields for the manifest (e.g. the training step).
            overwrite: Replace an existing directory (the old one is swapped out, then removed).

        Returns:
            The target directory.
        """
        target = Path(save_directory)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        q_len, b_len = self.max_query_tokens, self.max_block_tokens
        with atomic_directory(target, overwrite=overwrite) as tmp:
            # sentence-transformers counts special tokens: [CLS] q [SEP], [CLS] t [SEP] b [SEP]
            self.query_encoder.save_pretrained(tmp / QUERY_ENCODER_DIR, tokenizer,
                                               q_len + 2 if q_len else None, self.base_checkpoint)
            self.doc_encoder.save_pretrained(tmp / DOC_ENCODER_DIR, tokenizer,
                                             b_len + 3 if b_len else None, self.base_checkpoint)
            if tokenizer is not None:
                write_router(tmp, QUERY_ENCODER_DIR, DOC_ENCODER_DIR)
            tokenizer_dir = save_tokenizer(tokenizer, tmp)
            config = self.query_encoder.backbone.config
            fields = {
                "dim": self.dim,
                "pooling": self.pooling,
                "share_weights": self.share_weights,
                "base_checkpoint": self.base_checkpoint,
                "model_type": getattr(config, "model_type", None),
                "hidden_size": config.hidden_size,
                "max_query_tokens": q_len,
                "max_block_tokens": b_len,
                "query_encoder": QUERY_ENCODER_DIR,
                "doc_encoder": DOC_ENCODER_DIR,
                "tokenizer": tokenizer_dir,
            }
            write_manifest(tmp, MANIFEST_KIND, FORMAT_VERSION, fields, metadata)
        logger.info("saved retriever (dim %d, %s pooling) to %s", self.dim, self.pooling, target)
        return target

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: Optional[str | torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ) -> "Retriever":
        """Load a directory written by :meth:`save_pretrained` (transformers + safetensors only).

        Raises:
            FileNotFoundError: No ``manifest.json`` (not a finished retriever directory).
            ValueError: The manifest is of another kind, or a listed file is missing or has
                the wrong size.
        """
        directory = Path(directory)
        manifest = read_manifest(directory, MANIFEST_KIND)
        query_encoder = Embedder.from_pretrained(directory / manifest["query_encoder"], dtype)
        if manifest["share_weights"]:
            doc_encoder = query_encoder
        else:
            doc_encoder = Embedder.from_pretrained(directory / manifest["doc_encoder"], dtype)
        tokenizer = load_saved_tokenizer(directory, manifest)
        retriever = cls(
            query_encoder, doc_encoder, tokenizer=tokenizer,
            base_checkpoint=manifest.get("base_checkpoint"),
            max_query_tokens=manifest.get("max_query_tokens"),
            max_block_tokens=manifest.get("max_block_tokens"),
        )
        if device is not None:
            retriever.to(device)
        logger.info(
            "loaded retriever from %s (dim %d, %s pooling, base %s)",
            directory, retriever.dim, retriever.pooling, retriever.base_checkpoint,
        )
        return retriever


def build_retriever(
    name_or_path: Optional[str] = None,
    *,
    config: Optional[PretrainedConfig] = None,
    dim: int = 128,
    pooling: Pooling = "cls",
    share_weights: bool = False,
    **kwargs: Any,
) -> Retriever:
    """Builder: a retriever from a checkpoint name/path or (for tiny models) a config.

    Args:
        name_or_path: Checkpoint to initialise both encoders from.
        config: A transformers config (e.g. ``BertConfig``) for a randomly initialised model.
        dim: Embedding size.
        pooling: ``"cls"`` or ``"mean"``.
        share_weights: One encoder for queries and blocks.
        **kwargs: Passed to :meth:`Retriever.from_checkpoint` (``with_tokenizer``, ``dtype``).
    """
    if (name_or_path is None) == (config is None):
        raise ValueError("give exactly one of name_or_path or config")
    if config is not None:
        return Retriever.from_config(config, dim, pooling, share_weights=share_weights)
    return Retriever.from_checkpoint(
        name_or_path, dim, pooling, share_weights=share_weights, **kwargs
    )


def load_retriever(encoder: str, dim: int, pooling: str, layers: Optional[int] = None,
                   cache_dir: str = "runs/cache", max_query_tokens: Optional[int] = None,
                   max_block_tokens: Optional[int] = None) -> Retriever:
    """A saved retriever directory as is, a run directory's (ICT, pretraining: its
    ``retriever/``), else fresh encoders from a transformers checkpoint (its first ``layers``
    layers, a cut copy cached in ``cache_dir``, when given). ``max_query_tokens`` and
    ``max_block_tokens``, when given, are the lengths the caller trains it at (recorded when it
    is saved)."""
    if (not os.path.isfile(os.path.join(encoder, "manifest.json"))
            and os.path.isfile(os.path.join(encoder, "retriever", "manifest.json"))):
        encoder = os.path.join(encoder, "retriever")
    if os.path.isfile(os.path.join(encoder, "manifest.json")):
        retriever = Retriever.from_pretrained(encoder)
    else:
        retriever = Retriever.from_checkpoint(truncated_encoder(encoder, layers, cache_dir),
                                              dim=dim, pooling=pooling)
    retriever.max_query_tokens = max_query_tokens or retriever.max_query_tokens
    retriever.max_block_tokens = max_block_tokens or retriever.max_block_tokens
    return retriever
