"""Hugging Face export of dense_model checkpoints (see hf.py; CLI: toolkits/checkpoint_conversion/export_hf.py).

configuration_dense_model.py and modeling_dense_model.py are the standalone files written into an
exported folder for activations other than SwiGLU (``trust_remote_code``), next to copies of the
activation's own source (``hf.remote_code_files``); they import torch and transformers, never
dense_model, so modeling_dense_model.py is imported from an exported folder, not from here.
"""

from dense_model.export.hf import ExportError, convert_state_dict, export_hf, hf_config

__all__ = ["ExportError", "convert_state_dict", "export_hf", "hf_config"]
