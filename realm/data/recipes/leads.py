"""Leads-Open: real open-domain questions whose answer occurs in the 10,033 Wikipedia lead
sections of ``package:wiki-leads``.

The questions are NQ-open's dev split as DPR made it, TriviaQA-open's (DPR's dev split, answers
with their aliases), WebQuestions train and EfficientQA dev 1.1, in that order, each in its file
order. A question is kept when one of its answers occurs in a lead section's title or text by
DPR's ``has_answer`` rule as the shipped split applied it (:func:`answer_tokens`: the answer's
tokens a contiguous run of the passage's); a question already kept is not kept again. Then
``random.Random(20261201)`` shuffles the questions, they are grouped by source (in the order
each source first appears in the shuffled list), the first ``quota`` of each source go to dev
(1,500 in all, each source's share by largest remainder) and the rest to train, and the same
generator shuffles dev and then train. Records: ``question``, ``answers``, ``source``.

Sources: ``--from DIR`` reads ``DIR/openqa/*.jsonl`` (``question``, ``answers``) and the lead
sections from ``DIR/wikipedia/vital_level4_summaries_en.jsonl`` (else ``package:wiki-leads``).
The public route downloads DPR's question files and EfficientQA's from their homes and
WebQuestions from the Hub through ``datasets`` (:data:`PUBLIC`). Either way the four sets are written to
``openqa/`` too (``question``, ``answers``).
"""

from __future__ import annotations

import ast
import csv
import io
import json
import logging
import os
import random
import unicodedata
from typing import Any, Iterable, Optional, Sequence

import regex

from realm.data.readers import PACKAGE_WIKI_LEADS, CorpusReader
from realm.data.recipes.common import (Recipe, check_answers, download_text, hub_url,
                                       local_path, progress_bar, public, read_jsonl, write_jsonl,
                                       write_manifest)

FOLDER = "openqa_leads"
FILES = (f"{FOLDER}/train.jsonl", f"{FOLDER}/dev.jsonl")
LEADS_FILE = "wikipedia/vital_level4_summaries_en.jsonl"
#: source name -> its question file (relative to --from or --output), in the pooling order
SOURCES = {"nq": "openqa/nq_open_dev_dpr.jsonl", "trivia": "openqa/trivia_open_dev_dpr.jsonl",
           "wq": "openqa/wq_train.jsonl", "efficientqa": "openqa/efficientqa_dev.jsonl"}
DPR_QAS = "https://dl.fbaipublicfiles.com/dpr/data/retriever/"
#: source name -> (what it is, where it is public, how it is read)
PUBLIC = {
    "nq": ("NQ-open dev (DPR's split)", DPR_QAS + "nq-dev.qa.csv", "dpr_csv"),
    "trivia": ("TriviaQA-open dev (DPR's split)", DPR_QAS + "trivia-dev.qa.csv.gz", "dpr_csv"),
    "wq": ("WebQuestions train", "stanfordnlp/web_questions", "hub"),
    "efficientqa": ("EfficientQA dev 1.1",
                    "https://raw.githubusercontent.com/google-research-datasets/"
                    "natural-questions/master/nq_open/NQ-open.efficientqa.dev.1.1.jsonl", "jsonl"),
}
DEV_SIZE = 1500
SEED = 20261201

logger = logging.getLogger(__name__)

#: a token: a run of Unicode letters and digits (after NFD, so a combining accent ends a run)
_TOKEN = regex.compile(r"[\p{L}\p{N}]+")


def answer_tokens(text: str) -> list[str]:
    """The tokens Leads-Open matches answers with: ``text`` in NFD form, runs of Unicode letters
    and digits, lower-cased. Punctuation is no token (``"$20"`` -> ``["20"]``) and a combining
    accent splits a word (``"Shōnen"`` -> ``["sho", "nen"]``). This is the rule the shipped
    split was made with; :func:`realm.metrics.has_answer` (DPR's tokenizer, which keeps
    punctuation and accents as tokens) keeps a few dozen other questions."""
    return [t.lower() for t in _TOKEN.findall(unicodedata.normalize("NFD", text))]


class AnswerIndex:
    """Which answers occur in a set of passages, as a contiguous run of :func:`answer_tokens`
    inside one passage: an inverted index from each token to its positions."""

    def __init__(self, passages: Iterable[str]):
        self.tokens: list[Optional[str]] = []  # every passage's tokens, None between passages
        self.positions: dict[str, list[int]] = {}
        for text in passages:
            for token in answer_tokens(text):
                self.positions.setdefault(token, []).append(len(self.tokens))
                self.tokens.append(token)
            self.tokens.append(None)

    def __contains__(self, answer: str) -> bool:
        run = answer_tokens(answer)
        if not run:
            return False
        # anchor on the rarest token of the answer, then compare the whole run around it
        anchor = min(range(len(run)), key=lambda i: len(self.positions.get(run[i], ())))
        return any(self.tokens[p - anchor:p - anchor + len(run)] == run
                   for p in self.positions.get(run[anchor], ()) if p >= anchor)

    def has_answer(self, answers: Sequence[str]) -> bool:
        return any(a in self for a in answers)


