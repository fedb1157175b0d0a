"""``model.moe.activation_params=shared``: one set of activation coefficients per MoE layer, used by
every expert (the seed's megablocks dMoE), over gloo.

- the experts module (grouped and sequential): outputs and the shared coefficients' gradient equal
  a torch-only float64 reference, the gradient being the sum of each expert's own, computed apart;
  the fused Triton kernel (interpreted) gives the same;
- training (the trainer's model, DDP, distributed optimizer): grouped ≡ sequential experts, and
  EP=2 ≡ one process in losses and in the shared coefficients' gradients (a dense parameter summed
  over the full data-parallel group, not the expert one); TP=2 with expert-TP=1, EP=2 ≡ one
  process in losses, gradients and the coefficients after each step (summed over TP too);
- a checkpoint saved at EP=2, and at TP=2 / expert-TP=1 / EP=2, holds each layer's coefficients
  once, without an expert axis, and loads at EP=1 / TP=1 with the same coefficients and logits;
- the bad inputs: ``shared`` for an activation without parameters (one line, exit 2 before launch),
  and a resume that changes the setting.
"""

import pytest
import torch

from dense_model.config import load_config, validate
from dense_model.testing import run_layouts, spawn_workers
from tests.moe.test_moe_model import moe_overrides
from tests.test_sequence_parallel import (
    STEPS,
    _train,
    assert_trains_like,
    moe_training_overrides,
    step_batches,
)

SHARED = "model.moe.activation_params=shared"
SEQUENTIAL = "model.moe.grouped_gemm=false"
COUNTS = [5, 0, 7, 4]  # tokens per local expert; one expert gets none
HIDDEN = 64


def _experts_outputs(rank, world_size, dtype_name, out_file):
    """One MoE layer's experts (shared coefficients), grouped and sequential, the same random
    weights and coefficients, run on the same permuted tokens: parameters, output, gradients."""
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel_from

    dtype = getattr(torch, dtype_name)
    results = {}
    for impl, extra in (("grouped", []), ("sequential", [SEQUENTIAL])):
        cfg = load_config(None, [*moe_overrides(), SHARED, *extra])
        if impl == "grouped":
            initialize_parallel_from(cfg.parallel, seed=11)
        experts = build_model(cfg).decoder.layers[0].mlp.experts.to(dtype)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for param in experts.parameters():
                param.copy_(
                    torch.randn(param.shape, generator=gen, dtype=dtype) * (0.3 if param.ndim == 1 else 0.1)
                )
        n = sum(COUNTS)
        hidden = torch.randn(n, HIDDEN, generator=gen, dtype=dtype, requires_grad=True)
        probs = torch.rand(n, generator=gen, dtype=dtype)
        upstream = torch.randn(n, HIDDEN, generator=gen, dtype=dtype)
        y, _ = experts(hidden, torch.tensor(COUNTS), probs)
        y.backward(upstream)
        results[impl] = {
            "type": type(experts).__name__,
            "fused": experts.activation_func.act.fused_kernel is not None,
            "params": {name: p.detach().clone() for name, p in experts.named_parameters()},
            "grads": {
                name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for name, p in experts.named_parameters()
            },
            "inputs": (hidden.detach(), probs, upstream),
            "y": y.detach(),
        }
    torch.save(results, out_file)


def _polynorm(x, weight, bias, eps=1e-6):  # x [n, f]; a0 + sum_i a_i x^i / rms(x^i), rows apart
    out = bias
    for i in range(weight.shape[0]):
        power = x ** (i + 1)
        out = out + weight[i] * power * torch.rsqrt(power.square().mean(dim=-1, keepdim=True) + eps)
    return out


