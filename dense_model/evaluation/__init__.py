"""Evaluation with the LM Evaluation Harness, natively on our checkpoints (no conversion).

Importing this package registers the lm-eval model ``dense_model`` (adapter.py). Command line:
``toolkits/evaluation/run_lm_eval.sh CHECKPOINT TASKS [lm-eval options]`` (run.py).
"""

from dense_model.evaluation.adapter import DenseModelLM

__all__ = ["DenseModelLM"]
