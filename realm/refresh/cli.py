"""``python launch/refresh_index.py --run-dir DIR`` (also ``python -m realm.refresh``).

Runs until the trainer writes ``DONE`` (or its heartbeat goes stale), committing a new index
generation for each new encoder snapshot. ``--once`` commits one generation from the newest
snapshot and exits; ``--retriever DIR`` first publishes a saved retriever as the step-0 snapshot
when the run has none (an index for a fixed retriever, e.g. for Open-QA fine-tuning).

Exit codes: 0 finished, 1 error, 2 bad config, 3 another refresher holds the run directory.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Optional, Sequence

from realm.cli import config_parser, emit_summary, error_line, override, parse, print_error

logger = logging.getLogger("realm.refresh")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="run directory (path or fsspec URL)")
    parser.add_argument("--corpus", help="corpus directory (sets corpus)")
    parser.add_argument("--retriever", help="saved retriever to publish as step 0 if the run "
                                            "has no encoder snapshot yet")
    parser.add_argument("--once", action="store_true", help="commit one generation and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true",
                        help="a traceback instead of a one-line error for a bad input")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the trainer that "
                                                       "spawned the refresher) is gone")
    args, config = parse(parser, argv,
                         lambda a: [override("corpus", a.corpus)] if a.corpus else [])
    if not config.corpus:  # (the trainer fills it in; the refresher builds no corpus)
        parser.exit(2, error_line(parser.prog, "config: corpus: no corpus directory given "
                       "(--corpus DIR or corpus=DIR)"))
    from realm.errors import ConfigError, CorpusError, RunDirError, WriteError
    from realm.index.mips import check_factory

    try:
        check_factory(config.index.factory, config.retriever.dim)
        return _run(args, config)
    except ConfigError as e:
        if args.debug:
            raise
        print_error(parser.prog, f"config: {e}")
        return 2
    except (CorpusError, RunDirError, WriteError, FileNotFoundError, NotADirectoryError,
            PermissionError) as e:
        if args.debug:
            raise
        print_error(parser.prog, e)  # one line: the message names the path
        return 1


def _run(args, config) -> int:
    r = config.refresh
    import torch  # (after parsing: --help answers without it)

    from realm.data.store import BlockStore
    from realm.refresh.rundir import RunStore
    from realm.errors import StoreLockedError
    from realm.index.mips import check_factory
    from realm.refresh.refresher import Refresher, RefreshSettings, exit_with_parent
    from realm.tracking import Tracker, wandb_group

    if r.threads:
        import faiss

        torch.set_num_threads(r.threads)
        faiss.omp_set_num_threads(r.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # launched by accelerate/torchrun: one refresher, several embedding shards
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    rank = int(os.environ.get("RANK", "0"))

    store = RunStore(args.run_dir)
    if args.parent_pid is not None:
        exit_with_parent(args.parent_pid, store.release_refresher_lock)
    corpus = BlockStore(config.corpus)
    check_factory(config.index.factory, config.retriever.dim, rows=len(corpus),  # trainable?
                  train_size=config.index.train_size)
    if args.retriever and rank == 0 and store.latest_encoder() is None:
        from realm.modeling.retriever import Retriever

        store.publish_encoder(Retriever.from_pretrained(args.retriever), step=0,
                              metadata={"source": os.path.abspath(args.retriever)},
                              keep=r.keep_encoders)
    lg = config.logging
    metrics_dir = (os.path.join(store.root, "refresher") if store.local
                   else tempfile.mkdtemp(prefix="realm-refresher-"))
    tracker = Tracker(metrics_dir, config.to_dict(), wandb=lg.wandb, wandb_project=lg.wandb_project,
                      wandb_mode=lg.wandb_mode, run_name="refresher",
                      group=wandb_group(store.root) if lg.wandb and rank == 0
                      else os.path.basename(store.root.rstrip("/")), enabled=rank == 0,
                      tensorboard="tensorboard" in lg.trackers)  # RUN/refresher/tensorboard
    refresher = Refresher(store, corpus, RefreshSettings.from_config(config), tracker=tracker,
                          progress=not args.no_progress, parent_pid=args.parent_pid)
    try:
        summary = refresher.run(once=args.once)
    except StoreLockedError as e:
        print_error("refresher", e)
        emit_summary({"error": "locked", "message": str(e)})
        return 3
    finally:
        tracker.close()
        if rank == 0 and not store.local:  # the metrics reach the run directory too
            with open(tracker.path, "rb") as f:
                store.write_bytes_atomic(store.path("refresher", "metrics.jsonl"), f.read())
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        emit_summary({"run_dir": store.url, "corpus": config.corpus, "blocks": len(corpus),
                      "processes": refresher.dist.world, **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
