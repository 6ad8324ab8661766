"""Retrieval: one :class:`~realm.retrieval.search.Searcher` protocol over dense, BM25, fused,
sharded and fixed indexes."""
