"""The GPU check: one command, at most about 8 minutes on one GPU, one JSON file.

    python benchmarks/gpu_check.py --output gpu_check.json      # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --device cpu --tiny          # the same code paths, tiny, on CPU

1. ``tests``: ``pytest -m gpu tests/test_gpu.py`` (passed / failed / skipped, and the tail).
2. ``encode``: BERT-base (12 x 768, random weights: the hub is not needed, the shapes are what
   cost) bf16 forward over 288-token blocks, tokens/s (the refresher's work; goal >= 2M on an H100).
3. ``search``: exact inner-product top-10 of 512 queries over 1M x 768 float32, ms: faiss on the
   GPU where faiss-gpu is installed, and torch (a matmul and ``topk``) always (goal < 10 ms).
4. ``step``: a REALM step at ``configs/realm_bert_base.yaml``'s shapes, bf16 autocast: a query
   encoder over [64, 64], a document encoder over [64 x 8, 288] (the re-scored candidates) and a
   masked-LM reader over [64 x 9, 352] (k = 8 plus the null document), forward, backward and AdamW:
   seconds a step.
5. ``beside``: the refresher's encoding in another process on the same GPU while the trainer
   steps, against each alone: the slowdown of both.

Without a CUDA device it says so in one line and exits 0 (``--device cpu`` runs it anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def bert(config_kw: dict, lm: bool = False):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    config = BertConfig(**config_kw)
    return BertForMaskedLM(config) if lm else BertModel(config, add_pooling_layer=False)


def shapes(tiny: bool) -> dict:
    if tiny:
        return {"model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "intermediate_size": 128},
                "block": 32, "query": 16, "joined": 48, "batch": 2, "k": 2, "encode_batch": 8,
                "blocks": 2000, "dim": 32, "queries": 512, "steps": 2, "encode_s": 2.0}
    return {"model": {}, "block": 288, "query": 64, "joined": 352, "batch": 64, "k": 8,
            "encode_batch": 256, "blocks": 1_000_000, "dim": 768, "queries": 512, "steps": 5,
            "encode_s": 20.0}


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def encode(device, s: dict, seconds: float) -> dict:
    """bf16 document-encoder forward over full blocks for about ``seconds``: tokens/s."""
    import torch

    model = bert(s["model"]).to(device).eval()
    ids = torch.randint(1000, 20000, (s["encode_batch"], s["block"]), device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        model(input_ids=ids, attention_mask=mask)  # warm up
        _sync(device)
        t0, batches = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0].float()
            batches += 1
            if batches % 4 == 0:
                _sync(device)
        _sync(device)
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": round(batches * ids.numel() / elapsed),
            "blocks_per_s": round(batches * len(ids) / elapsed, 1), "batch": list(ids.shape),
            "seconds": round(elapsed, 1)}


def search(device, s: dict) -> dict:
    """Exact top-10 of 512 queries over ``blocks`` x ``dim``: torch always, faiss-gpu if any."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    base = rng.standard_normal((s["blocks"], s["dim"]), dtype=np.float32)
    queries = rng.standard_normal((s["queries"], s["dim"]), dtype=np.float32)
    out = {"blocks": s["blocks"], "dim": s["dim"], "queries": s["queries"], "k": 10}
    xb, xq = torch.from_numpy(base).to(device), torch.from_numpy(queries).to(device)
    times = []
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        torch.topk(xq @ xb.T, 10, dim=1)
        _sync(device)
        times.append(time.perf_counter() - t0)
    out["torch_ms_per_512"] = round(sorted(times[1:])[2] * 1000 * 512 / s["queries"], 2)
    del xb
    try:
        import faiss

        from realm.index.mips import MipsIndex, num_gpus

        if device.type == "cuda" and num_gpus() > 0:
            index = MipsIndex.build(base, "Flat", gpu=True, gpu_device=0)
            times = []
            for _ in range(6):
                t0 = time.perf_counter()
                index.search(queries, 10)
                times.append(time.perf_counter() - t0)
            out["faiss_gpu_ms_per_512"] = round(sorted(times[1:])[2] * 1000, 2)
        else:
            out["faiss_gpu_ms_per_512"] = None
            out["faiss"] = f"faiss {faiss.__version__} sees no GPU (faiss-gpu is not installed)"
    except ImportError as e:
        out["faiss"] = str(e)
    return out


