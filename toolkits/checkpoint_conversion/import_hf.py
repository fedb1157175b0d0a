"""Import a Hugging Face model folder into a dense_model run directory (logic: dense_model/export/hf_import.py).

python toolkits/checkpoint_conversion/import_hf.py HF_DIR OUT_RUN_DIR [--dtype auto] [--dry-run] [--overwrite]
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # dist_checkpointing's writer processes re-import this file (spawn)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from dense_model.export.hf_import import main

    sys.exit(main())
