"""Model cards: the ``README.md`` every model directory realm writes carries, and the dataset
card of a published corpus.

A card is a Hub card (``huggingface_hub.ModelCard``): YAML metadata (``library_name``,
``pipeline_tag``, ``base_model`` as a Hub id, ``datasets``, ``metrics``, ``license``, ``tags``
and, once the stage has evaluated the model, a ``model-index`` of its figures), then what the
directory is, how to load it with realm and with the libraries its layout follows
(transformers, sentence-transformers), how it was trained (the stage and its steps, from the
manifest's fields and metadata) and its figures. :func:`realm.artifacts.write_manifest` writes it
for every saved model; :func:`realm.artifacts.record_evaluation` rewrites it with the figures of
an evaluation; ``Embedder.save_pretrained`` writes :func:`encoder_card` for the query and
document encoders inside a retriever; :func:`corpus_card` is a published corpus's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from realm.hub import is_hub_id

CARD = "README.md"

#: kind -> (title, what it is, how to load it)
KINDS: dict[str, tuple[str, str, str]] = {
    "retriever": (
        "REALM-style dense retriever",
        "A dual encoder: `query_encoder/` embeds questions or masked queries, `doc_encoder/` "
        "embeds blocks (`[CLS] title [SEP] body [SEP]`); relevance is their inner product. The "
        "directory is a sentence-transformers model (a Router: `encode_query` runs the query "
        "encoder, `encode_document` the document encoder; similarity: dot product), and each "
        "encoder directory is a transformers model with its tokenizer and a sentence-transformers "
        "model of its own (Transformer, Pooling, Dense projection), cut at the lengths it was "
        "trained at.",
        "```python\nfrom sentence_transformers import SentenceTransformer   # >= 5\n"
        "model = SentenceTransformer(\"DIR\")\n"
        "q = model.encode_query([\"who wrote hamlet\"])\n"
        "d = model.encode_document([(\"Hamlet\", \"Hamlet is a tragedy by William "
        "Shakespeare.\")])   # (title, body)\nprint(model.similarity(q, d))   # inner product"
        "\n\nfrom realm.modeling.retriever import Retriever\nretriever = "
        "Retriever.from_pretrained(\"DIR\")\n```\n\nEvaluate: `python launch/evaluate.py "
        "retrieval --retriever DIR --corpus CORPUS --qa FILE`; use in Open-QA: "
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
        "the corpus its manifest names (see Corpus below): ask it questions.",
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
    "causal_lm_reader": (
        "REALM reader (causal LM)",
        "A transformers causal LM that scores a masked span after each retrieved block "
        "(REALM's p(y|z, x)); the weights merged where a LoRA adapter trained (the adapter "
        "itself in `adapter/`).",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(\"DIR\")\n"
        "tokenizer = AutoTokenizer.from_pretrained(\"DIR\")\n```\n\nWith realm: "
        "`realm.modeling.readers.causal_lm.CausalLMReader.from_pretrained(\"DIR\")`; as a "
        "pretraining reader: `pretrain.reader=DIR`.",
    ),
}

#: kind -> (library_name, pipeline_tag, tags) of the card's metadata.
HUB_KINDS: dict[str, tuple[str, Optional[str], list[str]]] = {
    "retriever": ("sentence-transformers", "sentence-similarity",
                  ["sentence-transformers", "feature-extraction", "dense-retrieval"]),
    "knowledge_augmented_encoder": ("transformers", "fill-mask", ["retrieval-augmented"]),
    "span_reader": ("realm", "question-answering", ["extractive-qa"]),
    "openqa_model": ("realm", "question-answering", ["open-domain-qa", "retrieval-augmented"]),
    "openqa_model/generative": ("realm", "question-answering",
                                ["open-domain-qa", "retrieval-augmented", "rag"]),
    "rag_generator": ("transformers", "text-generation", ["rag"]),
    "causal_lm_reader": ("transformers", "text-generation", ["retrieval-augmented"]),
}
#: Words in a question file's or corpus's path -> the Hub datasets it was made from (realm's
#: data recipes keep these names: docs/data.md).
KNOWN_DATASETS: list[tuple[str, list[str]]] = [
    ("squad", ["rajpurkar/squad"]),
    ("openqa_leads", ["google-research-datasets/nq_open", "mandarjoshi/trivia_qa",
                      "stanfordnlp/web_questions"]),
    ("nq_open", ["google-research-datasets/nq_open"]),
    ("trivia", ["mandarjoshi/trivia_qa"]),
    ("web_questions", ["stanfordnlp/web_questions"]),
    ("wq_", ["stanfordnlp/web_questions"]),
]
#: metric key -> (model-index metric type, its display name).
_METRICS = {"exact_match": ("exact_match", "Exact match"), "f1": ("f1", "F1"),
            "accuracy": ("accuracy", "Accuracy")}

_SHOWN = ("model_type", "architecture", "hidden_size", "dim", "pooling", "max_query_tokens",
          "max_block_tokens", "vocab_size", "k", "span_scorer", "max_span_tokens",
          "retriever_kind", "reader_type", "retrieval", "mode", "rag_loss", "decoding",
          "generator_source")
_NOT_FIGURES = ("stage", "steps", "source", "config", "evaluation")


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_value(x)}" for k, x in v.items())
    return str(v)


def dataset_ids(path: Optional[str]) -> list[str]:
    """The Hub datasets a question file or corpus path was made from, by its name (``[]`` when
    unknown): ``data/squad_open/qa_dev.jsonl`` -> ``["rajpurkar/squad"]``."""
    if not path:
        return []
    words = "/".join(Path(str(path)).parts[-2:]).lower()
    return next((ids for key, ids in KNOWN_DATASETS if key in words), [])


def evaluations(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluations a manifest's metadata holds: those :func:`realm.artifacts.
    record_evaluation` wrote (``metadata["evaluation"]``), and the dev recall a retriever's
    stage recorded (``dev_answer_recall@k`` beside ``dev_qa``). Each: ``task``, ``dataset``
    (the file it read), ``split`` and ``metrics`` (name -> value)."""
    out = [dict(e) for e in metadata.get("evaluation", []) if isinstance(e, dict)]
    recall = {k[len("dev_"):]: v for k, v in metadata.items()
              if k.startswith("dev_answer_recall@") and isinstance(v, (int, float))}
    if recall:
        out.append({"task": "text-retrieval", "dataset": metadata.get("dev_qa"), "split": "dev",
                    "metrics": recall})
    return out


