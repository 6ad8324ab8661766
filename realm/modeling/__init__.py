"""Models: the retriever (query and document encoders); more roles join here."""

from realm.modeling.retriever import (
    EncoderInputs,
    Embedder,
    Retriever,
    RetrieverOutput,
    build_block_inputs,
    build_query_inputs,
    build_retriever,
    length_bucketed_batches,
    pool,
    read_manifest,
)

__all__ = [
    "EncoderInputs",
    "Embedder",
    "Retriever",
    "RetrieverOutput",
    "build_block_inputs",
    "build_query_inputs",
    "build_retriever",
    "length_bucketed_batches",
    "pool",
    "read_manifest",
]
