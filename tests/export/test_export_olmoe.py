"""transformers' own ``OlmoeForCausalLM``, both ways (dense_model/export/olmoe.py).

Export: SwiGLU experts with ``model.qk_norm: full`` export as ``model_type: olmoe`` without remote
code, and ``AutoModelForCausalLM`` gives our logits to 1e-5 (fp32) for OLMoE's router
(``softmax_then_topk``, GQA, untied) and Mixtral's (``topk_then_softmax``, tied); a checkpoint saved
at TP=2 (its q/k gains sharded like the heads) exports the TP=2 model's logits. What OLMoE cannot
express is refused with one line, nothing written. Import: a random ``OlmoeForCausalLM`` built here
(sharded safetensors + index, allenai's tensor names) imports into a run directory whose model
gives transformers' logits to 1e-5 (at TP=1 and loaded at TP=2), exports back to the same logits,
and trains on at EP=2.

Megatron runs in spawned processes (dense_model.testing.spawn_workers); transformers runs here.
"""

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from dense_model.testing import spawn_workers
from tests.export.test_export_hf import SEQ, VOCAB
from tests.export.test_export_moe import EXPERTS, moe_config, perturb
from tests.export.test_import_hf import save_hf_model

TOL = 1e-5
# name -> (activation, top-k, overrides); exported as OlmoeForCausalLM
SPECS = {
    "olmoe_router_gqa": (
        "swiglu",
        2,
        ["model.moe.router_score=softmax_then_topk", "model.num_query_groups=2"],
    ),
    "mixtral_router_tied": ("swiglu", 3, ["model.untie_embeddings=false", "model.rotary_base=50000"]),
}
# name -> (activation, top-k, overrides, --format); each refused with one line
REFUSED = {
    # forced: without --format olmoe these export as our remote code (tests/export/test_export_moe.py)
    "polynorm_forced": ("polynorm", 2, ["model.qk_norm=full"], "olmoe"),
    "shared_expert": (
        "swiglu",
        2,
        ["model.qk_norm=full", "model.moe.shared_expert_ffn_hidden_size=32"],
        "olmoe",
    ),
    "qk_none_forced": ("swiglu", 2, ["model.qk_norm=none"], "olmoe"),
    "per_head_forced": ("swiglu", 2, ["model.qk_norm=per_head"], "olmoe"),
}
HF_FIELDS = dict(  # the imported OlmoeForCausalLM
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=EXPERTS,
    num_experts_per_tok=2,
    norm_topk_prob=False,
    max_position_embeddings=SEQ,
    rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
    rms_norm_eps=1e-5,
    router_aux_loss_coef=0.01,
    tie_word_embeddings=False,
    initializer_range=0.1,  # O(1) logits, so a misplaced weight shows
    pad_token_id=None,
    eos_token_id=None,
)


def olmoe_config(activation, topk, extra, tokenizer, tp=1):
    tp_fields = (
        [f"parallel.tensor_model_parallel_size={tp}", "parallel.sequence_parallel=true"] if tp > 1 else []
    )
    return moe_config(activation, topk, ["model.qk_norm=full", *extra, *tp_fields], tokenizer)


def _our_logits(run, tokens):
    from dense_model.checkpoint.inference import load_model_for_inference

    loaded = load_model_for_inference(run)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return loaded.model(tokens, positions, None)[..., :VOCAB].clone()  # [b, s, vocab]


def _job(rank, world_size, out_dir, tokenizer, tokens_file):
    """Export every spec and try every refused one (recording the CLI's exit code and stderr), import
    the transformers model in ``out_dir/hf_made`` and export that import again; our logits of each."""
    from dense_model.checkpoint import save_checkpoint
    from dense_model.export.hf import export_hf, main
    from dense_model.export.hf_import import import_hf
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    out = Path(out_dir)
    initialize_parallel(1, 1)
    tokens = torch.load(tokens_file)  # [b, s]
    logits = {}
    for name, spec in {**SPECS, **{k: v[:3] for k, v in REFUSED.items()}}.items():
        cfg = olmoe_config(*spec, tokenizer)
        model = build_model(cfg)
        perturb(model)  # every norm off its init, the q/k gains included
        save_checkpoint(out / name / "checkpoints", 3, model, cfg)
    for name in SPECS:
        export_hf(out / name, out / "hf" / name, dtype="float32")
        logits[name] = _our_logits(out / name, tokens)
    refused = {}
    for name, (*_, fmt) in REFUSED.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([str(out / name), str(out / "hf" / name), "--format", fmt])
        refused[name] = [code, err.getvalue()]
        initialize_parallel(1, 1)  # main() tears the process groups down
    (out / "refused.json").write_text(json.dumps(refused))
    import_hf(out / "hf_made", out / "imported")
    logits["imported"] = _our_logits(out / "imported", tokens)
    export_hf(out / "imported", out / "hf_again", dtype="float32")
    torch.save(logits, out / "logits.pt")
    import_hf(out / "hf" / "olmoe_router_gqa", out / "imported_ours")  # our export, dense_model.json beside
    export_hf(out / "imported_ours", out / "hf_ours_again", dtype="float32")


