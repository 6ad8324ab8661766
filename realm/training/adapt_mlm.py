"""MLM adaptation: continue an encoder as a BERT-style masked LM (the "BERT" REALM starts from).

The offline MiniLM has no masked-LM head. REALM's knowledge-augmented encoder starts from a
trained masked LM, so that ``p(y|z, x)`` means something from the first step and the retriever's
gradient is not noise. This stage gives any encoder checkpoint that head::

    accelerate launch launch/adapt_mlm.py --config configs/adapt_mlm.yaml [key=value ...]

- a new head (transform + decoder tied to the word embeddings) where the checkpoint has none;
- ``[CLS] title [SEP] body [SEP]`` of each block, whole words masked at ``mlm.mask_prob``
  (80% ``[MASK]``, 10% random, 10% kept), optionally one salient span instead;
- the vocabulary logits only at the masked positions (the decoder over every position and
  30,522 words is most of a step's cost otherwise);
- optionally (``mlm.copy_head``) a pointer over the second segment's word pieces
  (:class:`realm.modeling.readers.copy.CopyHead`), trained with the rest;
- held-out masked-token accuracy and loss before and after, and a few fill-in examples.

The output, ``run_dir/encoder/``, is a knowledge-augmented encoder directory that is also a plain
transformers masked-LM directory (``AutoModelForMaskedLM.from_pretrained``,
``AutoTokenizer.from_pretrained``). Pretraining runs this stage by itself (cached) when its
encoder has no trained head (``pretrain.mlm_steps``, :func:`realm.training.prepare.prepare_adapted_encoder`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from realm.config import save_config
from realm.data.ict import split_holdout
from realm.data.mlm_adapt import (BlockMLMDataset, MaskedSequenceBatch,
                                  collate_masked_sequences, continuation_pieces, mlm_text_blocks)
from realm.data.store import BlockStore, check_tokenizer
from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder, load_ka_encoder
from realm.modeling.modes import eval_mode
from realm.tracking import Tracker
from realm.training.accelerator import make_accelerator, shutdown
from realm.training.core import TrainSettings, train
from realm.training.prepare import prepare_corpus
from realm.hub import truncated_encoder

logger = logging.getLogger(__name__)

#: Fill-in examples printed in the summary.
FILL_IN = ("The capital of France is [MASK].", "Albert Einstein was born in [MASK].",
           "The Pacific is the largest [MASK] on Earth.", "William Shakespeare wrote [MASK].")


def masked_lm_scores(encoder: KnowledgeAugmentedEncoder, batch: MaskedSequenceBatch
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and hits of one batch; logits at the masked positions only.

    Returns:
        ``(loss, n_correct, n_targets)``: mean negative log-likelihood of the real targets
        (scalar), correctly predicted targets, and their count.
    """
    device = next(encoder.parameters()).device
    types = None if batch.token_type_ids is None else batch.token_type_ids.to(device)
    out = encoder(batch.input_ids.to(device), batch.attention_mask.to(device), types,
                  batch.mask_positions.to(device), labels=batch.target_ids.to(device),
                  label_mask=batch.target_mask.to(device))
    mask = batch.target_mask.to(device)  # [B, M]
    n = mask.sum().clamp(min=1)
    loss = -out.token_log_probs[:, 0].sum() / n  # token_log_probs [B, 1, M], 0 on padding
    predicted = out.logits[:, 0].argmax(-1) if out.copy is None else encoder.predictions(
        out, torch.zeros(len(mask), 1, device=device))[0]  # [B, M] (with copying)
    hits = (predicted == batch.target_ids.to(device)) & mask  # [B, M]
    return loss, hits.sum(), mask.sum()


def fill_mask(encoder: KnowledgeAugmentedEncoder, tokenizer, texts: Sequence[str], top: int = 3
              ) -> list[dict[str, Any]]:
    """Top predictions for the first ``[MASK]`` of each text."""
    rows = []
    device = next(encoder.parameters()).device
    with eval_mode(encoder), torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            where = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()
            if not len(where):
                raise ValueError(f"no {tokenizer.mask_token} in {text!r}")
            logits = encoder(enc["input_ids"].to(device), enc["attention_mask"].to(device),
                             None, where.T.to(device)).logits  # [1, 1, 1, vocab]
            best = logits[0, 0, 0].float().topk(top).indices.tolist()
            rows.append({"text": text, "top": tokenizer.convert_ids_to_tokens(best)})
    return rows


