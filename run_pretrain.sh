#!/usr/bin/env bash
# Launch pretraining on one or many nodes.
#
#   bash run_pretrain.sh                                   # the demo: small PolyNorm model, CPU, minutes
#   bash run_pretrain.sh configs/1b/polynorm.yaml          # one node, all its GPUs
#   bash run_pretrain.sh configs/1b/polynorm.yaml training.lr=2e-4 run_dir=runs/lr2e-4
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 bash run_pretrain.sh configs/1b/polynorm.yaml   # 4 x 8 GPUs
#   bash run_pretrain.sh configs/1b/polynorm.yaml --dry-run   # print the resolved job, start nothing
#
# Multi-node from NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE, or SLURM's variables
# (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST, SLURM_GPUS_ON_NODE) under srun: see
# scripts/slurm/pretrain_4x8.sbatch. On a machine without GPUs GPUS_PER_NODE is the number of CPU
# processes (default 1). The config and overrides are checked before torchrun starts (a bad value
# exits 2 with one line; so does a run directory another job holds); the command is printed
# before it runs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"

DRY_RUN=0
ARGS=()
for arg in "$@"; do
    if [[ "$arg" == --dry-run ]]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done
set -- "${ARGS[@]}"
CONFIG="${1:-}"
if [[ -z "$CONFIG" || "$CONFIG" == *=* ]]; then
    CONFIG="$HERE/configs/demo.yaml"   # no CONFIG: the demo (any arguments are overrides)
else
    shift
fi
if [[ ! -f "$CONFIG" ]]; then
    echo "run_pretrain.sh: config file '$CONFIG' not found (see configs/)" >&2
    exit 2
fi

detect_gpus() {
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | wc -l; return
    fi
    echo 1
}
first_slurm_host() {
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
    else
        echo 127.0.0.1
    fi
}

NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-$(first_slurm_host)}"
if [[ -z "${MASTER_PORT:-}" && "$NNODES" == 1 ]]; then
    # One node: a free port, so that two jobs on one machine (or a test run in parallel) never meet.
    MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(detect_gpus)}"

# Megatron needs one CUDA connection for TP/sequence-parallel communication to overlap in order.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / GPUS_PER_NODE > 0 ? $(nproc) / GPUS_PER_NODE : 1 ))}"
export PYTHONUNBUFFERED=1

TORCHRUN_ARGS=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     -m dense_model.training.pretrain "$CONFIG" "$@")

# The config is validated first, with no process group and no GPU (the job checks again); only node 0
# checks that no other job holds the run directory (the other nodes' checks could see their own
# job's). The same Python process then prints the torchrun command and runs it (--torchrun).
CHECK=("$PYTHON" -m dense_model.launcher "$CONFIG" "$@" --world-size "$(( NNODES * GPUS_PER_NODE ))")
if (( DRY_RUN )); then
    "${CHECK[@]}" --dry-run || exit $?
    echo "$PYTHON" -m torch.distributed.run "${TORCHRUN_ARGS[@]}"
    exit 0
fi
[[ "$NODE_RANK" == 0 ]] && CHECK+=(--check-run-dir)

# Preemption: SIGTERM/SIGUSR1 to this script goes to the training processes only, which save a
# checkpoint and exit 0; torchrun then ends normally (a SIGTERM to torchrun itself makes it kill
# the workers and fail). With SLURM use `#SBATCH --signal=B:TERM@120` so only this shell is told.
"${CHECK[@]}" --torchrun "${TORCHRUN_ARGS[@]}" &
LAUNCHER=$!
forward() { pkill "-$1" -P "$LAUNCHER" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT
status=0
while true; do
    wait "$LAUNCHER" && status=0 || status=$?
    kill -0 "$LAUNCHER" 2>/dev/null || break   # wait returned because of a signal: keep waiting
done
exit "$status"
