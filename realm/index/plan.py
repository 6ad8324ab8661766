"""The resource planner: what a REALM run's index needs, against what this machine has.

:func:`plan` answers, for a config (``python -m realm plan --config CONFIG``): how many blocks
(counted from the built corpus, or estimated from ``data.input``), the index's bytes per trainer
process, the embedding bytes of a generation and of the generations kept, the encoder snapshots'
bytes, the time of one refresh (scaled from a throughput measured here, :data:`MEASURED`), and a
verdict. :func:`check_plan` is what a pretraining run asks before it starts: a configuration
whose index cannot fit this machine's memory or disk, or whose faiss factory cannot be trained
on the corpus, is refused in one line (:class:`~realm.errors.ConfigError`).

The memory model, per machine: each trainer process holds its index (the whole generation, or
its share with ``index.sharding=ranks``) and, while a new generation loads, the next one beside
it (2x); the refresher beside them holds one shard of embeddings at a time (float32), and for a
trained factory every row (float16) and the index it trains. The disk model: the generations
kept (``index.keep_generations``) and the one being built, each N x dim x 2 bytes of float16
shards (plus ``index.faiss`` for trained factories), and the encoder snapshots kept
(``refresh.keep_encoders``) and the one being written.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
from typing import Any, Optional

import numpy as np

from realm.data.build import corpus_cache_dir
from realm.data.readers import CorpusReader, resolve_input
from realm.data.store import BlockStore
from realm.errors import ConfigError
from realm.fsutil import existing_parent
from realm.hub import resolve_model_path
from realm.index.mips import check_factory, index_bytes

#: Embedding throughput measured on this project's machines, the base every refresh estimate is
#: scaled from (tokens/s of one core or one device; the estimate scales it by the encoder's
#: layers x hidden^2 against the measured model's, and by the cores or devices the refresher has).
MEASURED: dict[str, dict[str, Any]] = {
    "cpu": {
        "tokens_per_s": 325.8 * 111.7, "per": "core", "layers": 2, "hidden": 384,
        "precision": "bf16",
        "source": "benchmarks/scale_rehearsal.py's real refresh, re-run with refresh.threads=1 "
                  "(docs/performance.md, 'Wikipedia scale, rehearsed'): 12,374 blocks of the 2015 "
                  "English Wikipedia sample (128 word pieces at most, 111.7 with the special "
                  "tokens on average) embedded by the real refresher with a 2-layer MiniLM "
                  "retriever (384 wide, dim 128), bf16, one thread of this AVX-512 BF16 CPU "
                  "(load average 3.2 on 2 cores): 325.8 blocks/s. The built-in corpus's 2,507 "
                  "blocks of 48.1 tokens ran at 721.8 blocks/s the same way (the estimate: 757)",
    },
}
#: Characters of English Wikipedia text per word piece (MiniLM/BERT uncased), and how full a
#: block is on average: measured on the first 4,000 articles of
#: enwiki2015_first30k_articles.jsonl.gz, blocked at 128 word pieces (126,121 blocks, 13.3M
#: word pieces; docs/performance.md).
CHARS_PER_PIECE = 4.66
BLOCK_FILL = 0.82
#: Articles read from ``data.input`` to estimate the blocks of a corpus not built yet.
SAMPLE_ARTICLES = 2000
#: Transformer shapes of encoders that may not be in the local cache (layers, hidden,
#: intermediate, vocabulary, positions).
KNOWN_ENCODERS = {
    "bert-base-uncased": (12, 768, 3072, 30522, 512),
    "bert-large-uncased": (24, 1024, 4096, 30522, 512),
    "sentence-transformers/all-MiniLM-L6-v2": (6, 384, 1536, 30522, 512),
}


def encoder_shape(name: str, layers: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Layers, hidden size and parameter count of a BERT-style encoder (its config from the
    local cache or directory, else :data:`KNOWN_ENCODERS`), cut to ``layers``; None if unknown."""
    shape = None
    try:
        from transformers import AutoConfig

        where = (os.path.join(name, "doc_encoder")  # a saved retriever
                 if os.path.isdir(os.path.join(name, "doc_encoder")) else resolve_model_path(name))
        cfg = AutoConfig.from_pretrained(where, local_files_only=True)
        shape = (cfg.num_hidden_layers, cfg.hidden_size,
                 getattr(cfg, "intermediate_size", 4 * cfg.hidden_size), cfg.vocab_size,
                 getattr(cfg, "max_position_embeddings", 512))
    except Exception:  # noqa: BLE001 - not cached, not a model: the table, else unknown
        shape = KNOWN_ENCODERS.get(name)
    if shape is None:
        return None
    n_layers, hidden, inter, vocab, positions = shape
    n_layers = min(n_layers, layers) if layers else n_layers
    per_layer = 4 * hidden * hidden + 2 * hidden * inter + 9 * hidden + inter
    params = (vocab + positions + 2) * hidden + 2 * hidden + n_layers * per_layer
    return {"encoder": name, "layers": n_layers, "hidden": hidden, "params": int(params)}


