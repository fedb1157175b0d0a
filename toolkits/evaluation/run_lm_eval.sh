#!/usr/bin/env bash
# Evaluate a dense_model checkpoint with the LM Evaluation Harness (lm-eval), natively on megatron-core.
#
#   toolkits/evaluation/run_lm_eval.sh CHECKPOINT TASKS [lm-eval options]
#   toolkits/evaluation/run_lm_eval.sh runs/polynorm hellaswag,arc_easy --num_fewshot 0 --output_path evals/polynorm
#   toolkits/evaluation/run_lm_eval.sh runs/demo tiny_python --include_path examples/lm_eval_tasks
#   TP=2 toolkits/evaluation/run_lm_eval.sh runs/polynorm hellaswag      # tensor parallel, via torchrun
#
# CHECKPOINT: a run directory, its checkpoints/ folder or one iter_NNNNNNN folder.
# TASKS: comma-separated lm-eval task names (or .yaml files). Other options go to `lm-eval run`
# unchanged: --num_fewshot --batch_size (default 8 here) --limit --include_path --output_path
# --log_samples --model_args dtype=float32 ... Runs offline (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1
# unless set): see docs/evaluation.md for filling the Hugging Face cache first.
#
#   toolkits/evaluation/run_lm_eval.sh RUN_DIR TASKS --every-checkpoint [--slurm] [lm-eval options]
#
# --every-checkpoint: score each saved iteration of RUN_DIR (or of every run under a study
# directory) not yet scored with these tasks, into RUN_DIR/lm_eval/iter_NNNNNNN; --slurm: submit one
# SLURM array task per such iteration instead. See docs/evaluation.md.
# Environment: TP (processes = tensor-parallel size, default 1), PYTHON (default: python).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
TP="${TP:-1}"
every=0
for arg in "$@"; do [[ "$arg" == --every-checkpoint ]] && every=1; done
# --every-checkpoint scores every iteration in one Python; with TP > 1 it runs this script once per
# iteration (torchrun there).
if [[ "$TP" -gt 1 && "$every" == 0 ]]; then
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$TP" "$here/run_lm_eval.py" "$@"
fi
exec "$PYTHON" "$here/run_lm_eval.py" "$@"
