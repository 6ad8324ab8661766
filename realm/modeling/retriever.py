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

    manifest.json        kind "retriever", dim, pooling, base checkpoint, realm version, sizes
    query_encoder/       config.json, model.safetensors, projection.safetensors, embedder.json
    doc_encoder/         the same, for blocks
    tokenizer/           the checkpoint's tokenizer (when there is one)
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

import realm
from realm.fsutil import fsync_dir
from realm.hub import load_tokenizer, resolve_model_path

logger = logging.getLogger(__name__)

Pooling = Literal["cls", "mean", "last"]
POOLINGS = ("cls", "mean", "last")

MANIFEST = "manifest.json"
MANIFEST_KIND = "retriever"
FORMAT_VERSION = 1
QUERY_ENCODER_DIR = "query_encoder"
DOC_ENCODER_DIR = "doc_encoder"
TOKENIZER_DIR = "tokenizer"
PROJECTION_FILE = "projection.safetensors"
EMBEDDER_FILE = "embedder.json"


# ---------------------------------------------------------------------------------------------
# Outputs and inputs


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


def _as_ids(ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def _pack(
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
        title, body = _as_ids(title), _as_ids(body)
        if max_length is not None:
            room = max_length - 3
            title = title[:room]
            body = body[: room - len(title)]
        rows.append([(cls, 0), (title, 0), (sep, 0), (body, 1), (sep, 1)])
    return _pack(rows, pad_id)


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
        ids = _as_ids(ids)
        if max_length is not None:
            ids = ids[: max_length - 2]
        rows.append([(cls, 0), (ids, 0), (sep, 0)])
    return _pack(rows, pad_id)


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


# ---------------------------------------------------------------------------------------------
# Encoders


def pool(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling
) -> torch.Tensor:
    """Pool token states into one vector per sequence.

    Args:
        hidden_states: ``[n, seq_len, hidden]``.
        attention_mask: 1 on real tokens, ``[n, seq_len]``.
        pooling: ``"cls"`` takes the first token; ``"mean"`` averages the real tokens only;
            ``"last"`` takes the last real token (right padding), for decoder-only encoders
            whose sequences end with an end-of-text token (DRAMA).

    Returns:
        ``[n, hidden]``.
    """
    if pooling == "cls":
        return hidden_states[:, 0]  # [n, hidden]
    if pooling == "last":
        last = attention_mask.sum(dim=1).clamp(min=1) - 1  # [n]
        return hidden_states[torch.arange(len(last), device=last.device), last]  # [n, hidden]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)  # [n, seq_len, 1]
        summed = (hidden_states * mask).sum(dim=1)  # [n, hidden]
        counts = mask.sum(dim=1).clamp(min=1.0)  # [n, 1]
        return summed / counts  # [n, hidden]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _check_head(dim: int, pooling: str) -> None:
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _backbone_kwargs(config: PretrainedConfig) -> dict[str, Any]:
    """Leave out BERT-style poolers: REALM pools itself, and unused weights upset DDP."""
    if type(config) not in MODEL_MAPPING:
        return {}
    params = inspect.signature(MODEL_MAPPING[type(config)].__init__).parameters
    return {"add_pooling_layer": False} if "add_pooling_layer" in params else {}


class Embedder(nn.Module):
    """A transformers encoder, pooling, and a linear projection to ``dim``.

    Args:
        backbone: Any transformers encoder whose output has ``last_hidden_state``.
        dim: Size of the embeddings.
        pooling: ``"cls"`` or ``"mean"`` (see :func:`pool`).
    """

    def __init__(self, backbone: PreTrainedModel, dim: int = 128, pooling: Pooling = "cls"):
        super().__init__()
        _check_head(dim, pooling)
        self.backbone = backbone
        self.pooling = pooling
        # decoder-only backbones (Llama) take no segment ids
        self._segments = "token_type_ids" in inspect.signature(backbone.forward).parameters
        self.projection = nn.Linear(backbone.config.hidden_size, dim)
        # Orthonormal rows: a pretrained encoder's inner products survive the projection (exactly
        # when dim == hidden size, a rotation), so a fresh retriever starts from the checkpoint's
        # geometry instead of a random distortion of it.
        nn.init.orthogonal_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)
        self.projection.to(device=backbone.device, dtype=backbone.dtype)

    @property
    def dim(self) -> int:
        return self.projection.out_features

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Embed a batch.

        Args:
            input_ids: ``[n, seq_len]``.
            attention_mask: ``[n, seq_len]``.
            token_type_ids: ``[n, seq_len]`` or None (all zeros).

        Returns:
            ``[n, dim]``.
        """
        kwargs = ({"token_type_ids": token_type_ids}
                  if token_type_ids is not None and self._segments else {})
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        ).last_hidden_state  # [n, seq_len, hidden]
        pooled = pool(hidden, attention_mask, self.pooling)  # [n, hidden]
        return self.projection(pooled)  # [n, dim]

    @classmethod
    def from_checkpoint(
        cls,
        name_or_path: str,
        dim: int = 128,
        pooling: Pooling = "cls",
        dtype: torch.dtype = torch.float32,
    ) -> "Embedder":
        """Pretrained encoder (resolved by :func:`realm.hub.resolve_model_path`), new projection."""
        _check_head(dim, pooling)
        path = resolve_model_path(name_or_path)
        config = AutoConfig.from_pretrained(path)
        from realm.hub import load_pretrained

        backbone, _ = load_pretrained(AutoModel.from_pretrained, path, "retriever encoder",
                                      config=config, dtype=dtype, **_backbone_kwargs(config))
        return cls(backbone, dim=dim, pooling=pooling)

    @classmethod
    def from_config(
        cls, config: PretrainedConfig, dim: int = 128, pooling: Pooling = "cls"
    ) -> "Embedder":
        """Randomly initialised encoder from a config (tiny test models)."""
        _check_head(dim, pooling)
        backbone = AutoModel.from_config(config, **_backbone_kwargs(config))
        return cls(backbone, dim=dim, pooling=pooling)

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any = None) -> None:
        """Write the encoder (transformers format, safetensors), projection, and head settings;
        with a ``tokenizer``, also the tokenizer and the sentence-transformers modules
        (Transformer, Pooling, Dense = the projection), so that ``SentenceTransformer(directory)``
        embeds a text as :meth:`Retriever.encode_queries` embeds ``[CLS] text [SEP]``.

        Not atomic by itself: :meth:`Retriever.save_pretrained` calls it inside a temp dir.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.projection.state_dict().items()}
        save_file(state, str(directory / PROJECTION_FILE))
        head = {
            "dim": self.dim,
            "pooling": self.pooling,
            "hidden_size": self.backbone.config.hidden_size,
            "projection": PROJECTION_FILE,
        }
        (directory / EMBEDDER_FILE).write_text(json.dumps(head, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
            self._write_sentence_transformers(directory, state)
        from realm.modeling.cards import CARD, encoder_card

        role = {"query_encoder": "Query encoder", "doc_encoder": "Document encoder"}.get(
            directory.name, "Encoder")
        (directory / CARD).write_text(encoder_card(role, self.dim, self.pooling), encoding="utf-8")

    def _write_sentence_transformers(self, directory: Path, projection: dict[str, Any]) -> None:
        """sentence-transformers' module files (its documented on-disk layout)."""
        hidden = self.backbone.config.hidden_size
        modules = [("sentence_transformers.models.Transformer", ""),
                   ("sentence_transformers.models.Pooling", "1_Pooling"),
                   ("sentence_transformers.models.Dense", "2_Dense")]
        _write_json(directory / "modules.json", [
            {"idx": i, "name": str(i), "path": path, "type": kind}
            for i, (kind, path) in enumerate(modules)])
        _write_json(directory / "sentence_bert_config.json",
                    {"max_seq_length": int(getattr(self.backbone.config,
                                                   "max_position_embeddings", 512)),
                     "do_lower_case": False})
        (directory / "1_Pooling").mkdir(exist_ok=True)
        _write_json(directory / "1_Pooling" / "config.json", {
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_lasttoken": self.pooling == "last"})
        (directory / "2_Dense").mkdir(exist_ok=True)
        _write_json(directory / "2_Dense" / "config.json", {
            "in_features": hidden, "out_features": self.dim, "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity"})
        save_file({f"linear.{k}": v for k, v in projection.items()},
                  str(directory / "2_Dense" / "model.safetensors"))

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32
    ) -> "Embedder":
        """Load what :meth:`save_pretrained` wrote."""
        directory = Path(directory)
        head = json.loads((directory / EMBEDDER_FILE).read_text(encoding="utf-8"))
        config = AutoConfig.from_pretrained(directory)
        backbone = AutoModel.from_pretrained(
            directory, config=config, dtype=dtype, **_backbone_kwargs(config)
        )
        embedder = cls(backbone, dim=head["dim"], pooling=head["pooling"])
        state = load_file(str(directory / head.get("projection", PROJECTION_FILE)))
        embedder.projection.load_state_dict(state, strict=True)
        embedder.projection.to(dtype=dtype)
        return embedder


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
    """

    def __init__(
        self,
        query_encoder: Embedder,
        doc_encoder: Embedder,
        *,
        tokenizer: Any = None,
        base_checkpoint: Optional[str] = None,
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
        with _atomic_directory(target, overwrite=overwrite) as tmp:
            self.query_encoder.save_pretrained(tmp / QUERY_ENCODER_DIR, tokenizer)
            self.doc_encoder.save_pretrained(tmp / DOC_ENCODER_DIR, tokenizer)
            tokenizer_dir = _save_tokenizer(tokenizer, tmp)
            config = self.query_encoder.backbone.config
            fields = {
                "dim": self.dim,
                "pooling": self.pooling,
                "share_weights": self.share_weights,
                "base_checkpoint": self.base_checkpoint,
                "model_type": getattr(config, "model_type", None),
                "hidden_size": config.hidden_size,
                "query_encoder": QUERY_ENCODER_DIR,
                "doc_encoder": DOC_ENCODER_DIR,
                "tokenizer": tokenizer_dir,
            }
            _write_manifest(tmp, MANIFEST_KIND, FORMAT_VERSION, fields, metadata)
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
        manifest = read_manifest(directory)
        query_encoder = Embedder.from_pretrained(directory / manifest["query_encoder"], dtype)
        if manifest["share_weights"]:
            doc_encoder = query_encoder
        else:
            doc_encoder = Embedder.from_pretrained(directory / manifest["doc_encoder"], dtype)
        tokenizer = _load_saved_tokenizer(directory, manifest)
        retriever = cls(
            query_encoder, doc_encoder, tokenizer=tokenizer,
            base_checkpoint=manifest.get("base_checkpoint"),
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


# ---------------------------------------------------------------------------------------------
# Directory helpers


def read_manifest(directory: str | os.PathLike, kind: str = MANIFEST_KIND) -> dict[str, Any]:
    """Read and check a saved model directory's manifest (kind and listed file sizes).

    Args:
        directory: A directory written by ``save_pretrained``.
        kind: The manifest kind expected (``"retriever"`` unless told otherwise).
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a saved {kind}")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("kind") != kind:
        raise ValueError(f"{path}: kind is {manifest.get('kind')!r}, expected {kind!r}")
    for rel, size in manifest.get("files", {}).items():
        file = directory / rel
        if not file.is_file():
            raise ValueError(f"{directory}: {rel} is listed in {MANIFEST} but missing")
        if file.stat().st_size != size:
            raise ValueError(
                f"{directory}: {rel} has {file.stat().st_size} bytes, manifest says {size}"
            )
    return manifest


def _save_tokenizer(tokenizer: Any, directory: Path) -> Optional[str]:
    """Save ``tokenizer`` (if any) under ``directory`` (its manifest entry, returned) and at the
    directory's top too, so that ``AutoTokenizer.from_pretrained(directory)`` loads it."""
    if tokenizer is None:
        return None
    tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    tokenizer.save_pretrained(str(directory))
    return TOKENIZER_DIR


def _load_saved_tokenizer(directory: Path, manifest: dict[str, Any]) -> Any:
    """The tokenizer a saved model directory holds, or None when it was saved without one."""
    if not manifest.get("tokenizer"):
        return None
    return AutoTokenizer.from_pretrained(str(directory / manifest["tokenizer"]))


def _write_manifest(
    directory: Path,
    kind: str,
    format_version: int,
    fields: dict[str, Any],
    metadata: Optional[dict[str, Any]],
) -> None:
    """Write ``README.md`` (the model card) and then ``manifest.json`` last into a model directory
    being built: kind and format, the model's own ``fields``, then creation time, realm version,
    metadata and every file's size."""
    from realm.modeling.cards import write_model_card

    write_model_card(directory, kind, fields, metadata)
    manifest = {
        "kind": kind,
        "format_version": format_version,
        **fields,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "realm_version": realm.__version__,
        "metadata": metadata or {},
        "files": _file_sizes(directory),
    }
    _write_json(directory / MANIFEST, manifest)


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to stable storage."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


class _atomic_directory:
    """Context manager: yields a temp dir beside ``target``; on success renames it into place."""

    def __init__(self, target: Path, overwrite: bool = False):
        self.target = Path(target)
        self.overwrite = overwrite
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        if self.target.exists() and not self.overwrite:
            raise FileExistsError(f"{self.target} exists (pass overwrite=True to replace it)")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        suffix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{suffix}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            logger.warning("writing %s failed; removing %s", self.target, self.tmp)
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            _fsync_tree(self.tmp)
            if self.target.exists():
                old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(self.target, old)
                try:
                    os.rename(self.tmp, self.target)
                except BaseException:
                    os.rename(old, self.target)  # put the previous version back
                    raise
                shutil.rmtree(old)
            else:
                os.rename(self.tmp, self.target)
            fsync_dir(self.target.parent)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
