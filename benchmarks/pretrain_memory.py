"""Peak memory of the reader's part of one REALM step: the [B, k + 1, M, vocab] logits and their
log-softmax (``pretrain.vocab_chunk=0``) against the memory-lean step.

    python benchmarks/pretrain_memory.py                   # B=32, k=8, M=10
    python benchmarks/pretrain_memory.py --shapes 32x8x10,64x8x10,32x16x10

One training step of the knowledge-augmented encoder as pretraining runs it: B x (k + 1) joined
sequences of ``--seq`` word pieces (100: the main job's ``pretrain.max_joined_tokens``; MiniLM's
vocabulary, its first ``--layers`` layers), M masked
targets each, log p(y|z,x) per candidate, REALM's marginal loss over a fixed p(z|x), backward,
and the step's predictions (marginal and null-document argmax). Each variant runs in a fresh
process; its figure is the process's peak resident memory minus the memory before the step.
Three variants: ``plain`` (the materialised log-softmax, ``pretrain.vocab_chunk=0``, kept for
this comparison), ``chunked`` (``vocab_chunk``) and ``lean``, the memory-lean step: chunked and
``pretrain.gradient_checkpointing`` (the encoder's activations recomputed in the backward pass),
as configs/realm_bert_base.yaml trains. ``memory_ratio`` = plain / lean, per shape and (top
level) for the first shape; ``memory_ratio_chunking_only`` = plain / chunked. All fp32. Prints
one JSON object.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_SHAPES = "32x8x10"


def one_step(batch: int, k: int, masked: int, seq: int, layers: int, chunk: int,
             checkpointing: bool, cache_dir: str) -> dict:
    """The step in this process: returns its extra peak memory (MiB) and seconds."""
    import psutil
    import torch

    from realm.losses import realm_marginal_loss
    from realm.modeling.readers.mlm import KnowledgeAugmentedEncoder
    from realm.hub import truncated_encoder

    torch.manual_seed(0)
    encoder = KnowledgeAugmentedEncoder.from_checkpoint(
        truncated_encoder("sentence-transformers/all-MiniLM-L6-v2", layers, cache_dir),
        with_tokenizer=False)
    encoder.vocab_chunk = chunk
    if checkpointing:
        encoder.mlm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    encoder.train()
    vocab = encoder.config.vocab_size
    n = batch * (k + 1)
    ids = torch.randint(1000, vocab, (n, seq))
    mask_positions = torch.stack([torch.randperm(seq - 2)[:masked] + 1 for _ in range(batch)])
    mask_positions = mask_positions.sort(dim=1).values
    labels = torch.randint(1000, vocab, (batch, masked))
    log_p_z = torch.log_softmax(torch.randn(batch, k + 1), dim=-1)
    attention = torch.ones_like(ids)
    rss_before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    out = encoder(ids, attention, None, mask_positions, labels=labels)
    loss, _ = realm_marginal_loss(log_p_z, out.log_probs_of_targets)
    loss.backward()
    encoder.predictions(out, log_p_z)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"extra_peak_mib": round((peak - rss_before) / 2**20, 1),
            "seconds": round(seconds, 2), "loss": round(float(loss), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="comma-separated BxKxM (batch x retrieved blocks x masked tokens)")
    parser.add_argument("--seq", type=int, default=100, help="word pieces per joined sequence")
    parser.add_argument("--layers", type=int, default=2, help="MiniLM layers of the reader")
    parser.add_argument("--chunk", type=int, default=8192, help="pretrain.vocab_chunk")
    parser.add_argument("--cache-dir", default="runs/cache")
    parser.add_argument("--_one", help=argparse.SUPPRESS)  # B,k,M,chunk,ckpt: one variant here
    args = parser.parse_args()
    if args._one:
        b, k, m, chunk, ckpt = (int(x) for x in args._one.split(","))
        print(json.dumps(one_step(b, k, m, args.seq, args.layers, chunk, bool(ckpt),
                                  args.cache_dir)))
        return
    result = {"seq": args.seq, "layers": args.layers, "chunk": args.chunk,
              "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None, "shapes": {}}
    ratios = []
    for shape in args.shapes.split(","):
        b, k, m = (int(x) for x in shape.lower().split("x"))
        row = {}
        for name, chunk, ckpt in (("plain", 0, 0), ("chunked", args.chunk, 0),
                                  ("lean", args.chunk, 1)):
            done = subprocess.run(
                [sys.executable, __file__, "--_one", f"{b},{k},{m},{chunk},{ckpt}", "--seq",
                 str(args.seq), "--layers", str(args.layers), "--cache-dir", args.cache_dir],
                capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{name} {shape} failed:\n{done.stderr[-3000:]}")
            row[name] = json.loads(done.stdout.strip().splitlines()[-1])
        plain = row["plain"]["extra_peak_mib"]
        row["memory_ratio"] = round(plain / max(row["lean"]["extra_peak_mib"], 1e-9), 2)
        row["memory_ratio_chunking_only"] = round(
            plain / max(row["chunked"]["extra_peak_mib"], 1e-9), 2)
        row["logits_mib"] = round(b * (k + 1) * m * 30522 * 4 / 2**20, 1)
        ratios.append(row["memory_ratio"])
        result["shapes"][shape] = row
    result["memory_ratio"] = ratios[0]  # the first shape's (the defaults'): plain / lean
    result["lean"] = f"pretrain.vocab_chunk={args.chunk} + pretrain.gradient_checkpointing=true"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
