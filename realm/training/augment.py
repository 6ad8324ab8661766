"""DRAMA-style retriever training data written and labelled by a language model.

    python launch/augment_queries.py --corpus DIR --output DIR [--limit N] [--llm smollm2]

For each sampled block of a corpus (DRAMA, Ma et al. 2025, section 3.1):

- **queries**: (a) ``crop``: a random sentence of the block, a pseudo-query; (b) ``llm``: a
  question the block answers, written by the language model (greedy decoding).
- **candidates**: the top ``candidates`` blocks the current retriever (BM25 or a dense retriever
  directory) finds for the query, the source block among them (it replaces the last one when the
  search misses it).
- **labels**: the language model scores each candidate z by the mean log-probability of the
  query given z (``log p(query | z)``, the query as the reply to the request that wrote the
  questions, about z); the best is the positive, the others are distractors (hard negatives), best first.

The output directory holds ``triplets.jsonl`` (one JSON object per query: ``query``, ``kind``,
``source``, ``positive``, ``negatives``, ``candidates``, ``scores``) and, once complete,
``manifest.json`` (settings, the corpus fingerprint, counts, throughput). Records are appended and
flushed chunk by chunk: a killed run continues where it stopped; a complete run with the same
settings does nothing; other settings are refused. ``retriever_training.triplets=DIR`` trains a
DPR retriever on it (:mod:`realm.training.dpr`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from realm.data.pairs import MANIFEST_FILE, TRIPLETS_FILE, read_done
from realm.data.store import BlockStore
from realm.retrieval.search import BM25Searcher, DenseSearcher
from realm.hub import load_tokenizer, resolve_model_path, run_part
from realm.modeling.retriever import Retriever

logger = logging.getLogger(__name__)

MANIFEST_KIND = "augmented_queries"
KINDS = ("crop", "llm")

#: The conversation that asks for a question (and under which a query's probability is scored).
#: SmolLM2-135M answers "write a question this passage answers" with chatter ("What a
#: delightful text!"); as a quiz writer it writes questions.
SYSTEM_PROMPT = "You write quiz questions. Reply with one question only."
USER_PROMPT = "Text: {passage}\n\nWrite a quiz question whose answer is in the text."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def crop_query(text: str, rng: np.random.Generator, min_words: int = 4,
               max_words: int = 32) -> Optional[str]:
    """A random sentence of ``text`` (at most ``max_words`` words) with at least ``min_words``
    words; None when there is none."""
    sentences = [s.split() for s in _SENTENCE_END.split(text.strip())]
    sentences = [s for s in sentences if len(s) >= min_words]
    if not sentences:
        return None
    words = sentences[int(rng.integers(len(sentences)))]
    return " ".join(words[:max_words])


def clean_question(text: str) -> Optional[str]:
    """The first line of a generated reply, without a ``Question:`` prefix or quotes; None when
    nothing is left."""
    line = next((l.strip() for l in text.strip().splitlines() if l.strip()), "")
    line = re.sub(r"^(question|q)\s*[:.-]\s*", "", line, flags=re.IGNORECASE).strip(" \"'")
    return line or None


class LanguageModel:
    """A causal LM that writes questions for passages and scores ``log p(query | passage)``.

    Args:
        name_or_path: A transformers causal-LM directory, a hub name, or a packaged alias
            (``smollm2``: SmolLM2-135M-Instruct, :data:`realm.hub.PACKAGED_GGUF`).
        max_passage_tokens: Passage tokens (the LM's tokenizer) kept in a prompt.
        batch_size: Sequences per forward pass.
    """

    def __init__(self, name_or_path: str = "smollm2", max_passage_tokens: int = 192,
                 batch_size: int = 8):
        from transformers import AutoModelForCausalLM

        self.name = name_or_path
        try:
            self.model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path))
        except (ValueError, OSError, KeyError) as err:  # e.g. a BERT directory
            raise ValueError(f"--llm {name_or_path}: not a causal language model that "
                             f"transformers can load ({str(err).splitlines()[0]})") from None
        self.model.eval()
        self.tokenizer = load_tokenizer(name_or_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not self.tokenizer.chat_template:
            raise ValueError(f"{name_or_path}: its tokenizer has no chat template; an "
                             f"instruction-tuned causal LM is needed")
        self.max_passage_tokens, self.batch_size = max_passage_tokens, batch_size

    def _passage(self, title: str, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_passage_tokens:
            text = self.tokenizer.decode(ids[: self.max_passage_tokens])
        return f"{title}. {text}" if title else text

    def _prompt_ids(self, passage: tuple[str, str]) -> list[int]:
        """The chat-formatted request for a question about ``(title, text)``, up to where the
        assistant's reply starts."""
        request = USER_PROMPT.format(passage=self._passage(*passage))
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": request}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _batch(self, rows: Sequence[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span], mask[i, span] = torch.tensor(row), 1
        return ids, mask

    @torch.inference_mode()
    def write_questions(self, passages: Sequence[tuple[str, str]],
                        max_new_tokens: int = 32) -> list[Optional[str]]:
        """A question for each ``(title, text)``, greedy; None where the reply is empty."""
        out: list[Optional[str]] = []
        for start in range(0, len(passages), self.batch_size):
            rows = [self._prompt_ids(p) for p in passages[start: start + self.batch_size]]
            ids, mask = self._batch(rows, left=True)
            generated = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            out += [clean_question(self.tokenizer.decode(g[ids.shape[1]:],
                                                         skip_special_tokens=True))
                    for g in generated]
        return out

    @torch.inference_mode()
    def query_log_probs(self, query: str, passages: Sequence[tuple[str, str]]) -> np.ndarray:
        """Mean log-probability per token of ``query`` given each passage, ``[len(passages)]``."""
        target = self.tokenizer(query, add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError("query_log_probs: empty query")
        scores: list[float] = []
        for start in range(0, len(passages), self.batch_size):
            prompts = [self._prompt_ids(p) for p in passages[start: start + self.batch_size]]
            ids, mask = self._batch([p + target for p in prompts], left=False)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            for i, prompt in enumerate(prompts):
                positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target))
                picked = log_probs[i, positions, torch.tensor(target)]
                scores.append(float(picked.mean()))
        return np.asarray(scores, np.float64)


