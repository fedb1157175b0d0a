"""The training loop on megatron-core: step, optimizer and schedule, checkpoints, logging, signals.

Entry point: ``python -m dense_model.training.pretrain CONFIG [key=value ...]`` (run_pretrain.sh).
"""
