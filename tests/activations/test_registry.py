"""Every registered activation against an independent float64 formula, forward and gradients."""

import math
import zlib

import pytest
import torch

from dense_model.activations import build_activation, is_gated, list_activations, register_activation

SHIPPED = ["gelu", "relu", "squared_relu", "silu", "swiglu", "geglu", "reglu", "polyrelu", "polynorm"]


def _erf_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _sigmoid_silu(x):
    return x / (1.0 + torch.exp(-x))


def _rms_normalise(v, eps=1e-6):
    return v / torch.sqrt((v * v).mean(dim=-1, keepdim=True) + eps)


def formula(name, x, w=None, b=None):
    """Independent float64 definitions (docs/paper.md for PolyCom), written without our code."""
    if name in ("swiglu", "geglu", "reglu"):
        gate, up = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        inner = {"swiglu": _sigmoid_silu, "geglu": _erf_gelu, "reglu": lambda t: t.clamp(min=0)}[name]
        return inner(gate) * up
    if name == "gelu":
        return _erf_gelu(x)
    if name == "relu":
        return x.clamp(min=0)
    if name == "squared_relu":
        return x.clamp(min=0) ** 2
    if name == "silu":
        return _sigmoid_silu(x)
    if name == "polyrelu":
        r = x.clamp(min=0)
        return b[0] + w[0] * r + w[1] * r**2 + w[2] * r**3
    if name == "polynorm":
        return b[0] + w[0] * _rms_normalise(x) + w[1] * _rms_normalise(x**2) + w[2] * _rms_normalise(x**3)
    raise KeyError(name)


def test_shipped_activations_are_registered():
    assert set(SHIPPED) <= set(list_activations())
    assert {n for n in SHIPPED if is_gated(n)} == {"swiglu", "geglu", "reglu"}


@pytest.mark.parametrize("name", SHIPPED)
def test_forward_and_gradients_match_float64_formula(name):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # stable across processes
    width = 2 * 131 if is_gated(name) else 131  # ragged, not a power of two
    x = torch.randn(3, 5, width, generator=gen, dtype=torch.float32, requires_grad=True)
    act = build_activation(name)
    params = dict(act.named_parameters())
    if params:  # move the scalars off their init so every coefficient matters
        with torch.no_grad():
            act.weight.copy_(torch.tensor([0.7, -0.4, 0.25]))
            act.bias.fill_(0.1)
    y = act(x)
    grad_out = torch.randn(y.shape, generator=gen)
    y.backward(grad_out)

    x64 = x.detach().double().requires_grad_(True)
    w64 = act.weight.detach().double().requires_grad_(True) if params else None
    b64 = act.bias.detach().double().requires_grad_(True) if params else None
    ref = formula(name, x64, w64, b64)
    ref.backward(grad_out.double())

    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    if params:
        torch.testing.assert_close(act.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(act.bias.grad.double(), b64.grad, rtol=1e-5, atol=1e-4)


def test_polynorm_at_init_equals_reference_definition():
    """a_i = 1/3, a0 = 0, eps = 1e-6, over an FFN row of the 1B model's width (8256), in fp32."""
    act = build_activation("polynorm")
    assert torch.equal(act.weight.detach(), torch.full((3,), 1 / 3))
    assert torch.equal(act.bias.detach(), torch.zeros(1))
    assert act.eps == 1e-6 and act.order == 3
    x = torch.randn(4, 8256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = act(x).double()
    ref = formula("polynorm", x.double(), torch.full((3,), 1 / 3, dtype=torch.float64), torch.zeros(1))
    rel = ((y - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-6, rel


def test_statistics_in_fp32_for_half_inputs():
    """x^6 inside N(x^3) overflows fp16 (max 65504) for |x| > 6.3; fp32 statistics keep it finite."""
    x = torch.full((2, 64), 8.0)
    x[:, ::2] = -3.0
    act = build_activation("polynorm")
    y16 = act(x.half())
    assert y16.dtype == torch.float16 and torch.isfinite(y16).all()
    torch.testing.assert_close(y16.float(), act(x), rtol=2e-3, atol=2e-3)


def test_polycom_family_order_and_inner_are_configurable():
    x = torch.randn(2, 40, dtype=torch.float64)
    act = build_activation("polynorm", order=2).double()
    assert act.weight.shape == (2,) and torch.allclose(act.weight, torch.full((2,), 0.5, dtype=torch.float64))
    ref = 0.5 * _rms_normalise(x) + 0.5 * _rms_normalise(x**2)
    torch.testing.assert_close(act(x), ref)
    relu_inner = build_activation("polynorm", inner="relu", order=4).double()
    r = x.clamp(min=0)
    torch.testing.assert_close(relu_inner(x), sum(0.25 * r**i for i in range(1, 5)))


def test_bad_names_and_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown activation 'nope'.*polynorm"):
        build_activation("nope")
    with pytest.raises(ValueError, match="order"):
        build_activation("polynorm", order=0)
    with pytest.raises(ValueError, match="does not take"):
        build_activation("gelu", order=3)


def test_registry_refuses_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):

        @register_activation("gelu")
        class Another(torch.nn.Module):
            """dup"""


def test_coefficients_are_one_dimensional_so_no_weight_decay():
    for name in ("polyrelu", "polynorm"):
        assert all(p.dim() == 1 for p in build_activation(name).parameters())


def test_every_activation_file_is_imported_by_the_package():
    """A new activation is one file: the package imports every module beside the registry."""
    import pkgutil
    import sys

    import dense_model.activations as package

    files = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    for name in set(files) - {"registry", "kernels"}:
        assert f"dense_model.activations.{name}" in sys.modules, name
    defined_in = {build_activation(n).__class__.__module__.rsplit(".", 1)[1] for n in list_activations()}
    assert defined_in <= set(files) | {"_polycom"}


def test_activation_modules_from_outside_the_package():
    """model.activation_modules is imported before the name is looked up; a bad module is a clear error.
    In a fresh process, so the test activation stays out of this session's registry."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
from dense_model.config import ConfigError, load_config, resolve_vocab_size, validate
from dense_model.model import count_parameters
cfg = load_config(None, ["data.demo=true", "model.activation=test_scaled_tanh", "model.activation_modules=[tests.export.scaled_tanh_activation]"])
validate(cfg)
cfg.model.vocab_size = resolve_vocab_size(cfg)  # the demo tokenizer's
assert count_parameters(cfg.model)["total"] > 0
try:
    validate(load_config(None, ["data.demo=true", "model.activation_modules=[no_such_pkg.act]"]))
except ConfigError as err:
    print(err)
"""
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("model.activation_modules: cannot import 'no_such_pkg.act'"), (
        result.stdout
    )
