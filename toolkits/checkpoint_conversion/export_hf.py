"""Export a dense_model checkpoint to Hugging Face format (logic: dense_model/export/hf.py).

python toolkits/checkpoint_conversion/export_hf.py RUN_DIR_OR_ITER_DIR OUTPUT_DIR [--dtype bfloat16]
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # dist_checkpointing's writer/loader processes re-import this file (spawn)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from dense_model.export.hf import main

    sys.exit(main())