def leads_questions(question_sets: dict[str, list[dict[str, Any]]], index: AnswerIndex,
                    progress: bool = False) -> list[dict[str, Any]]:
    """The questions of ``question_sets`` (source -> records, taken in :data:`SOURCES` order)
    with an answer in ``index``, each question once, as ``{question, answers, source}``."""
    kept, seen = [], set()
    total = sum(len(question_sets[s]) for s in SOURCES)
    records = ((s, r) for s in SOURCES for r in question_sets[s])
    for source, r in progress_bar(records, "leads-open: has_answer", total, progress):
        if r["question"] not in seen and index.has_answer(r["answers"]):
            seen.add(r["question"])
            kept.append({"question": r["question"], "answers": r["answers"], "source": source})
    return kept


def dev_quota(counts: dict[str, int], dev_size: int) -> dict[str, int]:
    """Each source's share of ``dev_size`` questions, proportional to ``counts``, rounded by
    largest remainder (ties: the order of ``counts``) so that the shares sum to ``dev_size``."""
    total = sum(counts.values())
    exact = {s: n * dev_size / total for s, n in counts.items()}
    quota = {s: int(x) for s, x in exact.items()}
    by_remainder = sorted(counts, key=lambda s: quota[s] - exact[s])  # stable: ties in order
    for s in by_remainder[: dev_size - sum(quota.values())]:
        quota[s] += 1
    return quota


def split_leads(questions: Sequence[dict[str, Any]], dev_size: int = DEV_SIZE, seed: int = SEED
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, dev)``: a random dev set of ``dev_size`` stratified by ``source`` (the
    procedure of the module docstring); the same questions and seed give the same files."""
    if not 0 < dev_size < len(questions):
        raise ValueError(f"dev_size must be in [1, {len(questions) - 1}], got {dev_size}")
    rng = random.Random(seed)
    pool = list(questions)
    rng.shuffle(pool)
    by_source: dict[str, list[dict[str, Any]]] = {}
    for q in pool:
        by_source.setdefault(q["source"], []).append(q)
    quota = dev_quota({s: len(v) for s, v in by_source.items()}, dev_size)
    train, dev = [], []
    for source, items in by_source.items():
        dev += items[: quota[source]]
        train += items[quota[source]:]
    rng.shuffle(dev)
    rng.shuffle(train)
    return train, dev


def _dpr_csv(text: str) -> list[dict[str, Any]]:
    """DPR's ``*.qa.csv``: ``question<TAB>['answer', ...]`` a line, read as DPR reads it."""
    return [{"question": row[0], "answers": list(ast.literal_eval(row[1]))}
            for row in csv.reader(io.StringIO(text, newline=""), delimiter="\t")]


def _public_sets(output: str) -> dict[str, list[dict[str, Any]]]:
    """The four question sets from their public homes (one line naming --from when one cannot
    be reached)."""
    out = {}
    for source, (what, where, how) in PUBLIC.items():
        def load(where=where, how=how) -> list[dict[str, Any]]:
            if how == "hub":
                import datasets

                rows = datasets.load_dataset(where, split="train")
                return [{"question": r["question"], "answers": list(r["answers"])} for r in rows]
            text = download_text(where)
            if how == "dpr_csv":
                return _dpr_csv(text)
            return [{"question": r["question"], "answers": list(r["answer"])}
                    for r in map(json.loads, filter(str.strip, text.split("\n")))]

        url = hub_url() if how == "hub" else where
        out[source] = public("leads-open", output, f"{what} from {where}", load, url)
        check_answers(out[source], where)
    return out


def build_leads_open(output: str, source: Optional[str] = None,
                     progress: bool = True) -> dict[str, Any]:
    """Write Leads-Open's ``train.jsonl`` and ``dev.jsonl`` into ``output/openqa_leads/`` and
    the four question sets it was drawn from into ``output/openqa/``; returns the manifest."""
    if source is None:
        question_sets = _public_sets(output)
    else:
        question_sets = {}
        for name, relative in SOURCES.items():
            path = local_path(source, relative, "leads-open")
            question_sets[name] = read_jsonl(path, ("question", "answers"))
            check_answers(question_sets[name], path)
    leads = os.path.join(source, LEADS_FILE) if source else ""
    leads = leads if os.path.isfile(leads) else PACKAGE_WIKI_LEADS
    sections = [(a.title, a.text) for a in CorpusReader(leads)]
    index = AnswerIndex(text for section in sections for text in section)
    questions = leads_questions(question_sets, index, progress)
    logger.info("leads-open: %d of %d questions have an answer in %d lead sections (%s)",
                len(questions), sum(map(len, question_sets.values())), len(sections), leads)
    train, dev = split_leads(questions)
    files = {relative: write_jsonl(output, relative, question_sets[name])
             for name, relative in SOURCES.items()}
    files[FILES[0]] = write_jsonl(output, FILES[0], train)
    files[FILES[1]] = write_jsonl(output, FILES[1], dev)
    counts = {name: {s: sum(q["source"] == s for q in rows) for s in SOURCES}
              for name, rows in (("train", train), ("dev", dev))}
    return write_manifest(output, RECIPE, source, files, lead_sections=leads,
                          n_lead_sections=len(sections), seed=SEED, counts=counts)


RECIPE = Recipe(
    name="leads-open",
    description="Leads-Open: NQ-open, TriviaQA, WebQuestions and EfficientQA questions with an "
                "answer in the 10,033 lead sections of package:wiki-leads (train 8,738, dev 1,500)",
    folder=FOLDER, files=FILES + tuple(SOURCES.values()), build=build_leads_open)
