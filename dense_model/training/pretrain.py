"""Pretraining entry point: ``python -m dense_model.training.pretrain [CONFIG] [key=value ...]``.

Normally launched by ``run_pretrain.sh`` through torchrun (one process per GPU; on a CPU machine one
or more processes over gloo). The trainer builds its parts in a straight line (process groups,
tokenizer, model, DDP, optimizer, schedule, resume, data), then runs ``train_step`` until
``train_iters``; logging, validation, checkpoints and signals hang off the loop.

Relaunching the same command resumes from the run directory's latest checkpoint and continues
exactly (same data order, same losses, dropout included); ``checkpoint.fresh=true`` starts over.
``checkpoint.load`` starts a run that has no checkpoint of its own from another one, continuing it
(``checkpoint.load_mode=resume``) or from its weights at step 0 (``weights``); see
``checkpoint.layout.plan_load``.
SIGTERM (a SLURM preemption) saves a checkpoint at the end of the current step and exits 0.

A job lives and dies as one: each worker is SIGKILLed when its torchrun agent dies
(``procutil.die_with_parent``), and global rank 0 holds the run directory's claim
(``run_lock.RunDirClaim``) from before anything is written there until it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dense_model import collectives
from dense_model.checkpoint import (
    CheckpointError,
    finish_param_gather,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from dense_model.checkpoint.layout import LoadPlan, plan_run_load
from dense_model.compat.quiet import filter_known_warnings
from dense_model.config import (
    Config,
    ConfigError,
    load_config,
    moe_enabled,
    resolve_vocab_size,
    save_config,
    split_config_argument,
    validate,
)
from dense_model.data.demo import demo_work_dir, prepare_demo_dataset
from dense_model.data.tokenizers import build_tokenizer
from dense_model.data.validation_sets import build_validation_set, resolve_validation_sets
from dense_model.parallel import destroy_parallel, initialize_parallel_from
from dense_model.procutil import die_with_parent, is_torchrun_agent
from dense_model.training.activation_stats import ActivationStats
from dense_model.training.batches import batch_iterator, build_datasets
from dense_model.training.manual_gc import ManualGC, manual_gc_wanted
from dense_model.training.metrics import MetricsLogger
from dense_model.training.optim import (
    adopt_schedule,
    build_scheduler,
    build_training_model,
    group_settings,
    schedule_in_force,
    schedule_steps,
)
from dense_model.training.run_lock import RunDirBusy, RunDirClaim, RunDirLost
from dense_model.training.signals import TerminationRequest
from dense_model.training.step import forward_backward, lm_loss, reduce_lm_loss

# The worker's pid, for the helper processes it spawns (see below).
WORKER_PID_ENV = "DENSE_MODEL_TRAINING_WORKER_PID"
# For tests that kill a job at a known point: after this step (logged, and saved if it is a save
# step) every rank says so and waits until it is killed, so no later step or save can race the kill.
HOLD_AFTER_STEP_ENV = "DENSE_MODEL_DEBUG_HOLD_AFTER_STEP"

# A helper process the worker spawns (dist_checkpointing's multiprocessing Manager) re-imports this
# module as __mp_main__ before it starts: it dies with the worker, as the worker dies with torchrun.
if __name__ == "__mp_main__" and WORKER_PID_ENV in os.environ:
    if not die_with_parent(int(os.environ[WORKER_PID_ENV])):
        os._exit(1)


class TrainingDiverged(RuntimeError):
    """A NaN/Inf loss or gradient norm with nan_policy=stop; nothing was saved after it."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


def prepare_data_config(cfg: Config) -> None:
    """Fill data.blend/tokenizer_model for the demo (tokenised on first use, on rank 0 first)."""
    if not cfg.data.demo:
        return

    work_dir = demo_work_dir()
    if collectives.rank() == 0:
        prepare_demo_dataset(str(work_dir))
    collectives.barrier()
    demo = prepare_demo_dataset(str(work_dir))  # cached: every rank reads the same paths
    cfg.data.blend = demo["blend"]
    cfg.data.tokenizer_model = demo["tokenizer_model"]
    cfg.data.tokenizer_type = "sentencepiece"


