"""Fused PolyCom kernels (dense_model/activations/kernels/polycom.py) against the torch reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (see conftest.py), so sizes stay small; row
lengths are ragged (not powers of two) and longer than the tiles in the tiled variants. bf16 runs
in the interpreter on the CPU (checked here), so 16-bit inputs are tested as bf16 and fp16.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dense_model.activations._polycom import polycom_reference
from dense_model.activations.kernels.parity import parity_inputs as inputs
from tests.activations.kernels._polycom_helpers import assert_close_rel, relative_tolerance, run

# Launch configurations: the default (1024-column chunks, up to 4 programs on the CPU), 32-column
# chunks with 3 programs (several rows per program, many chunks and a tail), and the TP code path
# (stats kernel -> apply kernel) at TP=1 with 64-column chunks and 2 programs.
CONFIGS = {
    "fused": {},
    "tiled": dict(block=32, max_programs=3),
    "split": dict(force_split=True, block=64, max_programs=2),
}


def check_parity(polycom_kernels, shape, order, dtype, inner, device, seed, config=None, **input_kw):
    cfg = polycom_kernels.PolyComKernelConfig(**(config or {}))
    x, weight, bias, grad = inputs(shape, order, dtype, device, seed, **input_kw)
    fused = run(polycom_kernels.polycom_fused, x, weight, bias, grad, inner=inner, eps=1e-6, config=cfg)
    ref = run(polycom_reference, x, weight, bias, grad, inner=inner, eps=1e-6)
    rtol = relative_tolerance(dtype)
    for name, a, e in zip(("y", "dx", "d_weight", "d_bias"), fused, ref):
        assert a.dtype == e.dtype and a.shape == e.shape, (name, a.dtype, e.dtype, a.shape, e.shape)
        assert torch.isfinite(a).all(), name
        assert_close_rel(a, e, rtol, f"{inner} {dtype} {tuple(shape)} r={order} {name}")
    return fused


@pytest.mark.parametrize("inner", ["norm", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("cols", [33, 100, 257])
def test_matches_reference(polycom_kernels, device, inner, dtype, rows, cols):
    check_parity(polycom_kernels, (rows, cols), 3, dtype, inner, device, seed=rows * 1000 + cols)


@pytest.mark.parametrize("inner", ["norm", "relu"])
@pytest.mark.parametrize("path", ["tiled", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiled_and_split_paths(polycom_kernels, device, inner, path, dtype):
    # 257 columns: 9 tiles of 32 (last one holds 1 column) / 5 tiles of 64.
    check_parity(polycom_kernels, (5, 257), 3, dtype, inner, device, seed=7, config=CONFIGS[path])


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("inner", ["norm", "relu"])
@pytest.mark.parametrize("cols", [1, 7, 77, 1000, 4097, 5504, 8256])
def test_widths_that_are_not_powers_of_two(polycom_kernels, device, cols, inner, order, path):
    """The 1B widths (8256 = 8 x 1024 + 64 at TP=1, 5504 SwiGLU-matched, 4097 = 4 x 1024 + 1) and
    ragged small ones: full chunks, a tail chunk, and rows shorter than one chunk; 2 rows in one
    program (it loops over both). Against the reference in float64: at width 1
    PolyNorm's dx is ill-conditioned (each N(x^k) is +-1 up to eps: dx is a difference of two large
    terms), and the fp32 reference itself is ~2e-5 off there, so that width gets 1e-4."""
    cfg = polycom_kernels.PolyComKernelConfig(force_split=path == "split", max_programs=1)
    x, weight, bias, grad = inputs((2, cols), order, torch.float32, device, seed=cols + order)
    fused = run(polycom_kernels.polycom_fused, x, weight, bias, grad, inner=inner, eps=1e-6, config=cfg)
    ref64 = run(polycom_reference, *(t.double() for t in (x, weight, bias, grad)), inner=inner, eps=1e-6)
    rtol = 1e-4 if cols == 1 else 1e-5
    for name, a, e in zip(("y", "dx", "d_weight", "d_bias"), fused, ref64):
        assert a.dtype == torch.float32 and a.shape == e.shape, name
        assert_close_rel(a, e, rtol, f"{inner} width {cols} r={order} {path} {name}")


def test_coefficient_gradients_are_deterministic(polycom_kernels, device):
    """Per-program partials summed in a fixed order: the same bits on every call."""
    x, weight, bias, grad = inputs((5, 130), 3, torch.float32, device, seed=21)
    cfg = polycom_kernels.PolyComKernelConfig(block=64, max_programs=2)
    for inner in ("norm", "relu"):
        first = run(polycom_kernels.polycom_fused, x, weight, bias, grad, inner=inner, config=cfg)
        again = run(polycom_kernels.polycom_fused, x, weight, bias, grad, inner=inner, config=cfg)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("inner", ["norm", "relu"])
@pytest.mark.parametrize("order", [1, 2, 4, 5])
def test_orders(polycom_kernels, device, inner, order):
    check_parity(polycom_kernels, (3, 100), order, torch.float32, inner, device, seed=order)


@pytest.mark.parametrize("inner", ["norm", "relu"])
def test_leading_dims_and_non_contiguous_input(polycom_kernels, device, inner):
    # [s, b, f] like megatron's MLP input, taken as a transposed (non-contiguous) view.
    x, weight, bias, grad = inputs((2, 5, 67), 3, torch.float32, device, seed=3)
    x_t = x.transpose(0, 1)  # [5, 2, 67], non-contiguous
    grad_t = grad.transpose(0, 1)
    assert not x_t.is_contiguous()
    cfg = polycom_kernels.PolyComKernelConfig()
    fused = run(polycom_kernels.polycom_fused, x_t, weight, bias, grad_t, inner=inner, config=cfg)
    ref = run(polycom_reference, x_t, weight, bias, grad_t, inner=inner)
    for name, a, e in zip(("y", "dx", "d_weight", "d_bias"), fused, ref):
        assert a.shape == e.shape
        assert_close_rel(a, e, 1e-5, name)


@pytest.mark.parametrize("inner", ["norm", "relu"])
def test_bf16_parameters(polycom_kernels, device, inner):
    """Megatron's Float16Module casts the scalars to bf16: grads come back in bf16."""
    _, _, dw, db = check_parity(
        polycom_kernels, (3, 100), 3, torch.bfloat16, inner, device, seed=11, param_dtype=torch.bfloat16
    )
    assert dw.dtype == torch.bfloat16 and db.dtype == torch.bfloat16


