"""The trainer with a NaN injected at one step, for the nan_policy tests (not a production path):
``nan_trainer(where, step)`` makes a Trainer whose forward/backward poisons the loss ("loss") or
the first gradient-buffer element ("grad") at that step; everything after it (the one health
all-reduce, the nan_policy) is the trainer's own code. Used through
``pretrain_jobs.train_in_workers(..., trainer=partial(nan_trainer, where, step))``.
"""

import torch


def nan_trainer(where: str, at_step: int, base):
    class NanTrainer(base):
        def _forward_backward(self):
            loss = super()._forward_backward()
            if self.state.iteration + 1 == at_step:
                if where == "loss" and loss is not None:
                    loss = torch.full_like(loss, float("nan"))
                if where == "grad":
                    self.ddp.buffers[0].grad_data[0] = float("nan")
            return loss

    return NanTrainer
