"""Build the data files a shipped config reads (the same as ``python -m realm data``).

    python launch/get_data.py squad-open --output data        # SQuAD-open from the public source
    python launch/get_data.py leads-open --output data --from LOCAL_DIR   # from a local copy

Recipes: squad-open (configs/openqa_squad.yaml, dpr_squad.yaml, rag_squad.yaml) and leads-open
(configs/dpr_leads.yaml, openqa_leads.yaml, rag_leads.yaml); docs/data.md says what each writes.
"""

import sys

from realm.data.recipes.cli import main

if __name__ == "__main__":
    sys.exit(main())
