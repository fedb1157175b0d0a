"""Grouped-GEMM experts (dense_model.moe_experts) against megatron-core's SequentialMLP, over gloo.

- grouped_linear: torch's grouped_mm (and the per-expert fallback) equal one matmul per expert;
- every registry activation: the experts module's output and every gradient (inputs, routing
  probabilities, expert weights, each expert's own coefficients) equal SequentialMLP's, with an
  expert that gets no tokens and per-expert coefficients that differ;
- training (the trainer's model, DDP, optimizer, finalize_model_grads): grouped experts give
  sequential experts' losses within 1e-5 and every gradient at EP=1, at EP=2 and at expert-TP=2
  (TP=2 with sequence parallelism), layout by layout;
- one checkpoint layout: a checkpoint saved with grouped experts resumes with sequential ones and
  the other way round (across EP as well), model and optimizer state.
"""

import pytest
import torch

from dense_model.activations import get_activation_entry, list_activations
from dense_model.config import load_config
from dense_model.testing import run_layouts, spawn_workers
from tests.moe.test_moe_model import moe_overrides
from tests.test_sequence_parallel import _train, assert_trains_like, moe_training_overrides, step_batches

SEQUENTIAL = "model.moe.grouped_gemm=false"


@pytest.mark.parametrize("width_in, width_out, grouped", [(16, 24, True), (6, 10, False)])
def test_grouped_linear_equals_one_matmul_per_expert(width_in, width_out, grouped):
    """16-byte aligned fp32 rows take torch's grouped_mm on the CPU, others the per-expert loop."""
    # Imported here: megatron-core imports Triton, which the kernel tests' conftest must import first.
    from dense_model.moe_experts import grouped_linear, grouped_mm_runs

    gen = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 2]
    x = torch.randn(sum(counts), width_in, generator=gen, requires_grad=True)
    weight = torch.randn(len(counts), width_out, width_in, generator=gen, requires_grad=True)
    assert grouped_mm_runs(x, weight) is grouped
    out = grouped_linear(x, weight, counts)
    grad = torch.randn(out.shape, generator=gen)
    got = (out, *torch.autograd.grad(out, (x, weight), grad))
    want = torch.cat([part @ w.t() for part, w in zip(torch.split(x, counts), weight)])
    want = (want, *torch.autograd.grad(want, (x, weight), grad))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert got[2][1].abs().sum() == 0  # the expert without tokens: no weight gradient