def _dataset_label(path: Optional[str]) -> str:
    return "/".join(Path(str(path)).parts[-2:]) if path else "unknown"


def _eval_results(evals: list[dict[str, Any]]) -> list[Any]:
    from huggingface_hub import EvalResult

    results = []
    for e in evals:
        ids = dataset_ids(e.get("dataset"))
        for key, value in e["metrics"].items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, name = _METRICS.get(key, (re.sub(r"@.*", "", key).replace("answer_", "")
                                              or key, key.replace("_", " ")))
            results.append(EvalResult(
                task_type=e.get("task", "question-answering"),
                dataset_type=ids[0] if ids else _dataset_label(e.get("dataset")),
                dataset_name=_dataset_label(e.get("dataset")), dataset_split=e.get("split"),
                metric_type=metric, metric_name=name, metric_value=float(value)))
    return results


def card_data(kind: str, fields: dict[str, Any], metadata: dict[str, Any]) -> Any:
    """The card's metadata: a ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import ModelCardData

    variant = f"{kind}/{fields.get('reader_type')}"
    library, pipeline, tags = HUB_KINDS.get(variant) or HUB_KINDS.get(kind, ("realm", None, []))
    base = fields.get("base_model") or {}
    datasets: list[str] = []
    corpus = fields.get("corpus") if isinstance(fields.get("corpus"), dict) else {}
    named = [corpus["name"]] if is_hub_id(str(corpus.get("name") or "")) else []  # published
    sources = [metadata.get("train_qa"), metadata.get("dev_qa"),
               *(e.get("dataset") for e in evaluations(metadata))]
    for ids in [named, list(metadata.get("datasets", [])), *map(dataset_ids, sources)]:
        datasets += [d for d in ids if d not in datasets]
    results = _eval_results(evaluations(metadata))
    metrics = sorted({r.metric_type for r in results})
    # a random start owes nothing to another model: realm's own license
    license_ = base.get("license") or ("apache-2.0" if base.get("note") == "a random "
                                       "initialisation" else None)
    return ModelCardData(
        library_name=library, pipeline_tag=pipeline, base_model=base.get("id"),
        datasets=datasets or None, metrics=metrics or None, license=license_,
        tags=["realm", *tags], eval_results=results or None,
        model_name=f"realm {variant if variant in HUB_KINDS else kind}" if results else None)


def _base_lines(fields: dict[str, Any], data: Any) -> list[str]:
    base = fields.get("base_model")
    if not base:
        return []
    if base.get("id"):
        note = f" ({base['note']})" if base.get("note") else ""
        return ["## Base model", "", f"[{base['id']}](https://huggingface.co/{base['id']})"
                f"{note}." + ("" if data.license else " License: that of the base model."), ""]
    return ["## Base model", "", f"Started from {base.get('note') or 'an unknown checkpoint'}, "
            "which has no Hub id: the metadata names no `base_model`.", ""]


def _corpus_lines(fields: dict[str, Any]) -> list[str]:
    corpus = fields.get("corpus")
    if not isinstance(corpus, dict):
        return []
    name = corpus.get("name")
    where = (f"`{name}` (a path relative to this directory, or a Hub datasets repository)"
             if name else f"`{corpus.get('path')}`")
    return ["## Corpus", "", f"The blocks it answers from: {where}, fingerprint "
            f"`{corpus.get('fingerprint')}`. `OpenQA.from_pretrained` looks there (then at the "
            "path it was saved with); `corpus=` points it elsewhere. Publish a corpus with "
            "`python launch/push_to_hub.py MODEL_DIR USER/MODEL --corpus-repo USER/CORPUS`.", ""]


def _evaluation_lines(metadata: dict[str, Any]) -> list[str]:
    evals = evaluations(metadata)
    if not evals:
        return []
    lines = ["## Evaluation", "", "| data | split | metric | value |", "|---|---|---|---|"]
    for e in evals:
        for key, value in e["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lines.append(f"| {_dataset_label(e.get('dataset'))} | {e.get('split', '')} | "
                             f"{key} | {_value(value)} |")
    return lines + [""]


def model_card(kind: str, fields: dict[str, Any], metadata: Optional[dict[str, Any]]) -> str:
    """The card (YAML metadata and Markdown) of a directory of ``kind`` (unknown kinds get a
    plain card)."""
    from huggingface_hub import ModelCard

    variant = f"{kind}/{fields.get('reader_type')}"  # e.g. a generative Open-QA model
    title, what, load = KINDS.get(variant) or KINDS.get(kind, (kind.replace("_", " "), "", ""))
    metadata = metadata or {}
    data = card_data(kind, fields, metadata)
    lines = [f"# {title}", "", "Written by realm (REALM-style "
             "retrieval-augmented pretraining).", ""]
    if what:
        lines += [what, ""]
    if load:
        lines += ["## Load", "", load.replace("DIR", "<this directory>"), ""]
    lines += _base_lines(fields, data)
    facts = [(k, fields[k]) for k in _SHOWN if fields.get(k) is not None]
    if facts:
        lines += ["## Model", ""] + [f"- {k}: {_value(v)}" for k, v in facts] + [""]
    lines += _corpus_lines(fields)
    lines += ["## Training", ""]
    stage = metadata.get("stage")
    lines.append(f"- stage: {stage}" if stage else "- stage: not recorded")
    for key in ("steps", "source", "config"):
        if key in metadata:
            lines.append(f"- {key}: {_value(metadata[key])}")
    figures = {k: v for k, v in metadata.items() if k not in _NOT_FIGURES
               and not k.startswith("dev_answer_recall@")  # (under Evaluation)
               and isinstance(v, (int, float, dict)) and not isinstance(v, bool)}
    lines += [""]
    lines += _evaluation_lines(metadata)
    if figures:
        lines += ["## Figures", ""] + [f"- {k}: {_value(v)}" for k, v in figures.items()] + [""]
    lines += ["`manifest.json` beside this card lists every file with its size, the realm version "
              "and the creation time.", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_model_card(directory: Path, kind: str, fields: dict[str, Any],
                     metadata: Optional[dict[str, Any]]) -> None:
    """Write ``README.md`` into a model directory being built."""
    (Path(directory) / CARD).write_text(model_card(kind, fields, metadata), encoding="utf-8")


def encoder_card(role: str, dim: int, pooling: str, max_seq_length: Optional[int] = None,
                 base: Optional[dict[str, Any]] = None) -> str:
    """The card of a query or document encoder directory inside a retriever (a
    sentence-transformers model of its own)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = base or {}
    data = ModelCardData(library_name="sentence-transformers", pipeline_tag="sentence-similarity",
                         base_model=base.get("id"), license=base.get("license"),
                         tags=["realm", "sentence-transformers", "feature-extraction"])
    length = (f"; texts are cut at {max_seq_length} word pieces (special tokens included), the "
              "length it was trained at" if max_seq_length else "")
    body = "\n".join([
        f"# {role} of a realm retriever", "",
        f"A transformers encoder with its tokenizer, {pooling} pooling and a linear projection to "
        f"{dim} dimensions (scores are inner products){length}; also a sentence-transformers "
        "model:", "",
        "```python\nfrom sentence_transformers import SentenceTransformer\n"
        "vectors = SentenceTransformer(\"<this directory>\").encode([\"some text\"])\n```", "",
        "The retriever this belongs to is the directory above (its README.md, manifest.json).",
        ""])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