class Trainer:
    def __init__(self, cfg: Config, claim: RunDirClaim | None = None):
        from megatron.core import parallel_state as ps

        self.cfg, self.claim = cfg, claim  # claim: rank 0's hold on the run directory
        p, t = cfg.parallel, cfg.training
        tasks = load_downstream_tasks(cfg)  # before anything is written: a task that cannot build stops here
        initialize_parallel_from(p, seed=t.seed)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        prepare_data_config(cfg)
        if not cfg.data.tokenizer_model:
            raise ConfigError("data.tokenizer_model is not set: give the tokenizer the data was made with")
        self.tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
        # The tokenizer's vocabulary unless set (then at least that): the saved config holds the number.
        cfg.model.vocab_size = resolve_vocab_size(cfg, self.tokenizer.vocab_size)
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
        # Each schedule change of the run: {"step", "changes": {name: [old, new]}} (checkpoint metadata).
        self.schedule_history: list[dict] = []
        self._schedule_change: dict | None = None  # this job's, logged once metrics.jsonl is open
        self._load(plan_job_load(cfg))

        self.train_ds, self.valid_ds = build_datasets(cfg, self.train_iters, self.tokenizer)
        self.valid_sets = self._build_validation_sets()
        self.train_iter = batch_iterator(
            self.train_ds, cfg, self.state.consumed_samples, wrap=True, filter_repeats=True
        )
        self._batch_iterator = batch_iterator
        self.metrics = MetricsLogger(cfg, enabled=self.rank == 0, resumed_from=self.state.iteration)
        if self._schedule_change:
            # Stamped with the first step it applies to: a relaunch from the same checkpoint sets it
            # aside with that attempt's records and logs it again, so the run's file holds it once.
            self.metrics.log_event(
                {"step": self.state.iteration + 1, "event": "schedule_change", **self._schedule_change}
            )
        self.lr_used = self.optimizer.param_groups[0]["lr"]  # the last step's (metrics.jsonl)
        self.moe_monitor = None
        if moe_enabled(cfg.model):
            from dense_model.moe import MoEMonitor

            self.moe_monitor = MoEMonitor(self.model, cfg)
        self.activation_stats = ActivationStats(self.model)
        self.downstream = None
        if tasks:
            from dense_model.training.downstream import InLoopEvaluator

            self.downstream = InLoopEvaluator(cfg, self.model, self.tokenizer, tasks)
        self.downstream_seconds = 0.0  # this job's in-loop evaluations, for their share of wall time
        self.terminate = TerminationRequest()
        device_type = next(self.model.parameters()).device.type
        self.gc = ManualGC(manual_gc_wanted(t.manual_gc, device_type), t.manual_gc_interval)
        self.hold_after_step = int(os.environ.get(HOLD_AFTER_STEP_ENV, "0") or 0)
        n_params = sum(p.numel() for p in self.model.parameters())
        self._print(
            f"model: {cfg.model.activation}, {n_params:,} parameters on rank 0 | "
            f"TP {p.tensor_model_parallel_size} PP {p.pipeline_model_parallel_size} DP {self.dp_size} | "
            f"{self.train_iters} steps of {t.global_batch_size} x {cfg.model.seq_length} tokens | run dir {self.run_dir}"
            # On the CPU the bits of the losses depend on the thread count (docs/safety.md): say it.
            + (f" | {torch.get_num_threads()} CPU threads per rank" if device_type == "cpu" else "")
        )

    def _load(self, plan: LoadPlan) -> None:
        """Load what ``plan`` names (every rank) and say so in one line (rank 0)."""
        if plan.note:
            self._print(plan.note)
        if plan.folder is None:
            return
        if plan.mode == "weights":
            load_checkpoint(plan.folder, self.ddp, load_rng=False)
            # With bf16 the optimizer holds fp32 main copies of the parameters made when it was
            # built: refresh them from the loaded weights (as Megatron-LM does for --finetune), or
            # the first step would write the initialisation back.
            self.optimizer.reload_model_params()
            self._print(
                f"loaded the model weights of {plan.folder} (its step {plan.iteration}; load_mode=weights): "
                "training starts at step 0 with a fresh optimizer, schedule and data position"
            )
            return
        settings = group_settings(self.optimizer)  # this config's, before the checkpoint's are loaded
        common = load_checkpoint(plan.folder, self.ddp, self.optimizer, self.scheduler)
        t = self.cfg.training
        self.state = TrainState(
            iteration=common["iteration"],
            consumed_samples=common.get("consumed_train_samples", common["iteration"] * t.global_batch_size),
            skipped_steps=common.get("skipped_steps", 0),
        )
        source = (
            "its own checkpoint" if plan.source == "own" else f"checkpoint.load={self.cfg.checkpoint.load}"
        )
        self._print(
            f"resumed from {plan.folder} at step {self.state.iteration} ({source}; load_mode=resume: "
            "step, optimizer, schedule and data position continue)"
        )
        self.schedule_history = list(read_metadata(plan.folder).get("schedule_history", []))
        changes = adopt_schedule(self.optimizer, self.scheduler, common.get("scheduler"), settings)
        if changes:
            step = self.state.iteration
            self._schedule_change = {"resumed_from": step, "changes": changes}
            self.schedule_history.append({"step": step, "changes": changes})
            said = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changes.items())
            self._print(
                f"schedule changed since the checkpoint of step {step}: {said}; the config's schedule "
                f"applies from step {step + 1} (lr {self.optimizer.param_groups[0]['lr']:.4g} there)"
            )

    def _print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # ----------------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float | None, bool]:
        """One optimizer step over a global batch. Returns (loss, grad_norm, applied)."""
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._forward_backward()
        step = self.state.iteration + 1
        # One all-reduce (one host sync) for the step's health: every rank learns whether the loss
        # (known on the last pipeline stage) or any rank's local gradients are NaN/Inf, and the loss.
        loss_bad, grad_bad, loss = collectives.all_reduce_max_tensor(self._step_health(loss)).tolist()
        if loss_bad:
            return self._bad_step(step, "the loss is NaN or Inf")
        if grad_bad:
            return self._bad_step(step, f"a gradient is NaN or Inf (loss {loss:.4f})")
        self.lr_used = self.optimizer.param_groups[0]["lr"]  # this step's, set by the scheduler
        applied, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        if applied:
            self.scheduler.step(1)
        return loss, grad_norm, bool(applied)

    def _forward_backward(self) -> torch.Tensor | None:
        """Forward and backward over the global batch: the token-mean loss (a 0-d tensor on the
        last pipeline stage, None elsewhere); the gradients are in the DDP buffers."""
        t = self.cfg.training
        losses = forward_backward(
            [self.ddp], self.train_iter, self.num_microbatches, self.cfg.model.seq_length, t.micro_batch_size
        )
        return lm_loss(losses)

    def _filtered_instances(self) -> int:
        """Train samples the repetition filter masked since the last call, over data-parallel ranks
        (every rank of a DP group reads the same samples, so one DP group's sum is the total)."""
        from megatron.core import parallel_state as ps

        n = torch.tensor([float(self.train_iter.take_filtered())])
        collectives.sum_over_group(n, ps.get_data_parallel_group())
        return int(n.item())

    def _step_health(self, loss: torch.Tensor | None) -> torch.Tensor:
        """[loss is NaN/Inf, a local gradient is NaN/Inf, the loss or -inf], float64, on the GPU/CPU.
        A NaN or Inf anywhere in a gradient buffer makes its sum non-finite (with the distributed
        optimizer the rank that holds a bad local gradient still sees it)."""
        grad_sum = sum(buffer.grad_data.sum(dtype=torch.float32) for buffer in self.ddp.buffers)
        grad_bad = torch.isfinite(grad_sum).logical_not().double()
        if loss is None:  # not the last pipeline stage
            loss_bad, value = torch.zeros_like(grad_bad), torch.full_like(grad_bad, -math.inf)
        else:
            loss = loss.double().to(grad_bad.device)
            loss_bad = torch.isfinite(loss).logical_not().double()
            value = torch.where(loss_bad > 0, torch.full_like(loss, -math.inf), loss)
        return torch.stack([loss_bad, grad_bad, value])

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
        if self.valid_ds is None or self.cfg.logging.eval_iters <= 0:
            return None
        return self._forward_only_loss(self.valid_ds, self.cfg.logging.eval_iters)

    def evaluate_sets(self) -> dict[str, float]:
        """{name: token-mean loss} over each named validation set's evaluated samples (the same
        ones at every evaluation, from its first sample, DP-sharded); {} without named sets."""
        if self.cfg.logging.eval_iters <= 0:
            return {}
        global_batch = self.cfg.training.global_batch_size
        return {
            name: self._forward_only_loss(dataset, samples // global_batch)
            for name, (dataset, samples) in self.valid_sets.items()
        }

    def _forward_only_loss(self, dataset, batches: int) -> float:
        """The token-mean loss of ``batches`` global batches of ``dataset`` from its first sample,
        on every rank; the model in eval mode (no dropout), the MoE monitor paused."""
        t = self.cfg.training
        self.ddp.eval()
        valid_iter = self._batch_iterator(dataset, self.cfg, 0, wrap=True, num_workers=0)
        paused = self.moe_monitor.paused() if self.moe_monitor else contextlib.nullcontext()
        with torch.no_grad(), paused:
            losses = forward_backward(
                [self.ddp],
                valid_iter,
                self.num_microbatches * batches,
                self.cfg.model.seq_length,
                t.micro_batch_size,
                forward_only=True,
            )
        self.ddp.train()
        return collectives.broadcast_from_last_stage(reduce_lm_loss(losses))

    def _build_validation_sets(self) -> dict:
        """{name: (GPTDataset, samples scored per evaluation)} for data.validation_sets, built after
        the training data (their own index caches: the training order does not change)."""
        cfg = self.cfg
        d, t = cfg.data, cfg.training
        sets = resolve_validation_sets(d.validation_sets)
        return {
            name: build_validation_set(
                prefixes,
                weights,
                tokenizer=self.tokenizer,
                seq_length=cfg.model.seq_length,
                seed=t.seed if t.data_seed is None else t.data_seed,
                global_batch_size=t.global_batch_size,
                eval_iters=cfg.logging.eval_iters,
                cache_dir=d.cache_dir or str(self.run_dir / "data_cache"),
                eod_mask_loss=t.eod_mask_loss,
            )
            for name, (prefixes, weights) in sets.items()
        }

    def save(self) -> None:
        if collectives.any_rank(self.claim is not None and not self.claim.verify()):  # every rank
            raise RunDirLost("this job no longer holds its run directory: stopped without saving")
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
            keep_every=self.cfg.checkpoint.keep_every,
            fully_parallel=self.cfg.checkpoint.fully_parallel_save,
            record={
                "schedule": schedule_in_force(self.optimizer, self.scheduler),
                "schedule_history": self.schedule_history,
            },
        )
        self._print(f"saved checkpoint {folder}")

    def tokens(self) -> int:
        return self.state.consumed_samples * self.cfg.model.seq_length

    def fit(self) -> TrainState:
        """Train to ``train_iters`` (or a stop request). With ``training.manual_gc`` the automatic
        garbage collector is off inside, and on again however the loop ends (an exception too)."""
        with self.gc:
            return self._fit()

    def _fit(self) -> TrainState:
        cfg, t, lg = self.cfg, self.cfg.training, self.cfg.logging
        save_every = cfg.checkpoint.save_interval
        interval_losses, interval_tokens, interval_time, interval_steps = [], 0, 0.0, 0
        last_saved = self.state.iteration if self.state.iteration else None
        last_eval = None
        last_downstream = (
            self.state.iteration
        )  # a resumed step was scored (or not) by the job that trained it
        self._fit_started = time.perf_counter()
        in_loop = cfg.evaluation.in_loop
        while self.state.iteration < self.train_iters:
            started = time.perf_counter()
            loss, grad_norm, _ = self.train_step()
            interval_time += time.perf_counter() - started  # step time only: no eval or save
            self.state.iteration += 1
            interval_steps += 1
            self.state.consumed_samples += t.global_batch_size
            interval_tokens += t.global_batch_size * cfg.model.seq_length
            if math.isfinite(loss):
                interval_losses.append(loss)
            step = self.state.iteration
            if step % lg.log_interval == 0 or step == self.train_iters:
                mean_loss = sum(interval_losses) / len(interval_losses) if interval_losses else float("nan")
                router = (  # collective: every rank
                    self.moe_monitor.metrics(interval_steps, self.num_microbatches)
                    if self.moe_monitor
                    else None
                )
                if cfg.data.repetition_filter.enabled:  # collective: every rank
                    router = {**(router or {}), "filtered_instances": self._filtered_instances()}
                self.metrics.log_train(
                    step,
                    self.tokens(),
                    mean_loss,
                    self.lr_used,  # what the step's update used (the scheduler has moved on)
                    grad_norm if grad_norm is not None else float("nan"),
                    interval_time,
                    interval_tokens,
                    self.world_size,
                    skipped=self.state.skipped_steps,
                    extra=router,
                )
                self.metrics.log_activation_stats(step, self.tokens(), self.activation_stats.read())
                interval_losses, interval_tokens, interval_time, interval_steps = [], 0, 0.0, 0
            if lg.eval_interval and step % lg.eval_interval == 0:
                self._validate()
                last_eval = step
            if self.downstream and step % in_loop.interval == 0:
                self._evaluate_downstream()
                last_downstream = step
            stop = collectives.any_rank(self.terminate.requested or bool(self.claim and self.claim.lost()))
            if (save_every and step % save_every == 0) or stop:
                self._save()
                last_saved = step
            if stop:
                why = f"received {self.terminate.signal_name}" if self.terminate.requested else "claim lost"
                self._print(f"{why}: saved step {step} and stopping")
                return self.state
            self.gc.step(step)
            if step == self.hold_after_step:
                self._print(f"holding after step {step} ({HOLD_AFTER_STEP_ENV}) until killed")
                while True:
                    time.sleep(60)
        if last_eval != self.state.iteration:
            self._validate()
        # the last step too, unless scored already or this job trained nothing (a relaunch of a
        # finished run: its record is there from the job that trained it)
        if self.downstream and last_downstream != self.state.iteration:
            self._evaluate_downstream()
        if last_saved != self.state.iteration:
            self._save()
        self._print(
            f"done: {self.state.iteration} steps, {self.tokens():,} tokens | checkpoint {self.ckpt_dir} | "
            f"metrics {self.run_dir / 'metrics.jsonl'} | TensorBoard {self.run_dir / 'tensorboard'}"
        )
        return self.state

    def _validate(self) -> None:
        with self.gc.around():
            val = self.evaluate()
            named = self.evaluate_sets()
        if val is not None:
            self.metrics.log_valid(self.state.iteration, self.tokens(), val)
        if named:
            self.metrics.log_valid_sets(self.state.iteration, self.tokens(), named)

    def _evaluate_downstream(self) -> None:
        """Score evaluation.in_loop's tasks on the live model (every rank) and log them with the time
        it took and the share of this job's wall time its in-loop evaluations took so far."""
        started = time.perf_counter()
        paused = self.moe_monitor.paused() if self.moe_monitor else contextlib.nullcontext()
        with self.gc.around(), paused:  # MoE: the router statistics count training forwards only
            finish_param_gather(self.ddp)  # overlap_param_gather: the forward needs this step's weights
            values = self.downstream.evaluate()
        seconds = time.perf_counter() - started
        self.downstream_seconds += seconds
        wall = time.perf_counter() - self._fit_started
        self.metrics.log_downstream(
            self.state.iteration, self.tokens(), values, seconds, self.downstream_seconds / max(wall, 1e-9)
        )

    def _save(self) -> None:
        with self.gc.around():
            self.save()

    def close(self) -> None:
        self.metrics.close()


