"""MLM adaptation: continue an encoder as a BERT-style masked LM (what REALM's reader starts from).

    accelerate launch launch/adapt_mlm.py                          # configs/adapt_mlm.yaml
    accelerate launch launch/adapt_mlm.py --config configs/adapt_mlm.yaml mlm.encoder_layers=6

Whole-word masking at 15% (80/10/10), a new head tied to the word embeddings where the checkpoint
has none, logits at the masked positions only. Writes run_dir/encoder/ (loads with
AutoModelForMaskedLM / AutoTokenizer.from_pretrained); the last stdout line is a JSON summary with
held-out masked-token accuracy and loss before and after, and fill-in examples.
"""

import os
import sys

from realm.cli import stage_main  # imports the stage after parsing: --help is fast

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                              "adapt_mlm.yaml")

if __name__ == "__main__":
    sys.exit(stage_main("adapt_mlm", default_config=os.path.normpath(DEFAULT_CONFIG)))
