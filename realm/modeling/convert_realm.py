"""The original REALM checkpoints as realm's retriever and reader directories.

Google's REALM checkpoints (Guu et al. 2020; on the Hub as ``google/realm-cc-news-pretrained-
embedder`` and ``-encoder``) were published for transformers 4.x's ``RealmEmbedder`` and
``RealmKnowledgeAugEncoder``. transformers 5 removed those classes (and ``RealmConfig``,
``RealmTokenizer``), so the checkpoints no longer load there; their weights are plain BERT under
other names, which this module maps onto realm's own directories::

    RealmEmbedder (retriever)        realm's Retriever (both towers: the same weights)
      realm.embeddings.*, realm.encoder.layer.N.*   ->  BertModel (no pooler)
      realm.pooler.dense.*                          ->  Embedder.pooler  (tanh(W h_CLS + b))
      cls.dense.*                                   ->  Embedder.projection (hidden -> 128)
      cls.LayerNorm.*                               ->  Embedder.norm
      cls.predictions.*                             dropped (the embedder never reads it)
    RealmKnowledgeAugEncoder (reader)  realm's KnowledgeAugmentedEncoder (BertForMaskedLM)
      realm.embeddings.*, realm.encoder.*           ->  bert.*
      cls.predictions.*                             ->  cls.predictions.* (the MLM head)
      realm.pooler.*                                dropped (the MLM head reads every position)

So the converted retriever embeds a text exactly as ``RealmEmbedder`` did (the [CLS] state
through BERT's pooler, the projection and its LayerNorm: ``projected_score``), blocks as
``[CLS] title [SEP] body [SEP]`` with the body as segment 1, as ``RealmTokenizer``'s candidates;
the converted reader's logits are ``RealmKnowledgeAugEncoder``'s. The tokenizer (BERT's
uncased word pieces, ``vocab.txt``) is saved with both as a fast BERT tokenizer.

    python -m realm convert-realm --embedder google/realm-cc-news-pretrained-embedder \\
        --encoder google/realm-cc-news-pretrained-encoder --output runs/realm-cc-news
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

from realm.modeling.embedder import Embedder
from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder, tie_output_embeddings
from realm.modeling.retriever import Retriever

logger = logging.getLogger(__name__)

#: The fields of a REALM config that are BERT's (the rest are REALM's reader and searcher).
BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "hidden_act", "hidden_dropout_prob",
               "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
               "initializer_range", "layer_norm_eps", "pad_token_id")
#: Where each part goes under ``--output``.
RETRIEVER_DIR, READER_DIR = "retriever", "reader"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def checkpoint_dir(name_or_path: str) -> Path:
    """A local checkpoint directory, or a Hub repository's files (downloaded, or from the Hub
    cache offline).

    Raises:
        FileNotFoundError: Neither a directory nor a repository that can be had.
    """
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=[
            "*.json", "*.txt", "*.safetensors", "pytorch_model.bin"]))
    except Exception as err:  # offline, unknown repository, bad name: say which, keep the type
        raise FileNotFoundError(f"{name_or_path}: not a directory, and not a Hub repository "
                                f"that can be fetched ({type(err).__name__})") from None


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json as a dict, the state dict)`` of a transformers 4.x checkpoint directory
    (``model.safetensors`` or ``pytorch_model.bin``)."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a transformers checkpoint)")
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            state = (load_file(str(directory / name)) if name.endswith(".safetensors")
                     else torch.load(directory / name, map_location="cpu", weights_only=True))
            return config, state
    raise FileNotFoundError(f"{directory}: no {' or '.join(WEIGHT_FILES)}")


def bert_config(realm_config: dict[str, Any], **kwargs: Any) -> BertConfig:
    """The BERT config of a REALM config (its encoder's sizes, activation and epsilon)."""
    return BertConfig(**{k: realm_config[k] for k in BERT_FIELDS if k in realm_config}, **kwargs)


def realm_tokenizer(directory: Path, max_length: int) -> BertTokenizerFast:
    """REALM's tokenizer (``RealmTokenizer`` was BERT's word pieces) as a fast BERT tokenizer,
    from ``tokenizer.json`` or ``vocab.txt``, lower-cased unless ``tokenizer_config.json`` says
    otherwise (transformers 5's ``AutoTokenizer`` no longer knows the ``RealmTokenizer`` class it
    names)."""
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(f"{directory}: no tokenizer (vocab.txt or tokenizer.json)")
    settings = {}
    if (directory / "tokenizer_config.json").is_file():
        settings = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    return BertTokenizerFast.from_pretrained(
        str(directory), do_lower_case=settings.get("do_lower_case", True),
        model_max_length=min(settings.get("model_max_length", max_length), max_length))


def split_state(state: dict[str, torch.Tensor], source: Path, what: str
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(BERT's weights without the ``realm.`` prefix and without the pooler, the rest)``;
    ``realm.pooler.*`` stays in the rest. Raises ValueError when there is no ``realm.*``."""
    bert, rest = {}, {}
    for key, value in state.items():
        if key.endswith("position_ids"):  # a buffer 4.x saved; BERT rebuilds it
            continue
        if key.startswith("realm.") and not key.startswith("realm.pooler."):
            bert[key[len("realm."):]] = value
        else:
            rest[key] = value
    if not bert:
        raise ValueError(f"{source}: no realm.* weights: not a transformers 4.x {what} "
                         f"checkpoint (its keys start {sorted(state)[:3]})")
    return bert, rest


def take(rest: dict[str, torch.Tensor], prefix: str, source: Path, what: str
         ) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (prefix removed), taken out of ``rest``."""
    part = {k[len(prefix):]: rest.pop(k) for k in sorted(rest) if k.startswith(prefix)}
    if not part:
        raise ValueError(f"{source}: no {prefix}* weights: not a transformers 4.x {what} "
                         "checkpoint")
    return part


def convert_embedder(name_or_path: str, output: str | os.PathLike, *,
                     share_weights: bool = False, overwrite: bool = False) -> Path:
    """A ``RealmEmbedder`` checkpoint as a realm retriever directory (``Retriever``), both
    towers holding its weights (one shared encoder with ``share_weights``, as REALM's own
    scorer; separate copies, realm's default, otherwise).

    Raises:
        FileNotFoundError: No checkpoint there.
        ValueError: Not a ``RealmEmbedder`` checkpoint (the message says what is missing).
    """
    source = checkpoint_dir(name_or_path)
    config, state = read_checkpoint(source)
    bert, rest = split_state(state, source, "RealmEmbedder")
    pooler = take(rest, "realm.pooler.dense.", source, "RealmEmbedder (with its pooler)")
    projection = take(rest, "cls.dense.", source, "RealmEmbedder")
    norm = take(rest, "cls.LayerNorm.", source, "RealmEmbedder")
    dropped = sorted(rest)
    if any(not k.startswith("cls.predictions.") for k in dropped):
        raise ValueError(f"{source}: weights a RealmEmbedder does not have: "
                         f"{[k for k in dropped if not k.startswith('cls.predictions.')][:5]}")
    backbone = BertModel(bert_config(config), add_pooling_layer=False)
    backbone.load_state_dict(bert, strict=True)
    dim = int(projection["weight"].shape[0])
    embedder = Embedder(backbone, dim=dim, pooling="cls", pooler=True,
                        norm_eps=float(config.get("layer_norm_eps", 1e-12)))
    for module, part in ((embedder.pooler, pooler), (embedder.projection, projection),
                         (embedder.norm, norm)):
        module.load_state_dict(part, strict=True)
    tokenizer = realm_tokenizer(source, backbone.config.max_position_embeddings)
    retriever = Retriever(embedder, embedder if share_weights else copy.deepcopy(embedder),
                          tokenizer=tokenizer, base_checkpoint=name_or_path)
    logger.info("RealmEmbedder %s: %d BERT tensors, pooler, projection to %d and its LayerNorm "
                "(%d unused MLM-head tensors dropped)", name_or_path, len(bert), dim, len(dropped))
    return retriever.save_pretrained(output, overwrite=overwrite, metadata={
        "converted_from": name_or_path, "source_architecture": "RealmEmbedder"})


def convert_encoder(name_or_path: str, output: str | os.PathLike, *,
                    overwrite: bool = False) -> Path:
    """A ``RealmKnowledgeAugEncoder`` checkpoint as a realm reader directory
    (``KnowledgeAugmentedEncoder``: a BERT masked LM, also a plain transformers directory).

    Raises:
        FileNotFoundError: No checkpoint there.
        ValueError: Not a ``RealmKnowledgeAugEncoder`` checkpoint.
    """
    source = checkpoint_dir(name_or_path)
    config, state = read_checkpoint(source)
    bert, rest = split_state(state, source, "RealmKnowledgeAugEncoder")
    head = take(rest, "cls.predictions.", source, "RealmKnowledgeAugEncoder (with its MLM head)")
    pooler = sorted(k for k in rest if k.startswith("realm.pooler."))
    unknown = sorted(set(rest) - set(pooler))
    if unknown:
        raise ValueError(f"{source}: weights a RealmKnowledgeAugEncoder does not have: "
                         f"{unknown[:5]}")
    embeddings = bert["embeddings.word_embeddings.weight"]
    decoder = head.pop("decoder.weight", None)
    tied = decoder is None or torch.equal(decoder, embeddings)
    if "decoder.bias" in head and "bias" not in head:
        head["bias"] = head["decoder.bias"]
    head.pop("decoder.bias", None)  # the same tensor as bias (tied in the model)
    mlm = BertForMaskedLM(bert_config(config, tie_word_embeddings=tied))
    weights = {**{f"bert.{k}": v for k, v in bert.items()},
               **{f"cls.predictions.{k}": v for k, v in head.items()},
               **({} if tied else {"cls.predictions.decoder.weight": decoder})}
    missing, unexpected = mlm.load_state_dict(weights, strict=False)
    tied_keys = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if unexpected or set(missing) - tied_keys:
        raise ValueError(f"{source}: not a RealmKnowledgeAugEncoder checkpoint (missing "
                         f"{sorted(set(missing) - tied_keys)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]})")
    mlm.cls.predictions.decoder.bias = mlm.cls.predictions.bias
    if tied:
        tie_output_embeddings(mlm)
    tokenizer = realm_tokenizer(source, mlm.config.max_position_embeddings)
    reader = KnowledgeAugmentedEncoder(mlm, tokenizer=tokenizer, base_checkpoint=name_or_path)
    logger.info("RealmKnowledgeAugEncoder %s: %d BERT tensors and the MLM head (decoder %s; "
                "pooler dropped)", name_or_path, len(bert), "tied" if tied else "untied")
    return reader.save_pretrained(output, overwrite=overwrite, metadata={
        "converted_from": name_or_path, "source_architecture": "RealmKnowledgeAugEncoder"})


def convert_realm(output: str | os.PathLike, embedder: Optional[str] = None,
                  encoder: Optional[str] = None, *, share_weights: bool = False,
                  overwrite: bool = False) -> dict[str, Any]:
    """Convert a REALM embedder (into ``output/retriever``) and/or knowledge-augmented encoder
    (into ``output/reader``); returns where each went."""
    if embedder is None and encoder is None:
        raise ValueError("give --embedder, --encoder or both")
    out: dict[str, Any] = {"output": str(output)}
    if embedder is not None:
        out["retriever"] = str(convert_embedder(embedder, Path(output) / RETRIEVER_DIR,
                                                share_weights=share_weights,
                                                overwrite=overwrite))
    if encoder is not None:
        out["reader"] = str(convert_encoder(encoder, Path(output) / READER_DIR,
                                            overwrite=overwrite))
    return out
