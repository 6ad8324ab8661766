"""ICT warm start of the retriever (Inverse Cloze Task, Lee et al. 2019).

    accelerate launch launch/ict.py --config configs/ict_leads.yaml [key=value ...]
    accelerate launch --multi_gpu --num_processes 2 launch/ict.py ...   # two CPU processes

Writes run_dir/retriever/ (query + document encoder), checkpoints, metrics.jsonl; the last stdout
line is a JSON summary (steps, final loss, held-out ICT recall@k, seconds).
"""

import sys

from realm.cli import stage_main  # imports the stage after parsing: --help is fast

if __name__ == "__main__":
    sys.exit(stage_main("ict"))