@pytest.mark.parametrize("inner", ["norm", "relu"])
def test_fp16_large_inputs_keep_fp32_statistics(polycom_kernels, device, inner):
    """|x| up to ~30 in fp16: x^6 (inside N(x^3)) is far beyond fp16's 65504; fp32 stats stay finite."""
    x, weight, bias, grad = inputs((3, 100), 3, torch.float16, device, seed=5, scale=10.0)
    assert x.float().abs().max() ** 6 > 65504
    if inner == "norm":
        check_parity(polycom_kernels, (3, 100), 3, torch.float16, inner, device, seed=5, scale=10.0)
    else:  # relu(x)^3 alone overflows fp16 only beyond ~40; keep the check to parity
        check_parity(polycom_kernels, (3, 100), 3, torch.float16, inner, device, seed=5, scale=3.0)


@pytest.mark.parametrize("inner", ["norm", "relu"])
def test_fp32_against_float64_reference(polycom_kernels, device, inner):
    """fp32 kernels against the reference evaluated in float64 (the oracle's own rounding excluded)."""
    x, weight, bias, grad = inputs((3, 257), 3, torch.float32, device, seed=13)
    fused = run(polycom_kernels.polycom_fused, x, weight, bias, grad, inner=inner)
    ref64 = run(polycom_reference, x.double(), weight.double(), bias.double(), grad.double(), inner=inner)
    for name, a, e in zip(("y", "dx", "d_weight", "d_bias"), fused, ref64):
        assert_close_rel(a, e, 1e-5, name)


def test_empty_input(polycom_kernels, device):
    for inner in ("norm", "relu"):
        x, weight, bias, grad = inputs((0, 33), 3, torch.float32, device, seed=1)
        y, dx, dw, db = run(polycom_kernels.polycom_fused, x, weight, bias, grad, inner=inner)
        assert y.shape == (0, 33) and dx.shape == (0, 33)
        assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


def test_rejects_bad_arguments(polycom_kernels, device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="inner"):
        polycom_kernels.polycom_fused(x, torch.ones(3), torch.zeros(1), inner="gelu")
    with pytest.raises(ValueError, match="bias"):
        polycom_kernels.polycom_fused(x, torch.ones(3), torch.zeros(2), inner="norm")


def test_registry_wires_the_fused_function(polycom_kernels):
    from dense_model.activations import get_activation_entry

    for name in ("polynorm", "polyrelu"):
        assert get_activation_entry(name).fused() is polycom_kernels.polycom_fused


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_package_import_does_not_import_triton_and_falls_back_without_it():
    """The kernels package is importable without Triton; without Triton the registry gets None."""
    code = """
import sys
import dense_model.activations.kernels
assert "triton" not in sys.modules, "importing the kernels package imported triton"

class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton hidden by the test")
        return None

sys.meta_path.insert(0, _NoTriton())
from dense_model.activations import build_activation, get_activation_entry
assert get_activation_entry("polynorm").fused() is None
import torch
act = build_activation("polynorm")
assert act(torch.randn(2, 10)).shape == (2, 10)
print("ok")
"""
    proc = _python(code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