def _check_against_reference(res, rtol):
    """The experts' output, and the shared coefficients' gradient = the sum over experts of each
    expert's own gradient (each from its own forward and backward, with its own leaf copies)."""
    params, (hidden, probs, upstream) = res["params"], res["inputs"]
    coefficient_names = [name for name in params if "activation_func" in name]
    assert coefficient_names == ["activation_func.act.weight", "activation_func.act.bias"]  # once per layer
    weight, bias = params["activation_func.act.weight"], params["activation_func.act.bias"]
    outputs, sums = [], [torch.zeros_like(weight), torch.zeros_like(bias)]
    for e, (x, p, up) in enumerate(zip(*(torch.split(t, COUNTS) for t in (hidden, probs, upstream)))):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        fc1, fc2 = (
            params[f"local_experts.{e}.linear_fc1.weight"],
            params[f"local_experts.{e}.linear_fc2.weight"],
        )
        y = (_polynorm(x @ fc1.t(), w, b) * p.unsqueeze(-1)) @ fc2.t()  # [tokens of e, hidden]
        outputs.append(y.detach())
        for total, grad in zip(sums, torch.autograd.grad(y, (w, b), up, allow_unused=True)):
            if grad is not None:  # an expert without tokens adds nothing
                total += grad
    torch.testing.assert_close(res["y"], torch.cat(outputs), rtol=rtol, atol=rtol)
    torch.testing.assert_close(res["grads"]["activation_func.act.weight"], sums[0], rtol=rtol, atol=rtol)
    torch.testing.assert_close(res["grads"]["activation_func.act.bias"], sums[1], rtol=rtol, atol=rtol)
    assert sums[0].abs().min() > 0 and sums[1].abs().min() > 0