def load_downstream_tasks(cfg: Config) -> dict | None:
    """evaluation.in_loop's lm-eval tasks, built (None when off); a ConfigError naming the task if one
    cannot be built here (unknown, or its data neither local nor cached)."""
    if not cfg.evaluation.in_loop.tasks:
        return None
    from dense_model.training.downstream import load_tasks  # imports lm-eval: only when used

    return load_tasks(cfg.evaluation.in_loop)


def plan_job_load(cfg: Config) -> LoadPlan:
    """What this job loads; a path that does not resolve, a broken tracker or a checkpoint of
    another model is a ConfigError (exit 2, before anything is written)."""
    try:
        return plan_run_load(cfg)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Pretrain a dense LLM on megatron-core. CONFIG is a YAML file (configs/); "
        "overrides are dotted key=value pairs, e.g. model.activation=polynorm training.lr=3e-4.",
    )
    parser.add_argument("config", nargs="?", help="YAML config (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    args.config, args.overrides = split_config_argument(args.config, args.overrides)
    return args


def _die_with_launcher() -> bool:
    """A torchrun worker is SIGKILLed when its agent dies, however it dies (torchrun starts workers
    in sessions of their own, so nothing else reaches them). False: the agent is already gone."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # started by hand: nobody to die with
        return True
    agent = os.getppid()  # if the agent died already, this is whoever adopted us: not torchrun
    return die_with_parent(agent) and is_torchrun_agent(agent)


def main(argv=None) -> int:
    if not _die_with_launcher():
        print("error: the torchrun agent that started this worker is gone; exiting", file=sys.stderr)
        return 1
    os.environ[WORKER_PID_ENV] = str(os.getpid())
    filter_known_warnings()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        plan_job_load(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    claim = None
    if int(os.environ.get("RANK", "0")) == 0:  # before anything writes into the run directory
        try:
            claim = RunDirClaim.acquire(cfg.run_dir)
        except RunDirBusy as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
    trainer = None
    try:
        trainer = Trainer(cfg, claim)
        trainer.fit()
        if claim is not None and claim.lost():
            raise RunDirLost(f"{claim.lost_reason}; relaunch to resume from the last checkpoint")
    except (ConfigError, TrainingDiverged, CheckpointError, FileNotFoundError, RunDirLost) as err:
        # Errors a user fixes (a config, a path, a diverged run): the message, without a traceback.
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        destroy_parallel()
        if claim is not None:
            claim.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
