#!/usr/bin/env bash
# Tokenise a RedPajama download into per-subset Megatron datasets plus a blend file, the common case.
#
#   bash toolkits/pretrain_data_preprocessing/run_make_pretraining_dataset.sh INPUT OUTPUT_DIR TOKENIZER_MODEL [WORKERS]
#
# INPUT: a file, folder (searched recursively) or glob of .jsonl / .jsonl.zst / .json.gz files.
# OUTPUT_DIR: receives redpajama_<subset>_text_document.bin/.idx and redpajama_blend.json.
# TOKENIZER_MODEL: a SentencePiece .model file, or a Hugging Face folder / tokenizer.json.
# WORKERS: worker processes (default: all cores).
# Environment: PYTHON (default python), BLEND_WEIGHTING=tokens|redpajama (default tokens), and
# EXTRA_ARGS for more preprocess_data.py flags. Rerun the same command to resume after a crash.
set -euo pipefail

if [[ $# -lt 3 || $# -gt 4 ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
INPUT=$1
OUTPUT_DIR=$2
TOKENIZER_MODEL=$3
WORKERS=${4:-$(nproc)}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ -d "$TOKENIZER_MODEL" || "$TOKENIZER_MODEL" == *.json ]]; then
    TOKENIZER_TYPE=huggingface
else
    TOKENIZER_TYPE=sentencepiece
fi

mkdir -p "$OUTPUT_DIR"
# shellcheck disable=SC2086
"$PYTHON" "$HERE/preprocess_data.py" \
    --input "$INPUT" \
    --output-prefix "$OUTPUT_DIR/redpajama" \
    --tokenizer-type "$TOKENIZER_TYPE" \
    --tokenizer-model "$TOKENIZER_MODEL" \
    --append-eod \
    --split-by-subset \
    --blend-weighting "${BLEND_WEIGHTING:-tokens}" \
    --workers "$WORKERS" \
    ${EXTRA_ARGS:-}

"$PYTHON" "$HERE/inspect_dataset.py" "$OUTPUT_DIR/redpajama_blend.json" \
    --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL" --samples 1 --sample-chars 120
echo "blend file for training: $OUTPUT_DIR/redpajama_blend.json"
