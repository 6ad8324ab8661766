"""Models: the retriever (query and document encoders), the knowledge-augmented encoder."""

from realm.modeling.ka_encoder import (
    JoinedInputs,
    KnowledgeAugmentedEncoder,
    KnowledgeAugmentedOutput,
    build_joined_inputs,
    build_ka_encoder,
    tie_output_embeddings,
)
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
    "JoinedInputs",
    "KnowledgeAugmentedEncoder",
    "KnowledgeAugmentedOutput",
    "build_joined_inputs",
    "build_ka_encoder",
    "tie_output_embeddings",
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
