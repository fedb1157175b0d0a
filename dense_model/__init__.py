"""dense_model: pretraining of dense LLMs on megatron-core where the MLP activation is a one-line change.

Map of the package:
  activations/  registry of MLP activations (torch references; fused Triton kernels in kernels/)
  config/       typed config: schema, YAML + dotted overrides, validation before any process starts
  mlp.py        the MLP's activation module (dense MLPs and MoE experts)
  model.py      megatron-core GPTModel from the config, MLP activation plugged in through a ModuleSpec
  moe.py        mixture-of-experts layers
  parallel.py   process groups (NCCL on GPUs, gloo on the CPU)
  compat/       the CPU layer that lets megatron-core run without CUDA (inactive on GPUs)
  data/         tokenizers, RedPajama -> Megatron mmap preprocessing, dataset building
  training/     the loop, optimizer and schedule, checkpoints, logging, signals
  evaluation/   lm-eval adapter
  export/       Hugging Face export
  launcher.py   the check before launch (run_pretrain.sh): config, world size, run directory, --dry-run

The layers (what may import what) are drawn in docs/architecture.md and tested.
"""

__version__ = "0.1.0"
