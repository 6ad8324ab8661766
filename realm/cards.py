"""Model cards: the ``README.md`` every model directory realm writes carries.

A card says what the directory is, how to load it with realm and with the libraries its layout
follows (transformers, sentence-transformers), how it was trained (the stage, its steps and
base checkpoint, from the manifest's fields and metadata), and the figures its stage recorded.
It is written by :func:`realm.artifacts.write_manifest` for every saved retriever,
knowledge-augmented encoder, span reader and Open-QA model, and by ``Embedder.save_pretrained``
for the query and document encoders inside a retriever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

CARD = "README.md"

#: kind -> (title, what it is, how to load it)
KINDS: dict[str, tuple[str, str, str]] = {
    "retriever": (
        "REALM-style dense retriever",
        "A dual encoder: `query_encoder/` embeds questions or masked queries, `doc_encoder/` "
        "embeds blocks (`[CLS] title [SEP] body [SEP]`); relevance is their inner product. Each "
        "encoder directory is a transformers model with its tokenizer and a sentence-transformers "
        "model (Transformer, Pooling, Dense projection).",
        "```python\nfrom realm.modeling.retriever import Retriever\nretriever = "
        "Retriever.from_pretrained(\"DIR\")\n\nfrom sentence_transformers import "
        "SentenceTransformer\nqueries = SentenceTransformer(\"DIR/query_encoder\")"
        ".encode([\"who wrote hamlet\"])\n```\n\nEvaluate: `python launch/evaluate.py retrieval "
        "--retriever DIR --corpus CORPUS --qa FILE`; use in Open-QA: "
        "`openqa.retriever=DIR`.",
    ),
    "knowledge_augmented_encoder": (
        "REALM knowledge-augmented encoder (masked LM)",
        "A BERT-style masked language model that reads `[CLS] x [SEP] z [SEP]`: a masked query "
        "x beside a retrieved block z (or the null document), its decoder tied to the word "
        "embeddings.",
        "```python\nfrom transformers import AutoModelForMaskedLM, AutoTokenizer\n"
        "model = AutoModelForMaskedLM.from_pretrained(\"DIR\")\n"
        "tokenizer = AutoTokenizer.from_pretrained(\"DIR\")\n```\n\nWith realm: "
        "`realm.modeling.readers.mlm.load_ka_encoder(\"DIR\")`; as a pretraining reader: "
        "`pretrain.reader=DIR`. Where the manifest lists `copy_head.safetensors`, the reader "
        "also copies word pieces from the block (`mlm.copy_head`); transformers loads the masked "
        "LM without it.",
    ),
    "span_reader": (
        "Open-QA span reader",
        "An extractive reader: a transformers encoder (`model/`, with its tokenizer) reads "
        "`[CLS] question [SEP] title [SEP] block [SEP]` and a span scorer "
        "(`span_scorer.safetensors`) scores answer spans.",
        "```python\nfrom realm.modeling.span_reader import SpanReader\nreader = "
        "SpanReader.from_pretrained(\"DIR\")\n\nfrom transformers import AutoModel\n"
        "encoder = AutoModel.from_pretrained(\"DIR/model\")\n```\n\nAs the start of another "
        "fine-tune: `openqa.reader=DIR`.",
    ),
    "openqa_model": (
        "Open-QA system: retriever, reader and the corpus index",
        "A retriever (`retriever/`), a span reader (`reader/`) and the document embeddings of "
        "the corpus its manifest names: ask it questions.",
        "```python\nfrom realm import OpenQA\nqa = OpenQA.from_pretrained(\"DIR\")\n"
        "print(qa.answer(\"who wrote hamlet\"))\n```\n\nFrom the shell: `python launch/answer.py "
        "--model DIR \"who wrote hamlet\"`; evaluate: `python launch/evaluate.py openqa "
        "--model DIR --corpus CORPUS --qa FILE`.",
    ),
    "openqa_model/generative": (
        "Open-QA system (RAG): retriever, generator and the corpus index",
        "A retriever (`retriever/`, with the document embeddings of the corpus its manifest "
        "names; or BM25) and a causal-LM generator (`generator/`) that writes the answer after "
        "each of the top k blocks (RAG, Lewis et al. 2020): ask it questions.",
        "```python\nfrom realm import OpenQA\nqa = OpenQA.from_pretrained(\"DIR\")\n"
        "print(qa.answer(\"who wrote hamlet\"))   # the answer and the blocks it read\n```\n\n"
        "The generator alone: `AutoModelForCausalLM.from_pretrained(\"DIR/generator\")`. From "
        "the shell: `python launch/answer.py --model DIR \"who wrote hamlet\"`; evaluate: "
        "`python launch/evaluate.py openqa --model DIR --corpus CORPUS --qa FILE`.",
    ),
    "rag_generator": (
        "RAG generator (causal LM)",
        "A transformers causal LM that writes answers after `title\\nbody\\n\\nQuestion: q"
        "\\nAnswer:` (the weights merged where a LoRA adapter trained; the adapter itself in "
        "`adapter/`).",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(\"DIR\")\n"
        "tokenizer = AutoTokenizer.from_pretrained(\"DIR\")\n```\n\nWith realm: "
        "`realm.modeling.rag.RAGGenerator.from_pretrained(\"DIR\")`; where `adapter/` is listed, "
        "`peft.PeftModel.from_pretrained(base, \"DIR/adapter\")` opens the adapter on its base.",
    ),
}

_SHOWN = ("base_checkpoint", "model_type", "architecture", "hidden_size", "dim", "pooling",
          "vocab_size", "k", "span_scorer", "max_span_tokens", "retriever_kind", "reader_type",
          "retrieval", "mode", "rag_loss", "decoding", "generator_source")


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_value(x)}" for k, x in v.items())
    return str(v)


def model_card(kind: str, fields: dict[str, Any], metadata: Optional[dict[str, Any]]) -> str:
    """The card's Markdown for a directory of ``kind`` (unknown kinds get a plain card)."""
    variant = f"{kind}/{fields.get('reader_type')}"  # e.g. a generative Open-QA model
    title, what, load = KINDS.get(variant) or KINDS.get(kind, (kind.replace("_", " "), "", ""))
    metadata = metadata or {}
    lines = [f"# {title}", "", "Written by realm (REALM-style "
             "retrieval-augmented pretraining).", ""]
    if what:
        lines += [what, ""]
    if load:
        lines += ["## Load", "", load.replace("DIR", "<this directory>"), ""]
    facts = [(k, fields[k]) for k in _SHOWN if fields.get(k) is not None]
    if facts:
        lines += ["## Model", ""] + [f"- {k}: {_value(v)}" for k, v in facts] + [""]
    lines += ["## Training", ""]
    stage = metadata.get("stage")
    lines.append(f"- stage: {stage}" if stage else "- stage: not recorded")
    for key in ("steps", "source", "config"):
        if key in metadata:
            lines.append(f"- {key}: {_value(metadata[key])}")
    figures = {k: v for k, v in metadata.items()
               if k not in ("stage", "steps", "source", "config")
               and isinstance(v, (int, float, dict)) and not isinstance(v, bool)}
    lines += [""]
    if figures:
        lines += ["## Figures", ""] + [f"- {k}: {_value(v)}" for k, v in figures.items()] + [""]
    lines += ["`manifest.json` beside this card lists every file with its size, the realm version "
              "and the creation time.", ""]
    return "\n".join(lines)


def write_model_card(directory: Path, kind: str, fields: dict[str, Any],
                     metadata: Optional[dict[str, Any]]) -> None:
    """Write ``README.md`` into a model directory being built."""
    (Path(directory) / CARD).write_text(model_card(kind, fields, metadata), encoding="utf-8")


def encoder_card(role: str, dim: int, pooling: str) -> str:
    """The short card of a query or document encoder directory inside a retriever."""
    return "\n".join([
        f"# {role} of a realm retriever", "",
        f"A transformers encoder with its tokenizer, {pooling} pooling and a linear projection to "
        f"{dim} dimensions; also a sentence-transformers model:", "",
        "```python\nfrom sentence_transformers import SentenceTransformer\n"
        "vectors = SentenceTransformer(\"<this directory>\").encode([\"some text\"])\n```", "",
        "The retriever this belongs to is the directory above (its README.md, manifest.json).",
        ""])
