"""The "does retrieval get learned" experiment: REALM vs a null-document control, and a sweep of
the refresh interval, on the wiki_signal data (masked lead sections X, 2015 articles Z).

    python launch/prepare_wiki_signal.py --output runs/corpus/signal
    python benchmarks/wiki_signal.py --out runs/wiki_signal --every 10,50,200,never [key=value ...]

For each refresh interval one pretraining run (``accelerate launch launch/pretrain.py --config
configs/wiki_signal.yaml``), plus the control (``pretrain.null_only=true``: the null document
alone), all with the same seed, steps and overrides. Then same-title recall@k of the held-out X
queries against Z (``launch/evaluate.py title-recall``) for the warm-started retriever (before)
and each run's final retriever (after). Prints one JSON object: per run, loss and masked-span
accuracy (mean of the first and last ``--window`` steps), retrieval utility over training (the
same windows, and its slope), p(null), generations swapped, maximum staleness, the refresher's
compute (generations built, seconds), recall@k after, the reader's gain from the right block
against a random one (``oracle_ru``), and wall time. A run that already has its
``wiki_signal.json`` is not run again.

    python benchmarks/wiki_signal.py --signal READER_DIR ... --signal-retriever RETRIEVER_DIR

trains nothing: it prints where each reader's MLM signal points for that retriever
(:func:`signal_direction`): towards the same-title article or away from it, towards the null
document or not.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("wiki_signal")


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _run(cmd: list[str], log_path: str) -> str:
    logger.info("%s", " ".join(cmd))
    with open(log_path, "w", encoding="utf-8") as log:
        done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({done.returncode}); see {log_path}")
    return done.stdout


def title_recall(retriever: str, args) -> dict:
    out = _run([sys.executable, "launch/evaluate.py", "title-recall", "--retriever", retriever,
                "--queries", args.queries, "--corpus", args.corpus, "--k", args.k,
                "--max-query-tokens", str(args.max_query_tokens), "--no-progress"],
               os.path.join(args.out, f"recall-{abs(hash(retriever)) % 10**8}.log"))
    summary = _last_json(out)
    return {k: v for k, v in summary.items() if k.startswith("title_recall@")}


def oracle_ru(encoder_dir: str, args, n: int = 150, seed: int = 0) -> dict:
    """How much the trained reader gains from the *right* document: salient-span examples of
    x_train whose span string occurs in a Z block of the same title; RU of that block and of a
    random Z block (``log p(y|z,x) - log p(y|null,x)``), under the run's precision."""
    import torch

    from realm.data.mlm import MLMDataset, collate_mlm
    from realm.data.store import BlockStore
    from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder
    from realm.modeling.inputs import build_joined_inputs
    from realm.precision import autocast_dtype

    x, z = BlockStore(args.examples), BlockStore(args.corpus)
    enc = KnowledgeAugmentedEncoder.from_pretrained(encoder_dir).eval()
    tok = enc.tokenizer
    bf16 = autocast_dtype("auto", torch.device("cpu")) == "bf16"

    def text(ids) -> str:
        return tok.decode(list(ids)).replace(" ##", "").lower()

    by_title: dict[str, list[int]] = {}
    for i in range(len(z)):
        by_title.setdefault(z.title(i).lower(), []).append(i)
    ds = MLMDataset(x, tok.mask_token_id, max_query_tokens=args.max_query_tokens, seed=seed + 1)
    rng = np.random.default_rng(seed)
    gold, other = [], []
    for i in rng.permutation(len(ds)):
        ex = ds[int(i)]
        if ex.fallback or ex.label is None:
            continue
        span = text(ex.target_ids)
        hits = [b for b in by_title.get(x.title(ex.block_id).lower(), [])
                if span in text(z.body_ids(b))]
        if not hits:
            continue
        rand = int(rng.integers(len(z)))
        batch = collate_mlm([ex])
        joined = build_joined_inputs(
            batch.query_ids, [[z.title_ids(hits[0]), z.title_ids(rand)]],
            [[z.body_ids(hits[0]), z.body_ids(rand)]], tok.cls_token_id, tok.sep_token_id,
            tok.pad_token_id, max_length=args.max_joined_tokens,
            mask_positions=batch.mask_positions, append_null=True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = enc(joined.input_ids, joined.attention_mask, joined.token_type_ids,
                      joined.mask_positions, labels=batch.target_ids,
                      label_mask=batch.target_mask)
        lp = out.log_probs_of_targets.float()[0]  # [3]: the right block, a random one, null
        gold.append(float(lp[0] - lp[2]))
        other.append(float(lp[1] - lp[2]))
        if len(gold) >= n:
            break
    return {"examples": len(gold), "right_block_ru_mean": round(float(np.mean(gold)), 4),
            "right_block_ru_positive": round(float(np.mean(np.array(gold) > 0)), 3),
            "random_block_ru_mean": round(float(np.mean(other)), 4)}


def signal_direction(retriever_dir: str, readers: list[str], args, k: int = 4, n: int = 320,
                     seed: int = 5) -> dict:
    """Where the MLM signal points, before any retriever update: for ``n`` masked examples of
    x_train, the top-``k`` Z blocks of ``retriever_dir`` plus the null document, the prior
    p(z|x) (that retriever's scores) and, under each reader, the posterior p(z|x,y) ∝
    p(z|x) p(y|z,x). The retriever's gradient moves p(z|x) towards the posterior, so
    ``same_title_post / same_title_prior`` > 1 means the signal favours the same-title article
    (what recall measures), and ``null_post / null_prior`` how hard it pulls towards the null
    document. Also the RU of same-title and other retrieved blocks."""
    import torch

    from realm.data.mlm import MLMDataset, collate_mlm
    from realm.data.store import BlockStore
    from realm.modeling.embed import embed_blocks, special_ids
    from realm.index.mips import MipsIndex
    from realm.modeling.inputs import build_joined_inputs
    from realm.modeling.retriever import Retriever
    from realm.modeling.inputs import build_block_inputs, build_query_inputs
    from realm.precision import autocast_dtype
    from realm.modeling.readers.mlm import load_ka_encoder as load_reader

    x, z = BlockStore(args.examples), BlockStore(args.corpus)
    bf16 = autocast_dtype("auto", torch.device("cpu")) == "bf16"
    retriever = Retriever.from_pretrained(retriever_dir).eval()
    cls_id, sep_id, pad_id = special_ids(retriever.tokenizer)
    emb, _ = embed_blocks(retriever, z, (cls_id, sep_id, pad_id),
                          max_block_tokens=args.max_block_tokens, bf16=bf16, progress=False)
    index = MipsIndex.build(emb)
    z_titles = np.array([z.title(i).lower() for i in range(len(z))])
    torch.manual_seed(seed)  # a checkpoint without a masked-LM head gets a new one
    encoders = {r: load_reader(r).eval() for r in readers}
    sums: dict[str, dict[str, list]] = {r: {} for r in readers}
    ds = MLMDataset(x, retriever.tokenizer.mask_token_id, max_query_tokens=args.max_query_tokens,
                    seed=seed)
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(ds))[:n]]
    empty = np.zeros(0, np.int64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        null = retriever.encode_blocks(*build_block_inputs(
            [empty], [empty], cls_id, sep_id, pad_id,
            max_length=args.max_block_tokens + 3)).p_reps.float()[0]  # [dim]
        for start in range(0, len(order), 16):
            examples = [ds[i] for i in order[start:start + 16]]
            batch = collate_mlm(examples)
            q = retriever.encode_queries(*build_query_inputs(
                batch.query_ids, cls_id, sep_id, pad_id,
                max_length=args.max_query_tokens + 2)).q_reps.float()  # [B, dim]
            found = index.search(q.numpy(), k)
            ids = found.block_ids  # [B, k]
            log_prior = torch.log_softmax(torch.cat(
                [torch.from_numpy(found.scores).float(), (q @ null)[:, None]], 1), 1)  # [B, k+1]
            same = torch.tensor([[z_titles[j] == x.title(e.block_id).lower() for j in row]
                                 for e, row in zip(examples, ids)])  # [B, k]
            joined = build_joined_inputs(
                batch.query_ids, [[z.title_ids(int(j)) for j in row] for row in ids],
                [[z.body_ids(int(j)) for j in row] for row in ids], cls_id, sep_id, pad_id,
                max_length=args.max_joined_tokens, mask_positions=batch.mask_positions,
                append_null=True)
            for name, enc in encoders.items():
                log_p_y = enc(joined.input_ids, joined.attention_mask, joined.token_type_ids,
                              joined.mask_positions, labels=batch.target_ids,
                              label_mask=batch.target_mask).log_probs_of_targets.float()
                prior, post = log_prior.exp(), torch.softmax(log_prior + log_p_y, 1)
                ru = log_p_y[:, :-1] - log_p_y[:, -1:]  # [B, k]
                for key, values in (
                        ("same_title_prior", (prior[:, :-1] * same).sum(1)),
                        ("same_title_post", (post[:, :-1] * same).sum(1)),
                        ("null_prior", prior[:, -1]), ("null_post", post[:, -1]),
                        ("ru_same_title", ru[same]), ("ru_other", ru[~same]),
                        ("has_same_title", same.any(1).float())):
                    sums[name].setdefault(key, []).extend(values.tolist())
    out = {}
    for name, values in sums.items():
        means = {key: round(float(np.mean(v)), 4) for key, v in values.items()}
        means["same_title_post_over_prior"] = round(
            means["same_title_post"] / means["same_title_prior"], 3)
        means["null_post_over_prior"] = round(means["null_post"] / means["null_prior"], 3)
        out[name] = means
    return {"retriever": retriever_dir, "k": k, "examples": len(order), "readers": out}


def window_mean(records: list[dict], key: str, first: bool, window: int):
    values = [r[key] for r in records if key in r]
    if not values:
        return None
    part = values[:window] if first else values[-window:]
    return round(float(np.mean(part)), 4)


def summarize(run_dir: str, window: int) -> dict:
    """Training curves of one run, from its metrics.jsonl (and the refresher's)."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [r for r in map(json.loads, f) if "table" not in r]
    out = {}
    for key in ("loss", "masked_accuracy", "loss_null", "masked_accuracy_null", "ru_expected",
                "ru_top1", "p_null", "retrieval_entropy"):
        out[f"{key}_first"] = window_mean(records, key, True, window)
        out[f"{key}_last"] = window_mean(records, key, False, window)
    generations = {r["index/generation"] for r in records if r.get("index/generation") is not None}
    out["generations_used"] = len(generations)
    out["max_staleness_steps"] = max((r["index/staleness_steps"] for r in records
                                      if r.get("index/staleness_steps") is not None), default=None)
    ru = [(r["step"], r["ru_expected"]) for r in records if "ru_expected" in r]
    if len(ru) > 1:
        steps, values = map(np.asarray, zip(*ru))
        out["ru_slope_per_100_steps"] = round(float(np.polyfit(steps, values, 1)[0] * 100), 4)
        out["ru_curve"] = [[int(s), round(float(v), 3)] for s, v in ru]
    refresher = os.path.join(run_dir, "refresher", "metrics.jsonl")
    if os.path.exists(refresher):
        with open(refresher, encoding="utf-8") as f:
            gens = [r for r in map(json.loads, f) if "refresh/total_s" in r]
        out["refresher_generations"] = len(gens)
        out["refresher_seconds"] = round(sum(r["refresh/total_s"] for r in gens), 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/wiki_signal.yaml")
    parser.add_argument("--out", default="runs/wiki_signal")
    parser.add_argument("--every", default="10,50,200,never",
                        help="refresh intervals in steps; 'never': only generation 0")
    parser.add_argument("--no-null", action="store_true",
                        help="skip the null-document control (skipped anyway when the reader "
                             "is fixed: pretrain.reader_lr_scale=0)")
    parser.add_argument("--queries", default="runs/corpus/signal/x_heldout")
    parser.add_argument("--corpus", default="runs/corpus/signal/z")
    parser.add_argument("--examples", default="runs/corpus/signal/x_train")
    parser.add_argument("--max-joined-tokens", type=int, default=176)
    parser.add_argument("--k", default="1,4,20,100")
    parser.add_argument("--max-query-tokens", type=int, default=32)
    parser.add_argument("--window", type=int, default=5, help="log records per first/last window")
    parser.add_argument("--max-block-tokens", type=int, default=128)
    parser.add_argument("--signal", nargs="+", metavar="READER_DIR",
                        help="only print where these readers' MLM signal points for the "
                        "--signal-retriever (signal_direction), no training")
    parser.add_argument("--signal-retriever", help="the retriever for --signal")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args()
    if args.signal:
        if not args.signal_retriever:
            parser.error("--signal needs --signal-retriever")
        print(json.dumps({"benchmark": "wiki_signal", "signal_direction": signal_direction(
            args.signal_retriever, args.signal, args)}))
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.makedirs(args.out, exist_ok=True)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    from realm.config import load_config

    no_null = args.no_null
    if not no_null and load_config(args.config, args.overrides).pretrain.reader_lr_scale == 0:
        logger.info("the reader is fixed (pretrain.reader_lr_scale=0): a null-only control "
                    "would train nothing; each run logs loss_null and masked_accuracy_null, "
                    "the same reader beside the null document on the same examples")
        no_null = True
    runs = [("null", ["pretrain.null_only=true"])] if not no_null else []
    for every in args.every.split(","):
        value = "1000000000" if every == "never" else every
        runs.append((f"every-{every}", [f"refresh.every_steps={value}"]))

    results, before = {}, None
    for name, extra in runs:
        run_dir = os.path.join(args.out, name)
        done_path = os.path.join(run_dir, "wiki_signal.json")
        if os.path.exists(done_path):
            with open(done_path, encoding="utf-8") as f:
                results[name] = json.load(f)
            continue
        t0 = time.time()
        cmd = [accelerate, "launch", "launch/pretrain.py", "--config", args.config,
               "--no-progress", *args.overrides, *extra, f"train.run_dir={run_dir}"]
        if os.path.exists(os.path.join(run_dir, "DONE")):  # trained before: re-running resumes
            logger.info("%s has finished already; summarising it", run_dir)
        stdout = _run(cmd, os.path.join(args.out, f"{name}.log"))
        result = {"command": " ".join(cmd[1:]), "summary": _last_json(stdout),
                  **summarize(run_dir, args.window), "wall_s": round(time.time() - t0, 1)}
        if name != "null":
            result["recall_after"] = title_recall(os.path.join(run_dir, "retriever"), args)
        with open(done_path, "w", encoding="utf-8") as f:
            json.dump(result, f)
        results[name] = result
    for name in results:
        if name == "null":
            continue
        with open(os.path.join(args.out, name, "config.yaml"), encoding="utf-8") as f:
            start = yaml.safe_load(f)["pretrain"]["retriever"]  # the warm start all runs share
        before = title_recall(start, args)
        break
    for name, result in results.items():
        result["oracle_ru"] = oracle_ru(os.path.join(args.out, name, "encoder"), args)
    print(json.dumps({"benchmark": "wiki_signal", "config": args.config,
                      "overrides": args.overrides, "recall_before": before, "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
