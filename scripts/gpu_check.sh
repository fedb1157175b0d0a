#!/usr/bin/env bash
# The prepared GPU check: one command, one JSON + one Markdown summary (OUT/gpu_check.json, .md).
#
#   bash scripts/gpu_check.sh --out gpu_check_out          # on a GPU machine (see docs/benchmarks.md)
#   bash scripts/gpu_check.sh --cpu --out /tmp/check       # the parts a CPU can run, tiny sizes
#
# The parts and what each shows: scripts/gpu_check.py. PYTHON picks the interpreter (default:
# python). Exit status 0 when every part that ran passed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${PYTHON:-python}" "$HERE/scripts/gpu_check.py" "$@"
