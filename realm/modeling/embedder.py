"""One embedder: a transformers encoder, pooling ([CLS], mean or last token) and a linear
projection to ``dim``; saved as a transformers checkpoint plus ``projection.safetensors`` and
``embedder.json`` (and a sentence-transformers layout)."""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from realm.artifacts import write_json
from realm.cards import CARD, encoder_card
from realm.hub import load_pretrained, resolve_model_path

logger = logging.getLogger(__name__)

Pooling = Literal["cls", "mean", "last"]
POOLINGS = ("cls", "mean", "last")
PROJECTION_FILE = "projection.safetensors"
EMBEDDER_FILE = "embedder.json"


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


def check_head(dim: int, pooling: str) -> None:
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def backbone_kwargs(config: PretrainedConfig) -> dict[str, Any]:
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
        check_head(dim, pooling)
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
        check_head(dim, pooling)
        path = resolve_model_path(name_or_path)
        config = AutoConfig.from_pretrained(path)
        backbone, _ = load_pretrained(AutoModel.from_pretrained, path, "retriever encoder",
                                      config=config, dtype=dtype, **backbone_kwargs(config))
        return cls(backbone, dim=dim, pooling=pooling)

    @classmethod
    def from_config(
        cls, config: PretrainedConfig, dim: int = 128, pooling: Pooling = "cls"
    ) -> "Embedder":
        """Randomly initialised encoder from a config (tiny test models)."""
        check_head(dim, pooling)
        backbone = AutoModel.from_config(config, **backbone_kwargs(config))
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

        role = {"query_encoder": "Query encoder", "doc_encoder": "Document encoder"}.get(
            directory.name, "Encoder")
        (directory / CARD).write_text(encoder_card(role, self.dim, self.pooling), encoding="utf-8")

    def _write_sentence_transformers(self, directory: Path, projection: dict[str, Any]) -> None:
        """sentence-transformers' module files (its documented on-disk layout)."""
        hidden = self.backbone.config.hidden_size
        modules = [("sentence_transformers.models.Transformer", ""),
                   ("sentence_transformers.models.Pooling", "1_Pooling"),
                   ("sentence_transformers.models.Dense", "2_Dense")]
        write_json(directory / "modules.json", [
            {"idx": i, "name": str(i), "path": path, "type": kind}
            for i, (kind, path) in enumerate(modules)])
        write_json(directory / "sentence_bert_config.json",
                    {"max_seq_length": int(getattr(self.backbone.config,
                                                   "max_position_embeddings", 512)),
                     "do_lower_case": False})
        (directory / "1_Pooling").mkdir(exist_ok=True)
        write_json(directory / "1_Pooling" / "config.json", {
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_lasttoken": self.pooling == "last"})
        (directory / "2_Dense").mkdir(exist_ok=True)
        write_json(directory / "2_Dense" / "config.json", {
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
            directory, config=config, dtype=dtype, **backbone_kwargs(config)
        )
        embedder = cls(backbone, dim=head["dim"], pooling=head["pooling"])
        state = load_file(str(directory / head.get("projection", PROJECTION_FILE)))
        embedder.projection.load_state_dict(state, strict=True)
        embedder.projection.to(dtype=dtype)
        return embedder
