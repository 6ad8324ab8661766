"""ICT warm start of the retriever (Inverse Cloze Task, Lee et al. 2019).

    accelerate launch launch/ict.py --config configs/ict_leads.yaml [key=value ...]
    accelerate launch --multi_gpu --num_processes 2 launch/ict.py ...   # two CPU processes

Writes run_dir/retriever/ (query + document encoder), checkpoints, metrics.jsonl; the last stdout
line is a JSON summary (steps, final loss, held-out ICT recall@k, seconds).
"""

import os
import sys

from realm.cli import config_parser, emit_summary, override, parse
from realm.training.ict import run_ict


def main(argv=None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="corpus directory (sets ict.corpus)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args, config = parse(parser, argv, lambda a: [override("ict.corpus", a.corpus)] if a.corpus else [])
    summary = run_ict(config, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # the main process (accelerate/torchrun set RANK)
        emit_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