def count_blocks(config) -> dict[str, Any]:
    """The corpus's blocks and mean word pieces a block: counted when it is built (``corpus``,
    or the cached build of ``data``), else estimated from ``data.input``.

    Raises:
        ConfigError: neither is possible (no such input file).
    """
    built = config.corpus or (corpus_cache_dir(config.cache_dir, config.data, config.spans)
                              if config.data.input else None)
    if built and os.path.exists(os.path.join(built, "manifest.json")):
        store = BlockStore(built)
        lengths = np.minimum(store.lengths(), config.retriever.max_block_tokens)
        return {"blocks": len(store), "tokens_per_block": round(float(lengths.mean()) + 3, 1),
                "blocks_from": f"the corpus {built}"}
    return estimate_blocks(config.data, config.retriever.max_block_tokens)


def estimate_blocks(data, max_block_tokens: int) -> dict[str, Any]:
    """Blocks of ``data.input`` once built, from its first :data:`SAMPLE_ARTICLES` articles
    (their text length, at :data:`CHARS_PER_PIECE` and :data:`BLOCK_FILL`) and its size."""
    if not data.input:
        raise ConfigError("corpus: no corpus directory given and data.input is empty: nothing "
                          "to plan for (set corpus=DIR or data.input=FILE, or give --blocks N)")
    path = resolve_input(data.input)
    if not data.input.startswith("hf:") and not os.path.exists(path) and data.expected_blocks:
        return {"blocks": int(data.expected_blocks),
                "tokens_per_block": round(min(max_block_tokens, data.max_block_tokens)
                                          * BLOCK_FILL + 3, 1),
                "blocks_from": f"data.expected_blocks (data.input={data.input} is not here)"}
    if not data.input.startswith("hf:") and not os.path.exists(path):
        raise ConfigError(f"data.input={data.input}: no such file: build the corpus or give "
                          "--blocks N (REALM's English Wikipedia: 13,353,718)")
    per_block = CHARS_PER_PIECE * data.max_block_tokens * BLOCK_FILL
    cap = min(SAMPLE_ARTICLES, data.max_articles or SAMPLE_ARTICLES)
    sample = [max(1, math.ceil(len(article.text) / per_block))
              for article in CorpusReader(path, data.format, "skip", data.min_text_chars, cap)]
    articles = len(sample)
    if len(sample) == cap and cap < (data.max_articles or math.inf):  # more than the sample
        articles = min(_articles(path, data), data.max_articles or math.inf)
    blocks = int(round(np.mean(sample) * articles))
    fill = min(max_block_tokens, data.max_block_tokens) * BLOCK_FILL
    return {"blocks": blocks, "tokens_per_block": round(fill + 3, 1),
            "blocks_from": f"an estimate from {len(sample)} articles of {data.input} "
                           f"({articles:,} articles; build the corpus for the count)"}


