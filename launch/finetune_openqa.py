"""Open-QA fine-tuning: the document index fixed, the query encoder and the reader trained.

    accelerate launch launch/finetune_openqa.py                       # configs/openqa_squad.yaml
    accelerate launch launch/finetune_openqa.py --config configs/X.yaml [key=value ...]
    accelerate launch launch/finetune_openqa.py openqa.retriever=runs/pretrain openqa.reader=runs/pretrain
    accelerate launch launch/finetune_openqa.py --config configs/rag_leads.yaml   # RAG

The reader is a span reader (`openqa.reader_type: extractive`, the default) or a generator
(`generative`: RAG, `openqa.generator`, `configs/rag_leads.yaml`, `configs/rag_squad.yaml`;
`train.steps=0` is zero-shot RAG, `openqa.closed_book=true` the generator without retrieval).

With no --config, configs/openqa_squad.yaml (next to this script) is used: SQuAD-open from
data/squad_open (`python -m realm data squad-open --output data` makes it), BM25 retrieval, the
offline 6-layer MiniLM as the reader.
`openqa.retriever` takes `bm25`, an ICT retriever directory (the ORQA baseline) or a REALM
pretraining run directory; `openqa.reader` a pretraining run directory or any checkpoint.
Re-running the same command resumes from the newest checkpoint. Writes run_dir/model/ (read by
`launch/evaluate.py openqa --model`) and run_dir/predictions-dev.jsonl; the last stdout line is
a JSON summary with the dev exact match, F1 and answer recall@k.
"""

import os
import sys

from realm.cli import stage_main  # imports the stage after parsing: --help is fast

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                              "openqa_squad.yaml")

if __name__ == "__main__":
    sys.exit(stage_main("finetune_openqa", default_config=os.path.normpath(DEFAULT_CONFIG)))
