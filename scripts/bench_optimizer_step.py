"""The optimizer step's share of a training step and the host reads it makes, with megatron-core's
fallback gradient-norm ops (no TE/apex) against ours (``dense_model.compat.multi_tensor``).

For each set of ops, the trainer's model, DDP and optimizer (``build_training_model``) run warmup +
timed steps: forward/backward (``dense_model.training.step.forward_backward``), ``optimizer.step()``
and the scheduler step. Inside the optimizer step the gradient norm (megatron-core's
``get_grad_norm_fp32``) and the Adam update (the torch optimizer's ``step``) are timed on their own
(synchronised on a GPU). Host reads (``item()``, ``float()``, ``torch.tensor`` of tensor scalars)
are counted with ``HostReads`` over one optimizer step, and within it the gradient norm's and the
Adam update's: a read of a device tensor is a host sync on a GPU; torch's (non-capturable) AdamW
keeps its step counters on the host, so the reads it makes of them are not.

    python scripts/bench_optimizer_step.py --config configs/1b/polynorm.yaml model.num_layers=4   # GPU
    python scripts/bench_optimizer_step.py --device cpu                   # tiny model: host reads, CPU times

With TE or apex installed both rows use their kernels (``ops`` says which were in use).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from megatron.core.optimizer import clip_grads  # noqa: E402
from megatron.core.optimizer import optimizer as moptimizer  # noqa: E402

from dense_model.benchmarking import fmt, markdown_table, metadata_lines, run_metadata, write_json  # noqa: E402
from dense_model.compat.multi_tensor import HostReads, install  # noqa: E402
from dense_model.config import load_config  # noqa: E402
from dense_model.parallel import initialize_parallel  # noqa: E402
from dense_model.testing import tiny_model_overrides  # noqa: E402
from dense_model.training.optim import build_scheduler, build_training_model  # noqa: E402
from dense_model.training.step import forward_backward  # noqa: E402
from scripts.bench_train_step import GPU_OVERRIDES, synthetic_batch  # noqa: E402

CPU_OVERRIDES = [
    *tiny_model_overrides(layers=4, seq=64),
    "training.micro_batch_size=2",
    "training.bf16=false",
]
# megatron-core's own ops as imported (its local fallback without TE/apex), before install() swaps them.
MEGATRON_OPS = (
    clip_grads.l2_norm_impl,
    clip_grads.multi_tensor_scale_impl,
    moptimizer.multi_tensor_scale_impl,
)


def use_ops(which: str) -> str:
    """Put megatron-core's ops ("megatron") or ours ("foreach") in place; the l2-norm op's name."""
    if which == "foreach":
        install()
    else:
        clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, moptimizer.multi_tensor_scale_impl = (
            MEGATRON_OPS
        )
    return f"{clip_grads.l2_norm_impl.__module__}.{clip_grads.l2_norm_impl.__name__}"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, seconds: list, reads: list):
    """``fn`` that appends its synchronised wall time to ``seconds``, its host reads to ``reads``."""

    def wrapper(*args, **kwargs):
        _sync()
        start = time.perf_counter()
        with HostReads() as counter:
            out = fn(*args, **kwargs)
        _sync()
        seconds.append(time.perf_counter() - start)
        reads.append(counter.count)
        return out

    return wrapper


def run(which: str, cfg, warmup: int, steps: int, device: str) -> dict:
    model, ddp, optimizer = build_training_model(cfg)
    ops = use_ops(which)
    scheduler = build_scheduler(optimizer, cfg)
    norm_s, adam_s, optim_s, step_s, norm_reads, adam_reads = [], [], [], [], [], []
    original_norm = moptimizer.get_grad_norm_fp32
    moptimizer.get_grad_norm_fp32 = timed(original_norm, norm_s, norm_reads)
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        sub.optimizer.step = timed(sub.optimizer.step, adam_s, adam_reads)
    batch = synthetic_batch(cfg, device)
    mbs, seq = cfg.training.micro_batch_size, cfg.model.seq_length
    reads = None
    try:
        for step in range(warmup + steps):
            if step == warmup:
                del norm_s[:], adam_s[:], optim_s[:], norm_reads[:], adam_reads[:]
            _sync()
            start = time.perf_counter()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward([ddp], iter([batch]), 1, seq, mbs)
            _sync()
            optim_start = time.perf_counter()
            with HostReads() as counter:
                optimizer.step()
            _sync()
            optim_s.append(time.perf_counter() - optim_start)
            scheduler.step(1)
            if step >= warmup:
                step_s.append(time.perf_counter() - start)
            reads = counter.count
    finally:
        moptimizer.get_grad_norm_fp32 = original_norm
    step_ms = 1e3 * statistics.median(step_s)
    return {
        "ops": ops,
        "params": sum(p.numel() for p in model.parameters()),
        "grad_tensors": sum(1 for p in model.parameters() if p.requires_grad),
        "host_reads_per_optimizer_step": reads,
        "host_reads_grad_norm": norm_reads[-1],
        "host_reads_adam": sum(adam_reads) // len(step_s),
        "step_ms": step_ms,
        "optimizer_ms": 1e3 * statistics.median(optim_s),
        "grad_norm_ms": 1e3 * statistics.median(norm_s),
        "adam_ms": 1e3 * sum(adam_s) / len(step_s),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML config (default: the built-in 1B defaults)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", default=None, help="write results as JSON here ('-': stdout)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_optimizer_step.py: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    initialize_parallel(1, 1, seed=1)
    overrides = (CPU_OVERRIDES if args.device == "cpu" else GPU_OVERRIDES) + args.overrides
    cfg = load_config(args.config, overrides)
    rows = {which: run(which, cfg, args.warmup, args.steps, args.device) for which in ("megatron", "foreach")}
    meta = run_metadata(device_arg=args.device)
    header = ["ops", "grad tensors", "host reads: opt step", "of which grad norm", "of which Adam"]
    header += ["step ms", "optimizer ms", "grad norm ms", "Adam ms", "optimizer share"]
    table = [
        [r["ops"], r["grad_tensors"], r["host_reads_per_optimizer_step"], r["host_reads_grad_norm"]]
        + [r["host_reads_adam"], fmt(r["step_ms"], ".1f")]
        + [fmt(r["optimizer_ms"], ".2f"), fmt(r["grad_norm_ms"], ".2f"), fmt(r["adam_ms"], ".2f")]
        + [f"{r['optimizer_ms'] / r['step_ms']:.1%}"]
        for r in rows.values()
    ]
    print(metadata_lines(meta))
    print(markdown_table(header, table))
    write_json(args.json, {"meta": meta, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
