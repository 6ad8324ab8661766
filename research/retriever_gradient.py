"""Where the masked-LM signal moves the retriever: its gradient against a same-title oracle's, and
what one step along each does to recall and to hubs.

    python benchmarks/retriever_gradient.py --retriever R --reader READER \
        [--examples runs/corpus/signal/x_train] [--corpus runs/corpus/signal/z] \
        [--queries runs/corpus/signal/x_train] [--batches 64] [--alphas 1e-4,3e-4]

On the wiki_signal data (launch/prepare_wiki_signal.py), with the retriever ``R`` fixed as the
index's encoder and the reader ``READER`` frozen, it sums the gradient of the query and document
encoders over ``--batches`` batches of 8 masked examples of X (top-k of Z each), for each
``pretrain.retriever_signal`` (marginal, relative, positive, ...) and for an oracle that knows the
titles: the same re-ranking of the k retrieved blocks towards the same-title article (the loss
``-log p(same title | top-k)``, on the examples whose top-k holds it). It reports each
gradient's cosine with the oracle's (all parameters, query encoder, document encoder), then
takes one step of ``alpha * |theta| * g / |g|`` along each (plain gradient descent, no optimizer
state; ``--parts query``: along its query-encoder part alone) and measures same-title recall@k
of ``--queries`` against Z and how concentrated retrieval gets: the share of all top-20 slots
taken by the 1% of blocks retrieved most often, and the most any one block is retrieved (a
"hub"). The last stdout line is one JSON object.

Nothing is trained or written; it takes about 10 minutes on 2 cores with the defaults.

    python benchmarks/retriever_gradient.py --measure RETRIEVER_DIR ... [--queries ...]

computes nothing but the recall and hubness of each given retriever (e.g. runs' ``retriever/``).
"""

import argparse
import collections
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGNALS = ("marginal", "relative", "positive", "centered", "in_batch", "bank")


