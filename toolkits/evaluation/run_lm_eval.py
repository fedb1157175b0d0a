"""Evaluate a dense_model checkpoint with lm-eval (logic: dense_model/evaluation/run.py).

python toolkits/evaluation/run_lm_eval.py CHECKPOINT TASKS [lm-eval options]
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # dist_checkpointing's worker processes re-import this file (spawn)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from dense_model.evaluation.run import main

    sys.exit(main())
