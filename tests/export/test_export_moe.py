"""Hugging Face export of mixture-of-experts checkpoints: the exported ``DenseModelSparseMoeBlock``
(trust_remote_code) gives megatron-core's logits for PolyNorm experts with a shared expert (top-2),
SwiGLU experts (top-3), PolyNorm experts behind OLMoE's router (softmax, top-2, not renormalised)
and the paper's PolyNorm MoE layout (OLMoE's router, one PolyNorm per layer shared by its experts,
OLMoE's q/k norm over the full width); each expert keeps its own PolyNorm coefficients; a checkpoint saved at
EP=2 exports the same bytes; router settings the block does not reproduce (token dropping by
capacity) are refused.

Megatron runs in a spawned process (dense_model.testing.spawn_workers); transformers runs here.
"""

import json
from pathlib import Path

import pytest
import torch

from dense_model.testing import spawn_workers
from tests.export.test_export_hf import SEQ, VOCAB, export_cli, perturb, tiny_config

EXPERTS = 4
# name -> (activation, top-k, extra overrides)
SPECS = {
    "polynorm_shared": ("polynorm", 2, ["model.moe.shared_expert_ffn_hidden_size=48"]),
    "swiglu_top3": ("swiglu", 3, []),
    # OLMoE's router: softmax over all experts, top-k weights not renormalised (norm_topk_prob false)
    "polynorm_olmoe_router": ("polynorm", 2, ["model.moe.router_score=softmax_then_topk"]),
    # the seed's PolyNorm MoE (configs/moe/olmoe_1b7b_polynorm.yaml): OLMoE's router and q/k norm,
    # one PolyNorm per layer
    "polynorm_seed": (
        "polynorm",
        2,
        [
            "model.moe.router_score=softmax_then_topk",
            "model.qk_norm=full",
            "model.moe.activation_params=shared",
        ],
    ),
}
OLMOE_ROUTER = ("polynorm_olmoe_router", "polynorm_seed")
DROPPING = ("polynorm", 2, ["model.moe.capacity_factor=1.0"])  # refused by the export


def moe_config(activation, topk, extra, tokenizer):
    return tiny_config(
        activation,
        tokenizer,
        [
            f"model.moe.num_experts={EXPERTS}",
            f"model.moe.router_topk={topk}",
            "model.moe.ffn_hidden_size=32",
            "model.moe.z_loss_coeff=1e-3",
            *extra,
        ],
    )


def _job(rank, world_size, out_dir, tokenizer, tokens_file):
    """Save each spec (weights and coefficients off their init), export it, and record our logits."""
    from dense_model.checkpoint import save_checkpoint
    from dense_model.checkpoint.inference import load_model_for_inference
    from dense_model.export import ExportError, export_hf
    from dense_model.export.hf_import import import_hf
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    out_dir = Path(out_dir)
    initialize_parallel(1, 1)
    tokens = torch.load(tokens_file)  # [b, s]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = {}
    for name, spec in {**SPECS, "dropping": DROPPING}.items():
        cfg = moe_config(*spec, tokenizer)
        model = build_model(cfg)
        perturb(model)  # norms and every expert's PolyNorm coefficients, each its own values
        save_checkpoint(out_dir / name / "checkpoints", 3, model, cfg)
        try:
            export_hf(out_dir / name, out_dir / "hf" / name, dtype="float32")
        except ExportError as err:
            (out_dir / f"{name}.refused").write_text(str(err))
            continue
        loaded = load_model_for_inference(out_dir / name)
        with torch.no_grad():
            logits[name] = loaded.model(tokens, positions, None)[..., :VOCAB].clone()  # [b, s, vocab]
    # the seed's layout back through import_hf.py, from config.json alone (no dense_model.json)
    (out_dir / "hf" / "polynorm_seed" / "dense_model.json").rename(out_dir / "polynorm_seed.dense_model.json")
    import_hf(out_dir / "hf" / "polynorm_seed", out_dir / "imported_seed")
    (out_dir / "polynorm_seed.dense_model.json").rename(out_dir / "hf" / "polynorm_seed" / "dense_model.json")
    imported = load_model_for_inference(out_dir / "imported_seed")
    with torch.no_grad():
        logits["imported_seed"] = imported.model(tokens, positions, None)[..., :VOCAB].clone()
    torch.save(logits, out_dir / "logits.pt")


