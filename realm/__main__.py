"""``python -m realm STAGE [--config FILE] [key=value ...]``: one table maps each stage to its
entry; the launch/ scripts and the cached warm starts run the same entries.

    python -m realm pretrain --config configs/pretrain.yaml
    python -m realm ict --corpus runs/corpus/leads
    python -m realm refresh --run-dir runs/pretrain
    python -m realm plan --config configs/realm_bert_base.yaml --blocks 13353718
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from realm.cli import STAGES, stage_main


def _refresh(argv: Sequence[str]) -> int:
    from realm.refresh.cli import main

    return main(list(argv))


def _plan(argv: Sequence[str]) -> int:
    from realm.index.cli import main

    return main(list(argv))


def _convert_realm(argv: Sequence[str]) -> int:
    from realm.modeling.cli import main

    return main(list(argv))


def _data(argv: Sequence[str]) -> int:
    from realm.data.recipes.cli import main

    return main(list(argv))


#: entries that are not training stages, with their one-line help
TOOLS = {"refresh": ("The index refresher, standalone.", _refresh),
         "plan": ("What a pretraining run's index needs (memory, disk, refresh time) against "
                  "this machine, as one JSON object.", _plan),
         "convert-realm": ("Google's original REALM checkpoints (embedder, encoder) as a "
                           "retriever and a reader directory.", _convert_realm),
         "data": ("Build the data files a shipped config reads (squad-open, leads-open) from "
                  "their public sources, or --from a local copy.", _data)}


#: stage name -> entry taking the remaining arguments (names resolved lazily: --help is fast)
COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    **{name: (lambda argv, name=name: stage_main(name, list(argv))) for name in STAGES},
    **{name: entry for name, (_, entry) in TOOLS.items()},
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:18s} " + (STAGES[name].description if name in STAGES
                                      else TOOLS[name][0])
                 for name in COMMANDS]
        out = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        if argv and argv[0] not in ("-h", "--help"):
            out.write(f"python -m realm: unknown stage {argv[0]!r}\n")
        out.write("usage: python -m realm STAGE [--config FILE] [key=value ...]\n\nstages:\n"
                  + "\n".join(lines) + "\n")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
