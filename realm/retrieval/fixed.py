"""The retrieval floor of Open-QA: fixed indexes over a corpus, and fine-tuned models on disk.

REALM's Open-QA fine-tuning (Guu et al. 2020, section 3.4) keeps the document index fixed: every
block is embedded once by the (pretrained) document encoder (:func:`document_embeddings`) and
searched exactly (:class:`DenseIndex`), or BM25 ranks ``title + text`` (:class:`BM25Index`, scores
are constants). RAG-end2end trains the document encoder instead, over the refresher's
generations (:class:`LiveIndex`). A fine-tuned model is a directory ``model/`` (manifest,
retriever, the fixed document embeddings, and a span reader or a RAG generator) written by
:func:`save_openqa_model` and read, over its corpus, by :func:`load_openqa_model`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from realm.artifacts import atomic_directory, read_manifest, write_manifest
from realm.data.store import BlockStore, check_tokenizer
from realm.index.mips import SearchResult, build_index
from realm.index.mips import search as mips_search
from realm.modeling.embed import embed_blocks, special_ids
from realm.modeling.inputs import build_block_inputs
from realm.modeling.openqa import OpenQAModel
from realm.modeling.rag import GenerativeOpenQAModel, RAGGenerator
from realm.modeling.span_reader import SpanReader
from realm.modeling.retriever import Retriever
from realm.precision import autocast_dtype
from realm.retrieval.search import block_bm25

logger = logging.getLogger(__name__)

MANIFEST_KIND = "openqa_model"
FORMAT_VERSION = 1
EMBEDDINGS_FILE = "doc_embeddings.npy"
#: Where a generative model keeps its generator (a transformers causal-LM directory).
GENERATOR_DIR = "generator"


class DenseIndex:
    """Exact inner-product search over fixed document embeddings ``[n_blocks, dim]``."""

    def __init__(self, embeddings: np.ndarray):
        self.embeddings = torch.from_numpy(np.ascontiguousarray(embeddings, np.float32))
        self.index = build_index(self.embeddings.numpy())

    def search(self, q_reps: torch.Tensor, k: int,
               questions: Optional[Sequence[str]] = None) -> SearchResult:
        """Top-``k`` blocks: scores ``q . e`` ``[B, k]`` (a tensor with grad to the query
        encoder) and block ids ``[B, k]``. ``questions``: their texts (read by
        :class:`HybridIndex` only)."""
        ids = self.top_ids(q_reps, k)
        return SearchResult(self.scores(q_reps, ids), ids)

    def top_ids(self, q_reps: torch.Tensor, k: int) -> np.ndarray:
        """The ids ``[B, k]`` of the ``k`` blocks of highest ``q . e`` (no grad)."""
        return mips_search(self.index, q_reps.detach().float().cpu().numpy(), k).block_ids

    def scores(self, q_reps: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        """``q . e`` of the blocks ``ids`` ``[B, k]`` (with grad to the query encoder)."""
        docs = self.embeddings[torch.from_numpy(ids)].to(q_reps.device)  # [B, k, dim]
        return torch.einsum("bd,bkd->bk", q_reps.float(), docs)  # [B, k]


class BM25Index:
    """BM25 (bm25s) over ``title + text`` of every block; scores are constants."""

    def __init__(self, store: BlockStore):
        self.bm25 = block_bm25(store)

    def search(self, questions: Sequence[str], k: int) -> SearchResult:
        """Top-``k`` blocks: BM25 scores ``[B, k]`` (a float32 tensor) and block ids ``[B, k]``."""
        scores, ids = self.bm25.search(list(questions), k)  # [B, k] each
        return SearchResult(torch.from_numpy(np.ascontiguousarray(scores, np.float32)), ids)


class LiveIndex:
    """An index kept fresh by the refresher, its blocks scored by the live document encoder:
    RAG-end2end's retrieval (Siriwardhana et al. 2023), where both encoders train.

    The top ``k`` come from ``search`` (the refresh hook's watcher: the newest generation the
    refresher embedded, a few steps stale); their scores ``q . d(z)`` are recomputed with the
    current document encoder, so the gradient reaches the query and the document encoder (as
    REALM re-scores its retrieved blocks).

    Args:
        search: ``search(queries [B, dim] float32, k, exclude) -> SearchResult``.
        retriever: The dense retriever training (its document encoder scores the blocks).
        store: The corpus the generations index.
        max_block_tokens: Word pieces of a block read (as the refresher embeds it).
    """

    def __init__(self, search: Callable[..., SearchResult], retriever: Retriever,
                 store: BlockStore, max_block_tokens: int):
        self._search, self.retriever, self.store = search, retriever, store
        self.max_block_tokens = max_block_tokens
        self.special = special_ids(retriever.tokenizer)

    def top_ids(self, q_reps: torch.Tensor, k: int) -> np.ndarray:
        """The ids ``[B, k]`` of the generation in use's top ``k`` (-1 where it has fewer)."""
        return self._search(q_reps.detach().float().cpu().numpy(), k, None).block_ids

    def scores(self, q_reps: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        """``q . d(z)`` ``[B, k]`` of the blocks ``ids`` by the live document encoder (with grad
        to both encoders); -1e4 where an id is -1."""
        cls_id, sep_id, pad_id = self.special
        empty = np.zeros(0, np.int64)
        flat = [int(b) for b in ids.reshape(-1)]
        p_in = build_block_inputs([self.store.title_ids(b) if b >= 0 else empty for b in flat],
                                  [self.store.body_ids(b) if b >= 0 else empty for b in flat],
                                  cls_id, sep_id, pad_id, max_length=self.max_block_tokens + 3)
        p_reps = self.retriever.encode_blocks(*(t.to(q_reps.device) for t in p_in)).p_reps
        scores = torch.einsum("bd,bkd->bk", q_reps.float(),
                              p_reps.float().view(*ids.shape, -1))  # [B, k]
        return scores.masked_fill(torch.from_numpy(ids < 0).to(scores.device), -1e4)

    def search(self, q_reps: torch.Tensor, k: int,
               questions: Optional[Sequence[str]] = None) -> SearchResult:
        """As :meth:`DenseIndex.search`, over the generation in use."""
        ids = self.top_ids(q_reps, k)
        return SearchResult(self.scores(q_reps, ids), ids)


class HybridIndex:
    """A dense index (:class:`DenseIndex` or :class:`LiveIndex`) with ``bm25_blocks`` of the k
    blocks read taken from BM25: BM25's top ``bm25_blocks`` and the dense retriever's top
    ``k - bm25_blocks`` (a block both pick is read once and the next of the dense ranking fills
    its place). The blocks' scores stay the dense ``q . e``, so ``p(z|x)`` and the query
    encoder's gradient are the dense retriever's; BM25 only brings in a block that shares the
    question's rare words and that the dense retriever ranks low ("who painted the mona lisa":
    BM25's first block is Mona Lisa, outside DPR's top 10)."""

    def __init__(self, dense: DenseIndex | LiveIndex, store: BlockStore, bm25_blocks: int = 1):
        if bm25_blocks < 1:
            raise ValueError(f"bm25_blocks must be >= 1, got {bm25_blocks}")
        self.dense, self.bm25, self.bm25_blocks = dense, BM25Index(store), bm25_blocks

    @property
    def embeddings(self) -> torch.Tensor:
        """The dense index's fixed embeddings (a :class:`DenseIndex`'s)."""
        return self.dense.embeddings

    def scores(self, q_reps: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        """The dense ``q . e`` of the blocks ``ids`` ``[B, k]`` (as :meth:`search` scores)."""
        return self.dense.scores(q_reps, ids)

    def search(self, q_reps: torch.Tensor, k: int,
               questions: Optional[Sequence[str]] = None) -> SearchResult:
        if questions is None or len(questions) != len(q_reps):
            raise ValueError("a hybrid (dense + BM25) index searches with the question texts")
        n_bm25 = min(self.bm25_blocks, k)
        dense = self.dense.top_ids(q_reps, k)
        sparse = self.bm25.search(questions, n_bm25).block_ids
        ids = np.full((len(questions), k), -1, np.int64)
        for row, (d, b) in enumerate(zip(dense, sparse)):
            picked = [int(x) for x in b[:n_bm25] if x >= 0]
            picked += [int(x) for x in d if x >= 0 and int(x) not in picked][: k - len(picked)]
            ids[row, : len(picked)] = picked
        return SearchResult(self.dense.scores(q_reps, ids), ids)


def with_bm25(dense: DenseIndex | LiveIndex, store: BlockStore, bm25_blocks: int = 0):
    """``dense``, with BM25's top ``bm25_blocks`` read beside it (a :class:`HybridIndex`) when
    ``bm25_blocks`` > 0."""
    return HybridIndex(dense, store, bm25_blocks) if bm25_blocks else dense


def dense_index(embeddings: np.ndarray, store: BlockStore, bm25_blocks: int = 0
                ) -> DenseIndex | HybridIndex:
    """The fixed index over ``embeddings``, with BM25's top ``bm25_blocks`` read beside it."""
    return with_bm25(DenseIndex(embeddings), store, bm25_blocks)


def document_embeddings(retriever: Retriever, store: BlockStore, max_block_tokens: int,
                        cache: Optional[str] = None, progress: bool = True,
                        precision: str = "auto") -> np.ndarray:
    """The fixed index's embeddings: every block through the document encoder (cached)."""
    if cache and os.path.isfile(cache):
        emb = np.load(cache)
        if emb.shape == (len(store), retriever.dim):
            logger.info("document embeddings from %s", cache)
            return emb
    device = next(retriever.parameters()).device
    bf16 = autocast_dtype(precision, device) == "bf16"
    emb, stats = embed_blocks(retriever, store, special_ids(retriever.tokenizer),
                              max_block_tokens=max_block_tokens, progress=progress, bf16=bf16)
    logger.info("embedded %d blocks for the fixed index in %.1f s (%.0f blocks/s)", len(store),
                stats["seconds"], stats["blocks_per_s"])
    if cache:
        os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
        tmp = f"{cache}.tmp-{os.getpid()}.npy"
        np.save(tmp, emb)
        os.replace(tmp, cache)
    return emb


def save_openqa_model(model: OpenQAModel | GenerativeOpenQAModel, directory: str,
                      settings: dict[str, Any], metadata: Optional[dict[str, Any]] = None) -> Path:
    """``directory``: manifest and model card, ``retriever/`` and document embeddings (dense),
    and ``reader/`` (extractive) or ``generator/`` (generative: a transformers causal-LM
    directory, with ``adapter/`` where its LoRA adapter trained)."""
    generative = isinstance(model, GenerativeOpenQAModel)
    with atomic_directory(Path(directory), overwrite=True) as tmp:
        if generative:
            model.generator.save_pretrained(tmp / GENERATOR_DIR, metadata=metadata)
            tokenizer = model.generator.tokenizer
        else:
            model.reader.save_pretrained(tmp / "reader")
            tokenizer = model.reader.tokenizer
        if tokenizer is not None:  # AutoTokenizer.from_pretrained(directory)
            tokenizer.save_pretrained(str(tmp))
        if model.dense:
            settings = {**settings, "bm25_blocks": getattr(model.index, "bm25_blocks", 0)}
            model.retriever.max_query_tokens = model.max_question_tokens  # as trained here
            model.retriever.save_pretrained(tmp / "retriever")
            np.save(tmp / EMBEDDINGS_FILE, model.index.embeddings.numpy())
        retrieval = ("none" if generative and model.closed_book
                     else "dense" if model.dense else "bm25")
        fields = {"reader_type": "generative" if generative else "extractive",
                  "retrieval": retrieval,
                  # name: where a moved or downloaded copy finds the corpus (relative to the
                  # model; realm.data.publish makes it a Hub id)
                  "corpus": {"path": str(model.store.path),
                             "fingerprint": model.store.fingerprint,
                             "name": os.path.relpath(os.path.abspath(model.store.path),
                                                     os.path.abspath(directory))},
                  **settings}
        write_manifest(tmp, MANIFEST_KIND, FORMAT_VERSION, fields, metadata)
    logger.info("saved the Open-QA model to %s", directory)
    return Path(directory)


def _load_retrieval(directory: str, manifest: dict[str, Any], store: BlockStore,
                    max_block_tokens: int, progress: bool, precision: str
                    ) -> tuple[Optional[Retriever], Any]:
    """The saved retriever (None for BM25 and closed book) and its index over ``store``."""
    if manifest["retrieval"] == "none":
        return None, None
    if manifest["retrieval"] != "dense":
        return None, BM25Index(store)
    retriever = Retriever.from_pretrained(os.path.join(directory, "retriever"))
    check_tokenizer(retriever.tokenizer, store)
    if manifest["corpus"]["fingerprint"] == store.fingerprint:
        embeddings = np.load(os.path.join(directory, EMBEDDINGS_FILE))
    else:
        logger.info("%s is not the corpus the model was fine-tuned on: embedding it", store.path)
        embeddings = document_embeddings(retriever, store, max_block_tokens, progress=progress,
                                         precision=precision)
    # (with BM25's top blocks read too where it was fine-tuned so)
    return retriever, dense_index(embeddings, store, manifest.get("bm25_blocks", 0))


def load_openqa_model(directory: str, store: BlockStore, max_block_tokens: int = 288,
                      progress: bool = True, precision: str = "auto"
                      ) -> OpenQAModel | GenerativeOpenQAModel:
    """A model saved by :func:`save_openqa_model` (extractive or generative), over ``store``.

    The saved document embeddings are used when ``store`` is the corpus they were made from;
    any other corpus is embedded with the saved document encoder. A generative model's
    generator loads frozen (its merged weights), bf16 where ``precision`` says so.

    Raises:
        FileNotFoundError: ``directory`` holds no manifest.
        ValueError: ``directory`` is a saved model of another kind (the message names it).
    """
    manifest = read_manifest(directory, kind=MANIFEST_KIND)
    retriever, index = _load_retrieval(directory, manifest, store, max_block_tokens, progress,
                                       precision)
    if manifest.get("reader_type", "extractive") == "generative":
        generator = RAGGenerator.from_pretrained(os.path.join(directory, GENERATOR_DIR),
                                                 mode="frozen", precision=precision)
        return GenerativeOpenQAModel(
            retriever, generator, index, store, k=manifest["k"],
            max_question_tokens=manifest["max_question_tokens"], rag_loss=manifest["rag_loss"],
            decoding=manifest["decoding"], beam_size=manifest["beam_size"],
            max_answer_tokens=manifest["max_answer_tokens"],
            max_train_answers=manifest["max_train_answers"],
            closed_book=manifest["retrieval"] == "none", regex=manifest.get("regex", False),
            retrieval_temperature=manifest.get("retrieval_temperature", 1.0))
    reader = SpanReader.from_pretrained(os.path.join(directory, "reader"))
    check_tokenizer(reader.tokenizer, store)
    return OpenQAModel(retriever, reader, index, store, reader.tokenizer, k=manifest["k"],
                       max_question_tokens=manifest["max_question_tokens"],
                       max_joined_tokens=manifest["max_joined_tokens"],
                       regex=manifest.get("regex", False),
                       # models saved before these existed were trained and read this way
                       normalization=manifest.get("normalization", "block"),
                       retrieval_temperature=manifest.get("retrieval_temperature", 1.0))
