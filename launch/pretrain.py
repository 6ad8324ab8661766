"""REALM pretraining beside the index refresher.

    accelerate launch launch/pretrain.py                       # the built-in tiny default
    accelerate launch launch/pretrain.py --config configs/X.yaml [key=value ...]
    accelerate launch --multi_gpu --num_processes 2 launch/pretrain.py   # two CPU processes

With no --config, configs/pretrain.yaml (next to this script) is used: the Wikipedia lead sections
of the installed package, a 2-layer copy of the offline MiniLM, an ICT warm start, an exact index,
the refresher spawned, wandb offline. Re-running the same command resumes from the newest
checkpoint. The last stdout line is a JSON summary.
"""

import os
import sys

from realm.cli import stage_main  # imports the stage after parsing: --help is fast

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                              "pretrain.yaml")

if __name__ == "__main__":
    sys.exit(stage_main("pretrain", default_config=os.path.normpath(DEFAULT_CONFIG)))
