"""A quiet start: the named megatron-core warnings (no TE/Apex here) are filtered, others still show.

Each case runs in a fresh interpreter, since a module warns once, when it is first imported."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = """
import warnings
import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs, megatron.core.distributed
from megatron.core.transformer.transformer_config import TransformerConfig
TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2)
warnings.warn("a warning of our own")
"""
QUIET = "from dense_model.compat.quiet import filter_known_warnings; filter_known_warnings()\n"


def stderr_of(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    return proc.stderr


def test_known_warnings_are_filtered_and_others_show():
    loud = stderr_of(BUILD)
    assert "Apex is not installed" in loud and "cuda_graph_scope" in loud  # what the filter hides
    quiet = stderr_of(QUIET + BUILD)
    assert "UserWarning: a warning of our own" in quiet
    assert quiet.count("Warning") == 1, quiet
