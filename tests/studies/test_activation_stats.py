"""Activation statistics and PolyCom coefficients from forward hooks, against a hand computation."""

import math

import pytest
import torch

from dense_model.model import RegistryActivation
from dense_model.training.activation_stats import ActivationStats


class _Layer(torch.nn.Module):
    """The attribute path megatron-core's GPT layers have: .layer_number and .mlp.activation_func."""

    def __init__(self, layer_number: int, activation: str):
        super().__init__()
        self.layer_number = layer_number
        self.mlp = torch.nn.Module()
        self.mlp.activation_func = RegistryActivation(None, activation, {}, fused=False)


def _model(activation: str) -> torch.nn.Module:
    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList([_Layer(1, activation), _Layer(2, activation)])
    return model


def test_stats_and_coefficients_match_a_hand_computation():
    torch.manual_seed(0)
    model = _model("polynorm")
    act = [layer.mlp.activation_func for layer in model.decoder.layers]
    with torch.no_grad():
        act[1].act.weight.copy_(torch.tensor([0.5, 0.25, 0.125]))
        act[1].act.bias.fill_(-0.75)
    stats = ActivationStats(model)
    assert [layer for layer, _ in stats.layers] == [0, 1]

    inputs = [torch.randn(8, 2, 16), torch.randn(8, 2, 16)]  # [s, b, ffn], two training forwards
    inputs[1][0, 0, :3] = torch.tensor([40.0, -50.0, 60.0])  # three outliers in the second call
    outputs = [act[1](x) for x in inputs]
    act[1].eval()
    act[1](100 * torch.randn(8, 2, 16))  # validation forwards are not counted
    act[1].train()

    values = stats.read()
    x = torch.cat([t.flatten() for t in inputs]).double()
    y = torch.cat([t.detach().flatten() for t in outputs]).double()
    expected_outliers = sum(int((t.abs() > 6 * t.square().mean().sqrt()).sum()) for t in inputs)
    assert expected_outliers == 3
    assert values["layer1/in_rms"] == pytest.approx(math.sqrt(float(x.square().mean())), rel=1e-6)
    assert values["layer1/out_rms"] == pytest.approx(math.sqrt(float(y.square().mean())), rel=1e-6)
    assert values["layer1/outlier_frac"] == pytest.approx(3 / x.numel())
    assert [values[f"layer1/a{i}"] for i in range(4)] == [-0.75, 0.5, 0.25, 0.125]
    assert [values[f"layer0/a{i}"] for i in range(4)] == pytest.approx([0.0, 1 / 3, 1 / 3, 1 / 3])
    assert "layer0/in_rms" not in values  # layer 0 saw no forward

    again = stats.read()  # the sums were reset by the read
    assert "layer1/in_rms" not in again and again["layer1/a0"] == -0.75


def test_an_activation_without_parameters_logs_only_statistics():
    model = _model("gelu")
    stats = ActivationStats(model)
    model.decoder.layers[0].mlp.activation_func(torch.ones(4, 1, 8))
    values = stats.read()
    assert values == {
        "layer0/in_rms": pytest.approx(1.0),
        "layer0/out_rms": pytest.approx(torch.nn.functional.gelu(torch.tensor(1.0)).item()),
        "layer0/outlier_frac": 0.0,
    }
