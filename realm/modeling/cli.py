"""``python -m realm convert-realm --embedder DIR_OR_HUB_ID --encoder DIR_OR_HUB_ID --output DIR``:
the original REALM checkpoints (transformers 4.x's ``RealmEmbedder`` and
``RealmKnowledgeAugEncoder``, which transformers 5 dropped) as realm's ``DIR/retriever`` and
``DIR/reader`` (:mod:`realm.modeling.convert_realm`).

The last stdout line is one JSON object (where each part went); a bad input is one
``convert-realm: error: ...`` line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from realm.cli import emit_summary, setup_logging
from realm.fsutil import output_problem
from realm.modeling.convert_realm import convert_realm


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realm convert-realm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedder", metavar="DIR_OR_HUB_ID",
                        help="a RealmEmbedder checkpoint, e.g. "
                             "google/realm-cc-news-pretrained-embedder -> OUTPUT/retriever")
    parser.add_argument("--encoder", metavar="DIR_OR_HUB_ID",
                        help="a RealmKnowledgeAugEncoder checkpoint, e.g. "
                             "google/realm-cc-news-pretrained-encoder -> OUTPUT/reader")
    parser.add_argument("--output", required=True, help="directory for retriever/ and reader/")
    parser.add_argument("--share-weights", action="store_true",
                        help="one encoder for queries and blocks, as REALM's scorer (default: "
                             "two copies of the embedder, realm's retriever layout)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing parts")
    args = parser.parse_args(argv)
    if args.embedder is None and args.encoder is None:
        parser.error("give --embedder, --encoder or both")
    problem = output_problem(args.output, directory=True)
    if problem:
        parser.error(f"--output {args.output}: {problem}")
    setup_logging("INFO")
    t0 = time.perf_counter()
    try:
        out = convert_realm(args.output, args.embedder, args.encoder,
                            share_weights=args.share_weights, overwrite=args.overwrite)
    except (OSError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    emit_summary({"stage": "convert-realm", **out, "seconds": round(time.perf_counter() - t0, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