def step(device, s: dict, steps: int, stop_after_s: float = 0.0) -> dict:
    """REALM-shaped training steps (see the module docstring): seconds a step."""
    import torch

    query, doc = bert(s["model"]).to(device), bert(s["model"]).to(device)
    reader = bert(s["model"], lm=True).to(device)
    params = [*query.parameters(), *doc.parameters(), *reader.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    b, k = s["batch"], s["k"]
    q_ids = torch.randint(1000, 20000, (b, s["query"]), device=device)
    d_ids = torch.randint(1000, 20000, (b * k, s["block"]), device=device)
    j_ids = torch.randint(1000, 20000, (b * (k + 1), s["joined"]), device=device)
    times = []
    t_start = time.perf_counter()
    for i in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            q = query(input_ids=q_ids).last_hidden_state[:, 0]  # [b, h]
            d = doc(input_ids=d_ids).last_hidden_state[:, 0].view(b, k, -1)  # [b, k, h]
            log_p_z = torch.log_softmax(torch.einsum("bh,bkh->bk", q, d), dim=-1)  # [b, k]
            h = reader.bert(input_ids=j_ids).last_hidden_state[:, 5:15]  # [b(k+1), 10, h]
            logits = reader.cls(h)  # [b(k+1), 10, vocab]: the masked positions only, as realm
            lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                   j_ids[:, 5:15].flatten())
            loss = lm - log_p_z.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i:  # (the first step warms up)
            times.append(time.perf_counter() - t0)
        if times and stop_after_s and time.perf_counter() - t_start > stop_after_s:
            break
    times.sort()
    return {"step_s_median": round(times[len(times) // 2], 3), "steps": len(times),
            "batch": b, "k": k, "tokens_per_step": int(j_ids.numel() + d_ids.numel()
                                                       + q_ids.numel())}


def beside(device, s: dict, alone_encode: dict, alone_step: dict, tiny: bool) -> dict:
    """The refresher's encoding (another process) and the trainer's steps at once."""
    cmd = [sys.executable, __file__, "--encode-child", "--device", str(device),
           *(["--tiny"] if tiny else [])]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    trained = step(device, s, steps=1000, stop_after_s=s["encode_s"])
    encoded = json.loads(child.stdout.readline())
    child.wait()
    return {"encode_tokens_per_s": encoded["tokens_per_s"],
            "encode_ratio": round(encoded["tokens_per_s"] / alone_encode["tokens_per_s"], 3),
            "step_s_median": trained["step_s_median"],
            "step_ratio": round(trained["step_s_median"] / alone_step["step_s_median"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="gpu_check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a dry run)")
    parser.add_argument("--encode-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; nothing measured (run it where one is, "
              "or --device cpu --tiny for a dry run)")
        return 0
    device = torch.device(args.device)
    s = shapes(args.tiny)
    torch.manual_seed(0)
    if args.encode_child:  # (the refresher's side of "beside")
        print("ready", flush=True)
        print(json.dumps(encode(device, s, s["encode_s"])), flush=True)
        return 0
    t0 = time.time()
    out: dict = {"benchmark": "gpu_check", "device": str(device),
                 "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "tiny": args.tiny}
    if not args.skip_tests:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                               "no:cacheprovider", os.path.join(REPO, "tests", "test_gpu.py")],
                              capture_output=True, text=True, cwd=REPO, timeout=240)
        out["tests"] = {"returncode": done.returncode,
                        "summary": (done.stdout.strip().splitlines() or [""])[-1],
                        "tail": done.stdout[-1500:]}
    out["encode"] = encode(device, s, s["encode_s"])
    out["search"] = search(device, s)
    out["step"] = step(device, s, s["steps"])
    out["beside"] = beside(device, s, out["encode"], out["step"], args.tiny)
    out["seconds"] = round(time.time() - t0, 1)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