class AdaptMLMTask:
    """The training core's task: masked-LM loss on the training blocks; held-out accuracy.

    Args:
        dataset: Training examples (:class:`BlockMLMDataset`).
        holdout: Held-out examples (fixed masking), or None.
        pad_id: Padding id.
        eval_batch_size: Examples per evaluation batch.
    """

    def __init__(self, dataset: BlockMLMDataset, holdout: Optional[BlockMLMDataset],
                 pad_id: int, eval_batch_size: int = 32):
        self.dataset, self.holdout = dataset, holdout
        self.pad_id, self.eval_batch_size = pad_id, eval_batch_size

    def train_dataset(self) -> BlockMLMDataset:
        return self.dataset

    def collate(self, examples) -> MaskedSequenceBatch:
        return collate_masked_sequences(examples, self.pad_id)

    def loss(self, model, batch: MaskedSequenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, hits, n = masked_lm_scores(model, batch)
        return loss, {"loss": float(loss.detach()), "masked_accuracy": float(hits) / max(1, int(n))}

    def evaluate(self, model) -> dict[str, float]:
        """Held-out masked-token accuracy and loss (per target token)."""
        if self.holdout is None or not len(self.holdout):
            return {}
        total_loss, hits, count = 0.0, 0, 0
        with eval_mode(model), torch.no_grad():
            for start in range(0, len(self.holdout), self.eval_batch_size):
                batch = self.collate([self.holdout[i] for i in
                                      range(start, min(len(self.holdout),
                                                       start + self.eval_batch_size))])
                loss, h, n = masked_lm_scores(model, batch)
                total_loss += float(loss) * int(n)
                hits += int(h)
                count += int(n)
        return {"heldout_masked_accuracy": hits / max(1, count),
                "heldout_loss": total_loss / max(1, count)}


def run_adapt_mlm(config, progress: bool = True) -> dict[str, Any]:
    """The MLM adaptation stage: train ``mlm.encoder`` as a masked LM on ``corpus`` (or the
    ``data`` section's corpus, built into ``cache_dir``); save ``run_dir/encoder/``; report
    held-out accuracy and loss before and after."""
    t0 = time.time()
    m, t = config.mlm, config.train
    corpus = prepare_corpus(config, progress)
    encoder_name = truncated_encoder(m.encoder, m.encoder_layers, config.cache_dir)
    accelerator, precision = make_accelerator(t, config.seed)
    store = BlockStore(corpus)
    encoder = load_ka_encoder(encoder_name)
    if m.copy_head:
        encoder.add_copy_head()  # (trained on the second segment: the reader's layout)
    tokenizer = encoder.tokenizer
    if tokenizer is None:
        raise ValueError(f"mlm.encoder={m.encoder!r} has no tokenizer saved with it")
    check_vocabulary(encoder, tokenizer, store, m.encoder)
    blocks = mlm_text_blocks(store)
    holdout = min(m.holdout_blocks, max(0, len(blocks) - 1))
    train_blocks, held_blocks = split_holdout(blocks, holdout, config.seed)
    special = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id)
    continuation = continuation_pieces(tokenizer)
    random_ids = np.setdiff1d(np.arange(len(tokenizer)), tokenizer.all_special_ids)
    make = dict(special=special, continuation=continuation, random_ids=random_ids,
                max_tokens=m.max_tokens, mask_prob=m.mask_prob,
                salient_span_prob=m.salient_span_prob, neighbour_prob=m.neighbour_prob,
                random_prob=m.random_prob)
    dataset = BlockMLMDataset(store, train_blocks, seed=config.seed, **make)
    held = BlockMLMDataset(store, held_blocks, seed=config.seed + 1, **make) if holdout else None
    task = AdaptMLMTask(dataset, held, tokenizer.pad_token_id)
    logger.info("MLM adaptation of %s on %d blocks of %s (%d held out)", m.encoder,
                len(train_blocks), corpus, holdout)
    if accelerator.is_main_process:
        save_config(config, t.run_dir)
    before = task.evaluate(encoder)
    tracker = Tracker.from_config(config, enabled=accelerator.is_main_process)
    settings = TrainSettings.from_config(config, progress)
    out_dir = os.path.join(t.run_dir, "encoder")
    model = encoder
    try:
        result = train(model, task, settings, accelerator, tracker, config_dict=config.to_dict(),
                       origin={"stage": "adapt_mlm", "corpus": corpus,
                               "corpus_fingerprint": store.fingerprint})
        unwrapped = accelerator.unwrap_model(model)
        after = result["last_eval"] or task.evaluate(unwrapped)
        fills = fill_mask(unwrapped, tokenizer, FILL_IN)
        if accelerator.is_main_process:
            unwrapped.save_pretrained(out_dir, overwrite=True, metadata={
                "stage": "adapt_mlm", "steps": result["steps"], "corpus": os.path.abspath(corpus),
                "heldout_before": before, "heldout_after": after})
        accelerator.wait_for_everyone()
    finally:
        tracker.close()
        del model
        shutdown(accelerator)
    r4 = (lambda d: {k: round(v, 4) for k, v in d.items()})
    return {
        "stage": "adapt_mlm", "run_dir": t.run_dir, "encoder": out_dir, "corpus": corpus,
        "base": m.encoder, "layers": m.encoder_layers, "steps": result["steps"],
        "heldout_before": r4(before), "heldout_after": r4(after),
        "final_loss": round(result["final_loss"], 4) if np.isfinite(result["final_loss"])
        else None,
        "fill_in": fills, "precision": precision or "fp32",
        "examples_per_s": result["examples_per_s"], "resumed_from": result["resumed_from"],
        "seconds": round(time.time() - t0, 1),
    }


def check_vocabulary(encoder: KnowledgeAugmentedEncoder, tokenizer, store: BlockStore,
                     name: str) -> None:
    """The encoder's vocabulary must be the corpus tokenizer's; an error names both."""
    if encoder.config.vocab_size < len(tokenizer):
        raise ValueError(f"{name}: its vocabulary has {encoder.config.vocab_size} entries but its "
                         f"tokenizer {len(tokenizer)}")
    check_tokenizer(tokenizer, store, what=f"encoder {name!r}")
