"""count_parameters (what ``--dry-run`` prints) against built MoE models: total as the built model's
parameters, active as the total less the experts a token does not visit (one process, one rank)."""

import pytest
import torch

from dense_model.config import load_config
from dense_model.testing import spawn_workers, tiny_model_overrides

CASES = {
    "polynorm": [],
    "swiglu": ["model.activation=swiglu"],
    "polynorm+shared+full_qk": ["model.moe.shared_expert_ffn_hidden_size=48", "model.qk_norm=full"],
    "polynorm+one_set_per_layer": ["model.moe.activation_params=shared"],
}


def overrides(extra):
    return [
        *tiny_model_overrides(activation="polynorm", layers=2, vocab=200),
        "model.moe.num_experts=4",
        "model.moe.router_topk=2",
        "model.moe.ffn_hidden_size=32",
        *extra,
    ]


def _count(rank, world_size, out_file):
    from megatron.core import parallel_state as ps

    from dense_model.model import build_model, count_parameters
    from dense_model.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=3)
    counts = {}
    for name, extra in CASES.items():
        cfg = load_config(None, overrides(extra))
        model = build_model(cfg)
        experts = model.decoder.layers[0].mlp.experts  # the 4 routed experts, grouped or one by one
        # a set shared by the layer's experts (activation_params=shared) is visited by every token
        experts = (
            sum(p.numel() for n, p in experts.named_parameters() if not n.startswith("activation_func.")) // 4
        )
        counts[name] = {
            "built": sum(p.numel() for p in model.parameters()),
            "expert_per_layer": experts,
            "formula": count_parameters(cfg.model),
        }
    torch.save(counts, out_file)
    ps.destroy_model_parallel()


@pytest.mark.slow  # a spawned process builds three models (~15 s on 2 busy cores; tests/test_dry_run.py
# checks the same formula's OLMoE numbers, derived independently, in the quick tier)
def test_moe_parameter_count_equals_the_built_model(tmp_path):
    out = tmp_path / "counts.pt"
    spawn_workers(_count, 1, str(out))
    for name, c in torch.load(out).items():
        formula = c["formula"]
        assert formula["total"] == c["built"], name
        # 2 layers x (4 - 2) experts a token skips
        assert formula["active"] == formula["total"] - 2 * 2 * c["expert_per_layer"], name
