"""A quiet start: filter, once, the named third-party warnings that are harmless here.

Each entry names one exact message (a regex anchored at its start) and the module that warns it,
with the reason it is harmless; anything else still shows. No blanket filter.
"""

from __future__ import annotations

import warnings

# (message regex, category, warning module regex, why it is harmless)
# megatron-core warns these at import or build time on a machine without Transformer Engine or
# Apex, once per module (seven lines before any of ours on the demo); its torch fallbacks are
# what the CPU and the tests run.
KNOWN_HARMLESS: list[tuple[str, type[Warning], str, str]] = [
    (
        r"Transformer Engine and Apex are not installed\. Falling back to local implementations of "
        r"multi_tensor_applier",
        UserWarning,
        r"megatron",  # megatron.core.* and its vendored megatron_fsdp
        "torch's multi-tensor ops are used instead",
    ),
    (
        r"Transformer Engine and Apex are not installed\. Falling back to Torch optimizers\.",
        UserWarning,
        r"megatron\.core\.optimizer",
        "torch's AdamW is used instead of the fused one",
    ),
    (
        r"Apex is not installed\. Falling back to Torch Norm",
        UserWarning,
        r"megatron\.core\.models\.",
        "the local layer spec uses torch's RMSNorm",
    ),
    (
        r"full scope is deprecated\. Use empty cuda_graph_scope to capture the whole layer\.",
        UserWarning,
        r"megatron\.core\.transformer\.transformer_config",
        "megatron-core's own default value triggers it; CUDA graphs are not used",
    ),
]


def filter_known_warnings() -> None:
    for message, category, module, _why in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