def make_olmoe(folder: Path, tokenizer: str, seed: int = 0):
    """A random OlmoeForCausalLM in ``folder`` as allenai's (sharded safetensors, index, per-expert
    tensors) with the SentencePiece model as tokenizer.json; norms and q/k gains off their init."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    return save_hf_model(OlmoeForCausalLM(OlmoeConfig(**HF_FIELDS)), folder, tokenizer, "60KB")


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory, spm_model):
    out = tmp_path_factory.mktemp("export_olmoe")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, out / "tokens.pt")
    model = make_olmoe(out / "hf_made", spm_model)
    with torch.no_grad():
        torch.save(model(tokens).logits, out / "made_logits.pt")  # [b, s, vocab]
    spawn_workers(_job, 1, str(out), spm_model, str(out / "tokens.pt"))
    return out


def hf_logits(folder, tokens, routed_topk=None):
    """transformers' logits of ``folder`` loaded as a user would (no remote code); with
    ``routed_topk``, also checks every expert of every layer got tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(model).__name__ == "OlmoeForCausalLM"
    routed = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda module, args, out: routed.append(out[2].unique().numel()))
    with torch.no_grad():
        logits = model(tokens).logits  # [b, s, vocab]
    assert routed == [EXPERTS] * len(model.model.layers), routed
    return logits


def assert_close(a, b, what):
    assert b.abs().max() > 1.0, what  # logits far from uniform: the comparison means something
    diff = (a - b).abs().max().item()
    assert diff < TOL, f"{what}: max |difference| = {diff:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPECS))
