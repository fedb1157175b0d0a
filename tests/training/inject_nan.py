"""The trainer with a NaN injected at one step, for the nan_policy tests (not a production path).

    python tests/training/inject_nan.py loss:6 CONFIG [key=value ...]   # step 6's loss is NaN
    python tests/training/inject_nan.py grad:6 CONFIG [key=value ...]   # one of step 6's gradients

Runs ``dense_model.training.pretrain.main`` with a Trainer whose forward/backward poisons the
loss or the first gradient-buffer element at that step; everything after it (the one health
all-reduce, the nan_policy) is the trainer's own code.
"""

import sys

import torch

from dense_model.training import pretrain


def nan_trainer(where: str, at_step: int):
    class NanTrainer(pretrain.Trainer):
        def _forward_backward(self):
            loss = super()._forward_backward()
            if self.state.iteration + 1 == at_step:
                if where == "loss" and loss is not None:
                    loss = torch.full_like(loss, float("nan"))
                if where == "grad":
                    self.ddp.buffers[0].grad_data[0] = float("nan")
            return loss

    return NanTrainer


if __name__ == "__main__":
    where, step = sys.argv[1].split(":")
    pretrain.Trainer = nan_trainer(where, int(step))
    sys.exit(pretrain.main(sys.argv[2:]))
