"""One searcher protocol for every index: ``search(queries, k) -> SearchResult``.

Whatever answers "the top k blocks for these queries" in realm answers it the same way (Atlas's
``search_knn`` is the model): one method, ``search(queries, k)`` (plus ``exclude`` where an index
can leave blocks out), returning one type, :class:`SearchResult` (``scores``, ``block_ids``,
each ``[n_queries, k]``, best first, -1 where fewer were found). The queries are texts for the
searchers below (dense, BM25, fused), embeddings ``[n, dim]`` for the indexes under them:

==========================================  =============  ===================================
searcher                                    queries        where
==========================================  =============  ===================================
:class:`DenseSearcher`                      texts          a retriever over every block
:class:`BM25Searcher`                       texts          BM25 over title + text
:class:`FusionSearcher`                     texts          reciprocal rank fusion of several
:class:`realm.retrieval.fixed.BM25Index`    texts          Open-QA's fixed BM25 index
:class:`realm.retrieval.fixed.DenseIndex`   embeddings     Open-QA's fixed index (scores with
                                                           grad to the query encoder)
:class:`realm.index.mips.MipsIndex`         embeddings     exact or any faiss factory string
:class:`realm.index.generations.Generation` embeddings     a committed index generation
:class:`realm.index.sharded.ShardedSearch`  embeddings     a generation sharded over ranks
:class:`realm.refresh.watcher.IndexWatcher` embeddings     the generation in use (hot swap)
==========================================  =============  ===================================

The three searchers over a corpus (dense, BM25, fused) are also the Python retrieval API
(``realm.Searcher``, as pyserini's ``LuceneSearcher``/``FaissSearcher``)::

    from realm import Searcher
    s = Searcher.from_pretrained("runs/pretrain/retriever", corpus="runs/cache/corpus-XXXX")
    s.search("who painted the mona lisa", k=5)    # [Hit(block_id, score, title, text), ...]
    s.batch_search(["q1", "q2"], k=5)             # one list of hits per query
    s.search(["q1", "q2"], k=5)                   # the protocol: SearchResult, [2, 5] arrays
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

import numpy as np
import torch
import yaml

from realm.artifacts import read_manifest
from realm.config import RetrieverConfig
from realm.data.store import BlockStore, check_tokenizer
from realm.hub import run_part
from realm.index.mips import SearchResult, build_index
from realm.index.mips import search as mips_search
from realm.modeling.embed import embed_blocks, embed_queries, special_ids
from realm.modeling.retriever import MANIFEST_KIND as RETRIEVER_KIND
from realm.modeling.retriever import Retriever
from realm.precision import autocast_dtype
from realm.retrieval.bm25 import BM25Retriever

logger = logging.getLogger(__name__)

#: The name :meth:`Searcher.from_pretrained` reads as "BM25 over the corpus, no model".
BM25 = "bm25"
#: Where a run keeps its resolved config, beside (or above) the retriever it saved.
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class Hit:
    """One retrieved block, as :meth:`Searcher.batch_search` returns it.

    Attributes:
        block_id: Row of the corpus (``BlockStore.block(block_id)``).
        score: The searcher's score (inner product, BM25 or fused), higher is better.
        title: The block's article title.
        text: The block's body text.
    """

    block_id: int
    score: float
    title: str
    text: str


class Searcher(Protocol):
    """Anything that returns the top ``k`` blocks for a batch of queries: ``search(queries, k)``
    is the protocol (structural: the indexes in the table above implement it without naming
    it).

    The searchers over a corpus (:class:`DenseSearcher`, :class:`BM25Searcher`,
    :class:`FusionSearcher`) subclass it and get with it :meth:`from_pretrained`,
    :meth:`batch_search` and ``search(text, k)`` for one query, which returns its :class:`Hit` s.
    """

    #: The corpus the block ids index (the searchers over a corpus).
    store: BlockStore

    def search(self, queries: Any, k: int) -> SearchResult:
        """Top ``k`` blocks per query: ``SearchResult(scores [n, k], block_ids [n, k])``."""

    def batch_search(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """The top ``k`` blocks of each query as :class:`Hit` s (block id, score, title, text),
        best first; one list per query."""
        if isinstance(queries, str):
            raise TypeError("batch_search takes a list of queries; search(text, k) takes one")
        scores, ids = self.search(list(queries), k)  # [n, k] each
        scores = np.asarray(scores, np.float64)
        return [[Hit(int(b), float(s), self.store.title(int(b)), self.store.text(int(b)))
                 for b, s in zip(row_ids, row_scores) if b >= 0]
                for row_ids, row_scores in zip(ids, scores)]

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike],
                        corpus: Union[str, os.PathLike, BlockStore, None] = None, *,
                        max_query_tokens: Optional[int] = None,
                        max_block_tokens: Optional[int] = None, device: Optional[str] = None,
                        precision: str = "auto", progress: bool = False) -> "Searcher":
        """A searcher over ``corpus``: a saved retriever's (dense, exact inner products) or BM25.

        Args:
            name_or_path: A retriever directory (``RUN/retriever``, a snapshot
                ``RUN/snapshots/step-N``, a converted REALM retriever), a run directory holding
                ``retriever/``, or ``"bm25"``.
            corpus: The corpus directory (``launch/prepare_corpus.py``'s), or a
                :class:`BlockStore`; a dense retriever must share its tokenizer. None: the
                corpus the run that saved the retriever read (its ``config.yaml``'s
                ``corpus``).
            max_query_tokens, max_block_tokens: Word pieces read per query and per block; None:
                what the retriever was trained with (:func:`trained_lengths`).
            device: Where the retriever runs (default: ``cuda`` when torch sees one).
            precision: ``auto`` (bf16 where the device runs it fast), ``bf16`` or ``fp32``.
            progress: A progress bar while every block is embedded.

        Raises:
            CorpusError: ``corpus`` is not a corpus directory.
            FileNotFoundError, ValueError: ``name_or_path`` is no retriever (the message says
                what it is), no corpus is given or named by its run, or the retriever's
                tokenizer is not the corpus's.
        """
        if os.fspath(name_or_path).strip().lower() == BM25:
            if corpus is None:
                raise ValueError("BM25 needs a corpus: Searcher.from_pretrained('bm25', "
                                 "corpus=DIR)")
            return BM25Searcher(corpus if isinstance(corpus, BlockStore) else BlockStore(corpus))
        directory = Path(run_part(name_or_path, "retriever"))
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no such directory (expected a retriever "
                                    f"directory, a run directory holding one, or {BM25!r})")
        read_manifest(directory, RETRIEVER_KIND)
        if corpus is None:
            config, where = run_config(directory)
            if not config.get("corpus"):
                raise ValueError(f"{directory}: give corpus=DIR (no run config beside it names "
                                 "the corpus it read)")
            corpus = run_path(config["corpus"], config, where)
            logger.info("corpus %s: from %s", corpus, where)
        store = corpus if isinstance(corpus, BlockStore) else BlockStore(corpus)
        lengths = trained_lengths(directory, store)
        max_query_tokens = max_query_tokens or lengths[0]
        max_block_tokens = max_block_tokens or lengths[1]
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        retriever = Retriever.from_pretrained(directory, device=device)
        return DenseSearcher(retriever, store, max_block_tokens, max_query_tokens,
                             progress=progress, precision=precision)


def trained_lengths(retriever_dir: Union[str, os.PathLike], store: BlockStore
                    ) -> tuple[int, int]:
    """``(max_query_tokens, max_block_tokens)`` a saved retriever was trained with, from the
    first place that says: its manifest (``max_query_tokens``/``max_block_tokens``, top level or
    in ``metadata``), else the ``config.yaml`` of the run that saved it (``retriever.*``; the
    run directory is the retriever's parent, or grandparent for ``snapshots/step-N`` and
    ``model/retriever``: :func:`run_config`), else the corpus's block size
    (``data.max_block_tokens`` of its manifest: no block is cut) and the config default for
    queries (64). Each is logged with where it came from."""
    directory = Path(retriever_dir)
    manifest = read_manifest(directory, RETRIEVER_KIND)
    where = [(manifest, f"{directory}/manifest.json"),
             (manifest.get("metadata") or {}, f"{directory}/manifest.json")]
    config, path = run_config(directory)
    where.append((config.get("retriever") or {}, f"{path} (retriever.*)"))
    data = store.manifest.get("params", {}).get("data", {})
    where.append(({"max_block_tokens": data.get("max_block_tokens")},
                  f"{store.path}/manifest.json (data.max_block_tokens)"))
    defaults = RetrieverConfig()
    where.append(({"max_query_tokens": defaults.max_query_tokens,
                   "max_block_tokens": defaults.max_block_tokens}, "the retriever.* defaults"))
    out = []
    for key in ("max_query_tokens", "max_block_tokens"):
        value, source = next((int(fields[key]), source) for fields, source in where
                             if fields.get(key))
        logger.info("%s %d: from %s", key, value, source)
        out.append(value)
    return out[0], out[1]


def run_config(retriever_dir: Path) -> tuple[dict[str, Any], Optional[Path]]:
    """The resolved config (a plain dict) of the run that saved a retriever, and its path:
    ``config.yaml`` in the retriever's parent (``RUN/retriever``) or grandparent
    (``RUN/snapshots/step-N``, ``RUN/model/retriever``); ``({}, None)`` when there is none."""
    for run in (retriever_dir.parent, retriever_dir.parent.parent):
        if (run / RUN_CONFIG).is_file():
            config = yaml.safe_load((run / RUN_CONFIG).read_text(encoding="utf-8"))
            return (config if isinstance(config, dict) else {}), run / RUN_CONFIG
    return {}, None


def run_path(value: str, config: dict[str, Any], config_path: Path) -> str:
    """A path a run's ``config.yaml`` names, as seen from here.

    Relative paths in a run's config are relative to the directory it was launched from (the
    run's own ``train.run_dir`` is one of them). When ``value`` does not exist from the current
    directory, the launch directory is found by stripping ``train.run_dir``'s parts from where
    the config lies (``/elsewhere/runs/x/config.yaml`` saved as ``runs/x``: ``/elsewhere``), so
    a run searched from another directory still finds its corpus. Absolute paths and paths that
    exist from here are returned as they are."""
    if os.path.isabs(value) or os.path.exists(value):
        return value
    saved = (config.get("train") or {}).get("run_dir")
    run = Path(config_path).parent.absolute()
    if saved and not os.path.isabs(saved):
        parts = Path(os.path.normpath(saved)).parts
        if run.parts[-len(parts):] == parts:
            candidate = Path(*run.parts[:-len(parts)]) / value
            if candidate.exists():
                return str(candidate)
    return value


def block_bm25(store: BlockStore) -> BM25Retriever:
    """BM25 (bm25s) over ``title + text`` of every block of ``store``."""
    texts = [f"{store.title(i)} {store.text(i)}" for i in range(len(store))]
    return BM25Retriever.build(texts)


class DenseSearcher(Searcher):
    """Embeds every block with the document encoder once; exact inner-product search.

    ``precision``: ``auto`` (bf16 autocast where the device runs it fast, as the refresher does),
    ``bf16`` or ``fp32``. :meth:`Searcher.from_pretrained` builds one from a saved retriever,
    with the lengths it was trained with.
    """

    def __init__(self, retriever, store: BlockStore, max_block_tokens: int = 288,
                 max_query_tokens: int = 64, progress: bool = True,
                 precision: str = "auto") -> None:
        check_tokenizer(retriever.tokenizer, store)
        self.retriever, self.store = retriever, store
        self.special = special_ids(retriever.tokenizer)
        self.max_query_tokens, self.max_block_tokens = max_query_tokens, max_block_tokens
        device = next(retriever.parameters()).device
        self.bf16 = autocast_dtype(precision, device) == "bf16"
        reps, self.embed_stats = embed_blocks(retriever, store, self.special,
                                              max_block_tokens=max_block_tokens, progress=progress,
                                              bf16=self.bf16)
        self.index = build_index(reps)

    def search(self, queries: Union[str, Sequence[str]], k: int):
        """Inner products and block ids of the top ``k`` blocks, ``[n, k]`` each; for one query
        text, its :class:`Hit` s."""
        if isinstance(queries, str):
            return self.batch_search([queries], k)[0]
        tok = self.retriever.tokenizer
        return self.search_tokens([tok(t, add_special_tokens=False)["input_ids"] for t in queries],
                                  k)

    def search_tokens(self, queries: Sequence[Sequence[int]], k: int) -> SearchResult:
        """As :meth:`search`, for queries already cut into the retriever's word pieces."""
        q = embed_queries(self.retriever, queries, self.special, self.max_query_tokens,
                          bf16=self.bf16)
        return mips_search(self.index, q, k)


class BM25Searcher(Searcher):
    """BM25 (bm25s) over ``title + text`` of every block."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self.bm25 = block_bm25(store)

    def search(self, queries: Union[str, Sequence[str]], k: int):
        """BM25 scores and block ids of the top ``k`` blocks, ``[n, k]`` each; for one query
        text, its :class:`Hit` s."""
        if isinstance(queries, str):
            return self.batch_search([queries], k)[0]
        return self.bm25.search(list(queries), k)


class FusionSearcher(Searcher):
    """Reciprocal rank fusion (Cormack et al. 2009) of several searchers, e.g. BM25 and a dense
    retriever: each ranks its top ``depth`` blocks, a block scores ``sum 1 / (k_rrf + rank)``
    over the rankings it appears in (rank from 1), and the fused top k are returned. RRF needs
    no score calibration between BM25 and inner products, and no weight to tune.
    """

    def __init__(self, searchers: Sequence[Any], depth: int = 100, k_rrf: int = 60) -> None:
        if len(searchers) < 2:
            raise ValueError("fusion needs at least two searchers")
        self.searchers, self.depth, self.k_rrf = list(searchers), depth, k_rrf
        self.store = next((s.store for s in self.searchers if hasattr(s, "store")), None)

    def search(self, queries: Union[str, Sequence[str]], k: int):
        """Fused scores and block ids, ``[n, k]`` each (-1 / 0 where fewer were found); for one
        query text, its :class:`Hit` s."""
        if isinstance(queries, str):
            return self.batch_search([queries], k)[0]
        texts = list(queries)
        depth = max(self.depth, k)
        rankings = [s.search(texts, depth).block_ids for s in self.searchers]
        return SearchResult(*reciprocal_rank_fusion(rankings, k, self.k_rrf))


def reciprocal_rank_fusion(rankings: Sequence[np.ndarray], k: int, k_rrf: int = 60
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of several rankings of the same queries (block ids ``[n, depth]``
    each, -1 for none): a block scores ``sum 1 / (k_rrf + rank)`` over the rankings it appears
    in (rank from 1); ties go to the lower block id. Returns fused scores ``[n, k]`` (float64)
    and block ids ``[n, k]`` (-1 / 0 where fewer were found)."""
    n = len(rankings[0])
    scores = np.zeros((n, k), np.float64)
    ids = np.full((n, k), -1, np.int64)
    for q in range(n):
        fused: dict[int, float] = collections.defaultdict(float)
        for ranking in rankings:
            for rank, block in enumerate(int(b) for b in ranking[q] if b >= 0):
                fused[block] += 1.0 / (k_rrf + rank + 1)
        best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        ids[q, : len(best)] = [b for b, _ in best]
        scores[q, : len(best)] = [s for _, s in best]
    return scores, ids


__all__ = ["BM25Searcher", "DenseSearcher", "FusionSearcher", "Hit", "SearchResult", "Searcher",
           "block_bm25", "reciprocal_rank_fusion", "run_config", "trained_lengths"]
