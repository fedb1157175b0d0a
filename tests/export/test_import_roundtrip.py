"""Our own exports import back: export -> import -> export gives the same tensors bit for bit and the
same config.json, for every registered activation (GQA, tied embeddings and a PolyNorm order 4
among them, with a padded vocabulary) and for MoE checkpoints (PolyNorm experts with a shared
expert, SwiGLU experts); the imported run directory keeps the model section of the original run.

Megatron runs in a spawned process (dense_model.testing.spawn_workers).
"""

import json
from pathlib import Path

import pytest
import torch

from dense_model.testing import spawn_workers
from tests.export.test_export_hf import SPECS, _build_save
from tests.export.test_export_moe import SPECS as MOE_SPECS
from tests.export.test_export_moe import moe_config, perturb


def _roundtrip_job(rank, world_size, out_dir, tokenizer):
    from dense_model.checkpoint import save_checkpoint
    from dense_model.export import export_hf
    from dense_model.export.hf_import import import_hf
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    out = Path(out_dir)
    initialize_parallel(1, 1)
    configs = {}
    for spec in SPECS:
        _build_save(spec, tokenizer, out / "runs", 1, 1)
    for name, spec in MOE_SPECS.items():
        cfg = moe_config(*spec, tokenizer)
        model = build_model(cfg)
        perturb(model)
        save_checkpoint(out / "runs" / name / "checkpoints", 3, model, cfg)
    for name in [*SPECS, *MOE_SPECS]:
        export_hf(out / "runs" / name, out / "hf" / name, dtype="float32")
        import_hf(out / "hf" / name, out / "imported" / name)
        export_hf(out / "imported" / name, out / "hf_again" / name, dtype="float32")
        configs[name] = [
            json.loads((out / run / name / "checkpoints" / folder / "dense_model.json").read_text())["config"]
            for run, folder in (("runs", "iter_0000003" if name in MOE_SPECS else "iter_0000007"),
                                ("imported", "iter_0000000"))
        ]  # fmt: skip
    (out / "configs.json").write_text(json.dumps(configs))


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory, spm_model):
    out = tmp_path_factory.mktemp("roundtrip")
    spawn_workers(_roundtrip_job, 1, str(out), spm_model)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", [*SPECS, *MOE_SPECS])
def test_export_import_export_is_bit_identical(roundtrip, name):
    from safetensors.torch import load_file

    first, again = roundtrip / "hf" / name, roundtrip / "hf_again" / name
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert tensor.dtype == b[key].dtype and torch.equal(tensor, b[key]), f"{name}: {key} differs"
    assert json.loads((first / "config.json").read_text()) == json.loads((again / "config.json").read_text())
    original, imported = json.loads((roundtrip / "configs.json").read_text())[name]
    assert imported["model"] == original["model"]  # padding multiple, MoE settings ... kept


def test_export_whose_config_json_was_edited_is_refused(roundtrip, tmp_path, capsys):
    """dense_model.json's model section is used only where config.json agrees with it."""
    import shutil

    from dense_model.export.hf_import import main

    folder = Path(shutil.copytree(roundtrip / "hf" / "polynorm_order4", tmp_path / "edited"))
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (folder / "config.json").write_text(json.dumps(config))
    assert main([str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "dense_model.json: model.norm_epsilon is 1e-05 but config.json says 0.001" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_router_score_comes_from_norm_topk_prob_alone(roundtrip, tmp_path):
    """Without dense_model.json, config.json's norm_topk_prob gives model.moe.router_score."""
    import shutil

    from dense_model.export.hf_import import METADATA, plan_import

    for name, router_score in (
        ("polynorm_olmoe_router", "softmax_then_topk"),
        ("swiglu_top3", "topk_then_softmax"),
    ):
        folder = Path(shutil.copytree(roundtrip / "hf" / name, tmp_path / name))
        (folder / METADATA).unlink()
        assert plan_import(folder, tmp_path / "out" / name).cfg.model.moe.router_score == router_score
