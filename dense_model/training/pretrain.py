"""Pretraining entry point: ``python -m dense_model.training.pretrain [CONFIG] [key=value ...]``.

Normally launched by ``run_pretrain.sh`` through torchrun (one process per GPU; on a CPU machine one
or more processes over gloo). The trainer builds its parts in a straight line (process groups,
tokenizer, model, DDP, optimizer, schedule, resume, data), then runs ``train_step`` until
``train_iters``; logging, validation, checkpoints and signals hang off the loop.

Relaunching the same command resumes from the run directory's latest checkpoint and continues
exactly (same data order, same losses); ``checkpoint.fresh=true`` starts over. SIGTERM (a SLURM
preemption) saves a checkpoint at the end of the current step and exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dense_model.config import ConfigError, load_config, save_config, validate
from dense_model.training.checkpointing import CheckpointError
from dense_model.training.signals import TerminationRequest

# Testing hook for the nan_policy: "loss:N" makes step N's loss NaN, "grad:N" one of its gradients.
INJECT_NAN_ENV = "DENSE_MODEL_INJECT_NAN_AT_STEP"


class TrainingDiverged(RuntimeError):
    """A NaN/Inf loss or gradient norm with nan_policy=stop; nothing was saved after it."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


def _last_stage_value(value: float | None) -> float:
    """Broadcast a number known on the last pipeline stage to every stage."""
    from megatron.core import parallel_state as ps

    t = torch.tensor([value if value is not None else 0.0], dtype=torch.float64)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            t, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
    return t.item()


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def prepare_data_config(cfg) -> None:
    """Fill data.blend/tokenizer_model for the demo (tokenised on first use, on rank 0 first)."""
    if not cfg.data.demo:
        return
    from dense_model.data.demo import prepare_demo_dataset

    work_dir = Path(os.environ.get("DENSE_MODEL_CACHE", ".cache")) / "demo_data"
    if dist.get_rank() == 0:
        prepare_demo_dataset(str(work_dir))
    dist.barrier()
    demo = prepare_demo_dataset(str(work_dir))  # cached: every rank reads the same paths
    cfg.data.blend = demo["blend"]
    cfg.data.tokenizer_model = demo["tokenizer_model"]
    cfg.data.tokenizer_type = "sentencepiece"