def _articles(path: str, data) -> int:
    """Articles in ``path``: counted by the reader where that is cheap (line files, a JSON
    list), else (a compressed line file) extrapolated from the compressed bytes of its first
    :data:`SAMPLE_ARTICLES` lines."""
    reader = CorpusReader(path, data.format, "skip", data.min_text_chars)
    next(iter(reader), None)  # (the reader counts what it can before the first article)
    if reader.total is not None:
        return reader.total
    if path.endswith(".gz"):
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as f:
            lines = 0
            for lines, _ in enumerate(f, 1):
                if lines >= SAMPLE_ARTICLES:
                    break
            return int(os.path.getsize(path) / max(raw.tell(), 1) * lines)
    raise ConfigError(f"data.input={data.input}: cannot count its articles cheaply: build the "
                      "corpus, or give --blocks N")


def this_machine(run_dir: str) -> dict[str, Any]:
    """Memory (total, available), CPU cores, and free disk under ``run_dir`` (its nearest
    existing parent), of the machine this runs on."""
    import psutil

    memory = psutil.virtual_memory()
    where = existing_parent(run_dir)
    return {"memory_bytes": int(memory.total), "memory_available_bytes": int(memory.available),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "disk_free_bytes": int(shutil.disk_usage(where).free),
            "disk_path": where}