def test_exports_as_transformers_olmoe_with_our_logits(olmoe, name):
    _, topk, extra = SPECS[name]
    folder = olmoe / "hf" / name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "olmoe" and config["architectures"] == ["OlmoeForCausalLM"]
    assert "auto_map" not in config and not list(folder.glob("*.py"))  # no remote code
    assert config["norm_topk_prob"] == ("softmax_then_topk" not in str(extra))
    assert (config["num_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (
        EXPERTS,
        topk,
        32,
    )
    assert config["tie_word_embeddings"] == ("model.untie_embeddings=false" in extra)
    ours = torch.load(olmoe / "logits.pt")[name]
    assert_close(hf_logits(folder, torch.load(olmoe / "tokens.pt")), ours, name)


@pytest.mark.slow
def test_what_olmoe_cannot_express_is_refused_in_one_line(olmoe):
    refused = json.loads((olmoe / "refused.json").read_text())
    says = {
        "polynorm_forced": "--format olmoe, but OlmoeForCausalLM has SwiGLU experts and this model's are "
        "model.activation='polynorm'; export without --format olmoe (our trust_remote_code model has the full q/k norm)",
        "shared_expert": "OlmoeForCausalLM has no shared expert",
        "qk_none_forced": "--format olmoe, but OlmoeForCausalLM always normalises q and k over their full width and "
        "this model has model.qk_norm='none'; export without --format olmoe",
        "per_head_forced": "model.qk_norm='per_head'",
    }
    for name, (code, err) in refused.items():
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("export_hf: error: "), (name, err)
        assert says[name] in lines[0], (name, err)
        assert not (olmoe / "hf" / name).exists()


@pytest.mark.slow
def test_transformers_olmoe_imports_with_its_logits_and_exports_back(olmoe):
    made = torch.load(olmoe / "made_logits.pt")
    assert_close(torch.load(olmoe / "logits.pt")["imported"], made, "imported")
    cfg = json.loads((olmoe / "imported" / "checkpoints/iter_0000000/dense_model.json").read_text())["config"]
    model = cfg["model"]
    assert (model["qk_norm"], model["activation"], model["num_query_groups"]) == ("full", "swiglu", 2)
    moe = model["moe"]
    assert (moe["num_experts"], moe["router_topk"], moe["ffn_hidden_size"], moe["router_score"]) == (
        EXPERTS, 2, 32, "softmax_then_topk",
    )  # fmt: skip
    # the folder's 0.01 is megablocks' weight, as allenai's OLMoE-1B-7B carries its training value
    assert moe["router_loss_scaling"] == "olmoe" and moe["aux_loss_coeff"] == pytest.approx(0.01)
    # config.json has no z-loss field: the import trains without one and says what the recipe used
    from dense_model.config import load_config
    from dense_model.export.olmoe import olmoe_import_notes

    assert moe["z_loss_coeff"] is None
    (note,) = olmoe_import_notes(load_config(str(olmoe / "imported" / "config.yaml")).model)
    assert note.startswith("note: an OLMoE config.json records no router z-loss") and (
        "model.moe.z_loss_coeff=0.001" in note
    ), note
    seed = load_config("configs/moe/olmoe_1b7b_polynorm.yaml", ["model.vocab_size=50304"]).model
    assert seed.moe.z_loss_coeff == pytest.approx(0.001) and olmoe_import_notes(seed) == []
    # round trip: the same config.json fields and transformers' logits
    original = json.loads((olmoe / "hf_made" / "config.json").read_text())
    again = json.loads((olmoe / "hf_again" / "config.json").read_text())
    for key in ("model_type", "num_experts", "num_experts_per_tok", "intermediate_size", "norm_topk_prob",
                "num_key_value_heads", "rope_parameters", "rms_norm_eps", "tie_word_embeddings"):  # fmt: skip
        assert again[key] == original[key], key
    assert again["router_aux_loss_coef"] == pytest.approx(original["router_aux_loss_coef"])
    assert_close(hf_logits(olmoe / "hf_again", torch.load(olmoe / "tokens.pt")), made, "round trip")


def test_transformers_aux_loss_is_megablocks_with_its_weight_times_top_k_when_layers_route_alike():
    """docs/moe.md: transformers' ``load_balancing_loss_func`` x c against megablocks'
    ``batched_load_balancing_loss`` (float64 re-implementation) with weight c x k; pooled over layers,
    it is another function when the layers route differently. So an OLMoE folder's number is not
    converted by the import: it is megablocks' weight there (allenai carried 0.01 over unchanged),
    and it stays that through import and export."""
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    from dense_model.config import ModelConfig, MoEConfig
    from dense_model.export.olmoe import aux_loss_from_hf, aux_loss_to_hf

    layers, tokens, experts, topk, coef = 3, 40, 8, 3, 0.01
    gen = torch.Generator().manual_seed(0)

    def megablocks(logits, weight):  # w * E / (L * T * k) * sum_l sum_e n[l,e] * mean_t p[l,t,e]
        total = 0.0
        for layer in logits:
            p = layer.double().softmax(-1)
            n = torch.bincount(p.topk(topk, -1).indices.reshape(-1), minlength=experts).double()
            total += (n * p.mean(0)).sum()
        return weight * experts / (len(logits) * tokens * topk) * total

    weight = coef * topk
    alike = (torch.randn(tokens, experts, generator=gen) * 2,) * layers
    hf = coef * load_balancing_loss_func(alike, experts, topk).double()
    assert hf.item() == pytest.approx(megablocks(alike, weight).item(), rel=1e-6)
    apart = tuple(torch.randn(tokens, experts, generator=gen) * 2 for _ in range(layers))
    hf = coef * load_balancing_loss_func(apart, experts, topk).double()
    assert not math.isclose(hf.item(), megablocks(apart, weight).item(), rel_tol=1e-3)
    ours = aux_loss_from_hf(coef)
    assert ours == {"aux_loss_coeff": coef, "router_loss_scaling": "olmoe"}
    moe = MoEConfig(num_experts=experts, router_topk=topk, **ours)
    assert aux_loss_to_hf(ModelConfig(num_layers=layers, moe=moe)) == coef
    per_layer = MoEConfig(num_experts=experts, router_topk=topk, aux_loss_coeff=coef / layers)
    assert aux_loss_to_hf(ModelConfig(num_layers=layers, moe=per_layer)) == pytest.approx(coef)


def test_a_folder_of_another_model_type_is_refused_naming_it(tmp_path, capsys):
    from dense_model.export.hf_import import main

    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    assert main([str(tmp_path / "gpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and "model_type='gpt2'" in err[0], err
    assert "OlmoeForCausalLM" in err[0]  # the layouts it reads, OLMoE's among them
    assert not (tmp_path / "out").exists()


def _tp2_job(rank, world_size, out_dir, tokenizer, tokens_file):
    """Save a spec at TP=2 with q/k gains that differ along the whole width (each rank its slice of
    one global gain), record the TP=2 logits, then export (rank 0 writes; every rank loads at TP=1)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from dense_model.checkpoint import save_checkpoint
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    out = Path(out_dir)
    initialize_parallel(2, 1)
    cfg = olmoe_config(*SPECS["olmoe_router_gqa"], tokenizer, tp=2)
    model = build_model(cfg)
    perturb(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                gen = torch.Generator().manual_seed(len(name))
                whole = 1 + 0.5 * torch.randn(param.numel() * 2, generator=gen)
                param.copy_(whole.chunk(2)[ps.get_tensor_model_parallel_rank()])
    save_checkpoint(out / "tp2" / "checkpoints", 3, model, cfg)
    model.eval()
    tokens = torch.load(tokens_file)
    with torch.no_grad():
        logits = model(
            tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None
        )  # [b, s, padded vocab / 2]
        logits = gather_from_tensor_model_parallel_region(logits)[..., :VOCAB]
    if rank == 0:
        torch.save(logits, out / "logits_tp2.pt")


def _export_job(rank, world_size, run, output):
    from dense_model.export.hf import export_hf

    export_hf(run, output, dtype="float32")


@pytest.mark.slow
def test_a_checkpoint_saved_at_tp2_exports_its_sharded_qk_gains_gathered(tmp_path, spm_model):
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, tmp_path / "tokens.pt")
    spawn_workers(_tp2_job, 2, str(tmp_path), spm_model, str(tmp_path / "tokens.pt"))
    spawn_workers(_export_job, 1, str(tmp_path / "tp2"), str(tmp_path / "hf"))
    from safetensors.torch import load_file

    weights = {}
    for path in (tmp_path / "hf").glob("*.safetensors"):
        weights.update(load_file(path))
    q_gain = weights["model.layers.0.self_attn.q_norm.weight"]
    assert q_gain.shape == (64,) and not torch.equal(q_gain[:32], q_gain[32:])  # both ranks' halves
    assert_close(hf_logits(tmp_path / "hf", tokens), torch.load(tmp_path / "logits_tp2.pt"), "TP=2")


@pytest.mark.slow
def test_an_imported_olmoe_trains_on_at_ep2(olmoe, tmp_path, mmap_dataset):
    from tests.training.pretrain_jobs import read_metrics, trained_ok

    out = trained_ok(
        olmoe / "imported" / "config.yaml",
        f"run_dir={tmp_path / 'new'}",
        f"data.paths=[{mmap_dataset}]",
        "data.split=90,10,0",
        "data.num_workers=0",
        "parallel.expert_model_parallel_size=2",
        "training.train_iters=2",
        "training.lr_warmup_iters=1",
        "training.micro_batch_size=2",
        "training.global_batch_size=4",
        "training.bf16=false",
        "training.recompute_granularity=none",
        "logging.log_interval=1",
        "logging.eval_interval=0",
        "checkpoint.save_interval=2",
        nproc=2,
    )
    assert f"loaded the model weights of {olmoe / 'imported'}/checkpoints/iter_0000000" in out, out
    losses, _ = read_metrics(tmp_path / "new")
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values()), losses


@pytest.mark.slow
def test_our_olmoe_export_imports_back_bit_for_bit_with_its_model_section(olmoe):
    from safetensors.torch import load_file

    name = "olmoe_router_gqa"
    first, again = olmoe / "hf" / name, olmoe / "hf_ours_again"
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((first / "config.json").read_text()) == json.loads((again / "config.json").read_text())
    section = [
        json.loads((olmoe / run / "checkpoints" / it / "dense_model.json").read_text())["config"]["model"]
        for run, it in ((name, "iter_0000003"), ("imported_ours", "iter_0000000"))
    ]
    assert section[0] == section[1]  # the run's own router-loss settings, init, padding multiple ... kept


def _tp2_logits_job(rank, world_size, run, tokens_file, out):
    """Our logits of ``run`` loaded at TP=2 (each rank half the heads, half the q/k gains), gathered."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from dense_model.checkpoint.inference import load_model_for_inference

    loaded = load_model_for_inference(run, tensor_model_parallel_size=2, dtype=torch.float32)
    tokens = torch.load(tokens_file)
    with torch.no_grad():
        logits = loaded.model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)  # [b, s, v/2]
        logits = gather_from_tensor_model_parallel_region(logits)[..., :VOCAB]
    if rank == 0:
        torch.save(logits, out)


@pytest.mark.slow
def test_an_imported_olmoe_loads_at_tp2_with_transformers_logits(olmoe, tmp_path):
    """What run_lm_eval.sh with TP=2 loads: the import resharded, q/k gains split like the heads."""
    spawn_workers(
        _tp2_logits_job, 2, str(olmoe / "imported"), str(olmoe / "tokens.pt"), str(tmp_path / "l.pt")
    )
    assert_close(torch.load(tmp_path / "l.pt"), torch.load(olmoe / "made_logits.pt"), "import at TP=2")
