"""Retriever training pairs: a positive block and hard negatives per question, and the triplet
directories (``launch/augment_queries.py``) they are read from."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from realm.data.qa import QAExample
from realm.data.store import BlockStore

TRIPLETS_FILE = "triplets.jsonl"
MANIFEST_FILE = "manifest.json"


@dataclasses.dataclass
class TrainingPairs:
    """Mined training data, one row per question.

    Attributes:
        positive: Block id, ``-1`` where no searched block holds an answer, ``[N]``.
        negatives: Hard negatives (random blocks where too few were found), ``[N, n]``.
        from_gold: The positive is a block of the question's gold article, ``[N]``.
    """

    positive: np.ndarray
    negatives: np.ndarray
    from_gold: np.ndarray


def fill_random(negatives: list[int], n: int, positive: int, n_blocks: int,
                rng: np.random.Generator) -> int:
    """Append random blocks (never ``positive``, no repeats) until ``negatives`` holds ``n``;
    returns how many were added."""
    added = 0
    while len(negatives) < n and n_blocks > 1:
        block = int(rng.integers(n_blocks))
        if block != positive and block not in negatives:
            negatives.append(block)
            added += 1
    return added


def read_done(path: Path) -> list[dict[str, Any]]:
    """The complete records of a triplet file (a torn last line from a kill is dropped)."""
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            records.append(json.loads(line))
    return records


def read_triplets(directory: str, store: BlockStore, hard_negatives: int, seed: int = 0):
    """``(queries, TrainingPairs)`` from a complete triplet directory over ``store``: each
    query's positive and its best-scored ``hard_negatives`` distractors (random blocks where a
    record has too few)."""
    manifest_path = Path(directory) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"retriever_training.triplets: {directory} holds no "
                                f"{MANIFEST_FILE}: not a complete launch/augment_queries.py output")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("corpus_fingerprint") != store.fingerprint:
        raise ValueError(f"retriever_training.triplets: {directory} was made over a corpus with "
                         f"fingerprint {manifest.get('corpus_fingerprint')} "
                         f"({manifest.get('corpus')}); this corpus ({store.path}) has "
                         f"{store.fingerprint}")
    path = Path(directory) / TRIPLETS_FILE
    records = read_done(path)
    for line, r in enumerate(records, 1):
        bad = [z for z in [r.get("positive"), *r.get("negatives", [])]
               if not isinstance(z, int) or not 0 <= z < len(store)]
        if bad or not isinstance(r.get("query"), str) or not r["query"].strip():
            raise ValueError(f"{path}:{line}: " + (f"block ids {bad} are not in the corpus "
                                                   f"({len(store)} blocks)" if bad else
                                                   "no query"))
    rng = np.random.default_rng(seed)
    n = len(records)
    pairs = TrainingPairs(np.empty(n, np.int64), np.empty((n, hard_negatives), np.int64),
                          np.zeros(n, bool))
    for i, r in enumerate(records):
        pairs.positive[i] = r["positive"]
        negatives = list(r["negatives"][:hard_negatives])
        fill_random(negatives, hard_negatives, r["positive"], len(store), rng)
        pairs.negatives[i] = negatives
    return [QAExample(question=r["query"], answers=[]) for r in records], pairs
