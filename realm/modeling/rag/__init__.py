"""RAG (Lewis et al. 2020): a causal-LM generator over the top-k retrieved blocks.

:class:`RAGGenerator` scores gold answers beside each block (token log-probabilities, which the
RAG-Sequence and RAG-Token losses marginalise with the retriever's logits) and writes answers
(:func:`decode`: RAG-Token greedy or beam, RAG-Sequence thorough or fast);
:class:`GenerativeOpenQAModel` puts it behind the Open-QA retriever.
"""

from realm.modeling.rag.decode import (METHODS, Decoded, Hypothesis, decode, rag_sequence_decode,
                                       rag_token_decode)
from realm.modeling.rag.generator import GeneratorScores, Prefill, RAGGenerator
from realm.modeling.rag.openqa import GenerativeOpenQAModel, RAGOutput
from realm.modeling.rag.losses import (LOSSES, rag_sequence_log_likelihood, rag_sequence_loss,
                                       rag_token_log_likelihood, rag_token_loss)
from realm.modeling.rag.prompts import GeneratorInputs, RAGPrompts

__all__ = [
    "Decoded",
    "GeneratorInputs",
    "GenerativeOpenQAModel",
    "GeneratorScores",
    "Hypothesis",
    "LOSSES",
    "METHODS",
    "Prefill",
    "RAGGenerator",
    "RAGOutput",
    "RAGPrompts",
    "decode",
    "rag_sequence_decode",
    "rag_sequence_log_likelihood",
    "rag_sequence_loss",
    "rag_token_decode",
    "rag_token_log_likelihood",
    "rag_token_loss",
]