#: Words in a corpus's input -> (license, what the text is).
_CORPUS_SOURCES = [("squad", ("cc-by-sa-4.0", "SQuAD v1.1 paragraphs (Wikipedia)")),
                   ("wiki", ("cc-by-sa-3.0", "Wikipedia text"))]


def corpus_card(manifest: dict[str, Any], repo_id: Optional[str], data_files: str) -> str:
    """The dataset card of a corpus published as a datasets repository: the blocks as a table
    (``data_files``, split ``train``) that ``datasets.load_dataset`` reads, and the realm block
    store beside it that ``BlockStore`` and a saved Open-QA model read."""
    from huggingface_hub import DatasetCard, DatasetCardData

    source = str(manifest.get("params", {}).get("data", {}).get("input")
                 or manifest.get("input", {}).get("path", "")).lower()
    license_, text = next((v for k, v in _CORPUS_SOURCES if k in source), (None, "text"))
    counts = manifest.get("counts", {})
    n = int(counts.get("blocks", 0))
    size = ("n<1K" if n < 1_000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000
            else "100K<n<1M" if n < 1_000_000 else "1M<n<10M" if n < 10_000_000 else "n>10M")
    data = DatasetCardData(
        license=license_, language=["en"], task_categories=["text-retrieval"],
        tags=["realm", "retrieval-corpus"], size_categories=[size],
        source_datasets=dataset_ids(source) or None, pretty_name="realm corpus",
        configs=[{"config_name": "default",
                  "data_files": [{"split": "train", "path": data_files}]}])
    repo = repo_id or "<this repository>"
    tokenizer = manifest.get("tokenizer", {}).get("name")
    body = "\n".join([
        "# realm corpus: retrieval blocks", "",
        f"{n} blocks of {text} ({counts.get('articles', '?')} articles) cut into at most "
        f"{manifest.get('params', {}).get('data', {}).get('max_block_tokens', '?')} word pieces "
        f"of `{tokenizer}`, with {counts.get('spans', 0)} salient spans. Fingerprint "
        f"`{manifest.get('fingerprint')}`." + ("" if license_ else
                                               " License: that of the source text."), "",
        "Columns: `id` (the block id), `article_id`, `title`, `text`, `spans` (salient spans: "
        "`start`/`end` are character offsets into `text`, `token_start`/`token_end` word-piece "
        "offsets into the body as realm reads it, `label`).", "",
        "```python\nimport datasets\n"
        f"blocks = datasets.load_dataset(\"{repo}\", split=\"train\")\n```", "",
        "The realm block store (`manifest.json`, `*.bin`, `articles.jsonl`) sits beside the "
        "table: an Open-QA model whose manifest names this repository finds its corpus here "
        "(`OpenQA.from_pretrained`), and "
        "`BlockStore(huggingface_hub.snapshot_download(REPO, repo_type=\"dataset\"))` opens it."
        .replace("REPO", f"\"{repo}\""), ""])
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
