"""Block-embedding throughput against a bare model forward on same-shaped random tensors.

    python benchmarks/embed_blocks.py --corpus runs/corpus/leads [--limit N] [--bf16-limit N]

The pipeline (``realm.modeling.embed.embed_blocks``: block store reads, [CLS] title [SEP] body [SEP]
assembly, length-bucketed padding, projection, copy out) is timed over the corpus; then, in the
same process, the document encoder alone runs over random token tensors of exactly the batch
shapes the pipeline used. ``ratio`` = pipeline blocks/s / bare blocks/s (1.0: the pipeline adds
nothing). Prints one JSON object.
"""

import argparse
import json
import logging
import time

import numpy as np
import torch

from realm.data.store import BlockStore
from realm.modeling.embed import embed_blocks, special_ids
from realm.modeling.inputs import length_bucketed_batches
from realm.modeling.retriever import load_retriever


def bare_forward(retriever, store, ids, max_block_tokens, max_tokens, bf16) -> float:
    lengths = np.minimum(store.lengths()[ids], max_block_tokens) + 3
    vocab = retriever.tokenizer.vocab_size
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in length_bucketed_batches(lengths, max_tokens=max_tokens):
            width = int(lengths[batch].max())
            x = torch.randint(1000, vocab, (len(batch), width), generator=gen)
            mask = torch.ones_like(x)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                retriever.encode_blocks(x, mask)
    return time.perf_counter() - t0


def run(retriever, store, ids, args, bf16: bool) -> dict:
    special = special_ids(retriever.tokenizer)
    _, stats = embed_blocks(retriever, store, special, ids, args.max_block_tokens,
                            args.max_tokens, bf16=bf16, progress=False)
    bare_s = bare_forward(retriever, store, ids, args.max_block_tokens, args.max_tokens, bf16)
    return {"precision": "bf16" if bf16 else "fp32", "blocks": len(ids),
            "pipeline_blocks_per_s": round(len(ids) / stats["seconds"], 2),
            "bare_forward_blocks_per_s": round(len(ids) / bare_s, 2),
            "ratio": round(bare_s / stats["seconds"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--retriever", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--limit", type=int, help="embed only the first N blocks (fp32)")
    parser.add_argument("--bf16-limit", type=int, default=1000,
                        help="blocks for the bf16 run (slow on CPUs without AVX512-BF16)")
    parser.add_argument("--max-block-tokens", type=int, default=288)
    parser.add_argument("--max-tokens", type=int, default=16384, help="padded tokens per batch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    store = BlockStore(args.corpus)
    retriever = load_retriever(args.retriever, 128, "mean").eval()
    n = len(store) if args.limit is None else min(args.limit, len(store))
    results = [run(retriever, store, np.arange(n), args, bf16=False)]
    if args.bf16_limit:
        results.append(run(retriever, store, np.arange(min(args.bf16_limit, n)), args, bf16=True))
    print(json.dumps({"benchmark": "embed_blocks", "corpus": args.corpus,
                      "threads": torch.get_num_threads(),
                      "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                      "results": results}))


if __name__ == "__main__":
    main()
