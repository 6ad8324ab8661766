"""REALM's readers: ``log p(y|z, x)`` of masked examples beside their candidate blocks.

:class:`Reader` is the interface REALM calls (``build_inputs``, ``read``, ``predict``;
:mod:`realm.modeling.readers.base`); the masked-LM knowledge-augmented encoder
(:class:`KnowledgeAugmentedEncoder`, :mod:`realm.modeling.readers.mlm`) is its first
implementation; a transformers causal LM reading the blocks' cased text
(:class:`CausalLMReader`, :mod:`realm.modeling.readers.causal_lm`) is the second.
:func:`load_reader` loads a saved reader by its manifest's kind.
"""

from __future__ import annotations

import json
import os

from realm.modeling.readers.base import Reader, ReaderOutput
from realm.modeling.readers.causal_lm import MANIFEST_KIND as CAUSAL_LM_KIND
from realm.modeling.readers.causal_lm import CausalLMReader
from realm.modeling.readers.mlm import (MANIFEST_KIND, KnowledgeAugmentedEncoder,
                                        KnowledgeAugmentedOutput)

#: Saved reader directories by their manifest's ``kind``.
READERS: dict[str, type[Reader]] = {MANIFEST_KIND: KnowledgeAugmentedEncoder,
                                     CAUSAL_LM_KIND: CausalLMReader}


def load_reader(path: str) -> Reader:
    """A saved reader directory (the class its manifest's kind names), or any transformers
    checkpoint as a masked-LM reader (a new tied head when it has none)."""
    manifest = os.path.join(path, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as f:
            kind = json.load(f).get("kind")
        # (another kind: the masked-LM reader's loader names what the directory holds instead)
        return READERS.get(kind, KnowledgeAugmentedEncoder).from_pretrained(path)
    return KnowledgeAugmentedEncoder.from_checkpoint(path)


__all__ = ["READERS", "CausalLMReader", "KnowledgeAugmentedEncoder", "KnowledgeAugmentedOutput",
           "Reader", "ReaderOutput", "load_reader"]
