"""Supervised dense retriever training (DPR): questions, BM25-mined positives and hard negatives.

    accelerate launch launch/train_retriever.py                       # configs/dpr_leads.yaml
    accelerate launch launch/train_retriever.py --config configs/X.yaml [key=value ...]
    accelerate launch --multi_gpu --num_processes 2 launch/train_retriever.py ...   # two processes

With no --config, configs/dpr_leads.yaml (next to this script) is used: Leads-Open questions
(data/openqa_leads: `python -m realm data leads-open --output data`) over the lead sections of
package:wiki-leads, both encoders from the offline MiniLM. Re-running the same command resumes from
the newest checkpoint. Writes run_dir/retriever/ (for `openqa.retriever=`, `launch/evaluate.py
retrieval --retriever`), checkpoints and metrics.jsonl; the last stdout line is a JSON summary with
the dev answer recall@k before and after.
"""

import os
import sys

from realm.cli import stage_main  # imports the stage after parsing: --help is fast

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                              "dpr_leads.yaml")

if __name__ == "__main__":
    sys.exit(stage_main("train_retriever", default_config=os.path.normpath(DEFAULT_CONFIG)))
