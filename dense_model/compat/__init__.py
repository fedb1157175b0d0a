"""Compatibility layers. `cpu` makes megatron-core run on a machine without CUDA (tests, laptop demo)."""

from dense_model.compat.cpu import cpu_mode_active, enable_cpu_mode

__all__ = ["cpu_mode_active", "enable_cpu_mode"]
