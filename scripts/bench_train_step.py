"""Training-step throughput of the 1B model on one GPU: PolyNorm against SwiGLU, fused kernels on and off.

Each run builds the model from the config (``dense_model.config.load_config`` +
``dense_model.model.build_model``) and wraps it as the trainer does (``dense_model.training.optim``:
megatron-core DistributedDataParallel, the megatron optimizer: AdamW with fp32 master weights, the
distributed optimizer and grad clipping as configured), then times full optimizer steps (one
micro-batch of synthetic tokens) after warm-up: the trainer's own step (the forward/backward of
``dense_model.training.step``, the optimizer step, the LR scheduler step).

The protocol (issue 23: ten steps one run after the other cannot tell 1.03 from 1.07):
* interleaved: all runs are built in this one process and step in turn, A B C A B C ... (``--steps``
  timed steps each, default 30, after ``--warmup``), so clock and thermal drift hit every run alike;
  ``--isolate`` instead runs each in a child process of its own, one after the other (for runs
  that do not fit in memory together);
* timed with CUDA events on the GPU (``time.perf_counter`` on the CPU), the optimizer step apart;
* reported: min / median / inter-quartile range of the step, and beside the full single-GPU step
  the step with the optimizer's share divided by ``--dp-size`` (default 32: the 1B run's
  distributed optimizer shards Adam 32 ways), each with its MFU; the GPU's SM/memory clocks
  (before and after, from nvidia-smi) and the SDPA kernel torch picks at the model's shape.

Runs:

  swiglu                    (no fused kernel)
  polynorm  fused on        (model.fused_activation=true: the Triton kernels)
  polynorm  fused off       (model.fused_activation=false: the torch reference)

It reports tokens/s, step time, MFU and peak memory (a run's own: what it holds plus its step's
peak above that), and each run's median step time against swiglu's.
A run that does not fit is reported as OOM; with ``--fit-layers`` the layer count is halved until
the run fits and the table says how many layers ran.

MFU = tokens/s x FLOPs per token / peak FLOP/s. FLOPs per token come from the trainer's
``dense_model.training.metrics.flops_per_token`` (3 x forward matmul FLOPs including the logits,
plus 12 x layers x hidden x seq for attention scores and values, not halved for the causal mask);
elementwise work (norms, activations) is not counted, so a parameter-matched PolyNorm and SwiGLU
have the same FLOPs per token. Peak FLOP/s: --peak-tflops, else training.peak_flops from the
config, else the dense bf16 peak of the GPU model (``dense_model.training.metrics.PEAK_BF16_FLOPS``).

    python scripts/bench_train_step.py                                    # 1B defaults, seq 4096, mbs 2
    python scripts/bench_train_step.py --config configs/1b/polynorm.yaml --json step.json
    python scripts/bench_train_step.py --runs polynorm:on,polynorm:off    # a subset
    python scripts/bench_train_step.py --runs polynorm:on --attention local,sdpa   # attention backends
    python scripts/bench_train_step.py --device cpu                       # smoke run: tiny model, no timings

Extra ``key=value`` arguments are config overrides applied to every run (e.g.
``model.transformer_impl=transformer_engine``; that is the default here when Transformer Engine
imports, for its flash attention).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dense_model.benchmarking import (  # noqa: E402
    fmt,
    markdown_table,
    metadata_lines,
    require_cuda,
    run_isolated,
    run_metadata,
    write_json,
)
from dense_model.config import load_config  # noqa: E402
from dense_model.model import installed_kernels  # noqa: E402
from dense_model.parallel import initialize_parallel  # noqa: E402
from dense_model.testing import tiny_model_overrides  # noqa: E402
from dense_model.training.metrics import flops_per_token, peak_flops  # noqa: E402
from dense_model.training.optim import build_scheduler, build_training_model, torch_adams  # noqa: E402
from dense_model.training.step import forward_backward  # noqa: E402

# Benchmarks run without a tokenizer: the 1B model's vocabulary (the Llama tokenizer's) unless an
# override sets model.vocab_size (a config's tokenizer is not loaded).
GPU_OVERRIDES = ["model.vocab_size=32000"]
CPU_SMOKE_OVERRIDES = [*tiny_model_overrides(seq=32), "training.micro_batch_size=2", "training.bf16=false"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=None, help="YAML config (default: the built-in 1B defaults)")
    p.add_argument(
        "--runs",
        default="swiglu:na,polynorm:on,polynorm:off",
        help="comma-separated ACTIVATION:FUSED with FUSED in on/off/na (default: %(default)s)",
    )
    p.add_argument(
        "--attention",
        default="auto",
        help="comma-separated model.attention_backend values; every run once per backend (default: auto)",
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (interleaved)")
    p.add_argument(
        "--dp-size",
        type=int,
        default=32,
        help="data-parallel size the optimizer's share is divided by (default 32)",
    )
    p.add_argument("--num-layers", type=int, default=None, help="override model.num_layers")
    p.add_argument("--fit-layers", action="store_true", help="on OOM, halve the layers and retry")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke run of a tiny model")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as JSON ('-' for stdout)")
    p.add_argument(
        "--isolate",
        action="store_true",
        help="one child process per run, one after the other (not interleaved: for runs that do not "
        "fit in memory together); default: all runs interleaved in this process",
    )
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every run")
    return p.parse_args(argv)


def synthetic_batch(cfg, device):
    b, s = cfg.training.micro_batch_size, cfg.model.seq_length
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=gen)  # [b, s + 1]
    return {
        "tokens": tokens[:, :-1].contiguous().to(device),
        "labels": tokens[:, 1:].contiguous().to(device),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous().to(device),
        "loss_mask": torch.ones(b, s, device=device),
    }


class StepTimer:
    """Times of one step and of its optimizer part: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1e3 * (end - start)


