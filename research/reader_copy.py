"""What can a reader use? The nats a block adds over the null document, for blocks that hold the
masked span and blocks that do not, read by one or more knowledge-augmented encoders.

    python benchmarks/reader_copy.py --corpus runs/cache/corpus-KEY --readers DIR [DIR ...]

Masked examples as pretraining draws them (``MLMDataset``, salient spans, the main job's query
length); each kept example's span (its target word pieces, in order) occurs in another block of the
corpus (not its own). Each example is read beside four candidates, in one joined batch per
reader: that **answer** block (the first such block, same article first), a **random** block
that does not hold the span, its **own** block unmasked (the span in plain sight), and the null
document. Reported per reader: the mean of ``log p(y|z, x) - log p(y|null, x)`` for each kind of
block, and the share of examples where it is positive. The retriever can only learn from a
reader whose answer-block gain is large and whose random-block gain is not. Prints one JSON
object.
"""

import argparse
import json
import logging

import numpy as np
import torch

from realm.data.mlm import MLMDataset, collate_mlm, mlm_blocks
from realm.data.store import BlockStore
from realm.modeling.inputs import build_joined_inputs
from realm.modeling.readers.mlm import load_ka_encoder


def holds(block: np.ndarray, span: np.ndarray) -> bool:
    """Whether ``span`` occurs in ``block`` as a contiguous run of word pieces."""
    n = len(span)
    if n == 0 or len(block) < n:
        return False
    windows = np.lib.stride_tricks.sliding_window_view(block, n)
    return bool((windows == span).all(axis=1).any())


def pick_examples(store: BlockStore, mask_id: int, n: int, seed: int, max_query_tokens: int,
                  max_block_tokens: int):
    """``n`` masked examples whose span another block holds, with that block and a random one."""
    data = MLMDataset(store, mask_id, mlm_blocks(store, with_spans=True),
                      masking="salient_span", max_query_tokens=max_query_tokens, seed=seed)
    texts = [np.concatenate([store.title_ids(b), store.body_ids(b)])[: max_block_tokens]
             for b in range(len(store))]
    articles = np.asarray(store.blocks["article"])
    rng = np.random.default_rng(seed)
    kept, answer, random_block = [], [], []
    for i in rng.permutation(len(data)):
        example = data[int(i)]
        span, own = np.asarray(example.target_ids), int(example.block_id)
        found = [b for b in range(len(store)) if b != own and holds(texts[b], span)]
        if not found:
            continue
        found.sort(key=lambda b: articles[b] != articles[own])  # same article first
        while True:
            other = int(rng.integers(len(store)))
            if other != own and not holds(texts[other], span):
                break
        kept.append(example)
        answer.append(found[0])
        random_block.append(other)
        if len(kept) == n:
            break
    return kept, answer, random_block


@torch.no_grad()
def gains(reader_dir: str, store: BlockStore, examples, answer, random_block,
          max_joined_tokens: int, batch_size: int = 16) -> dict:
    encoder = load_ka_encoder(reader_dir).eval()
    tok = encoder.tokenizer
    rows = []
    for start in range(0, len(examples), batch_size):
        chunk = slice(start, start + batch_size)
        batch = collate_mlm(examples[chunk])
        ids = [[a, r, int(e.block_id)] for a, r, e in
               zip(answer[chunk], random_block[chunk], examples[chunk])]
        joined = build_joined_inputs(
            batch.query_ids, [[store.title_ids(b) for b in row] for row in ids],
            [[store.body_ids(b) for b in row] for row in ids], tok.cls_token_id,
            tok.sep_token_id, tok.pad_token_id, max_length=max_joined_tokens,
            mask_positions=batch.mask_positions, append_null=True)
        out = encoder(joined.input_ids, joined.attention_mask, joined.token_type_ids,
                      joined.mask_positions, labels=batch.target_ids,
                      label_mask=batch.target_mask)
        log_p = out.log_probs_of_targets  # [B, 4]: answer, random, own, null
        rows.append((log_p[:, :3] - log_p[:, 3:]).float().numpy())
    diff = np.concatenate(rows)  # [N, 3]
    result = {"copy_head": encoder.copy_head is not None}
    for j, kind in enumerate(("answer", "random", "own")):
        result[f"{kind}_minus_null"] = round(float(diff[:, j].mean()), 3)
        result[f"{kind}_positive_share"] = round(float((diff[:, j] > 0).mean()), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="a corpus directory with salient spans")
    parser.add_argument("--readers", nargs="+", required=True,
                        help="knowledge-augmented encoder directories (or checkpoints)")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-query-tokens", type=int, default=32)
    parser.add_argument("--max-block-tokens", type=int, default=64)
    parser.add_argument("--max-joined-tokens", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    store = BlockStore(args.corpus)
    mask_id = load_ka_encoder(args.readers[0]).tokenizer.mask_token_id
    examples, answer, random_block = pick_examples(
        store, mask_id, args.examples, args.seed, args.max_query_tokens, args.max_block_tokens)
    article = np.asarray(store.blocks["article"])
    same = int(sum(article[a] == article[int(e.block_id)] for a, e in zip(answer, examples)))
    result = {"corpus": args.corpus, "examples": len(examples),
              "answer_block_same_article": same, "readers": {}}
    for reader in args.readers:
        result["readers"][reader] = gains(reader, store, examples, answer, random_block,
                                          args.max_joined_tokens)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