def _experts_pair(rank, world_size, cases, out_file):
    """For each activation: one MoE layer's experts built as GroupedExperts and as SequentialMLP
    with the same weights, run on the same permuted tokens; outputs and gradients saved."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from dense_model.model import build_model
    from dense_model.moe_experts import GroupedExperts
    from dense_model.parallel import initialize_parallel_from

    results = {}
    for index, (name, overrides) in enumerate(cases.items()):
        pair = {}
        for impl, extra in (("grouped", []), ("sequential", [SEQUENTIAL])):
            cfg = load_config(None, [*overrides, *extra])
            if index == 0 and impl == "grouped":
                initialize_parallel_from(cfg.parallel, seed=11)  # one process, the same layout throughout
            pair[impl] = build_model(cfg).decoder.layers[0].mlp.experts
        grouped, sequential = pair["grouped"], pair["sequential"]
        assert type(grouped) is GroupedExperts and type(sequential) is SequentialMLP
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():  # every expert its own coefficients (the init gives all the same)
            for param in sequential.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * (0.3 if param.ndim == 1 else 0.1))
        grouped.load_state_dict(sequential.state_dict())
        counts = torch.tensor([5, 0, 7, 4])  # one expert gets no tokens
        hidden = torch.randn(int(counts.sum()), 64, generator=gen)
        probs = torch.rand(int(counts.sum()), generator=gen)
        upstream = torch.randn(int(counts.sum()), 64, generator=gen)
        out = {}
        for impl, experts in pair.items():
            x, p = hidden.clone().requires_grad_(), probs.clone().requires_grad_()
            y, bias = experts(x, counts, p)
            assert bias is None
            y.backward(upstream)
            grads = {n: q.grad.clone() for n, q in experts.named_parameters()}
            out[impl] = {"y": y.detach(), "x": x.grad, "probs": p.grad, "params": grads}
        results[name] = out
    torch.save(results, out_file)


def test_every_registry_activation_matches_sequential_experts(tmp_path):
    names = list_activations()
    assert {"polynorm", "polyrelu", "swiglu", "gelu"} <= set(names)
    cases = {name: moe_overrides(activation=name) for name in names}
    spawn_workers(_experts_pair, 1, cases, str(tmp_path / "out.pt"))
    results = torch.load(tmp_path / "out.pt")
    for name, res in results.items():
        got, want = res["grouped"], res["sequential"]
        for key in ("y", "x", "probs"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        assert got["params"].keys() == want["params"].keys()
        coefficients = [n for n in want["params"] if ".activation_func." in n]
        has_params = any(True for _ in get_activation_entry(name).cls().parameters())
        assert len(coefficients) == (4 * 2 if has_params else 0), name  # experts x (a1..ar, a0)
        for param, grad in want["params"].items():
            torch.testing.assert_close(
                got["params"][param], grad, rtol=1e-5, atol=1e-6, msg=f"{name} {param}"
            )
            empty = param.startswith("local_experts.1.")  # no tokens: no gradient, from no other rows
            assert (grad.abs().sum() == 0) == empty, (name, param)


# One spawn per world size trains all its layouts, grouped and sequential.
LAYOUTS = {
    1: {"grouped": moe_training_overrides(), "sequential": [*moe_training_overrides(), SEQUENTIAL]},
    2: {
        "grouped_ep2": moe_training_overrides(ep=2),
        "sequential_ep2": [*moe_training_overrides(ep=2), SEQUENTIAL],
        "grouped_etp2": moe_training_overrides(tp=2, etp=2),
        "sequential_etp2": [*moe_training_overrides(tp=2, etp=2), SEQUENTIAL],
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_layouts(_train, LAYOUTS, tmp_path_factory.mktemp("grouped_experts"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["", "_ep2", "_etp2"])
def test_grouped_experts_train_like_sequential_experts(runs, layout):
    """Same layout, rank by rank: losses of 3 optimizer steps within 1e-5 relative, and every
    parameter's gradient at every step. Against one process's sequential run: the losses, and at
    DP = 1 (expert-TP=2 with TP=2) every gradient too; at EP=2 with TP=1 the two ranks are also
    two data-parallel ranks fed the same batch, so each expert's gradient is twice one process's
    (as in tests/moe/test_moe_model.py) and only the losses compare."""
    grouped, sequential = runs[f"grouped{layout}"], runs[f"sequential{layout}"]
    for got, want in zip(grouped, sequential):
        assert_trains_like([got], want)
    one_process = runs["sequential"][0]
    if layout == "_ep2":
        for got in grouped:
            assert got["losses"] == pytest.approx(one_process["losses"], rel=1e-5)
    else:
        assert_trains_like(grouped, one_process)


def _resume(rank, world_size, overrides, root, save, out_file):
    """save: one step, checkpoint (model and optimizer), two more steps. Else: load that
    checkpoint, the same two steps. The losses of those two steps are saved."""
    from megatron.core import parallel_state as ps

    from dense_model.checkpoint.layout import iteration_dir
    from dense_model.checkpoint.state import load_checkpoint, save_checkpoint
    from dense_model.parallel import initialize_parallel_from
    from dense_model.training.optim import build_training_model
    from dense_model.training.step import forward_backward, reduce_lm_loss

    cfg = load_config(None, overrides)
    initialize_parallel_from(cfg.parallel, seed=11)
    model, ddp, optimizer = build_training_model(cfg)

    def step(index):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = reduce_lm_loss(forward_backward([ddp], iter(step_batches(index)), 2, 16, 2))
        optimizer.step()
        return loss

    if save:
        step(0)
        save_checkpoint(root, 1, ddp, cfg, optimizer)
    else:
        load_checkpoint(iteration_dir(root, 1), ddp, optimizer)
    losses = [step(1), step(2)]
    if rank == 0:
        torch.save(
            {"losses": losses, "experts": type(model.decoder.layers[0].mlp.experts).__name__}, out_file
        )
    ps.destroy_model_parallel()


@pytest.mark.slow
@pytest.mark.parametrize(
    "saved, loaded",
    [(("grouped", 2), ("sequential", 1)), (("sequential", 1), ("grouped", 2))],
    ids=["grouped_ep2_to_sequential_ep1", "sequential_ep1_to_grouped_ep2"],
)
def test_checkpoint_loads_across_expert_implementations(tmp_path, saved, loaded):
    def overrides(impl, ep):
        extra = [SEQUENTIAL] if impl == "sequential" else []
        return [*moe_training_overrides(ep=ep), "parallel.use_distributed_optimizer=false", *extra]

    root = tmp_path / "ckpt"
    spawn_workers(_resume, saved[1], overrides(*saved), str(root), True, str(tmp_path / "saver.pt"))
    spawn_workers(_resume, loaded[1], overrides(*loaded), str(root), False, str(tmp_path / "loader.pt"))
    saver, loader = torch.load(tmp_path / "saver.pt"), torch.load(tmp_path / "loader.pt")
    names = {"grouped": "GroupedExperts", "sequential": "SequentialMLP"}
    assert (saver["experts"], loader["experts"]) == (names[saved[0]], names[loaded[0]])
    # The first step after the load is the weights; the second also Adam's moments and step.
    assert loader["losses"] == pytest.approx(saver["losses"], rel=1e-5)
