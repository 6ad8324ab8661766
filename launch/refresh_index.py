"""The index refresher: re-embeds the corpus for each new encoder snapshot, commits generations.

    python launch/refresh_index.py --run-dir DIR [--corpus DIR] [--config FILE] [key=value ...]
    python launch/refresh_index.py --run-dir DIR --corpus DIR --retriever RETRIEVER --once
    accelerate launch --multi_gpu --num_processes N launch/refresh_index.py --run-dir DIR ...

Runs beside the trainer (pretraining spawns it by default), until the trainer writes DONE or its
heartbeat goes stale. The last stdout line is a JSON summary. See docs/refresh.md.
"""

import sys

from realm.refresh.cli import main

if __name__ == "__main__":
    sys.exit(main())
