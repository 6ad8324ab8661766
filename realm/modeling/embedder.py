"""One embedder: a transformers encoder, pooling ([CLS], mean or last token) and a linear
projection to ``dim``; saved as a transformers checkpoint plus ``projection.safetensors`` and
``embedder.json`` (and a sentence-transformers layout). REALM's own embedder (converted by
:mod:`realm.modeling.convert_realm`) adds BERT's pooler before the projection and a LayerNorm
after it."""

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
from realm.hub import base_model, load_pretrained, resolve_model_path

logger = logging.getLogger(__name__)

Pooling = Literal["cls", "mean", "last"]
POOLINGS = ("cls", "mean", "last")
PROJECTION_FILE = "projection.safetensors"
EMBEDDER_FILE = "embedder.json"
#: sentence-transformers' module types, as its 3.x-6.x releases all read them.
ST_MODULES = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
              "sentence_transformers.models.Dense")
ST_LAYER_NORM = "sentence_transformers.models.LayerNorm"  # a converted REALM embedder's norm
ST_ROUTER = "sentence_transformers.models.Router"


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
        pooler: BERT's pooler (``tanh(W h + b)``, ``hidden -> hidden``) between pooling and
            the projection, as REALM's embedder reads [CLS].
        norm_eps: A LayerNorm (this epsilon) after the projection, as REALM's embedder; None:
            none.
    """

    def __init__(self, backbone: PreTrainedModel, dim: int = 128, pooling: Pooling = "cls", *,
                 pooler: bool = False, norm_eps: Optional[float] = None):
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
        hidden = backbone.config.hidden_size
        self.pooler = nn.Linear(hidden, hidden) if pooler else None
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if norm_eps is not None else None
        for head in self.head_modules().values():
            head.to(device=backbone.device, dtype=backbone.dtype)

    @property
    def dim(self) -> int:
        return self.projection.out_features

    def head_modules(self) -> dict[str, nn.Module]:
        """What follows the pooling, by name: ``pooler`` (if any), ``projection``, ``norm`` (if
        any)."""
        return {name: module for name, module in (("pooler", self.pooler),
                                                  ("projection", self.projection),
                                                  ("norm", self.norm)) if module is not None}

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
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(pooled))  # [n, hidden]
        out = self.projection(pooled)  # [n, dim]
        return self.norm(out) if self.norm is not None else out

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

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any = None,
                        max_seq_length: Optional[int] = None,
                        base_checkpoint: Optional[str] = None) -> None:
        """Write the encoder (transformers format, safetensors), projection, and head settings;
        with a ``tokenizer``, also the tokenizer and the sentence-transformers modules
        (Transformer, Pooling, Dense = the projection), so that ``SentenceTransformer(directory)``
        embeds a text as :meth:`Retriever.encode_queries` embeds ``[CLS] text [SEP]``.

        Args:
            max_seq_length: Word pieces sentence-transformers keeps, special tokens included:
                the length the encoder was trained at (a query encoder's
                ``max_query_tokens + 2``); None: the backbone's position limit.
            base_checkpoint: What the encoder started from (its card names the Hub id).

        Not atomic by itself: :meth:`Retriever.save_pretrained` calls it inside a temp dir.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory)
        parts = {name: {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
                 for name, module in self.head_modules().items()}
        # the projection unprefixed (as before the pooler and norm existed), the others prefixed
        save_file({**parts["projection"], **{f"{name}.{k}": v for name, part in parts.items()
                                             if name != "projection" for k, v in part.items()}},
                  str(directory / PROJECTION_FILE))
        head = {
            "dim": self.dim,
            "pooling": self.pooling,
            "hidden_size": self.backbone.config.hidden_size,
            "projection": PROJECTION_FILE,
            **({"pooler": True} if self.pooler is not None else {}),
            **({"norm_eps": self.norm.eps} if self.norm is not None else {}),
        }
        (directory / EMBEDDER_FILE).write_text(json.dumps(head, indent=2) + "\n", encoding="utf-8")
        max_seq_length = max_seq_length or int(getattr(self.backbone.config,
                                                       "max_position_embeddings", 512))
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
            self._write_sentence_transformers(directory, parts, max_seq_length)

        role = {"query_encoder": "Query encoder", "doc_encoder": "Document encoder"}.get(
            directory.name, "Encoder")
        (directory / CARD).write_text(
            encoder_card(role, self.dim, self.pooling, max_seq_length,
                         base_model(base_checkpoint)), encoding="utf-8")

    def _write_sentence_transformers(self, directory: Path, parts: dict[str, Any],
                                     max_seq_length: int) -> None:
        """sentence-transformers' module files (its documented on-disk layout); REALM's pooler
        is a Tanh Dense module before the projection's, its norm a LayerNorm module after it
        (whose epsilon sentence-transformers fixes at 1e-5)."""
        hidden = self.backbone.config.hidden_size
        transformer, pooling, dense = ST_MODULES
        modules = [(transformer, ""), (pooling, "1_Pooling"),
                   *([(dense, "2_Pooler")] if "pooler" in parts else []), (dense, "2_Dense"),
                   *([(ST_LAYER_NORM, "3_LayerNorm")] if "norm" in parts else [])]
        write_json(directory / "modules.json", [
            {"idx": i, "name": str(i), "path": path, "type": kind}
            for i, (kind, path) in enumerate(modules)])
        settings: dict[str, Any] = {"max_seq_length": max_seq_length, "do_lower_case": False}
        if backbone_kwargs(self.backbone.config):  # no pooler, as realm loads it
            settings["model_args"] = backbone_kwargs(self.backbone.config)
        write_json(directory / "sentence_bert_config.json", settings)
        write_json(directory / "config_sentence_transformers.json", st_model_config())
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
        save_file({f"linear.{k}": v for k, v in parts["projection"].items()},
                  str(directory / "2_Dense" / "model.safetensors"))
        if "pooler" in parts:
            (directory / "2_Pooler").mkdir(exist_ok=True)
            write_json(directory / "2_Pooler" / "config.json", {
                "in_features": hidden, "out_features": hidden, "bias": True,
                "activation_function": "torch.nn.modules.activation.Tanh"})
            save_file({f"linear.{k}": v for k, v in parts["pooler"].items()},
                      str(directory / "2_Pooler" / "model.safetensors"))
        if "norm" in parts:
            (directory / "3_LayerNorm").mkdir(exist_ok=True)
            write_json(directory / "3_LayerNorm" / "config.json", {"dimension": self.dim})
            save_file({f"norm.{k}": v for k, v in parts["norm"].items()},
                      str(directory / "3_LayerNorm" / "model.safetensors"))

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32
    ) -> "Embedder":
        """Load what :meth:`save_pretrained` wrote."""
        directory = Path(directory)
        head = json.loads((directory / EMBEDDER_FILE).read_text(encoding="utf-8"))
        config = AutoConfig.from_pretrained(directory)
        backbone, _ = load_pretrained(AutoModel.from_pretrained, str(directory), "encoder",
                                      config=config, dtype=dtype, **backbone_kwargs(config))
        embedder = cls(backbone, dim=head["dim"], pooling=head["pooling"],
                       pooler=bool(head.get("pooler")), norm_eps=head.get("norm_eps"))
        state = load_file(str(directory / head.get("projection", PROJECTION_FILE)))
        for name, module in embedder.head_modules().items():
            prefix = "" if name == "projection" else f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                    if k.startswith(prefix) and (prefix or "." not in k)},
                                   strict=True)
            module.to(dtype=dtype)
        return embedder