def test_shared_coefficients_gradient_is_the_sum_over_experts(tmp_path):
    spawn_workers(_experts_outputs, 1, "float64", str(tmp_path / "out.pt"))
    results = torch.load(tmp_path / "out.pt")
    assert (results["grouped"]["type"], results["sequential"]["type"]) == (
        "GroupedExperts",
        "SequentialExperts",
    )
    for res in results.values():
        assert not res["fused"]  # the torch reference (the fused kernel: the next test)
        _check_against_reference(res, rtol=1e-10)
    for name, grad in results["sequential"]["grads"].items():  # grouped ≡ sequential, every gradient
        torch.testing.assert_close(results["grouped"]["grads"][name], grad, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_shared_coefficients_with_the_fused_kernel(tmp_path, monkeypatch):
    """PolyNorm's fused Triton kernel (interpreted on the CPU), one call over all the experts' rows."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the workers get the caller's environment
    spawn_workers(_experts_outputs, 1, "float32", str(tmp_path / "out.pt"))
    for res in torch.load(tmp_path / "out.pt").values():
        assert res["fused"]
        as_double = {
            "params": {name: p.double() for name, p in res["params"].items()},
            "grads": {name: g.double() for name, g in res["grads"].items()},
            "inputs": tuple(t.double() for t in res["inputs"]),
            "y": res["y"].double(),
        }
        _check_against_reference(as_double, rtol=1e-4)


def _shared_training(tp=1, ep=1, etp=None):
    return [*moe_training_overrides(tp=tp, ep=ep, etp=etp), SHARED]


PLAIN = "parallel.use_distributed_optimizer=false"  # main_grad read whole (distopt: each rank its shard)
LAYOUTS = {
    1: {"grouped": _shared_training(), "sequential": [*_shared_training(), SEQUENTIAL]},
    2: {
        "grouped_ep2": [*_shared_training(ep=2), PLAIN],
        "grouped_ep2_distopt": _shared_training(ep=2),
        "sequential_tp2": [*_shared_training(tp=2), SEQUENTIAL],
        # expert-TP != TP: each rank holds half the sequence and 2 of the 4 experts
        "grouped_tp2_etp1_ep2": [*_shared_training(tp=2, ep=2, etp=1), PLAIN],
        # and DDP's reduce overlapped with the backward (the expert-TP hook only scales, before it)
        "grouped_tp2_etp1_ep2_distopt": [
            *_shared_training(tp=2, ep=2, etp=1),
            "parallel.overlap_grad_reduce=true",
        ],
    },
    # expert-TP > TP needs expert-TP x EP = 4 ranks (DP=4, every rank fed the same batch)
    4: {"grouped_tp1_etp2_ep2": [*_shared_training(ep=2, etp=2), PLAIN]},
}


def _train_keeping_coefficients(rank, world_size, runs, out_dir):
    """``_train``, and the shared coefficients' values after each optimizer step (``coefficients``)."""
    from dense_model.training import optim

    build, kept = optim.build_training_model, []

    def build_and_keep(cfg):
        model, ddp, optimizer = build(cfg)
        values, step = [], optimizer.step

        def step_and_keep():
            out = step()
            values.append(
                {n: p.detach().clone() for n, p in model.named_parameters() if ".activation_func." in n}
            )
            return out

        optimizer.step = step_and_keep
        kept.append(values)
        return model, ddp, optimizer

    optim.build_training_model = build_and_keep  # this forked worker only
    _train(rank, world_size, runs, out_dir)
    for name, values in zip(runs, kept):
        result = torch.load(f"{out_dir}/{name}.rank{rank}")
        torch.save({**result, "coefficients": values}, f"{out_dir}/{name}.rank{rank}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_layouts(_train_keeping_coefficients, LAYOUTS, tmp_path_factory.mktemp("shared_activation"))


@pytest.mark.slow
def test_grouped_experts_train_like_sequential_with_shared_coefficients(runs):
    """Losses of 3 steps and every gradient; also at TP=2 (= expert-TP, sequence parallel), where
    the coefficients' gradient is reduced over the TP group and replicated."""
    assert_trains_like(runs["grouped"], runs["sequential"][0])
    assert_trains_like(runs["sequential_tp2"], runs["sequential"][0])


@pytest.mark.slow
def test_ep2_trains_like_one_process_with_shared_coefficients(runs):
    """The two EP ranks are also two DP ranks fed the same batch: the losses, and every dense
    gradient (the shared coefficients' included: each rank's sum over its 2 local experts, summed
    over the dense DP group and averaged) equal one process's. Experts' own weights get each
    token twice, so those are left out (tests/moe/test_moe_grouped_experts.py). With the
    distributed optimizer (the shared coefficients in its dense parameter groups): the losses."""
    one = runs["grouped"][0]
    for rank in runs["grouped_ep2_distopt"]:
        assert rank["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for rank in runs["grouped_ep2"]:
        assert rank["losses"] == pytest.approx(one["losses"], rel=1e-5)
        _assert_dense_grads_like(rank, one)


def _assert_dense_grads_like(rank: dict, one: dict) -> None:
    """Every dense gradient of every step (the shared coefficients' included) equals one
    process's; experts' own weights are left out (under EP each rank holds only its own)."""
    for step in range(STEPS):
        dense = {n: g for n, g in one["grads"][step].items() if ".local_experts." not in n}
        coefficients = [n for n in dense if ".mlp.experts.activation_func." in n]
        assert len(coefficients) == 2 * 2  # layers x (a1..ar, a0)
        largest = max(g.abs().max().item() for g in dense.values())  # fp32 summation-order floor
        for name, want in dense.items():
            got = rank["grads"][step][name]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * largest, msg=name)


def _assert_coefficients_like(runs: dict, layouts: tuple[str, ...]) -> None:
    """Losses and the shared coefficients after each Adam step equal one process's, on every rank."""
    one = runs["grouped"][0]
    assert len(one["coefficients"]) == STEPS
    for layout in layouts:
        for rank in runs[layout]:
            assert rank["losses"] == pytest.approx(one["losses"], rel=1e-5), layout
            for step, values in enumerate(one["coefficients"]):
                for name, want in values.items():
                    got = rank["coefficients"][step][name]
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{layout} {step} {name}")


@pytest.mark.slow
def test_tp2_expert_tp1_ep2_trains_like_one_process_with_shared_coefficients(runs):
    """Expert-TP (1) < TP (2), EP=2, sequence parallel: each rank routes its half of the sequence
    and runs 2 of the 4 experts on tokens of both halves; the shared coefficients' gradient is the
    sum over the two ranks (finalize_model_grads' TP all-reduce of the ``sequence_parallel`` mark),
    so losses, every dense gradient and the coefficients after each Adam step equal one process's.
    With the distributed optimizer and overlapped gradient reduce: the losses and the coefficients
    after each step."""
    _assert_coefficients_like(runs, ("grouped_tp2_etp1_ep2", "grouped_tp2_etp1_ep2_distopt"))
    for rank in runs["grouped_tp2_etp1_ep2"]:
        _assert_dense_grads_like(rank, runs["grouped"][0])


@pytest.mark.slow
def test_tp1_expert_tp2_ep2_trains_like_one_process_with_shared_coefficients(runs):
    """Expert-TP (2) > TP (1), EP=2, 4 ranks: DDP sums the coefficients' gradient over all 4 (DP=4),
    where each expert-TP pair holds the same expert-TP total: the hook's division by expert-TP
    counts it once. Losses, every dense gradient, the coefficients after each step."""
    _assert_coefficients_like(runs, ("grouped_tp1_etp2_ep2",))
    for rank in runs["grouped_tp1_etp2_ep2"]:
        _assert_dense_grads_like(rank, runs["grouped"][0])


def _checkpoint_logits(rank, world_size, overrides, root, save, out_file):
    """save: coefficients set apart from their init (each layer its own), checkpoint, logits. Else:
    the checkpoint loaded into a fresh model, logits. Rank 0 saves them (and the saved tensors'
    global shapes)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from dense_model.checkpoint.layout import iteration_dir
    from dense_model.checkpoint.state import load_checkpoint, save_checkpoint
    from dense_model.parallel import initialize_parallel_from
    from dense_model.training.optim import build_training_model

    cfg = load_config(None, overrides)
    initialize_parallel_from(cfg.parallel, seed=11)
    model, ddp, optimizer = build_training_model(cfg)
    shapes = {}
    if save:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".activation_func." in name:
                    layer = int(name.split(".")[2])
                    param.copy_(torch.linspace(-0.5, 0.7, param.numel()) + 0.1 * layer)
        save_checkpoint(root, 1, ddp, cfg, optimizer)
        metadata = dist_checkpointing.load_tensors_metadata(str(iteration_dir(root, 1)))
        shapes = {key: tuple(t.global_shape) for key, t in metadata.items() if "activation_func" in key}
    else:
        load_checkpoint(iteration_dir(root, 1), ddp)  # the weights (no step taken: no Adam state)
    model.eval()
    batch = step_batches(0)[0]
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, v / TP]: rank 0's vocab shard
    coefficients = {n: p.detach().clone() for n, p in model.named_parameters() if ".activation_func." in n}
    if rank == 0:
        torch.save({"logits": logits, "shapes": shapes, "coefficients": coefficients}, out_file)
    ps.destroy_model_parallel()


@pytest.mark.slow
@pytest.mark.parametrize("saved_at", [{"ep": 2}, {"tp": 2, "etp": 1, "ep": 2}], ids=["ep2", "tp2_etp1_ep2"])
def test_checkpoint_saved_at_ep2_loads_at_ep1_with_the_same_logits(tmp_path, saved_at):
    root = tmp_path / "ckpt"
    # PLAIN: the distributed optimizer's state_dict needs a step taken first
    spawn_workers(
        _checkpoint_logits,
        2,
        [*_shared_training(**saved_at), PLAIN],
        str(root),
        True,
        str(tmp_path / "saver.pt"),
    )
    spawn_workers(
        _checkpoint_logits, 1, [*_shared_training(), PLAIN], str(root), False, str(tmp_path / "loader.pt")
    )
    saver, loader = torch.load(tmp_path / "saver.pt"), torch.load(tmp_path / "loader.pt")
    # megatron stacks the layers (first axis); no expert axis: one tensor, replicated over EP and DP
    assert saver["shapes"] == {
        "decoder.layers.mlp.experts.activation_func.act.weight": (2, 3),
        "decoder.layers.mlp.experts.activation_func.act.bias": (2, 1),
    }
    for name, value in saver["coefficients"].items():
        torch.testing.assert_close(loader["coefficients"][name], value, rtol=0, atol=0)
    vocab_shard = saver["logits"].shape[-1]  # TP=2: rank 0 holds the first half of the vocabulary
    torch.testing.assert_close(loader["logits"][..., :vocab_shard], saver["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_shared_without_parameters_is_one_line_exit_2_before_launch(activation, capsys, tmp_path):
    from dense_model import launcher

    overrides = [
        *moe_overrides(activation=activation),
        SHARED,
        "data.demo=true",
        f"run_dir={tmp_path / 'run'}",
    ]
    assert launcher.main(overrides) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"config error: model.moe.activation_params=shared: model.activation={activation} has no "
        "parameters to share; set model.moe.activation_params=per_expert (or a PolyCom activation: "
        "polynorm, polyrelu)"
    )
    assert not (tmp_path / "run").exists()  # nothing written


def test_shared_with_expert_tp_other_than_tp_is_a_valid_layout():
    """Once refused (the dense DP group's sum missed EP ranks); it trains like one process above."""
    cfg = load_config(None, [*moe_training_overrides(tp=2, etp=1, ep=2), SHARED, "data.demo=true"])
    validate(cfg, world_size=2, files=False)  # the layout's rules (files: the tiny vocabulary is the tests')


def test_resume_refuses_a_changed_activation_params(tmp_path):
    from dense_model.checkpoint import layout
    from dense_model.config import config_from_dict, config_to_dict

    saved = load_config(None, [*moe_overrides(), f"run_dir={tmp_path}"])
    folder = layout.iteration_dir(tmp_path / "checkpoints", 4)
    folder.mkdir(parents=True)
    layout.write_metadata(folder, 4, config_from_dict(config_to_dict(saved)))
    (tmp_path / "checkpoints" / layout.TRACKER).write_text("4")
    assert layout.plan_run_load(saved).iteration == 4
    with pytest.raises(layout.CheckpointError) as err:
        layout.plan_run_load(load_config(None, [*moe_overrides(), f"run_dir={tmp_path}", SHARED]))
    (line,) = str(err.value).splitlines()
    assert (
        "holds a model with model.moe.activation_params=per_expert, this config asks for "
        "model.moe.activation_params=shared: a model cannot change shape" in line
    ), line


def _export_import_job(rank, world_size, out_dir, tokenizer, tokens_file):
    """A shared-coefficient MoE checkpoint (coefficients off their init), exported to Hugging Face
    and imported back: our logits of both, and the imported run's model config."""
    import shutil
    from pathlib import Path

    from dense_model.checkpoint import read_metadata, resolve_checkpoint, save_checkpoint
    from dense_model.checkpoint.inference import load_model_for_inference
    from dense_model.checkpoint.layout import METADATA
    from dense_model.export import export_hf
    from dense_model.export.hf_import import import_hf
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel
    from tests.export.test_export_hf import VOCAB as EXPORT_VOCAB
    from tests.export.test_export_moe import moe_config, perturb

    out = Path(out_dir)
    initialize_parallel(1, 1)
    cfg = moe_config("polynorm", 2, [SHARED], tokenizer)
    model = build_model(cfg)
    perturb(model)  # every layer's shared coefficients their own values
    save_checkpoint(out / "run" / "checkpoints", 3, model, cfg)
    export_hf(out / "run", out / "hf", dtype="float32")
    import_hf(out / "hf", out / "imported")
    # config.json alone (a folder without the export's dense_model.json): moe_activation_params
    shutil.copytree(out / "hf", out / "hf_bare")
    (out / "hf_bare" / METADATA).unlink()
    import_hf(out / "hf_bare", out / "imported_bare")
    tokens = torch.load(tokens_file)  # [b, s]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = {}
    for name in ("run", "imported"):
        loaded = load_model_for_inference(out / name)
        with torch.no_grad():
            logits[name] = loaded.model(tokens, positions, None)[..., :EXPORT_VOCAB].clone()  # [b, s, vocab]
    imported = [
        read_metadata(resolve_checkpoint(out / name / "checkpoints"))["config"]["model"]["moe"][
            "activation_params"
        ]
        for name in ("imported", "imported_bare")
    ]
    torch.save({"logits": logits, "activation_params": imported}, out / "ours.pt")


@pytest.mark.slow
def test_export_and_import_keep_the_shared_coefficients(tmp_path, spm_model):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.export.test_export_hf import SEQ as EXPORT_SEQ
    from tests.export.test_export_hf import VOCAB as EXPORT_VOCAB

    tokens = torch.randint(0, EXPORT_VOCAB, (2, EXPORT_SEQ), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, tmp_path / "tokens.pt")
    spawn_workers(_export_import_job, 1, str(tmp_path), spm_model, str(tmp_path / "tokens.pt"))
    ours = torch.load(tmp_path / "ours.pt")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    for layer in range(2):
        assert weights[f"model.layers.{layer}.mlp.act_fn.weight"].shape == (3,)  # one set per layer
        assert f"model.layers.{layer}.mlp.act_fn.bias" in weights
    assert not [key for key in weights if ".experts." in key and "act_fn" in key]
    assert not torch.equal(
        weights["model.layers.0.mlp.act_fn.weight"], weights["model.layers.1.mlp.act_fn.weight"]
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        hf_logits = model.eval()(tokens).logits  # [b, s, vocab]
    assert ours["logits"]["run"].abs().max() > 1.0  # far from uniform: the comparison means something
    torch.testing.assert_close(hf_logits, ours["logits"]["run"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["logits"]["imported"], ours["logits"]["run"], rtol=1e-5, atol=1e-5)
    assert ours["activation_params"] == ["shared", "shared"]
