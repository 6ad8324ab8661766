"""``python -m realm plan --config CONFIG [key=value ...]``: what a pretraining run's index needs.

Prints one JSON object: blocks (counted from the built corpus, or estimated from data.input),
index bytes per trainer process, embedding bytes per generation and for the generations kept,
encoder snapshot bytes, the estimated seconds of one refresh (scaled from a throughput measured
here), this machine's memory and disk, and a verdict with the problems, each in one line.
Exit codes: 0 it fits, 1 it does not, 2 a bad config.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

from realm.cli import config_parser, emit_summary, parse, print_error
from realm.errors import ConfigError, CorpusFormatError
from realm.index.plan import plan

logger = logging.getLogger("realm.plan")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, help="plan for this many blocks (default: count "
                                                   "the built corpus, or estimate data.input)")
    parser.add_argument("--processes", type=int, help="trainer processes in all (default: "
                                                      "WORLD_SIZE, else 1)")
    parser.add_argument("--processes-per-machine", type=int,
                        help="trainer processes on one machine (default: all of them)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="the refresher's device (default: cuda where torch sees one)")
    args, config = parse(parser, argv)
    try:
        out = plan(config, blocks=args.blocks, processes=args.processes,
                   processes_per_machine=args.processes_per_machine, device=args.device)
    except ConfigError as e:
        print_error(parser.prog, f"config: {e}")
        return 2
    except (CorpusFormatError, FileNotFoundError) as e:
        print_error(parser.prog, e)
        return 1
    emit_summary(out)
    if out["verdict"] != "fits":  # the JSON above, and the verdict in the one error shape
        print_error(parser.prog, "refused: " + "; ".join(out["problems"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