def _used(path: str) -> int:
    """Bytes already under ``path`` (a resumed run's generations and snapshots are reused)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def refresh_estimate(config, blocks: int, tokens_per_block: float, device: str,
                     cpus: int) -> dict[str, Any]:
    """Seconds of one refresh of ``blocks`` on ``device``, scaled from :data:`MEASURED`."""
    p, r = config.pretrain, config.refresh
    shape = encoder_shape(p.retriever or p.encoder, p.encoder_layers)
    out: dict[str, Any] = {"device": device, "encoder": shape}
    base = MEASURED.get(device)
    if base is None or shape is None:
        out["seconds"] = None
        out["why"] = (f"no embedding throughput measured on {device!r} yet (measured: "
                      f"{sorted(MEASURED)}; benchmarks/gpu_check.py measures a GPU)"
                      if base is None else "the encoder's shape is unknown here")
        return out
    scale = (base["layers"] * base["hidden"] ** 2) / (shape["layers"] * shape["hidden"] ** 2)
    processes = max(1, len(r.devices))
    units = processes * (r.threads or max(1, cpus // processes)) if device == "cpu" else processes
    tokens_per_s = base["tokens_per_s"] * scale * units
    out.update({"units": units, "per": base["per"], "tokens_per_block": tokens_per_block,
                "blocks_per_s": round(tokens_per_s / tokens_per_block, 2),
                "seconds": round(blocks * tokens_per_block / tokens_per_s, 1),
                "measured": base["source"]})
    return out


def plan(config, *, blocks: Optional[int] = None, processes: Optional[int] = None,
         processes_per_machine: Optional[int] = None, device: Optional[str] = None,
         machine: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What ``config``'s pretraining run needs and whether this machine holds it (see the module
    docstring). ``blocks`` overrides the count; ``processes`` are the trainer processes in all
    (default ``WORLD_SIZE``, else 1), ``processes_per_machine`` those on one machine (default
    ``LOCAL_WORLD_SIZE``, else all); ``device`` the refresher's (default: ``cuda`` where torch sees
    one, else ``cpu``)."""
    i, r, t = config.index, config.refresh, config.train
    dim = config.retriever.dim
    counted = ({"blocks": int(blocks), "blocks_from": "--blocks",
                "tokens_per_block": round(config.retriever.max_block_tokens * BLOCK_FILL + 3, 1)}
               if blocks is not None else count_blocks(config))
    n = counted["blocks"]
    world = processes or int(os.environ.get("WORLD_SIZE", "1"))
    local = min(world, processes_per_machine or int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    rows = -(-n // world) if i.sharding == "ranks" else n  # the largest process's share
    problems: list[str] = []
    try:
        check_factory(i.factory, dim, rows=rows, train_size=i.train_size)
    except ConfigError as e:
        problems.append(str(e))
    trained = not check_factory(i.factory, dim).is_trained
    per_rank = index_bytes(i.factory, dim, rows)
    whole = index_bytes(i.factory, dim, n)
    embeddings = n * dim * 2
    generation = embeddings + (whole if trained else 0)
    refresher = (embeddings + whole if trained else 0) + min(n, i.shard_blocks) * dim * 4
    memory = local * 2 * per_rank + (refresher if r.spawn else 0)
    shape = encoder_shape(config.pretrain.retriever or config.pretrain.encoder,
                          config.pretrain.encoder_layers)
    snapshot = 2 * 4 * shape["params"] if shape else None  # query + document encoder, float32
    kept_generations, kept_snapshots = i.keep_generations + 1, r.keep_encoders + 1
    disk = kept_generations * generation + (kept_snapshots * snapshot if snapshot else 0)
    machine = machine or this_machine(t.run_dir)
    reuse = sum(_used(os.path.join(t.run_dir, sub)) for sub in ("index", "snapshots", "encoders"))
    if memory > machine["memory_bytes"]:
        problems.append(f"the index does not fit this machine's memory: {local} trainer "
                        f"process(es) x 2 x {_gb(per_rank)} (the index in use and the next one "
                        f"loading){' + the refresher ' + _gb(refresher) if r.spawn else ''} = "
                        f"{_gb(memory)} > {_gb(machine['memory_bytes'])} (index.factory="
                        f"{i.factory}, index.sharding={i.sharding}, {n:,} blocks)")
    if disk > machine["disk_free_bytes"] + reuse:
        problems.append(f"the generations and snapshots do not fit the disk under "
                        f"{machine['disk_path']}: {kept_generations} x {_gb(generation)} + "
                        f"{kept_snapshots} x {_gb(snapshot or 0)} = {_gb(disk)} > "
                        f"{_gb(machine['disk_free_bytes'] + reuse)} free")
    device = device or _default_device()
    out = {
        "blocks": n, "blocks_from": counted["blocks_from"], "dim": dim, "factory": i.factory,
        "sharding": i.sharding, "processes": world, "processes_per_machine": local,
        "index_bytes_per_rank": per_rank, "index_bytes_whole": whole,
        "memory_bytes_per_machine": memory, "embedding_bytes_per_generation": embeddings,
        "generation_bytes": generation, "generations_kept": kept_generations,
        "generations_bytes": kept_generations * generation, "snapshot_bytes": snapshot,
        "snapshots_kept": kept_snapshots,
        "snapshots_bytes": kept_snapshots * snapshot if snapshot else None, "disk_bytes": disk,
        "refresh": refresh_estimate(config, n, counted["tokens_per_block"], device,
                                    machine["cpus"]),
        "machine": machine, "verdict": "refused" if problems else "fits", "problems": problems,
    }
    return out


def check_plan(config, blocks: int, processes: Optional[int] = None,
               processes_per_machine: Optional[int] = None) -> dict[str, Any]:
    """:func:`plan` for a run about to start; its problems raise one :class:`ConfigError` line."""
    out = plan(config, blocks=blocks, processes=processes,
               processes_per_machine=processes_per_machine, device="cpu")
    if out["problems"]:
        raise ConfigError("; ".join(out["problems"]) + " (python -m realm plan shows the plan)")
    return out


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


__all__ = ["plan", "check_plan", "count_blocks", "estimate_blocks", "encoder_shape",
           "refresh_estimate", "this_machine", "MEASURED"]
