"""BM25 sparse-retrieval baseline, a thin wrapper around the maintained ``bm25s`` library.

The defaults ``k1=0.9, b=0.4`` are Anserini's (Pyserini's) BM25 settings, the usual baseline in
Open-QA papers. Text is tokenised by ``bm25s.tokenize`` (lower-cased ``\\w\\w+`` words, stop words
removed); corpus and queries go through the same tokeniser, and query words that never occur in
the corpus are ignored. Stemming needs the optional ``PyStemmer`` package and is off by default.

    >>> retriever = BM25Retriever.build(["the cat sat", "dogs bark"])
    >>> scores, indices = retriever.search(["which cat"], k=1)
    >>> indices.tolist()
    [[0]]
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, Union

import bm25s
import numpy as np

from realm.index.mips import SearchResult

logger = logging.getLogger(__name__)
# bm25s sets its own logger to DEBUG ("Building index from IDs objects" at every build): keep its
# chatter below the user's INFO
logging.getLogger("bm25s").setLevel(logging.WARNING)


class BM25Retriever:
    """Okapi BM25 (Lucene variant) over an in-memory list of passages.

    Build with :meth:`build`; :meth:`search` returns scores and row indices into the texts
    given to :meth:`build`.
    """

    def __init__(
        self,
        model: bm25s.BM25,
        num_docs: int,
        stopwords: Union[str, list[str], None],
        stemmer: Optional[Any],
    ) -> None:
        """Wrap an indexed ``bm25s.BM25``; use :meth:`build` rather than calling this directly."""
        self.model = model
        self.num_docs = num_docs
        self.stopwords = stopwords
        self.stemmer = stemmer

    @classmethod
    def build(
        cls,
        texts: Sequence[str],
        k1: float = 0.9,
        b: float = 0.4,
        stopwords: Union[str, list[str], None] = "en",
        stem: bool = False,
    ) -> "BM25Retriever":
        """Tokenise and index a corpus.

        Args:
            texts: The passages; result indices refer to positions in this sequence.
            k1: BM25 term-frequency saturation.
            b: BM25 length normalisation.
            stopwords: A ``bm25s`` stop-word language code (``"en"``, ``"de"``, ...), an explicit
                list of words, or None for no stop-word removal.
            stem: Apply an English Snowball stemmer to corpus and queries (needs ``PyStemmer``).

        Returns:
            The indexed retriever.

        Raises:
            ValueError: ``texts`` is empty.
            ImportError: ``stem=True`` and PyStemmer is not installed.
        """
        if len(texts) == 0:
            raise ValueError("cannot build a BM25 index over an empty corpus")
        stemmer = _english_stemmer() if stem else None
        tokens = bm25s.tokenize(
            list(texts), stopwords=stopwords, stemmer=stemmer, show_progress=False
        )
        model = bm25s.BM25(k1=k1, b=b, method="lucene")
        model.index(tokens, show_progress=False)
        logger.info("BM25 index: %d passages, %d terms", len(texts), len(tokens.vocab))
        return cls(model, len(texts), stopwords, stemmer)

    def __len__(self) -> int:
        """Number of indexed passages."""
        return self.num_docs

    def search(self, queries: Sequence[str], k: int) -> SearchResult:
        """Top-k passages per query, best first.

        Args:
            queries: Query strings.
            k: Results per query. Clamped (with a warning) to the corpus size when larger.

        Returns:
            :class:`~realm.index.mips.SearchResult`: float32 ``[n_queries, k]`` BM25 scores in
            descending order and int64 ``[n_queries, k]`` passage indices. A query with no corpus word scores 0
            everywhere (its indices are then arbitrary).

        Raises:
            ValueError: ``k < 1``.
        """
        k = self._clamp_k(k)
        if len(queries) == 0:
            return SearchResult(np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64))
        query_tokens = bm25s.tokenize(
            list(queries),
            stopwords=self.stopwords,
            stemmer=self.stemmer,
            return_ids=False,  # words, so bm25s maps them onto the corpus vocabulary
            show_progress=False,
        )
        # With no corpus given, bm25s returns (document indices, scores), each [n_queries, k].
        indices, scores = self.model.retrieve(query_tokens, k=k, show_progress=False)
        return SearchResult(scores.astype(np.float32, copy=False),
                            indices.astype(np.int64, copy=False))

    def _clamp_k(self, k: int) -> int:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > self.num_docs:
            logger.warning(
                "BM25 search asked for k=%d but the corpus has only %d passages; returning %d",
                k,
                self.num_docs,
                self.num_docs,
            )
            return self.num_docs
        return k


def _english_stemmer() -> Any:
    try:
        import Stemmer  # PyStemmer, optional
    except ImportError as err:
        raise ImportError(
            "BM25 stemming needs the optional PyStemmer package (pip install PyStemmer); "
            "build with stem=False to index without stemming"
        ) from err
    return Stemmer.Stemmer("english")  # bm25s calls its stemWords on the vocabulary