class Trainer:
    def __init__(self, cfg):
        from megatron.core import parallel_state as ps

        from dense_model.data.tokenizers import build_tokenizer
        from dense_model.parallel import initialize_parallel
        from dense_model.training.activation_stats import ActivationStats
        from dense_model.training.batches import batch_iterator, build_datasets
        from dense_model.training.checkpointing import load_checkpoint, read_latest_iteration
        from dense_model.training.metrics import MetricsLogger
        from dense_model.training.optim import build_scheduler, build_training_model, schedule_steps

        self.cfg = cfg
        p, t = cfg.parallel, cfg.training
        initialize_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=t.seed)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        prepare_data_config(cfg)
        if not cfg.data.tokenizer_model:
            raise ConfigError("data.tokenizer_model is not set: give the tokenizer the data was made with")
        self.tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"the tokenizer {cfg.data.tokenizer_model} has {self.tokenizer.vocab_size} tokens but "
                f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size={self.tokenizer.vocab_size}"
            )
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        self.model, self.ddp, self.optimizer = build_training_model(cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.train_iters, _ = schedule_steps(cfg)
        self.dp_size = ps.get_data_parallel_world_size()
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dp_size)

        self.state = TrainState()
        load_from = Path(cfg.checkpoint.load) if cfg.checkpoint.load else self.ckpt_dir
        if not cfg.checkpoint.fresh and read_latest_iteration(load_from) is not None:
            common = load_checkpoint(load_from, self.ddp, self.optimizer, self.scheduler)
            self.state = TrainState(
                iteration=common["iteration"],
                consumed_samples=common.get(
                    "consumed_train_samples", common["iteration"] * t.global_batch_size
                ),
                skipped_steps=common.get("skipped_steps", 0),
            )
            self._print(f"resumed from {load_from} at step {self.state.iteration}")

        self.train_ds, self.valid_ds = build_datasets(cfg, self.train_iters, self.tokenizer)
        self.train_iter = batch_iterator(self.train_ds, cfg, self.state.consumed_samples, wrap=True)
        self._batch_iterator = batch_iterator
        self.metrics = MetricsLogger(cfg, enabled=self.rank == 0)
        self.activation_stats = ActivationStats(self.model)
        self.terminate = TerminationRequest()
        n_params = sum(p.numel() for p in self.model.parameters())
        self._print(
            f"model: {cfg.model.activation}, {n_params:,} parameters on rank 0 | "
            f"TP {p.tensor_model_parallel_size} PP {p.pipeline_model_parallel_size} DP {self.dp_size} | "
            f"{self.train_iters} steps of {t.global_batch_size} x {cfg.model.seq_length} tokens | run dir {self.run_dir}"
        )

    def _print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # ----------------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float | None, bool]:
        """One optimizer step over a global batch. Returns (loss, grad_norm, applied)."""
        from dense_model.training.step import forward_backward, reduce_lm_loss

        cfg, t = self.cfg, self.cfg.training
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = forward_backward(
            [self.ddp], self.train_iter, self.num_microbatches, cfg.model.seq_length, t.micro_batch_size
        )
        loss = _last_stage_value(reduce_lm_loss(losses))
        step = self.state.iteration + 1
        if os.environ.get(INJECT_NAN_ENV) == f"loss:{step}":
            loss = float("nan")
        if os.environ.get(INJECT_NAN_ENV) == f"grad:{step}":
            self.ddp.buffers[0].grad_data[0] = float("nan")
        if _any_rank(not math.isfinite(loss)):
            return self._bad_step(step, f"loss is {loss}")
        if _any_rank(not self._local_grads_finite()):
            return self._bad_step(step, f"a gradient is NaN or Inf (loss {loss:.4f})")
        applied, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        if applied:
            self.scheduler.step(1)
        return loss, grad_norm, bool(applied)

    def _local_grads_finite(self) -> bool:
        """One reduction per gradient buffer: a NaN or Inf anywhere makes its sum non-finite.
        (With the distributed optimizer the rank that holds a bad local gradient still sees it.)"""
        total = sum(buffer.grad_data.sum(dtype=torch.float32) for buffer in self.ddp.buffers)
        return bool(torch.isfinite(total))

    def _bad_step(self, step: int, what: str):
        if self.cfg.training.nan_policy == "stop":
            raise TrainingDiverged(
                f"step {step}: {what}; stopping before the optimizer step, nothing was saved after "
                f"step {self.state.iteration}. Resume from the last checkpoint with a lower training.lr, "
                f"or set training.nan_policy=skip to skip such steps"
            )
        self._print(f"step {step}: {what}; skipping this step (training.nan_policy=skip)")
        self.state.skipped_steps += 1
        return float("nan"), None, False

    def evaluate(self) -> float | None:
        from dense_model.training.step import forward_backward, reduce_lm_loss

        if self.valid_ds is None or self.cfg.logging.eval_iters <= 0:
            return None
        t = self.cfg.training
        self.ddp.eval()
        valid_iter = self._batch_iterator(self.valid_ds, self.cfg, 0, wrap=True, num_workers=0)
        with torch.no_grad():
            losses = forward_backward(
                [self.ddp],
                valid_iter,
                self.num_microbatches * self.cfg.logging.eval_iters,
                self.cfg.model.seq_length,
                t.micro_batch_size,
                forward_only=True,
            )
        self.ddp.train()
        return _last_stage_value(reduce_lm_loss(losses))

    def save(self) -> None:
        from dense_model.training.checkpointing import save_checkpoint

        folder = save_checkpoint(
            self.ckpt_dir,
            self.state.iteration,
            self.ddp,
            self.cfg,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra={
                "consumed_train_samples": self.state.consumed_samples,
                "skipped_steps": self.state.skipped_steps,
            },
            keep_last=self.cfg.checkpoint.keep_last,
            fully_parallel=self.cfg.checkpoint.fully_parallel_save,
        )
        self._print(f"saved checkpoint {folder}")

    def tokens(self) -> int:
        return self.state.consumed_samples * self.cfg.model.seq_length

    def fit(self) -> TrainState:
        cfg, t, lg = self.cfg, self.cfg.training, self.cfg.logging
        save_every = cfg.checkpoint.save_interval
        interval_losses, interval_tokens, interval_time = [], 0, 0.0
        last_saved = self.state.iteration if self.state.iteration else None
        last_eval = None
        while self.state.iteration < self.train_iters:
            started = time.perf_counter()
            loss, grad_norm, _ = self.train_step()
            interval_time += time.perf_counter() - started  # step time only: no eval or save
            self.state.iteration += 1
            self.state.consumed_samples += t.global_batch_size
            interval_tokens += t.global_batch_size * cfg.model.seq_length
            if math.isfinite(loss):
                interval_losses.append(loss)
            step = self.state.iteration
            if step % lg.log_interval == 0 or step == self.train_iters:
                mean_loss = sum(interval_losses) / len(interval_losses) if interval_losses else float("nan")
                self.metrics.log_train(
                    step,
                    self.tokens(),
                    mean_loss,
                    self.scheduler.get_lr(self.optimizer.param_groups[0]),
                    grad_norm if grad_norm is not None else float("nan"),
                    interval_time,
                    interval_tokens,
                    self.world_size,
                    skipped=self.state.skipped_steps,
                )
                self.metrics.log_activation_stats(step, self.tokens(), self.activation_stats.read())
                interval_losses, interval_tokens, interval_time = [], 0, 0.0
            if lg.eval_interval and step % lg.eval_interval == 0:
                self._validate()
                last_eval = step
            stop = _any_rank(self.terminate.requested)
            if (save_every and step % save_every == 0) or stop:
                self.save()
                last_saved = step
            if stop:
                self._print(f"received {self.terminate.signal_name}: saved step {step} and stopping")
                return self.state
        if last_eval != self.state.iteration:
            self._validate()
        if last_saved != self.state.iteration:
            self.save()
        self._print(
            f"done: {self.state.iteration} steps, {self.tokens():,} tokens | checkpoint {self.ckpt_dir} | "
            f"metrics {self.run_dir / 'metrics.jsonl'} | TensorBoard {self.run_dir / 'tensorboard'}"
        )
        return self.state

    def _validate(self) -> None:
        val = self.evaluate()
        if val is not None:
            self.metrics.log_valid(self.state.iteration, self.tokens(), val)

    def close(self) -> None:
        self.metrics.close()


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Pretrain a dense LLM on megatron-core. CONFIG is a YAML file (configs/); "
        "overrides are dotted key=value pairs, e.g. model.activation=polynorm training.lr=3e-4.",
    )
    parser.add_argument("config", nargs="?", help="YAML config (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides.insert(0, args.config)
        args.config = None
    return args


def main(argv=None) -> int:
    from dense_model.parallel import destroy_parallel

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.fit()
    except (ConfigError, TrainingDiverged, CheckpointError, FileNotFoundError) as err:
        # Errors a user fixes (a config, a path, a diverged run): the message, without a traceback.
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
