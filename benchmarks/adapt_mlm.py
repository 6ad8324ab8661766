"""MLM adaptation step throughput: logits at the masked positions only against the full-vocabulary
decoder over every position, and bf16 against fp32, in one process.

    python benchmarks/adapt_mlm.py --corpus runs/cache/corpus-KEY [--layers 2] [--steps 5]

Each variant runs ``--steps`` timed training steps (forward, backward, fused AdamW) after one
untimed step, on the same batches of real blocks masked as the stage masks them (whole words,
15%). ``full_vocab`` computes the decoder over all positions and picks the masked ones, as a plain
``BertForMaskedLM`` loss does. Ratios are examples/s against the fp32 masked-positions run.
Prints one JSON object.
"""

import argparse
import json
import logging
import time

import numpy as np
import torch

from realm.data.mlm_adapt import BlockMLMDataset, collate_masked_sequences, continuation_pieces
from realm.data.store import BlockStore
from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder
from realm.hub import truncated_encoder
from realm.training.adapt_mlm import masked_lm_scores


def full_vocab_loss(encoder, batch) -> torch.Tensor:
    """The plain masked-LM loss: vocabulary logits at every position, then the masked ones."""
    logits = encoder.mlm(input_ids=batch.input_ids,
                         attention_mask=batch.attention_mask).logits  # [B, L, V]
    picked = logits.gather(1, batch.mask_positions[:, :, None].expand(
        -1, -1, logits.shape[-1]))  # [B, M, V]
    log_probs = torch.log_softmax(picked.float(), dim=-1)
    token = log_probs.gather(-1, batch.target_ids[:, :, None]).squeeze(-1)  # [B, M]
    return -(token * batch.target_mask).sum() / batch.target_mask.sum()


def time_variant(encoder_dir, batches, full: bool, bf16: bool, steps: int) -> float:
    torch.manual_seed(0)
    encoder = KnowledgeAugmentedEncoder.from_checkpoint(encoder_dir, with_tokenizer=False)
    encoder.train()
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-4, fused=True)
    elapsed = 0.0
    for i in range(steps + 1):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = full_vocab_loss(encoder, batch) if full else masked_lm_scores(encoder, batch)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up kernels and allocations
            elapsed += time.perf_counter() - t0
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="a corpus directory (prepare_corpus.py)")
    parser.add_argument("--encoder", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bf16-steps", type=int, default=2,
                        help="timed bf16 steps (slow on CPUs without AVX512-BF16); 0 skips bf16")
    parser.add_argument("--cache-dir", default="runs/cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    encoder_dir = truncated_encoder(args.encoder, args.layers, args.cache_dir)
    tok = KnowledgeAugmentedEncoder.from_checkpoint(encoder_dir).tokenizer
    store = BlockStore(args.corpus)
    data = BlockMLMDataset(
        store, np.arange(len(store)), (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id),
        continuation_pieces(tok), np.setdiff1d(np.arange(len(tok)), tok.all_special_ids),
        max_tokens=args.max_tokens)
    n = args.batch_size
    batches = [collate_masked_sequences([data[j] for j in range(i * n, (i + 1) * n)],
                                        tok.pad_token_id) for i in range(args.steps + 1)]
    result = {"encoder": args.encoder, "layers": args.layers, "batch_size": n,
              "max_tokens": args.max_tokens, "threads": torch.get_num_threads(),
              "masked_per_batch": float(np.mean([int(b.target_mask.sum()) for b in batches]))}
    runs = [("fp32_masked", False, False, args.steps), ("fp32_full_vocab", True, False, args.steps)]
    if args.bf16_steps:
        runs.append(("bf16_masked", False, True, args.bf16_steps))
    base = None
    for name, full, bf16, steps in runs:
        seconds = time_variant(encoder_dir, batches, full, bf16, steps)
        rate = steps * n / seconds
        base = base or rate
        result[name] = {"examples_per_s": round(rate, 2), "s_per_step": round(seconds / steps, 3),
                        "ratio": round(rate / base, 3)}
    result["bf16_mkldnn_fast"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