def retrieval_quality(retriever, z, queries, same_title, ks, args) -> dict:
    """Same-title recall@k of every query block of ``queries`` (masked as in training) among Z,
    span recall@k (a retrieved block holds the masked word pieces), and hubness of the top 20
    (share of slots held by the most-retrieved 1% of blocks)."""
    import torch

    from realm.data.mlm import MLMDataset, collate_mlm
    from realm.evaluation.run import holds_span
    from realm.modeling.embed import embed_blocks, special_ids
    from realm.modeling.inputs import build_query_inputs

    special = special_ids(retriever.tokenizer)
    retriever.eval()
    emb, _ = embed_blocks(retriever, z, special, max_block_tokens=args.max_block_tokens,
                          bf16=args.bf16, progress=False)
    ds = MLMDataset(queries, retriever.tokenizer.mask_token_id,
                    max_query_tokens=args.max_query_tokens, seed=0)
    reps, targets = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        for start in range(0, len(ds), 128):
            examples = [ds[i] for i in range(start, min(start + 128, len(ds)))]
            targets += [ex.target_ids for ex in examples]
            batch = collate_mlm(examples)
            reps.append(retriever.encode_queries(*build_query_inputs(
                batch.query_ids, *special, max_length=args.max_query_tokens + 2)).q_reps.float())
    q = torch.cat(reps).numpy()  # [n_queries, dim]
    top = np.argsort(-(q @ emb.T), axis=1)[:, :max(max(ks), 20)]  # [n_queries, K]
    hits = np.array([[same_title(int(ds.block_ids[i]), int(b)) for b in row]
                     for i, row in enumerate(top)])
    span_hits = np.array([[holds_span(z, int(b), run) for b in row]
                          for run, row in zip(targets, top)])
    counts = np.array(sorted(collections.Counter(top[:, :20].ravel().tolist()).values(),
                             reverse=True))
    n_hub = max(1, len(z) // 100)
    return {**{f"recall@{k}": round(float(hits[:, :k].any(1).mean()), 4) for k in ks},
            **{f"span_recall@{k}": round(float(span_hits[:, :k].any(1).mean()), 4) for k in ks},
            "top1pct_share_of_top20": round(float(counts[:n_hub].sum() / top[:, :20].size), 4),
            "max_block_in_top20": int(counts[0])}


def searcher_of(retriever, z, special, args):
    """Exact search over Z embedded by ``retriever``, returning the embeddings as the result's
    ``bank`` as an index generation's search does (the bank signal)."""
    from realm.modeling.embed import embed_blocks
    from realm.index.mips import MipsIndex

    emb, _ = embed_blocks(retriever, z, special, max_block_tokens=args.max_block_tokens,
                          bf16=args.bf16, progress=False)
    index = MipsIndex.build(emb)

    def search(q, k, exclude):
        found = index.search(q, k, exclude=exclude)
        found.bank = emb
        return found
    return search


def train_and_measure(args, make_model, batch_loss, ds, z, queries, same_title, ks, special,
                      start_search, t0) -> int:
    """``--train-steps``: AdamW on the retriever alone, under each signal (``oracle`` is one
    too), from the same start and on the same batches (the reader frozen; the index
    re-embedded every ``--refresh-every`` steps, else ``start_search``'s throughout); recall
    and hubness after each."""
    import torch

    from realm.modeling.retriever import Retriever

    start = Retriever.from_pretrained(args.retriever)
    results = {"none": retrieval_quality(start, z, queries, same_title, ks, args)}
    order = np.random.default_rng(args.seed + 1).permutation(len(ds))
    for signal in args.signals.split(","):
        t1 = time.time()
        encoders = Retriever.from_pretrained(args.retriever)
        model = make_model(signal, encoders)
        optimizer = torch.optim.AdamW([p for p in encoders.parameters() if p.requires_grad],
                                      lr=args.lr, weight_decay=0.0)
        search, stepped = start_search, 0
        for step in range(args.train_steps):
            if args.refresh_every and step and step % args.refresh_every == 0:
                search = searcher_of(encoders, z, special, args)
            rows = order[(8 * step + np.arange(8)) % len(order)]
            loss, _, _ = batch_loss(model, signal, [ds[int(i)] for i in rows], search)
            if loss is None:  # the oracle has nothing to say about this batch
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            stepped += 1
        results[signal] = {**retrieval_quality(encoders, z, queries, same_title, ks, args),
                           "optimizer_steps": stepped, "seconds": round(time.time() - t1, 1)}
        print(json.dumps({signal: results[signal]}), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "retriever_gradient", "mode": "train",
                      "retriever": args.retriever, "reader": args.reader, "k": args.k,
                      "train_steps": args.train_steps, "lr": args.lr,
                      "refresh_every": args.refresh_every, "queries": len(queries),
                      "results": results, "seconds": round(time.time() - t0, 1)}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retriever", help="retriever directory (e.g. the ICT warm start, "
                        "runs/cache/ict-*/retriever)")
    parser.add_argument("--reader", help="knowledge-augmented encoder (a saved encoder "
                        "directory, e.g. a reading warm-up's)")
    parser.add_argument("--measure", nargs="+", metavar="RETRIEVER_DIR",
                        help="only the recall and hubness of these retrievers")
    parser.add_argument("--examples", default="runs/corpus/signal/x_train")
    parser.add_argument("--corpus", default="runs/corpus/signal/z")
    parser.add_argument("--queries", default="runs/corpus/signal/x_train",
                        help="recall queries (every block, masked as in training)")
    parser.add_argument("--batches", type=int, default=64, help="batches of 8 examples")
    parser.add_argument("--signals", default=",".join(SIGNALS),
                        help="pretrain.retriever_signal values to measure, each optionally "
                        "with a pretrain.retriever_min_ru (positive:1.0)")
    parser.add_argument("--alphas", default="1e-4,3e-4", help="step sizes, as |step| / |theta|")
    parser.add_argument("--k", type=int, default=4, help="blocks retrieved per example")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="instead of one step along the summed gradient: N AdamW steps of "
                        "batch 8 on the retriever under each of --signals (where 'oracle' may "
                        "be one), recall after")
    parser.add_argument("--lr", type=float, default=9e-6, help="--train-steps: AdamW's "
                        "learning rate (9e-6: train.lr 3e-4 at retriever_lr_scale 0.03)")
    parser.add_argument("--refresh-every", type=int, default=0, help="--train-steps: re-embed "
                        "Z with the trained document encoder every N steps (0: never)")
    parser.add_argument("--parts", default="all", help="what each step moves: all (both "
                        "encoders), query (the query encoder alone, the index unchanged), or both")
    parser.add_argument("--recall-k", default="1,4,20,100")
    parser.add_argument("--max-query-tokens", type=int, default=32)
    parser.add_argument("--max-block-tokens", type=int, default=128)
    parser.add_argument("--max-joined-tokens", type=int, default=176)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.measure and not (args.retriever and args.reader):
        parser.error("give --retriever and --reader (or --measure)")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    import torch

    from realm.data.mlm import MLMDataset, collate_mlm, mlm_blocks
    from realm.data.signal import title_key
    from realm.data.store import BlockStore
    from realm.modeling.embed import special_ids
    from realm.modeling.retriever import Retriever
    from realm.precision import autocast_dtype
    from realm.modeling.readers.mlm import load_ka_encoder as load_reader
    from realm.modeling.realm import REALM

    t0 = time.time()
    torch.manual_seed(args.seed)
    args.bf16 = autocast_dtype("auto", torch.device("cpu")) == "bf16"
    ks = [int(k) for k in args.recall_k.split(",")]
    x, z, queries = BlockStore(args.examples), BlockStore(args.corpus), BlockStore(args.queries)
    z_title = [title_key(z.title(i)) for i in range(len(z))]

    def same_title(query_block: int, z_block: int, store=queries) -> bool:
        return z_block >= 0 and z_title[z_block] == title_key(store.title(query_block))

    if args.measure:
        print(json.dumps({"benchmark": "retriever_gradient", "queries": len(queries),
                          "measured": {r: retrieval_quality(Retriever.from_pretrained(r), z,
                                                            queries, same_title, ks, args)
                                       for r in args.measure},
                          "seconds": round(time.time() - t0, 1)}))
        return 0
    retriever = Retriever.from_pretrained(args.retriever)
    special = special_ids(retriever.tokenizer)
    search = searcher_of(retriever, z, special, args)
    reader = load_reader(args.reader).eval().requires_grad_(False)
    with_spans = int(np.asarray(x.blocks["n_spans"]).sum()) > 0
    ds = MLMDataset(x, retriever.tokenizer.mask_token_id, block_ids=mlm_blocks(x, with_spans),
                    max_query_tokens=args.max_query_tokens, seed=args.seed)
    order = np.random.default_rng(args.seed).permutation(len(ds))[:8 * args.batches]
    named = [(n, p) for n, p in retriever.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    is_query = torch.cat([torch.full((p.numel(),), n.startswith("query_encoder"))
                          for n, p in named])

    def make_model(signal, encoders):
        name, _, min_ru = signal.partition(":")  # e.g. positive:1.0 (pretrain.retriever_min_ru)
        return REALM(encoders, reader, z, special, k=args.k,
                     max_query_tokens=args.max_query_tokens,
                     max_block_tokens=args.max_block_tokens,
                     max_joined_tokens=args.max_joined_tokens, exclude_source=False,
                     retriever_signal="relative" if signal == "oracle" else name,
                     min_ru=float(min_ru or 0)).eval()

    def batch_loss(model, signal, examples, searcher):
        """One batch's loss under ``signal`` (the oracle's: -log p(same title | top-k), summed
        over the examples that have one there, over the batch size) and the forward's output."""
        batch = collate_mlm(examples)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(batch, searcher)
        if signal != "oracle":
            return out.loss, out, None
        same = torch.tensor([[same_title(e.block_id, int(j), x) for j in row]
                             for e, row in zip(examples, out.block_ids.tolist())])  # [B, k]
        has = same.any(1)
        if not has.any():
            return None, out, same
        log_p = torch.log_softmax(out.retrieval_logits[:, :-1].float(), dim=-1)
        loss = -torch.logsumexp(log_p.masked_fill(~same, -1e4), dim=-1)[has].sum()
        return loss / len(examples), out, same

    if args.train_steps:
        return train_and_measure(args, make_model, batch_loss, ds, z, queries, same_title, ks,
                                 special, search, t0)

    grads, oracle_examples, block_ru = {}, 0, []
    for signal in (*args.signals.split(","), "oracle"):
        model = make_model(signal, retriever)
        retriever.zero_grad(set_to_none=True)
        for b in range(args.batches):
            examples = [ds[int(i)] for i in order[8 * b: 8 * b + 8]]
            loss, out, same = batch_loss(model, signal, examples, search)
            if signal != "oracle":
                (loss / args.batches).backward()
                continue
            oracle_examples += int(same.any(1).sum())
            lpy = out.log_p_y_given_z.detach().float()
            ru = (lpy[:, :-1] - lpy[:, -1:])[out.block_ids >= 0]
            block_ru += list(zip(ru.tolist(), same[out.block_ids >= 0].tolist()))
            if loss is not None:
                (loss / args.batches).backward()
        grads[signal] = torch.cat([p.grad.flatten().float() if p.grad is not None
                                   else torch.zeros(p.numel()) for p in params])
    retriever.zero_grad(set_to_none=True)

    def cos(a, b):
        return round(float(a @ b / (a.norm() * b.norm() + 1e-30)), 4)

    oracle = grads["oracle"]
    gradients = {s: {"norm": round(float(g.norm()), 4), "cos_oracle": cos(g, oracle),
                     "cos_oracle_query_encoder": cos(g[is_query], oracle[is_query]),
                     "cos_oracle_doc_encoder": cos(g[~is_query], oracle[~is_query])}
                 for s, g in grads.items() if s != "oracle"}
    ru, is_same = np.array([r for r, _ in block_ru]), np.array([s for _, s in block_ru])
    # how well "the reader gains more than m nats from it" finds the same-title block
    by_margin = {f"ru>{m:g}": {"blocks": int((ru > m).sum()),
                               "same_title_share": round(float(is_same[ru > m].mean()), 4)
                               if (ru > m).any() else None,
                               "of_same_title": round(float((ru[is_same] > m).mean()), 4)}
                 for m in (0.0, 0.5, 1.0, 2.0, 4.0)}
    base = [p.detach().clone() for p in params]
    theta = float(torch.sqrt(sum((p.float() ** 2).sum() for p in base)))
    steps = {"none": retrieval_quality(retriever, z, queries, same_title, ks, args)}
    parts = ["all", "query"] if args.parts == "both" else [args.parts]
    for signal, g_all in grads.items():
        for part in parts:
            g = g_all if part == "all" else torch.where(is_query, g_all, 0.0)
            for alpha in (float(a) for a in args.alphas.split(",")):
                offset = 0
                with torch.no_grad():
                    for p, p0 in zip(params, base):
                        gi = g[offset: offset + p.numel()].view_as(p)
                        offset += p.numel()
                        p.copy_(p0 - alpha * theta * gi / g.norm())
                name = f"{signal}@{alpha:g}" + ("" if part == "all" else "/query")
                steps[name] = retrieval_quality(retriever, z, queries, same_title, ks, args)
    with torch.no_grad():
        for p, p0 in zip(params, base):
            p.copy_(p0)
    print(json.dumps({"benchmark": "retriever_gradient", "retriever": args.retriever,
                      "reader": args.reader, "examples": len(order), "k": args.k,
                      "oracle_examples": oracle_examples, "queries": len(queries),
                      "retrieved_blocks": len(ru), "same_title_blocks": int(is_same.sum()),
                      "ru_margin": by_margin,
                      "gradients": gradients, "steps": steps,
                      "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
