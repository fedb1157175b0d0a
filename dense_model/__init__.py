"""dense_model: pretraining of dense LLMs on megatron-core where the MLP activation is a one-line change.

Map of the package:
  activations/  registry of MLP activations (torch references; fused Triton kernels in kernels/)
  config.py     typed config schema, YAML + dotted overrides, validation before any process starts
  model.py      megatron-core GPTModel from the config, MLP activation plugged in through a ModuleSpec
  parallel.py   process groups (NCCL on GPUs, gloo on the CPU)
  compat/       the CPU layer that lets megatron-core run without CUDA (inactive on GPUs)
  data/         tokenizers, RedPajama -> Megatron mmap preprocessing, dataset building
  training/     the loop, optimizer and schedule, checkpoints, logging, signals
  evaluation/   lm-eval adapter
  export/       Hugging Face export
"""

__version__ = "0.1.0"
