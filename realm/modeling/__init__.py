"""Models: the retriever (query and document encoders), the knowledge-augmented encoder."""

from realm.modeling.inputs import (EncoderInputs, JoinedInputs, build_block_inputs,
                                   build_joined_inputs, build_query_inputs,
                                   length_bucketed_batches)
from realm.modeling.readers.mlm import (KnowledgeAugmentedEncoder, KnowledgeAugmentedOutput,
                                        build_ka_encoder, tie_output_embeddings)
from realm.modeling.embedder import Embedder, pool
from realm.modeling.retriever import Retriever, RetrieverOutput, build_retriever
from realm.artifacts import read_manifest

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
