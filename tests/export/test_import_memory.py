"""The import streams: importing a 94M-parameter Llama (375 MB of fp32 weights in one safetensors
file) raises the peak RSS of the CLI over its --dry-run (which imports the same libraries, reads
the same headers and allocates the same untouched model) by the model plus transients (measured
1.39x the weights), not two copies; from two pytorch_model-*.bin shards (memory-mapped, each
dropped after its last tensor) by the model plus about one shard's pages (measured 1.55x).

The peak is the import process's (and its children's) ``ru_maxrss``, read by a small parent process.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dense_model.testing import offline_env
from tests.export.test_import_hf import IMPORT_CLI, save_as_bin

PEAK = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"  # KiB on Linux
    "sys.exit(code)\n"
)


def peak_rss(args, tmp) -> int:
    """Peak RSS in bytes of ``python IMPORT_CLI args`` (largest of it and its children)."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK, sys.executable, str(IMPORT_CLI), *map(str, args)],
        capture_output=True,
        text=True,
        env=offline_env(tmp),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_import_holds_one_copy_of_the_model(tmp_path, spm_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dense_model.export.tokenizer import export_tokenizer

    shape = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6)
    config = LlamaConfig(
        **shape, num_attention_heads=8, max_position_embeddings=128, tie_word_embeddings=False
    )
    hf = tmp_path / "hf"
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    from safetensors.torch import save_file

    hf.mkdir()
    save_file(
        {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()},
        hf / "model.safetensors",
        metadata={"format": "pt"},
    )
    config.save_pretrained(hf)  # no architectures: the import goes by model_type "llama"
    export_tokenizer("sentencepiece", spm_model, hf, model_max_length=128)
    model_bytes = (hf / "model.safetensors").stat().st_size
    assert model_bytes > 350e6

    dry = peak_rss([hf, tmp_path / "dry", "--dry-run"], tmp_path)
    full = peak_rss([hf, tmp_path / "run"], tmp_path)
    figures = {"model_mb": model_bytes / 1e6, "dry_run_peak_mb": dry / 1e6, "import_peak_mb": full / 1e6}
    print(json.dumps(figures))
    assert full - dry < 1.6 * model_bytes, figures  # loading it all first, then the model: >= 2x

    # the same weights as pytorch_model.bin shards
    from safetensors.torch import load_file

    class Holder:
        def state_dict(self):
            return load_file(hf / "model.safetensors")

    save_as_bin(Holder(), tmp_path / "bin", hf)
    bin_peak = peak_rss([tmp_path / "bin", tmp_path / "run_bin"], tmp_path)
    figures["bin_import_peak_mb"] = bin_peak / 1e6
    print(json.dumps(figures))
    (Path(tmp_path) / "figures.json").write_text(json.dumps(figures))
    assert bin_peak - dry < 1.8 * model_bytes, figures  # + the pages of the shard being read