def _settings(store: BlockStore, llm: str, candidates: int, retriever: str, kinds: Sequence[str],
              limit: Optional[int], seed: int) -> dict[str, Any]:
    return {"corpus_fingerprint": store.fingerprint, "llm": llm, "candidates": candidates,
            "retriever": retriever, "kinds": list(kinds), "limit": limit, "seed": seed}


def augment_queries(corpus: str, output: str, llm: str = "smollm2", limit: Optional[int] = None,
                    candidates: int = 4, retriever: str = "bm25",
                    kinds: Sequence[str] = KINDS, seed: int = 0, batch_size: int = 8,
                    max_new_tokens: int = 32, max_block_tokens: int = 288,
                    progress: bool = True) -> dict[str, Any]:
    """Write (or finish) the triplet directory ``output`` for ``corpus``; returns the summary."""
    if candidates < 2:
        raise ValueError(f"candidates must be >= 2 (a positive and a distractor), got {candidates}")
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be some of {KINDS}, got {list(kinds)}")
    store = BlockStore(corpus)
    settings = _settings(store, llm, candidates, retriever, kinds, limit, seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    started = out / "settings.json"
    if started.is_file():
        previous = json.loads(started.read_text())
        if previous != settings:
            raise ValueError(f"{output} holds triplets made with other settings ({previous}); "
                             f"asked for {settings}: choose another --output")
    else:
        started.write_text(json.dumps(settings, indent=1))
    if (out / MANIFEST_FILE).is_file():
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        logger.info("%s already holds %d triplets; nothing to do", output, manifest["records"])
        return {**manifest, "output": output, "resumed": True}

    rng = np.random.default_rng(seed)
    sources = rng.permutation(len(store))[: limit or len(store)]
    crops = {int(b): crop_query(store.text(int(b)), np.random.default_rng([seed, int(b)]))
             for b in sources}
    path = out / TRIPLETS_FILE
    done = read_done(path)
    with open(path, "w", encoding="utf-8") as f:  # rewrite what was complete, then append
        f.writelines(json.dumps(r) + "\n" for r in done)
    finished = {r["source"] for r in done}
    todo = [int(b) for b in sources if int(b) not in finished]
    logger.info("%d of %d source blocks done; %d to go", len(finished), len(sources), len(todo))
    lm = LanguageModel(llm, batch_size=batch_size)
    if retriever == "bm25":
        searcher = BM25Searcher(store)
    else:
        searcher = DenseSearcher(Retriever.from_pretrained(run_part(retriever, "retriever")),
                                 store, max_block_tokens, progress=progress)
    t0, written, with_source = time.time(), 0, 0
    bar = tqdm(total=len(todo), desc="augmenting", unit="block", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start: start + batch_size]
        queries: list[tuple[int, str, str]] = []
        if "crop" in kinds:
            queries += [(b, "crop", crops[b]) for b in chunk if crops[b]]
        if "llm" in kinds:
            written_qs = lm.write_questions([(store.title(b), store.text(b)) for b in chunk],
                                            max_new_tokens)
            queries += [(b, "llm", q) for b, q in zip(chunk, written_qs) if q]
        ranked = searcher.search([q for _, _, q in queries],
                                 min(candidates, len(store))).block_ids
        records = []
        for (source, kind, query), row in zip(queries, ranked):
            found = [int(z) for z in row if z >= 0]
            if source not in found:
                found = found[: candidates - 1] + [source]
            scores = lm.query_log_probs(query, [(store.title(z), store.text(z)) for z in found])
            order = np.argsort(-scores, kind="stable")
            records.append({"query": query, "kind": kind, "source": source,
                            "positive": found[order[0]],
                            "negatives": [found[i] for i in order[1:]],
                            "candidates": found, "scores": [round(float(s), 4) for s in scores]})
            with_source += found[order[0]] == source
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        written += len(records)
        bar.update(len(chunk))
    bar.close()
    seconds = time.time() - t0
    everything = read_done(path)
    manifest = {
        "kind": MANIFEST_KIND, **settings, "corpus": os.path.abspath(corpus),
        "source_blocks": len(sources), "records": len(everything),
        "by_kind": {k: sum(r["kind"] == k for r in everything) for k in kinds},
        "positive_is_source": round(float(np.mean([r["positive"] == r["source"]
                                                   for r in everything])), 4)
        if everything else None,
        "queries_per_s": round(written / seconds, 3) if written and seconds else None,
        "seconds": round(seconds, 1),
    }
    tmp = out / f"{MANIFEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST_FILE)  # last: the directory is complete
    logger.info("%d triplets in %s (%.2f queries/s; the positive is the source block for %.0f%% "
                "of this run's queries)", len(everything), output, manifest["queries_per_s"] or 0,
                100 * with_source / max(written, 1))
    return {**manifest, "output": output, "resumed": False}


