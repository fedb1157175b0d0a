"""An activation from outside the package is one file for training, evaluation and export alike:
registered by a test module named in ``model.activation_modules``, it trains a tiny model (the
trainer's workers import it), exports, and the Hugging Face model (its code shipped by the export, loaded
where dense_model cannot be imported) gives our logits."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dense_model.config import parse_overrides
from dense_model.testing import offline_env, run_tool, spawn_workers
from tests.training.conftest import tiny_overrides
from tests.training.pretrain_jobs import trained_ok

REPO = Path(__file__).resolve().parents[2]
EXPORT_CLI = REPO / "toolkits" / "checkpoint_conversion" / "export_hf.py"
ACTIVATION = "test_scaled_tanh"
MODULE = "tests.export.scaled_tanh_activation"


def _our_logits_job(rank, world_size, run_dir, tokens_file):
    """Our logits of the trained checkpoint (the activation module is imported by the model build)."""
    from dense_model.checkpoint.inference import load_model_for_inference

    loaded = load_model_for_inference(run_dir)
    tokens = torch.load(tokens_file)  # [b, s]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = loaded.model(tokens, positions, None)[..., : loaded.config.model.vocab_size]
    torch.save(logits.clone(), Path(run_dir) / "ours.pt")  # [b, s, vocab]


HF_LOGITS = """
import sys
sys.modules["dense_model"] = None  # any import of dense_model (or of the test module) now fails
sys.modules["tests"] = None
import torch
from transformers import AutoModelForCausalLM
folder, tokens_file, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(torch.load(tokens_file)).logits, out)
print(type(model).__name__, model.model.layers[0].mlp.act_fn)
"""


@pytest.mark.slow
def test_activation_from_a_test_module_trains_exports_and_matches(tmp_path, mmap_dataset, spm_model):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        run_dir,
        mmap_dataset,
        spm_model,
        f"model.activation={ACTIVATION}",
        f"model.activation_modules=[{MODULE}]",
        "training.train_iters=4",
        "logging.eval_interval=4",
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(parse_overrides(overrides)))
    out = trained_ok(config)  # the activation module imported by the trainer's workers
    assert "done: 4 steps" in out

    hf = tmp_path / "hf"
    # The export CLI forked from the fork server (run_tool): it imports the activation module from
    # the run's config as a fresh `python export_hf.py` would (the HF side below needs a fresh Python).
    export = run_tool(EXPORT_CLI, [run_dir, hf, "--dtype", "float32"], tmp_path, timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]
    assert (hf / "scaled_tanh_activation.py").is_file()  # the activation's own file travels with the model

    from safetensors.torch import load_file

    alpha = load_file(hf / "model.safetensors")["model.layers.0.mlp.act_fn.alpha"]
    assert alpha.shape == (1,) and alpha.item() != 0.5  # trained, and exported under its own name

    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    spawn_workers(_our_logits_job, 1, str(run_dir), str(tmp_path / "tokens.pt"))
    result = subprocess.run(
        [sys.executable, "-c", HF_LOGITS, str(hf), str(tmp_path / "tokens.pt"), str(tmp_path / "hf.pt")],
        capture_output=True,
        text=True,
        env=offline_env(tmp_path),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DenseModelForCausalLM ScaledTanh()" in result.stdout
    ours, theirs = torch.load(run_dir / "ours.pt"), torch.load(tmp_path / "hf.pt")
    assert ours.abs().max() > 0.1  # not a degenerate model
    diff = (theirs - ours).abs().max().item()
    assert diff < 1e-4, f"max |HF - ours| = {diff:.3g}"