class Run:
    """One run's model, optimizer and batch, stepped by ``step()``; its times and losses kept."""

    def __init__(self, args, cfg):
        self.cuda = args.device == "cuda"
        before = torch.cuda.memory_allocated() if self.cuda else 0
        # exactly the trainer's model, DDP and optimizer
        self.model, self.ddp, self.optimizer = build_training_model(cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.batch = synthetic_batch(cfg, args.device)
        self.cfg, self.timer = cfg, StepTimer(self.cuda)
        self.before = before
        self.resident = 0  # bytes this run holds between steps (weights, grads, Adam state)
        self.step_peak = 0  # the most its step allocated above everything resident
        self.losses, self.step_ms, self.optimizer_ms = [], [], []

    def step(self, timed: bool) -> None:
        mbs, seq = self.cfg.training.micro_batch_size, self.cfg.model.seq_length
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = self.timer.mark()
        self.ddp.zero_grad_buffer()  # as Trainer.train_step
        self.optimizer.zero_grad()
        reduced = forward_backward([self.ddp], iter([self.batch]), 1, seq, mbs)
        optim_start = self.timer.mark()
        applied, _, _ = self.optimizer.step()
        if applied:
            self.scheduler.step(1)
        end = self.timer.mark()
        loss_sum, tokens = reduced[0]["lm loss"].tolist()  # a host read: the step has finished
        self.losses.append(loss_sum / tokens)
        if self.cuda:
            torch.cuda.synchronize()
            self.step_peak = max(self.step_peak, torch.cuda.max_memory_allocated() - base)
        if timed:
            self.step_ms.append(self.timer.ms(start, end))
            self.optimizer_ms.append(self.timer.ms(optim_start, end))

    def result(self, dp_size: int) -> dict:
        cfg = self.cfg
        mbs, seq = cfg.training.micro_batch_size, cfg.model.seq_length
        out = {
            "num_layers": cfg.model.num_layers,
            "attention": type(self.model.decoder.layers[0].self_attention.core_attention).__name__,
            "recompute": self.model.config.recompute_granularity,
            "fused_adam": any(g.get("fused") for o in torch_adams(self.optimizer) for g in o.param_groups),
            "cross_entropy_fusion": self.model.config.cross_entropy_loss_fusion,
            "flops_per_token": flops_per_token(cfg),
            "loss_first": self.losses[0],
            "loss_last": self.losses[-1],
            "dp_size": dp_size,
        }
        if self.step_ms:
            shared = [s - o + o / dp_size for s, o in zip(self.step_ms, self.optimizer_ms)]
            out.update(
                step_ms=step_stats(self.step_ms),
                optimizer_ms=step_stats(self.optimizer_ms),
                step_ms_dp=step_stats(shared),
                step_ms_all=self.step_ms,
                optimizer_ms_all=self.optimizer_ms,
                tokens_per_s=mbs * seq / (statistics.median(self.step_ms) / 1e3),
                tokens_per_s_dp=mbs * seq / (statistics.median(shared) / 1e3),
            )
        if self.cuda:
            out["peak_mem_gib"] = (self.resident + self.step_peak) / 2**30
        return out

    def free(self) -> None:
        del self.model, self.ddp, self.optimizer, self.scheduler, self.batch


def step_stats(values: list[float]) -> dict:
    """min, median, quartiles and inter-quartile range of a list of times (ms)."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"min": min(values), "median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(values)}


def run_interleaved(args, cfgs: list) -> tuple[list, list[int]]:
    """Build every run, warm each up, then step them in turn (A B A B ...); (runs, schedule)."""
    runs = []
    for cfg in cfgs:
        run = Run(args, cfg)
        for _ in range(args.warmup):
            run.step(timed=False)
        if run.cuda:
            torch.cuda.synchronize()
            run.resident = torch.cuda.memory_allocated() - run.before
        runs.append(run)
    schedule = []
    for _ in range(args.steps):
        for i, run in enumerate(runs):
            run.step(timed=True)
            schedule.append(i)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return runs, schedule


def gpu_clocks() -> dict | None:
    """SM and memory clocks (current and max, MHz), power and temperature from nvidia-smi."""
    fields = "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,temperature.gpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return dict(zip(fields.split(","), (v.strip() for v in out.strip().split(","))))


def sdpa_backend(cfg) -> str | None:
    """The kernel torch's scaled_dot_product_attention runs at the model's shape (bf16, causal),
    read from the profiler's kernel names: flash, cudnn, efficient (memory-efficient) or math."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    m = cfg.model
    heads, dim = m.num_attention_heads, m.hidden_size // m.num_attention_heads
    q = torch.randn(
        cfg.training.micro_batch_size, heads, m.seq_length, dim, device="cuda", dtype=torch.bfloat16
    )
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.cuda.synchronize()
    names = " ".join(e.name.lower() for e in prof.events())
    for key, label in (
        ("cudnn", "cudnn"),
        ("flash", "flash"),
        ("efficient", "efficient"),
        ("fmha", "efficient"),
    ):
        if key in names:
            return label
    return "math"


def parse_runs(args) -> list[tuple[str, str, str]]:
    """(activation, fused, attention backend) per run."""
    runs = []
    for item in args.runs.split(","):
        act, _, fused = item.partition(":")
        fused = fused or "na"
        if fused not in ("on", "off", "na"):
            raise SystemExit(f"--runs: {item!r}: FUSED must be on, off or na")
        runs += [(act, fused, attention) for attention in args.attention.split(",")]
    return runs


def main(argv=None) -> int:
    args = parse_args(argv)
    require_cuda(
        "bench_train_step",
        args.device,
        "this benchmark needs a GPU (H100/H200); --device cpu runs a tiny model",
    )
    runs = parse_runs(args)
    if args.isolate and len(runs) > 1:
        argv = sys.argv[1:] if argv is None else argv
        outcomes = run_isolated(
            __file__, argv, [["--runs", f"{a}:{f}", "--attention", b] for a, f, b in runs]
        )
        meta = next((o["meta"] for o in outcomes if isinstance(o, dict)), run_metadata())
        meta["command"] = run_metadata()["command"]
        results = []
        for (act, fused, attention), outcome in zip(runs, outcomes):
            failed = {"activation": act, "fused": fused, "attention_backend": attention, "status": outcome}
            results += outcome["results"] if isinstance(outcome, dict) else [failed]
    else:
        meta, results = run_in_process(args, runs)
    reference = next((r for r in results if r["activation"] == "swiglu" and r.get("step_ms")), None)
    for r in results:
        if reference and r.get("step_ms") and r["num_layers"] == reference["num_layers"]:
            r["step_time_vs_swiglu"] = r["step_ms"]["median"] / reference["step_ms"]["median"]
            if r.get("peak_mem_gib") and reference.get("peak_mem_gib"):
                r["peak_mem_vs_swiglu"] = r["peak_mem_gib"] / reference["peak_mem_gib"]
    print(markdown(meta, results))
    write_json(args.json, {"meta": meta, "results": results})
    return 0


def run_in_process(args, runs):
    base = CPU_SMOKE_OVERRIDES.copy() if args.device == "cpu" else GPU_OVERRIDES.copy()
    if args.device == "cuda" and installed_kernels().transformer_engine:
        base.append("model.transformer_impl=transformer_engine")
    base += list(args.overrides)
    if args.num_layers:
        base.append(f"model.num_layers={args.num_layers}")

    first = load_config(args.config, base)
    initialize_parallel(1, 1, seed=first.training.seed)
    if args.peak_tflops:
        first.training.peak_flops = args.peak_tflops * 1e12
    peak = peak_flops(first)
    meta = run_metadata(
        config=args.config or "(built-in defaults)",
        overrides=base,
        peak_flops=peak,
        seq_length=first.model.seq_length,
        micro_batch_size=first.training.micro_batch_size,
        transformer_impl=first.model.transformer_impl,
        recompute=first.training.recompute_granularity,
        bf16=first.training.bf16 and args.device == "cuda",
    )
    meta["gpu_clocks_before"] = gpu_clocks() if args.device == "cuda" else None
    meta["sdpa_backend"] = sdpa_backend(first) if args.device == "cuda" else None
    meta.update(
        warmup=args.warmup,
        steps=args.steps,
        dp_size=args.dp_size,
        timer="cuda events" if args.device == "cuda" else "perf_counter",
    )
    cfgs, rows, per_run = [], [], []
    for act, fused, attention in runs:
        overrides = [*base, f"model.activation={act}", f"model.attention_backend={attention}"]
        if fused != "na":
            overrides.append(f"model.fused_activation={'true' if fused == 'on' else 'false'}")
        per_run.append(overrides)
        cfgs.append(load_config(args.config, overrides))
        rows.append({"activation": act, "fused": fused, "attention_backend": attention})
    while True:
        try:
            built, schedule = run_interleaved(args, cfgs)
            break
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            layers = cfgs[0].model.num_layers
            if not args.fit_layers or layers <= 1:
                for row in rows:
                    row["status"] = f"OOM at {layers} layers (runs together; --isolate runs them apart)"
                return meta, rows
            cfgs = [load_config(args.config, [*o, f"model.num_layers={layers // 2}"]) for o in per_run]
    meta["schedule"] = schedule
    meta["gpu_clocks_after"] = gpu_clocks() if args.device == "cuda" else None
    results = []
    for row, run in zip(rows, built):
        row.update(run.result(args.dp_size), status="ok")
        if row.get("tokens_per_s") and peak:
            row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
            row["mfu_dp"] = row["tokens_per_s_dp"] * row["flops_per_token"] / peak
        results.append(row)
        print(f"# {row['activation']} fused={row['fused']} attention={row['attention_backend']}: "
              f"{row.get('step_ms')}", file=sys.stderr, flush=True)  # fmt: skip
        run.free()
    return meta, results


def markdown(meta, results) -> str:
    peak = meta.get("peak_flops")
    clocks = meta.get("gpu_clocks_before") or {}
    after = meta.get("gpu_clocks_after") or {}
    header = [
        metadata_lines(meta),
        f"Config: {meta.get('config')}; seq {meta.get('seq_length')}, micro-batch {meta.get('micro_batch_size')}, "
        f"{meta.get('transformer_impl')}, recompute {meta.get('recompute')} (as asked; built: per run), "
        f"bf16 {meta.get('bf16')}; peak {fmt(peak and peak / 1e12, '.1f')} TFLOP/s",
        f"Protocol: {meta.get('warmup')} warm-up + {meta.get('steps')} timed steps per run, "
        f"{'interleaved in one process' if meta.get('schedule') else 'one process per run'}, "
        f"timed with {meta.get('timer')}; SDPA kernel: {meta.get('sdpa_backend') or 'n/a'}; "
        f"SM clock {clocks.get('clocks.sm', 'n/a')}/{clocks.get('clocks.max.sm', 'n/a')} MHz before, "
        f"{after.get('clocks.sm', 'n/a')} after; optimizer share divided by DP = {meta.get('dp_size')}",
        "",
    ]
    columns = ["activation", "fused", "attention", "layers", "step ms min / median / IQR", "optimizer ms"]
    columns += ["tokens/s", "MFU %", f"step ms, optimizer / {meta.get('dp_size')}", "MFU % (DP)", "peak GiB"]
    columns += ["time vs swiglu", "loss first -> last", "status"]
    rows = []
    for r in results:
        st, opt, dp = r.get("step_ms") or {}, r.get("optimizer_ms") or {}, r.get("step_ms_dp") or {}
        mfu, mfu_dp = r.get("mfu"), r.get("mfu_dp")
        loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if "loss_first" in r else "n/a"
        attention = (
            f"{r['attention_backend']} ({r['attention']})" if "attention" in r else r["attention_backend"]
        )
        timing = f"{fmt(st.get('min'), '.1f')} / {fmt(st.get('median'), '.1f')} / {fmt(st.get('iqr'), '.1f')}"
        rows.append(
            [r["activation"], r["fused"], attention, r.get("num_layers", "n/a"), timing,
             fmt(opt.get("median"), ".1f"), fmt(r.get("tokens_per_s"), ".0f"), fmt(mfu and 100 * mfu, ".1f"),
             fmt(dp.get("median"), ".1f"), fmt(mfu_dp and 100 * mfu_dp, ".1f"), fmt(r.get("peak_mem_gib"), ".2f"),
             fmt(r.get("step_time_vs_swiglu"), ".3f"), loss, r["status"]]
        )  # fmt: skip
    return "\n".join(header) + markdown_table(columns, rows)


if __name__ == "__main__":
    sys.exit(main())
