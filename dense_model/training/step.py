"""One forward/backward over a global batch with megatron-core's pipeline schedules.

``forward_step`` is what ``get_forward_backward_func()`` calls per micro-batch; the loss is the mean
over unmasked tokens of each micro-batch, averaged over micro-batches (megatron-core divides by the
token count and the micro-batch count) and over data-parallel ranks (DDP).
"""

from __future__ import annotations

from functools import partial

import torch

from dense_model.collectives import sum_over_group


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """output_tensor: per-token losses [b, s] -> (sum, token count, {"lm loss": [sum, count]})."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    total = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    reported = torch.stack([total.detach(), mask.sum().detach()])
    return total, num_tokens, {"lm loss": reported}


def forward_step(data_iterator, model):
    """Megatron's forward_step_func: one micro-batch through the model (this pipeline stage)."""
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:  # a middle pipeline stage reads no data
        tokens = position_ids = labels = loss_mask = None
    else:
        tokens = batch["tokens"]
        position_ids = batch["position_ids"]
        labels = batch["labels"]
        loss_mask = batch["loss_mask"]
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(loss_func, loss_mask)


def lm_loss(losses_reduced: list[dict]) -> torch.Tensor | None:
    """The global batch's token-mean loss (0-d tensor, not synced to the host) from the schedule's
    per-micro-batch dicts; None on the stages that are not the last (they have no loss)."""
    from megatron.core import parallel_state

    if not losses_reduced:
        return None
    stacked = torch.stack([d["lm loss"] for d in losses_reduced]).sum(dim=0)  # [sum, count]
    sum_over_group(stacked, parallel_state.get_data_parallel_group())
    return stacked[0] / stacked[1].clamp(min=1)


def reduce_lm_loss(losses_reduced: list[dict]) -> float | None:
    """``lm_loss`` as a Python number (one host sync)."""
    loss = lm_loss(losses_reduced)
    return None if loss is None else loss.item()


def forward_backward(
    model, data_iterator, num_microbatches: int, seq_length: int, micro_batch_size: int, forward_only=False
):
    """Run megatron-core's schedule for one global batch; returns the per-micro-batch loss dicts."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