def st_model_config(prompts: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """``config_sentence_transformers.json``: realm scores by inner product."""
    return {"model_type": "SentenceTransformer", "similarity_fn_name": "dot",
            "prompts": prompts or {}, "default_prompt_name": None}


def write_router(directory: Path, query_dir: str, doc_dir: str) -> None:
    """Make ``directory`` one sentence-transformers model (sentence-transformers >= 5) over the
    two encoder directories :meth:`Embedder.save_pretrained` wrote inside it: a Router whose
    ``query`` route (also plain ``encode``) runs ``query_dir``'s modules (as its
    ``modules.json`` lists them) and whose ``document`` route runs ``doc_dir``'s, so
    ``encode_query`` and ``encode_document`` give realm's query and block embeddings. No
    weights are copied."""
    routes: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    for route, sub in (("query", query_dir), ("document", doc_dir)):
        modules = json.loads((directory / sub / "modules.json").read_text(encoding="utf-8"))
        routes[route] = [f"{sub}/{m['path']}" if m["path"] else sub for m in modules]
        types.update(zip(routes[route], (m["type"] for m in modules)))
    write_json(directory / "modules.json",
               [{"idx": 0, "name": "0", "path": "", "type": ST_ROUTER}])
    write_json(directory / "router_config.json", {
        "types": types, "structure": routes,
        "parameters": {"default_route": "query", "allow_empty_key": True}})
    write_json(directory / "config_sentence_transformers.json",
               st_model_config({"query": "", "document": ""}))