def _resave_at_ep2_job(rank, world_size, checkpoint, root):
    """Load ``checkpoint`` with its experts split over two expert-parallel ranks and save it so."""
    from dense_model.checkpoint import load_checkpoint, read_metadata, resolve_checkpoint, save_checkpoint
    from dense_model.config import config_from_dict
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    cfg = config_from_dict(read_metadata(resolve_checkpoint(checkpoint))["config"])
    cfg.parallel.expert_model_parallel_size = 2
    initialize_parallel(1, 1, expert_model_parallel_size=2)
    model = build_model(cfg, initialize=False)
    load_checkpoint(checkpoint, model, load_rng=False)
    save_checkpoint(root, 3, model, cfg)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, spm_model):
    out = tmp_path_factory.mktemp("export_moe")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, out / "tokens.pt")
    spawn_workers(_job, 1, str(out), spm_model, str(out / "tokens.pt"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPECS))
def test_exported_moe_gives_our_logits(exported, name):
    activation, topk, _ = SPECS[name]
    folder = exported / "hf" / name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "dense_model" and config["activation"] == activation
    assert config["norm_topk_prob"] == (name not in OLMOE_ROUTER)
    assert config["qk_norm"] == ("full" if name == "polynorm_seed" else "none")
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (
        EXPERTS,
        topk,
        32,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model.model.layers[0].mlp).__name__ == "DenseModelSparseMoeBlock"
    if name == "polynorm_seed":  # the gains were moved off ones: a norm not applied changes the logits
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (64,)
        assert (model.model.layers[0].self_attn.k_norm.weight - 1).abs().max() > 0.1
    routed = []  # per layer: how many experts the tokens' top-k choices cover
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(
            lambda module, args, out: routed.append(torch.topk(out, topk, dim=-1).indices.unique().numel())
        )
    with torch.no_grad():
        logits = model(torch.load(exported / "tokens.pt")).logits  # [b, s, vocab]
    assert routed == [EXPERTS] * len(model.model.layers)
    ours = torch.load(exported / "logits.pt")[name]
    assert ours.abs().max() > 1.0  # logits far from uniform: the comparison means something
    diff = (logits - ours).abs().max().item()
    assert diff < 1e-4, f"{name}: max |HF - ours| = {diff:.3g}"


@pytest.mark.slow
def test_the_seeds_layout_imports_back_from_config_json_alone(exported):
    """import_hf.py on the remote-code export of the paper's PolyNorm MoE (q/k norm full, one PolyNorm
    per layer, OLMoE's router), without dense_model.json: the same model section and logits."""
    from dense_model.checkpoint import read_metadata, resolve_checkpoint

    model = read_metadata(resolve_checkpoint(exported / "imported_seed"))["config"]["model"]
    assert model["qk_norm"] == "full" and model["activation"] == "polynorm"
    assert (model["moe"]["activation_params"], model["moe"]["router_score"]) == (
        "shared",
        "softmax_then_topk",
    )
    logits = torch.load(exported / "logits.pt")
    diff = (logits["imported_seed"] - logits["polynorm_seed"]).abs().max().item()
    assert diff < 1e-5, f"imported: max |ours - exported| = {diff:.3g}"


@pytest.mark.slow
def test_experts_keep_their_own_weights_and_coefficients(exported):
    from safetensors.torch import load_file

    weights = load_file(exported / "hf" / "polynorm_shared" / "model.safetensors")
    assert weights["model.layers.1.mlp.gate.weight"].shape == (EXPERTS, 64)
    coefficients = [weights[f"model.layers.1.mlp.experts.{e}.act_fn.weight"] for e in range(EXPERTS)]
    assert all(c.shape == (3,) for c in coefficients)
    assert len({tuple(c.tolist()) for c in coefficients}) == EXPERTS  # one set per expert
    assert weights["model.layers.1.mlp.shared_expert.up_proj.weight"].shape == (48, 64)
    assert "model.layers.1.mlp.shared_expert.act_fn.bias" in weights
    assert not any(
        "shared_expert" in k for k in load_file(exported / "hf" / "swiglu_top3" / "model.safetensors")
    )


@pytest.mark.slow
def test_token_dropping_checkpoint_is_refused(exported):
    message = (exported / "dropping.refused").read_text()
    assert "moe_expert_capacity_factor=1.0" in message and "model.moe.capacity_factor" in message
    assert not (exported / "hf" / "dropping").exists()


@pytest.mark.slow
def test_ep2_checkpoint_exports_the_same(exported):
    from safetensors.torch import load_file

    spawn_workers(
        _resave_at_ep2_job, 2, str(exported / "polynorm_shared"), str(exported / "ep2" / "checkpoints")
    )
    result = export_cli([exported / "ep2", exported / "hf_ep2", "--dtype", "float32"], exported)  # the CLI
    assert result.returncode == 0, result.stderr[-3000:]
    reference = load_file(exported / "hf" / "polynorm_shared" / "model.safetensors")
    weights = load_file(exported / "hf_ep2" / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(weights[name], tensor), f"EP=2: {name} differs"
