"""Log lines, metrics.jsonl, TensorBoard (and optionally Weights & Biases), and MFU.

A resumed run reads as one run: resuming from step N moves the records of earlier attempts past N
out of metrics.jsonl into ``metrics.attempt-K.jsonl`` (K = 1, 2, ... in the order they were
replaced; each record keeps its wall-clock time), and TensorBoard drops its events past N
(``purge_step``), so every step appears once.

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs per token (forward; training is 3x, and
activation recompute is not counted, the usual convention):
  attention  2*h*(h + 2*kv) [QKV] + 2*h*h [proj] + 4*s*h [scores and weighted sum, full s x s]
  MLP        2*h*F*(2 if gated else 1) [fc1] + 2*F*h [fc2]   (a parameter-matched PolyNorm MLP
             (F=8256) and SwiGLU (2x5504) cost the same matmul FLOPs; the activation's own
             elementwise work, tens of FLOPs per element, is left out as in Megatron-LM)
  logits     2*h*V
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from dense_model.activations import is_gated
from dense_model.config import Config, ffn_hidden_size, padded_vocab_size

# Dense bf16 tensor-core peaks (FLOP/s), by substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("H800", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
]


def flops_per_token(cfg: Config, training: bool = True) -> float:
    m = cfg.model
    h, s, layers = m.hidden_size, m.seq_length, m.num_layers
    kv = (m.num_query_groups or m.num_attention_heads) * (h // m.num_attention_heads)
    ffn = ffn_hidden_size(m)
    attention = 2 * h * (h + 2 * kv) + 2 * h * h + 4 * s * h
    mlp = 2 * h * ffn * (2 if is_gated(m.activation) else 1) + 2 * ffn * h
    if m.moe.num_experts:  # MoE: active parameters only (router, top-k experts, shared expert)
        from dense_model.moe import moe_mlp_flops_per_token

        mlp = moe_mlp_flops_per_token(m)
    logits = 2 * h * padded_vocab_size(m, 1)
    forward = layers * (attention + mlp) + logits
    return 3.0 * forward if training else float(forward)


def peak_flops(cfg: Config) -> float | None:
    if cfg.training.peak_flops:
        return cfg.training.peak_flops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def set_aside_records_after(metrics: Path, step: int) -> Path | None:
    """Move the records with a step past ``step`` (a killed attempt's) from ``metrics`` into the
    next free ``metrics.attempt-K.jsonl`` beside it; returns that file, or None if nothing moved."""
    if not metrics.is_file():
        return None
    keep, moved = [], []
    for line in metrics.read_text().splitlines(keepends=True):
        try:
            past = json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError):
            past = True  # a line torn by the kill: set aside too, so new records start clean
        (moved if past else keep).append(line)
    if not moved:
        return None
    k = 1
    while (aside := metrics.with_name(f"metrics.attempt-{k}.jsonl")).exists():
        k += 1
    aside.write_text("".join(moved))
    tmp = metrics.with_name(metrics.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, metrics)  # readers see the old file or the new one, never a half-written one
    return aside


class MetricsLogger:
    """Writes on the logging rank only: console line, metrics.jsonl, TensorBoard, wandb."""

    def __init__(self, cfg: Config, enabled: bool, resumed_from: int = 0):
        self.enabled = enabled
        self.cfg = cfg
        self.flops_per_token = flops_per_token(cfg)
        self.peak = peak_flops(cfg)
        self.tb = self.wandb = None
        self._file = None
        if not enabled:
            return
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        set_aside_records_after(run_dir / "metrics.jsonl", resumed_from)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_from + 1)
        if cfg.logging.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(run_dir), resume="allow")
            except ImportError:
                print(
                    "logging.wandb_project is set but wandb is not installed; pip install wandb", flush=True
                )

    def log_train(
        self,
        step,
        tokens,
        loss,
        lr,
        grad_norm,
        step_time,
        tokens_in_interval,
        world_size,
        skipped=0,
        extra=None,
    ):
        """``extra``: more scalars for the record and the line (the MoE router metrics)."""
        if not self.enabled:
            return
        tokens_per_sec = tokens_in_interval / max(step_time, 1e-9)
        record = {
            "step": step,
            "tokens": tokens,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "time": time.time(),
        }
        line = (
            f"step {step:>7d} | tokens {tokens:.3e} | loss {loss:.4f} | lr {lr:.3e} | "
            f"grad norm {grad_norm:.3f} | {tokens_per_sec:,.0f} tok/s"
        )
        if self.peak:
            record["mfu"] = tokens_per_sec * self.flops_per_token / (self.peak * world_size)
            line += f" | MFU {100 * record['mfu']:.1f}%"
        if skipped:
            record["skipped_steps"] = skipped
            line += f" | skipped {skipped}"
        for key, value in (extra or {}).items():
            record[key] = value
            line += f" | {key} {value:.4g}"
        self._write(record, line, prefix="train")

    def log_valid(self, step, tokens, loss):
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 50.0))
        record = {"step": step, "tokens": tokens, "val_loss": loss, "val_ppl": ppl, "time": time.time()}
        self._write(
            record, f"step {step:>7d} | validation loss {loss:.4f} | perplexity {ppl:.3f}", prefix="valid"
        )

    def log_valid_sets(self, step, tokens, losses: dict[str, float]):
        """One metrics.jsonl record {step, tokens, valid/NAME/loss, valid/NAME/ppl, ...} for the named
        validation sets (data.validation_sets), the same keys as TensorBoard and wandb scalars, and
        a console line per set."""
        if not self.enabled or not losses:
            return
        values = {}
        for name, loss in losses.items():
            values[f"valid/{name}/loss"] = loss
            values[f"valid/{name}/ppl"] = math.exp(min(loss, 50.0))
        self._file.write(json.dumps({"step": step, "tokens": tokens, **values, "time": time.time()}) + "\n")
        for name in losses:
            print(
                f"step {step:>7d} | validation {name} loss {values[f'valid/{name}/loss']:.4f} | "
                f"perplexity {values[f'valid/{name}/ppl']:.3f}",
                flush=True,
            )
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_downstream(self, step, tokens, values: dict[str, float], seconds: float, time_share: float):
        """One metrics.jsonl record {step, tokens, downstream/TASK/METRIC, ..., downstream/seconds,
        downstream/time_share} for an in-loop evaluation (evaluation.in_loop), the same keys as
        TensorBoard and wandb scalars, and one console line."""
        if not self.enabled:
            return
        scores = {f"downstream/{key}": value for key, value in values.items()}
        timing = {"downstream/seconds": seconds, "downstream/time_share": time_share}
        record = {"step": step, "tokens": tokens, **scores, **timing, "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        said = " | ".join(f"{key} {value:.4g}" for key, value in values.items())
        print(
            f"step {step:>7d} | downstream {said} | {seconds:.1f} s ({100 * time_share:.1f}% of wall time)",
            flush=True,
        )
        if self.tb is not None:
            for key, value in {**scores, **timing}.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({**scores, **timing}, step=step)

    def log_activation_stats(self, step, tokens, values: dict[str, float]):
        """One metrics.jsonl record {step, tokens, activation_stats: {layerL/name: value}} (see
        activation_stats.py) and TensorBoard scalars activation/layerL/name; no console line."""
        if not self.enabled or not values:
            return
        record = {"step": step, "tokens": tokens, "activation_stats": values, "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"activation/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"activation/{k}": v for k, v in values.items()}, step=step)

    def log_event(self, record: dict):
        """A record of something that happened to the run (``{"step", "event", ...}``, e.g. a
        schedule change on resume), in metrics.jsonl only."""
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")

    def _write(self, record, line, prefix):
        # The record first (the file is line-buffered): a step the log shows is in metrics.jsonl,
        # also when the job is killed right after printing it.
        self._file.write(json.dumps(record) + "\n")
        print(line, flush=True)
        step = record["step"]
        for key, value in record.items():
            if key in ("step", "time") or value is None:
                continue
            if self.tb is not None:
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.tb is not None:
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in record.items() if k != "time"}, step=step)

    def close(self):
        if self._file:
            self._file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
