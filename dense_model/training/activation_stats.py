"""What the MLP activation learns and sees, logged every log interval.

Per layer: the activation's own parameters (PolyCom: a0..ar), the RMS of its input and of its
output, and the fraction of input elements with |x| > 6 sigma (sigma = the RMS of that call's
input, close to the standard deviation of a pre-activation whose mean is near zero).

Forward hooks on the model's ``RegistryActivation`` modules add each training forward's sums into
one small tensor on the model's device; nothing is read back until ``read()`` at a log step, which
copies that tensor and the coefficients to the host in one transfer (no per-step, per-layer sync).
Values are those of the logging rank: its data-parallel shard, its tensor-parallel slice of the
FFN, and (with pipeline parallelism) the layers of its stage.
"""

from __future__ import annotations

import torch

from dense_model.model import RegistryActivation

OUTLIER_SIGMAS = 6.0
IN_SQ, OUT_SQ, OUTLIERS, ELEMENTS, OUT_ELEMENTS = range(5)


def _layer_index(module_name: str, model) -> int | None:
    """Global layer index from a module name 'decoder.layers.N....' (PP stages number from 0)."""
    parts = module_name.split(".")
    for i in range(len(parts) - 2):
        if parts[i] == "decoder" and parts[i + 1] == "layers" and parts[i + 2].isdigit():
            return model.decoder.layers[int(parts[i + 2])].layer_number - 1
    return None


def _coefficients(module) -> list[tuple[list[str], torch.nn.Parameter]]:
    """(element names, parameter) pairs: PolyCom's bias and weight are a0 and a1..ar; any other
    activation parameter is logged as name[i]."""
    params = dict(module.named_parameters())
    if set(params) == {"act.bias", "act.weight"} and params["act.bias"].numel() == 1:
        order = params["act.weight"].numel()
        return [(["a0"], params["act.bias"]), ([f"a{i}" for i in range(1, order + 1)], params["act.weight"])]
    return [([f"{name}[{i}]" for i in range(p.numel())], p) for name, p in params.items()]


class ActivationStats:
    """Hooks every RegistryActivation of ``model``; ``read()`` returns and resets the statistics."""

    def __init__(self, model):
        unwrapped = getattr(model, "module", model)
        self.layers: list[tuple[int, torch.nn.Module]] = []
        for name, module in unwrapped.named_modules():
            if isinstance(module, RegistryActivation):
                layer = _layer_index(name, unwrapped)
                self.layers.append((layer if layer is not None else len(self.layers), module))
        self._sums: torch.Tensor | None = None  # [layers, 5] float64 on the activations' device
        self._handles = [
            module.register_forward_hook(self._hook(i)) for i, (_, module) in enumerate(self.layers)
        ]

    def _hook(self, index: int):
        def hook(module, inputs, output):
            if not module.training:  # validation forwards are not counted
                return
            with torch.no_grad():
                x = inputs[0].detach().float()  # [s, b, ffn/tp] (gated: [s, b, 2*ffn/tp])
                y = output.detach().float()  # [s, b, ffn/tp]
                in_sq = x.square().sum()
                sigma = (in_sq / x.numel()).sqrt()
                outliers = (x.abs() > OUTLIER_SIGMAS * sigma).sum()
                if self._sums is None:
                    self._sums = torch.zeros(len(self.layers), 5, dtype=torch.float64, device=x.device)
                row = torch.stack(
                    [
                        in_sq.double(),
                        y.square().sum().double(),
                        outliers.double(),
                        torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
                        torch.tensor(float(y.numel()), dtype=torch.float64, device=x.device),
                    ]
                )
                self._sums[index] += row

        return hook

    def read(self) -> dict[str, float]:
        """``layer{L}/{a0.., in_rms, out_rms, outlier_frac}`` since the last read (one host transfer)."""
        coefficients = [(layer, _coefficients(module)) for layer, module in self.layers]
        sums = self._sums
        if sums is None:  # no training forward since the start
            sums = torch.zeros(len(self.layers), 5, dtype=torch.float64)
        params = [
            p.detach().double().flatten().to(sums.device) for _, pairs in coefficients for _, p in pairs
        ]
        host = torch.cat([sums.flatten(), *params]).tolist()
        out: dict[str, float] = {}
        for i, (layer, _) in enumerate(self.layers):
            s = host[i * 5 : (i + 1) * 5]
            if s[ELEMENTS] > 0:
                out[f"layer{layer}/in_rms"] = (s[IN_SQ] / s[ELEMENTS]) ** 0.5
                out[f"layer{layer}/out_rms"] = (s[OUT_SQ] / s[OUT_ELEMENTS]) ** 0.5
                out[f"layer{layer}/outlier_frac"] = s[OUTLIERS] / s[ELEMENTS]
        values = iter(host[len(self.layers) * 5 :])
        for layer, pairs in coefficients:
            for names, _ in pairs:
                for name in names:
                    out[f"layer{layer}/{name}"] = next(values)
        sums.zero_()
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
